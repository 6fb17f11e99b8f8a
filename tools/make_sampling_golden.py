#!/usr/bin/env python3
"""HF transformers' sampling warpers on random logits, for tests/test_sampling.cpp.

Usage (with torch and transformers installed):
    python3 tools/make_sampling_golden.py --out tests/data/sampling/hf_warpers.json

For each case (temperature, top_k, top_p) the warpers run in the order generate() builds them
(GenerationMixin._get_logits_processor: temperature, then top-k, then top-p; min_tokens_to_keep 1)
on float32 logits of 64 tokens; the output keeps the scores that stay finite ("kept") and their
values. Rows: plain random logits, and rows with repeated values (ties at the top-k threshold).
"""
import argparse
import json

import torch
import transformers
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)


def warpers(temperature, top_k, top_p):
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        procs.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return procs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(1234)
    V = 64
    rows = [torch.randn(V, generator=g) * s for s in (0.5, 2.0, 4.0)]
    tied = torch.randn(V, generator=g).round()  # many equal values
    rows.append(tied)
    cases = []
    for temperature in (1.0, 0.6, 1.7):
        for top_k in (0, 1, 5, 20):
            for top_p in (1.0, 0.95, 0.5, 0.05):
                for ri, row in enumerate(rows):
                    if ri == 3 and top_p < 1.0:
                        continue  # torch.sort's order among ties is unspecified
                    scores = row.to(torch.float32).unsqueeze(0)
                    out = warpers(temperature, top_k, top_p)(torch.zeros(1, 1, dtype=torch.long), scores.clone())[0]
                    kept = torch.isfinite(out)
                    cases.append({"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                  "logits": row.tolist(), "kept": kept.tolist(),
                                  "scores": [float(x) if k else None for x, k in zip(out.tolist(), kept.tolist())]})
    with open(args.out, "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}, f)
    print(f"{len(cases)} cases -> {args.out}")


if __name__ == "__main__":
    main()
