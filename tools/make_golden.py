#!/usr/bin/env python3
"""Golden fixtures: tiny random Qwen models + LoRA adapters, evaluated by HF transformers in float64.

Usage (on a machine with torch, transformers >= 5, peft, safetensors):
    PYTHONUNBUFFERED=1 python3 tools/make_golden.py --out tests/golden [--only CASE ...]

Per case directory (tests/golden/<case>/):
    config.json, model.safetensors          Hub layout, F32, per-expert names for qwen3_moe
    model_v5fused/, model_moefused/         (one MoE case) the same weights in the other two layouts
    adapter/adapter_config.json             written by PEFT (LoraConfig.save_pretrained)
    adapter/adapter_model.safetensors       PEFT names, F32; experts per-expert
    batch.json                              {"input_ids": [[..]], "labels": [[..]]}
    expected.safetensors                    F64: "loss" [1], "logits" (B,S,V), "<adapter name>.grad"

Every weight and adapter value is rounded to float32 before the float64 computation, so the F32 files
hold exactly the values HF used. Loss = mean over unmasked positions of the cross entropy of
logits[:, :-1] against labels[:, 1:] (-100 ignored), computed here in float64.

Dense LoRA (q,k,v,o and dense-MLP gate/up/down, all nn.Linear) goes through PEFT itself. transformers v5
keeps MoE experts as fused 3-D parameters that PEFT's target_modules cannot reach, so expert LoRA is
added with torch.nn.utils.parametrize: W_eff[e] = W[e] + scale * B_e @ A_e on gate_up_proj (gate rows
first) and down_proj, which equals y += scale * (x A_e^T) B_e^T.

HF numerics to be aware of: RMSNorm, RoPE cos/sin and the router softmax run in float32 inside HF even
for a float64 model, so these references are accurate to ~1e-7 relative, not to float64 precision.
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import traceback

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name, model_type, config overrides, LoRA (r, alpha, use_rslora), (B, S), label masking, seed,
# extra model layouts.
CASES = [
    dict(name="qwen2_bias_gqa", model_type="qwen2",
         cfg=dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
         lora=(4, 8, False), bs=(2, 12), mask=False, seed=101),
    dict(name="qwen2_tied_mha", model_type="qwen2",
         cfg=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rms_norm_eps=1e-5),
         lora=(2, 5, False), bs=(2, 10), mask=True, seed=202),
    dict(name="qwen3_headdim_gqa", model_type="qwen3",
         cfg=dict(vocab_size=384, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
         lora=(4, 16, False), bs=(2, 16), mask=True, seed=303),
    dict(name="qwen3_rslora", model_type="qwen3",
         cfg=dict(vocab_size=256, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
         lora=(4, 6, True), bs=(2, 8), mask=False, seed=404),
    dict(name="qwen3_moe_top2_norm", model_type="qwen3_moe",
         cfg=dict(vocab_size=300, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                  mlp_only_layers=[], tie_word_embeddings=False),
         lora=(2, 3, False), bs=(2, 12), mask=True, seed=505, extra_layouts=True),
    dict(name="qwen3_moe_mixed_top4", model_type="qwen3_moe",
         cfg=dict(vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=2,
                  mlp_only_layers=[3], tie_word_embeddings=False),
         lora=(3, 4, False), bs=(2, 12), mask=True, seed=606),
    dict(name="qwen3_moe_top1", model_type="qwen3_moe",
         cfg=dict(vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  num_experts=4, num_experts_per_tok=1, norm_topk_prob=False, decoder_sparse_step=1,
                  mlp_only_layers=[], tie_word_embeddings=False),
         lora=(2, 4, False), bs=(2, 12), mask=False, seed=707),
]

# A MoE case a bf16 engine can match: every token's k-th and (k+1)-th router logits differ by at
# least 5% of their size in every layer (a handful of tokens, so such a draw exists).
CASES.append(dict(name="qwen3_moe_bf16_routing", model_type="qwen3_moe",
                  cfg=dict(vocab_size=256, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                           mlp_only_layers=[], tie_word_embeddings=False),
                  lora=(2, 3, False), bs=(2, 6), mask=False, seed=808, min_rel_logit_gap=0.05))

ARCH = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def f32_round(t):
    """The float64 tensor holding exactly the float32-rounded values of t."""
    return t.float().double()


def randn(g, shape, std, mean=0.0):
    return f32_round(torch.randn(tuple(shape), generator=g, dtype=torch.float64) * std + mean)


def is_moe_layer(cfg, i):
    if cfg.model_type != "qwen3_moe":
        return False
    return i not in (cfg.mlp_only_layers or []) and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0


# ---------------------------------------------------------------------------------------------------
# Base weights: scales chosen so attention and routing are far from uniform.
#   qwen2 q/k (no qk-norm): std sqrt(2.5/H) -> score std ~ 2.5; qwen3 q_norm/k_norm weights ~1.4.
#   router std 2/sqrt(H) -> router logit std ~ 2. lm_head std 2.5/sqrt(H). Others 1/sqrt(fan_in).
# ---------------------------------------------------------------------------------------------------
def init_base_weights(model, cfg, g):
    H = cfg.hidden_size
    has_qk_norm = cfg.model_type in ("qwen3", "qwen3_moe")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                v = randn(g, p.shape, 0.2, 1.4)
            elif name.endswith("norm.weight"):  # input/post_attention layernorms, model.norm
                v = randn(g, p.shape, 0.1, 1.0)
            elif name.endswith("embed_tokens.weight"):
                v = randn(g, p.shape, 0.35 if cfg.tie_word_embeddings else 1.0)
            elif name == "lm_head.weight":
                v = randn(g, p.shape, 2.5 / math.sqrt(H))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                v = randn(g, p.shape, 1.0 / math.sqrt(H) if has_qk_norm else math.sqrt(2.5 / H))
            elif name.endswith("_proj.bias"):
                v = randn(g, p.shape, 0.2)
            elif name.endswith("mlp.gate.weight"):  # router (E, H)
                v = randn(g, p.shape, 2.0 / math.sqrt(H))
            elif name.endswith("experts.gate_up_proj"):  # (E, 2I, H)
                v = randn(g, p.shape, 1.0 / math.sqrt(p.shape[2]))
            elif name.endswith("experts.down_proj"):  # (E, H, I)
                v = randn(g, p.shape, 1.0 / math.sqrt(p.shape[2]))
            elif name.endswith(".weight") and p.dim() == 2:  # v/o projections, dense MLP
                v = randn(g, p.shape, 1.0 / math.sqrt(p.shape[1]))
            else:
                raise RuntimeError(f"no init rule for parameter {name} {tuple(p.shape)}")
            p.copy_(v)


# ---------------------------------------------------------------------------------------------------
# Expert LoRA through parametrize (stacked leaves A (E,r,in), B (E,out,r) per projection).
# ---------------------------------------------------------------------------------------------------
class GateUpLoraDelta(nn.Module):
    def __init__(self, a_gate, b_gate, a_up, b_up, scale):
        super().__init__()
        self.a_gate, self.b_gate = nn.Parameter(a_gate), nn.Parameter(b_gate)  # (E,r,H), (E,I,r)
        self.a_up, self.b_up = nn.Parameter(a_up), nn.Parameter(b_up)
        self.scale = scale

    def forward(self, w):  # w (E, 2I, H), gate rows first
        delta = torch.cat([torch.bmm(self.b_gate, self.a_gate), torch.bmm(self.b_up, self.a_up)], dim=1)
        return w + self.scale * delta


class DownLoraDelta(nn.Module):
    def __init__(self, a_down, b_down, scale):
        super().__init__()
        self.a_down, self.b_down = nn.Parameter(a_down), nn.Parameter(b_down)  # (E,r,I), (E,H,r)
        self.scale = scale

    def forward(self, w):  # w (E, H, I)
        return w + self.scale * torch.bmm(self.b_down, self.a_down)


def lora_b_std():
    return 0.05


def add_expert_lora(peft_model, cfg, r, scale, g):
    """Returns {PEFT per-expert name: (leaf param, expert index)} for A and B of every expert."""
    out = {}
    E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    for li, layer in enumerate(peft_model.base_model.model.model.layers):
        if not is_moe_layer(cfg, li):
            continue
        experts = layer.mlp.experts
        assert tuple(experts.gate_up_proj.shape) == (E, 2 * I, H), experts.gate_up_proj.shape
        assert tuple(experts.down_proj.shape) == (E, H, I), experts.down_proj.shape
        gu = GateUpLoraDelta(randn(g, (E, r, H), 1 / math.sqrt(H)), randn(g, (E, I, r), lora_b_std()),
                             randn(g, (E, r, H), 1 / math.sqrt(H)), randn(g, (E, I, r), lora_b_std()), scale)
        dn = DownLoraDelta(randn(g, (E, r, I), 1 / math.sqrt(I)), randn(g, (E, H, r), lora_b_std()), scale)
        parametrize.register_parametrization(experts, "gate_up_proj", gu)
        parametrize.register_parametrization(experts, "down_proj", dn)
        pre = f"base_model.model.model.layers.{li}.mlp.experts"
        for e in range(E):
            out[f"{pre}.{e}.gate_proj.lora_A.weight"] = (gu.a_gate, e)
            out[f"{pre}.{e}.gate_proj.lora_B.weight"] = (gu.b_gate, e)
            out[f"{pre}.{e}.up_proj.lora_A.weight"] = (gu.a_up, e)
            out[f"{pre}.{e}.up_proj.lora_B.weight"] = (gu.b_up, e)
            out[f"{pre}.{e}.down_proj.lora_A.weight"] = (dn.a_down, e)
            out[f"{pre}.{e}.down_proj.lora_B.weight"] = (dn.b_down, e)
    return out


# ---------------------------------------------------------------------------------------------------
# Checkpoint layouts
# ---------------------------------------------------------------------------------------------------
def base_state_f32(base_sd, cfg):
    sd = {}
    for k, v in base_sd.items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        sd[k] = v.detach().float().contiguous().clone()
    return sd


def to_hub_layout(sd, cfg):
    out = {}
    I = getattr(cfg, "moe_intermediate_size", 0)
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :I].contiguous().clone()
                out[f"{pre}{e}.up_proj.weight"] = v[e, I:].contiguous().clone()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = v[e].contiguous().clone()
        else:
            out[k] = v
    return out


def to_moefused_layout(sd, cfg):
    """transformers-qwen3-moe-fused: mlp.{gate,up,down}_proj.weight with shape (E, out, in)."""
    out = {}
    I = cfg.moe_intermediate_size
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("experts.gate_up_proj")]
            out[f"{pre}gate_proj.weight"] = v[:, :I].contiguous().clone()
            out[f"{pre}up_proj.weight"] = v[:, I:].contiguous().clone()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("experts.down_proj")]
            out[f"{pre}down_proj.weight"] = v.contiguous().clone()
        else:
            out[k] = v
    return out


def save_model_dir(path, cfg_json, tensors):
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(cfg_json)
    for v in tensors.values():
        assert v.dtype == torch.float32
    save_file(dict(sorted(tensors.items())), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------
# Diagnostics (asserted): attention far from uniform, routing far from uniform, top-k well separated,
# every expert used, LoRA changes the logits noticeably.
# ---------------------------------------------------------------------------------------------------
def attention_report(attentions):
    ratios, maxes, unif = [], [], []
    for a in attentions:  # (B, heads, S, S)
        S = a.shape[-1]
        rows = torch.arange(1, S)
        mx = a[:, :, 1:, :].amax(dim=-1)  # (B, heads, S-1)
        u = (1.0 / (rows + 1).double()).expand_as(mx)
        maxes.append(mx.mean().item())
        unif.append(u.mean().item())
        ratios.append((mx / u).mean().item())
    return dict(mean_max_prob=sum(maxes) / len(maxes), mean_uniform_prob=sum(unif) / len(unif),
                mean_ratio_to_uniform=sum(ratios) / len(ratios))


# Smallest allowed gap between the k-th and (k+1)-th routing probability of any token (no exact
# near-ties in float64; a bf16 engine needs far more: see min_rel_logit_gap). --min-topk-margin.
MIN_TOPK_MARGIN = 1e-4


def router_report(router_inputs, gates, cfg):
    k, E = cfg.num_experts_per_tok, cfg.num_experts
    rep = []
    for li, x in router_inputs.items():
        logits = x.reshape(-1, x.shape[-1]) @ gates[li].weight.detach().T  # (T, E)
        probs = torch.softmax(logits.double(), dim=-1)
        srt = probs.sort(dim=-1, descending=True).values
        margin = (srt[:, k - 1] - srt[:, k]).min().item() if k < E else 1.0
        # The gap between the k-th and (k+1)-th router logits relative to their size: what a bf16
        # engine must resolve to route as this float64 reference does (its router inputs carry the
        # relative error of the bf16 layers before, ~1e-2).
        lsrt = logits.double().sort(dim=-1, descending=True).values
        rel_gap = ((lsrt[:, k - 1] - lsrt[:, k]) / (lsrt[:, k - 1].abs() + lsrt[:, k].abs())).min().item() if k < E else 1.0
        top = probs.topk(k, dim=-1).indices
        counts = torch.bincount(top.reshape(-1), minlength=E).tolist()
        rep.append(dict(layer=li, mean_top1_prob=srt[:, 0].mean().item(), uniform=1.0 / E,
                        min_topk_margin=margin, min_rel_logit_gap=rel_gap, expert_token_counts=counts))
    return rep


# ---------------------------------------------------------------------------------------------------
def build_case(case, out_root, seed):
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    name, mt = case["name"], case["model_type"]
    r, alpha, rslora = case["lora"]
    B, S = case["bs"]
    g = torch.Generator().manual_seed(seed)

    cfg = AutoConfig.for_model(mt, **case["cfg"])
    cfg.use_cache = False
    cfg.architectures = [ARCH[mt]]
    cfg_for_disk = AutoConfig.for_model(mt, **case["cfg"])
    cfg_for_disk.architectures = [ARCH[mt]]
    cfg_for_disk.use_cache = False
    try:
        cfg_for_disk.dtype = torch.float32  # the files hold F32 weights
    except Exception:
        pass
    cfg_json = cfg_for_disk.to_json_string()  # what save_pretrained writes

    kw = dict(dtype=torch.float64)
    if mt == "qwen3_moe":
        kw["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa", **kw)
    model.to(torch.float64)
    model.eval()
    if mt == "qwen3_moe":
        impl = getattr(model.config, "_experts_implementation", None)
        assert impl == "eager", f"experts implementation is {impl!r}, want 'eager'"
    init_base_weights(model, cfg, g)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in base_sd.items():
        assert v.dtype == torch.float64, (k, v.dtype)
        assert torch.equal(v, f32_round(v)), f"{k} not f32-representable"

    # Batch
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    labels = ids.clone()
    if case["mask"]:
        labels[0, : S // 3] = -100                      # a masked prompt
        drop = torch.rand((S,), generator=g) < 0.3      # scattered masked positions
        labels[1, drop] = -100
        labels[1, S - 1] = ids[1, S - 1]
        assert (labels[:, 1:] != -100).sum() > 0

    # Diagnostic copy without LoRA, eager attention so the probabilities are visible.
    diag = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager", **kw)
    diag.to(torch.float64)
    diag.load_state_dict(base_sd)
    diag.eval()
    with torch.no_grad():
        dout = diag(input_ids=ids, output_attentions=True)
    assert dout.attentions is not None and len(dout.attentions) == cfg.num_hidden_layers, "no attention probs"
    att = attention_report(dout.attentions)
    logits_nolora = dout.logits.detach()
    del diag
    assert getattr(model.config, "_attn_implementation", "sdpa") == "sdpa", model.config._attn_implementation

    # PEFT LoRA on the nn.Linear modules
    lcfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0, bias="none",
                      target_modules=TARGETS, task_type="CAUSAL_LM")
    with peft_v5_moe_conversion_disabled():
        pm = get_peft_model(model, lcfg)
    pm.eval()
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    expect_modules = set()
    for li in range(cfg.num_hidden_layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expect_modules.add(f"base_model.model.model.layers.{li}.self_attn.{p}")
        if not is_moe_layer(cfg, li):
            for p in ("gate_proj", "up_proj", "down_proj"):
                expect_modules.add(f"base_model.model.model.layers.{li}.mlp.{p}")
    got_modules = set()
    with torch.no_grad():
        for mname, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and isinstance(getattr(mod, "lora_A"), nn.ModuleDict) and "default" in mod.lora_A:
                got_modules.add(mname)
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight  # (r,in), (out,r)
                assert abs(mod.scaling["default"] - scale) < 1e-15, (mname, mod.scaling["default"], scale)
                a.data = randn(g, a.shape, 1 / math.sqrt(a.shape[1]))
                b.data = randn(g, b.shape, lora_b_std())
    assert got_modules == expect_modules, f"PEFT wrapped {sorted(got_modules ^ expect_modules)} unexpectedly"
    sd = get_peft_model_state_dict(pm)
    params = dict(pm.named_parameters())
    adapter = {}  # PEFT name -> (leaf param, expert index or None)
    for k in sd:
        pname = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert pname in params and params[pname].requires_grad, k
        adapter[k] = (params[pname], None)
    assert len(adapter) == 2 * len(expect_modules), (len(adapter), len(expect_modules))
    if mt == "qwen3_moe":
        adapter.update(add_expert_lora(pm, cfg, r, scale, g))
    for n, p in pm.named_parameters():
        assert p.dtype == torch.float64, (n, p.dtype)

    # Forward (float64) with router-input capture, loss, backward
    router_inputs, gates, hooks = {}, {}, []
    if mt == "qwen3_moe":
        for li, layer in enumerate(pm.base_model.model.model.layers):
            if is_moe_layer(cfg, li):
                gates[li] = layer.mlp.gate
                hooks.append(layer.mlp.gate.register_forward_hook(
                    lambda m, inp, out, li=li: router_inputs.__setitem__(li, inp[0].detach())))
    out = pm(input_ids=ids)
    for h in hooks:
        h.remove()
    logits = out.logits
    assert logits.dtype == torch.float64 and tuple(logits.shape) == (B, S, cfg.vocab_size), (logits.dtype, logits.shape)
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    nll = -lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = (nll * keep).sum() / keep.sum()
    loss.backward()

    lora_effect = ((logits.detach() - logits_nolora).norm() / logits_nolora.norm()).item()
    diag_info = dict(case=name, seed=seed, loss=loss.item(), unmasked_targets=int(keep.sum()),
                     attention=att, lora_logit_effect=lora_effect, lora_scale=scale)
    if mt == "qwen3_moe":
        diag_info["router"] = router_report(router_inputs, gates, cfg)

    # Checks (raise -> the caller retries with another seed)
    problems = []
    if att["mean_ratio_to_uniform"] < 1.5:
        problems.append(f"attention too uniform: {att}")
    if lora_effect < 1e-3:
        problems.append(f"LoRA barely changes logits: {lora_effect}")
    for rr in diag_info.get("router", []):
        if rr["mean_top1_prob"] < 2.0 / cfg.num_experts:
            problems.append(f"routing too uniform: {rr}")
        if rr["min_topk_margin"] < MIN_TOPK_MARGIN:
            problems.append(f"top-k near tie: {rr}")
        if rr["min_rel_logit_gap"] < case.get("min_rel_logit_gap", 0.0):
            problems.append(f"top-k logits closer than a bf16 engine resolves: {rr}")
        if min(rr["expert_token_counts"]) == 0:
            problems.append(f"an expert gets no token: {rr}")
    grads = {}
    for k, (p, e) in sorted(adapter.items()):
        gr = p.grad
        assert gr is not None, f"no gradient for {k}"
        gr = gr[e] if e is not None else gr
        if gr.norm().item() == 0:
            problems.append(f"zero gradient for {k}")
        grads[k] = gr.detach().clone()
    diag_info["grad_norm_min"] = min(v.norm().item() for v in grads.values())
    diag_info["grad_norm_max"] = max(v.norm().item() for v in grads.values())
    diag_info["n_adapter_tensors"] = len(adapter)
    if problems:
        raise ValueError("; ".join(problems))

    # Write the fixture
    d = os.path.join(out_root, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    fused_sd = base_state_f32(base_sd, cfg)
    save_model_dir(d, cfg_json, to_hub_layout(fused_sd, cfg))
    if case.get("extra_layouts"):
        save_model_dir(os.path.join(d, "model_v5fused"), cfg_json, fused_sd)
        save_model_dir(os.path.join(d, "model_moefused"), cfg_json, to_moefused_layout(fused_sd, cfg))
    ad = os.path.join(d, "adapter")
    os.makedirs(ad)
    lcfg_disk = pm.peft_config["default"]
    lcfg_disk.base_model_name_or_path = f"tests/golden/{name}"
    lcfg_disk.save_pretrained(ad)
    with open(os.path.join(ad, "adapter_config.json")) as f:
        ac = json.load(f)
    assert set(ac["target_modules"]) == set(TARGETS), ac["target_modules"]
    assert not ac.get("target_parameters") and not ac.get("rank_pattern") and not ac.get("alpha_pattern"), ac
    ac["target_modules"] = sorted(ac["target_modules"])  # PEFT writes a set: fix the order
    with open(os.path.join(ad, "adapter_config.json"), "w") as f:
        json.dump(ac, f, indent=2, sort_keys=True)
    ad_tensors = {}
    for k, (p, e) in adapter.items():
        v = p.detach()[e] if e is not None else p.detach()
        assert torch.equal(v, f32_round(v)), k
        ad_tensors[k] = v.float().contiguous().clone()
    save_file(dict(sorted(ad_tensors.items())), os.path.join(ad, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(d, "batch.json"), "w") as f:
        json.dump({"input_ids": ids.tolist(), "labels": labels.tolist()}, f)
    exp = {"loss": loss.detach().reshape(1).clone(), "logits": logits.detach().contiguous().clone()}
    for k, v in grads.items():
        exp[k + ".grad"] = v.contiguous()
    meta = dict(case=name, torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                seed=str(seed))
    save_file(exp, os.path.join(d, "expected.safetensors"), metadata=meta)
    if mt == "qwen3_moe" and all(is_moe_layer(cfg, i) for i in range(cfg.num_hidden_layers)):
        diag_info["peft_v5_load_crosscheck"] = peft_load_crosscheck(cfg, kw, base_sd, ad, ids, logits.detach())
    if mt == "qwen3_moe":  # the routing margins, for engines that compute in bf16 (test_cuda_golden)
        with open(os.path.join(d, "routing.json"), "w") as f:
            json.dump(dict(router=diag_info["router"]), f, indent=1, sort_keys=True)
            f.write("\n")
    return diag_info


def peft_load_crosscheck(cfg, kw, base_sd, adapter_dir, ids, logits):
    """Independent check of the expert LoRA semantics: PEFT's own v5 loader converts the per-expert adapter
    into fused target_parameters; its logits should equal ours. Returns the relative difference or an error."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        m2 = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa", **kw)
        m2.to(torch.float64)
        m2.load_state_dict(base_sd)
        m2.eval()
        pm2 = PeftModel.from_pretrained(m2, adapter_dir)
        pm2.to(torch.float64)
        pm2.eval()
        with torch.no_grad():
            l2 = pm2(input_ids=ids).logits
        return ((l2 - logits).norm() / logits.norm()).item()
    except Exception as e:  # informational only
        return f"error: {type(e).__name__}: {str(e)[:300]}"


