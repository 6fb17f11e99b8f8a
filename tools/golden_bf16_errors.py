"""HF transformers + PEFT in bfloat16 on the golden fixtures: how far a bf16 run is from the float64
expectations. Writes tests/golden/<case>/hf_bf16_errors.json for every dense case:

  {"software": {...}, "device": "...", "loss": rel, "logits": rel, "grad_worst": rel,
   "grads": {"<adapter tensor>.grad": rel, ...}, "grad_cosine": c}

with rel = ||x - ref|| / ||ref|| (Frobenius) against expected.safetensors. The run is what an HF user
gets in bf16: the model loaded with dtype=torch.bfloat16 from the case's F32 files, the PEFT adapter
loaded trainable and cast to bf16, sdpa attention, on the GPU when there is one; the loss is the
case's (mean cross-entropy of logits[:, :-1] against labels[:, 1:], -100 ignored) computed from the
bf16 logits upcast to float32, as transformers' loss does. tests/test_cuda_golden.cpp bounds the CUDA
engine's errors by a multiple of these.

    python3 tools/golden_bf16_errors.py --golden tests/golden
"""
import argparse
import json
import os

import torch


def rel(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    d, n = (x - ref).norm().item(), ref.norm().item()
    return d / n if n > 0 else (0.0 if d == 0 else float("inf"))


def run_case(case_dir, device):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(case_dir)
    if cfg.model_type == "qwen3_moe":
        return None  # dense cases only (the CUDA engine's MoE path is checked elsewhere)
    model = AutoModelForCausalLM.from_pretrained(case_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    pm = PeftModel.from_pretrained(model, os.path.join(case_dir, "adapter"), is_trainable=True)
    pm.to(device=device, dtype=torch.bfloat16)
    pm.train()  # LoRA dropout is 0 in the fixtures; train() only enables gradients as in training
    batch = json.load(open(os.path.join(case_dir, "batch.json")))
    ids = torch.tensor(batch["input_ids"], device=device)
    labels = torch.tensor(batch["labels"], device=device)
    logits = pm(input_ids=ids).logits
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    nll = -lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = (nll * keep).sum() / keep.sum()
    loss.backward()

    want = load_file(os.path.join(case_dir, "expected.safetensors"))
    out = {"loss": rel(loss.detach().reshape(1), want["loss"]), "logits": rel(logits.detach(), want["logits"]), "grads": {}}
    dot = n_got = n_want = 0.0
    for name, p in pm.named_parameters():
        if "lora_" not in name or p.grad is None:
            continue
        key = name.replace(".default", "") + ".grad"
        if key not in want:
            raise KeyError(f"{case_dir}: {key} not in expected.safetensors")
        g, w = p.grad.double().cpu(), want[key].double()
        out["grads"][key] = rel(g, w)
        dot += (g * w).sum().item()
        n_got += (g * g).sum().item()
        n_want += (w * w).sum().item()
    missing = [k for k in want if k.endswith(".grad") and k not in out["grads"]]
    if missing:
        raise KeyError(f"{case_dir}: PEFT produced no gradient for {missing[:3]}")
    out["grad_worst"] = max(out["grads"].values())
    out["grad_cosine"] = dot / (n_got * n_want) ** 0.5
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--golden", required=True)
    args = ap.parse_args()
    import peft
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    software = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    for case in sorted(os.listdir(args.golden)):
        d = os.path.join(args.golden, case)
        if not os.path.exists(os.path.join(d, "expected.safetensors")):
            continue
        res = run_case(d, device)
        if res is None:
            print(f"{case}: MoE, skipped")
            continue
        res = {"software": software, "device": name, **res}
        with open(os.path.join(d, "hf_bf16_errors.json"), "w") as f:
            json.dump(res, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"{case}: loss {res['loss']:.3g} logits {res['logits']:.3g} grad worst {res['grad_worst']:.3g} "
              f"cosine {res['grad_cosine']:.6f}")


if __name__ == "__main__":
    main()
