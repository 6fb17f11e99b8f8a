#!/usr/bin/env python3
"""Python side of the tokenizer benchmark (run by bench/tokenizer/run_device.sh).

  hf      HF tokenizers: one Tokenizer.encode call per string, one thread (as REFERENCE.md's figure),
          and encode_batch over all strings (Rayon, all cores).
  tiktoken  an Encoding built from Qwen3's own vocabulary (token bytes -> rank = id), pre-tokenizer
          regex and added tokens: encode per string on one thread, and encode_batch on all cores.
          Its ids are compared with HF's (tiktoken merges by rank of the merged token, HF by merge
          rank: they can differ).
Also writes HF's ids of the corpus (for the exactness check against qwentune) and checks the
committed transformers.js fixture against HF.

Usage: bench_py.py corpus.json tokenizer.json hf_ids_out.json results_out.json [reference_fixture.json]
"""
import json
import os
import sys
import time


def mb(texts):
    return sum(len(t.encode()) for t in texts) / 1e6


def timed(fn, repeat):
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def main():
    corpus_path, tok_path, hf_ids_out, results_out = sys.argv[1:5]
    fixture = sys.argv[5] if len(sys.argv) > 5 else None
    texts = json.load(open(corpus_path, encoding="utf-8"))
    size = mb(texts)
    results = {"corpus_strings": len(texts), "corpus_mb": size, "cpus": os.cpu_count()}

    import tokenizers
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(tok_path)
    results["hf_version"] = tokenizers.__version__
    dt, ids = timed(lambda: [hf.encode(t).ids for t in texts], 2)
    n_tok = sum(len(x) for x in ids)
    results["hf_single"] = {"s": dt, "mb_s": size / dt, "mtok_s": n_tok / dt / 1e6, "tokens": n_tok}
    with open(hf_ids_out, "w") as f:
        json.dump(ids, f)
    dt, batch = timed(lambda: [e.ids for e in hf.encode_batch(texts)], 2)
    results["hf_batch"] = {"s": dt, "mb_s": size / dt, "mtok_s": n_tok / dt / 1e6,
                           "same_ids": batch == ids}
    print("hf", json.dumps(results["hf_single"]), json.dumps(results["hf_batch"]), flush=True)

    if fixture:
        fx = json.load(open(fixture, encoding="utf-8"))
        bad = [c["text"] for c in fx["cases"] if hf.encode(c["text"]).ids != c["ids"]]
        results["fixture_vs_hf"] = {"cases": len(fx["cases"]), "mismatches": len(bad), "first": bad[:5]}
        print("fixture vs hf", json.dumps(results["fixture_vs_hf"], ensure_ascii=False), flush=True)

    try:
        import tiktoken
        tj = json.load(open(tok_path, encoding="utf-8"))
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        byte_of = {chr(c): b for b, c in zip(bs, cs)}
        ranks = {bytes(byte_of[ch] for ch in tokstr): i for tokstr, i in tj["model"]["vocab"].items()}
        specials = {a["content"]: a["id"] for a in tj["added_tokens"]}
        pat = tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
        enc = tiktoken.Encoding(name="qwen3-bpe", pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
        results["tiktoken_version"] = tiktoken.__version__
        dt, tids = timed(lambda: [enc.encode(t, allowed_special="all") for t in texts], 2)
        tn = sum(len(x) for x in tids)
        agree = sum(1 for a, b in zip(tids, ids) if a == b)
        results["tiktoken_single"] = {"s": dt, "mb_s": size / dt, "mtok_s": tn / dt / 1e6, "tokens": tn,
                                      "strings_equal_to_hf": agree}
        threads = os.cpu_count()
        dt, _ = timed(lambda: enc.encode_batch(texts, num_threads=threads, allowed_special="all"), 2)
        results["tiktoken_batch"] = {"s": dt, "mb_s": size / dt, "mtok_s": tn / dt / 1e6, "threads": threads}
        print("tiktoken", json.dumps(results["tiktoken_single"]), json.dumps(results["tiktoken_batch"]), flush=True)
    except Exception as e:  # report, keep the rest of the run
        results["tiktoken_error"] = repr(e)
        print("tiktoken failed:", repr(e), flush=True)

    with open(results_out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