class peft_v5_moe_conversion_disabled:
    """PEFT >= 0.19 on transformers v5 rewrites target_modules gate_proj/up_proj/down_proj of MoE models into
    target_parameters of the fused experts (and then drops those names for dense MLP layers as well). We want
    plain nn.Linear LoRA from PEFT and add expert LoRA ourselves, so the conversion is switched off while
    get_peft_model runs."""
    NAME = "convert_peft_config_for_transformers"

    def __enter__(self):
        try:
            import peft.utils.transformers_weight_conversion  # noqa: F401  (so lazy imports see the patch)
        except ImportError:
            pass
        self.saved = []
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("peft") and hasattr(mod, self.NAME):
                self.saved.append((mod, getattr(mod, self.NAME)))
                setattr(mod, self.NAME, lambda *a, **k: None)
        return self

    def __exit__(self, *exc):
        for mod, fn in self.saved:
            setattr(mod, self.NAME, fn)
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--tries", type=int, default=4)
    ap.add_argument("--min-topk-margin", type=float, default=1e-4)
    args = ap.parse_args()
    global MIN_TOPK_MARGIN
    MIN_TOPK_MARGIN = args.min_topk_margin
    import transformers
    import peft
    torch.manual_seed(0)
    print(json.dumps(dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)))
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for case in CASES:
        if args.only and case["name"] not in args.only:
            continue
        for t in range(args.tries):
            seed = case["seed"] + 1000 * t
            try:
                info = build_case(case, args.out, seed)
                print(json.dumps(info))
                break
            except ValueError as e:
                print(f"# {case['name']} seed {seed}: check failed: {e}")
            except Exception:
                traceback.print_exc()
                failed.append(case["name"])
                break
        else:
            failed.append(case["name"])
    if failed:
        print("FAILED:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
