#!/usr/bin/env python3
"""Writes tests/fixtures/nf4_bnb.safetensors: NF4 tensors in the bitsandbytes *-bnb-4bit layout.

The quantization is the documented bitsandbytes algorithm (quantize_4bit nf4, blocksize 64, double
quantization of absmax with the signed 8-bit dynamic map, blocksize 256, offset = mean) written
here in plain Python, independently of the C++ code: every fp32 operation is done in Python's
double and rounded to float32 with struct (one rounding of an exact or double-rounding-safe result,
so each step equals the fp32 operation). No numpy or torch needed.

Per tensor X the file holds X.input (the original values, in X's storage dtype), the bnb tensors
X.weight, X.weight.absmax, X.weight.quant_map, X.weight.nested_absmax, X.weight.nested_quant_map,
X.weight.quant_state.bitsandbytes__nf4 and X.dequantized (the documented dequantization, storage dtype).

--check-bnb (on a machine with torch, bitsandbytes and a CUDA GPU): quantizes the same inputs with
bitsandbytes.functional.quantize_4bit(compress_statistics=True, quant_type="nf4") and reports, per
tensor, whether each stored tensor equals bitsandbytes' bytes, and whether bitsandbytes'
dequantize_4bit of the fixture's state equals X.dequantized.
"""
import argparse
import json
import math
import struct
import sys


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bf16_round(x):
    (u,) = struct.unpack("<I", struct.pack("<f", x))
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", u))[0]


def f16_round(x):
    return struct.unpack("<e", struct.pack("<e", x))[0]


NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
NF4 = [f32(v) for v in NF4]
# bitsandbytes' dQuantizeNF4 decision tree thresholds (float32 literals), sorted ascending.
NF4_THRESHOLDS = [f32(v) for v in (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011)]


def nf4_code(x):
    # The tree is equivalent to: the number of thresholds strictly below x (NaN -> 0).
    if x != x:
        return 0
    return sum(1 for t in NF4_THRESHOLDS if x > t)


def linspace_f32(start, end, steps):
    start, end = f32(start), f32(end)
    step = f32(f32(end - start) / (steps - 1))
    half = steps // 2
    return [f32(start + f32(step * i)) if i < half else f32(end - f32(step * (steps - 1 - i)))
            for i in range(steps)]


def dynamic_map():
    data = []
    for i in range(7):
        b = linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = [f32(f32(b[k] + b[k + 1]) / 2.0) for k in range(len(b) - 1)]
        scale = f32(10.0 ** (i - 6))
        data += [f32(scale * m) for m in means]
        data += [f32(-scale * m) for m in means]
    data += [0.0, 1.0]
    data.sort()
    assert len(data) == 256
    return data


def dynamic_code(code, x):
    # bitsandbytes' dQuantize: a 7-step binary search from index 127 that ends on an even index p
    # with code[p-1] < x <= code[p+1], then the nearer of the two neighbours of x by the fp32
    # midpoint; a value exactly on a midpoint gets the even index p. Written here as a scan.
    if x != x:
        return 0
    below = max((k for k in range(256) if x > code[k]), default=-1)  # largest entry < x
    if below == -1:
        return 0
    if below == 255:
        return 255
    mid = f32(f32(code[below] + code[below + 1]) * 0.5)
    if x > mid:
        return below + 1
    if x < mid:
        return below
    return below if below % 2 == 0 else below + 1


def quantize(values, blocksize=64, nested_blocksize=256):
    n = len(values)
    nb = (n + blocksize - 1) // blocksize
    absmax, codes = [], bytearray((n + 1) // 2)
    for b in range(nb):
        block = values[b * blocksize:(b + 1) * blocksize]
        amax = max(abs(v) for v in block)
        absmax.append(amax)
        inv = f32(1.0 / amax) if amax != 0 else math.inf  # 1/0 = inf in fp32; 0 * inf = NaN below
        padded = block + [0.0] * (len(block) % 2)  # an odd tail's low nibble codes 0 * (1/absmax)
        for j in range(0, len(padded), 2):
            hi = nf4_code(f32(padded[j] * inv))
            lo = nf4_code(f32(padded[j + 1] * inv))
            codes[(b * blocksize + j) // 2] = (hi << 4) | lo
    total = 0.0
    for a in absmax:  # a plain left-to-right double sum (Python's sum() compensates since 3.12)
        total += a
    offset = f32(total / nb)
    centred = [f32(a - offset) for a in absmax]
    code = dynamic_map()
    nb2 = (nb + nested_blocksize - 1) // nested_blocksize
    nested_absmax, absmax_codes = [], bytearray(nb)
    for b2 in range(nb2):
        block = centred[b2 * nested_blocksize:(b2 + 1) * nested_blocksize]
        amax = max(abs(v) for v in block)
        nested_absmax.append(amax)
        inv = f32(1.0 / amax) if amax != 0 else math.inf
        for j, v in enumerate(block):
            x = f32(v * inv)
            absmax_codes[b2 * nested_blocksize + j] = dynamic_code(code, x)
    return dict(codes=bytes(codes), absmax_codes=bytes(absmax_codes), nested_absmax=nested_absmax,
                offset=offset, code=code)


def dequantize(q, n, blocksize=64, nested_blocksize=256):
    absmax = [f32(f32(q["code"][c] * q["nested_absmax"][b // nested_blocksize]) + q["offset"])
              for b, c in enumerate(q["absmax_codes"])]
    out = []
    for j in range(n):
        byte = q["codes"][j // 2]
        c = byte >> 4 if j % 2 == 0 else byte & 15
        out.append(f32(NF4[c] * absmax[j // blocksize]))
    return out


class Rng:  # xorshift64*, integer only (identical everywhere)
    def __init__(self, seed):
        self.s = seed or 1

    def next(self):
        s = self.s
        s ^= (s >> 12)
        s ^= (s << 25) & 0xFFFFFFFFFFFFFFFF
        s ^= (s >> 27)
        self.s = s
        return (s * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF

    def value(self):  # sum of 4 uniforms, centred, exact binary fraction, roughly normal, std ~0.02
        t = sum((self.next() >> 48) for _ in range(4)) - 2 * 65535
        return t / 2.0 ** 23


# name, shape, storage dtype, zero block index (or None), outlier positions
TENSORS = [
    ("odd", (7, 9), "bfloat16", None, [5]),
    ("zero_block", (48, 40), "bfloat16", 3, [100, 700]),
    ("many_blocks", (130, 129), "bfloat16", 17, [3, 9000, 16769]),
    ("half", (5, 13), "float16", None, [64]),
    ("single", (4, 16), "float32", None, []),
]

ROUND = {"bfloat16": bf16_round, "float16": f16_round, "float32": f32}
ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def pack(values, dtype):
    if dtype == "float32":
        return struct.pack(f"<{len(values)}f", *values)
    if dtype == "float16":
        return struct.pack(f"<{len(values)}e", *values)
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in values)


def build():
    tensors = {}  # name -> (st dtype, shape, bytes)
    inputs = {}
    for idx, (name, shape, dtype, zero_block, outliers) in enumerate(TENSORS):
        rng = Rng(1000 + idx)
        n = shape[0] * shape[1]
        vals = [rng.value() for _ in range(n)]
        if zero_block is not None:
            for j in range(zero_block * 64, min(n, zero_block * 64 + 64)):
                vals[j] = 0.0
        for k, j in enumerate(outliers):
            vals[j] = (0.75 + k) * (-1) ** k
        vals = [ROUND[dtype](v) for v in vals]
        inputs[name] = (vals, shape, dtype)
        q = quantize(vals)
        deq = [ROUND[dtype](v) for v in dequantize(q, n)]
        w = f"{name}.weight"
        state = {"quant_type": "nf4", "blocksize": 64, "dtype": dtype, "shape": list(shape),
                 "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": q["offset"]}
        state_bytes = json.dumps(state).encode("utf-8")
        tensors[f"{name}.input"] = (ST_DTYPE[dtype], list(shape), pack(vals, dtype))
        tensors[w] = ("U8", [(n + 1) // 2, 1], q["codes"])
        tensors[w + ".absmax"] = ("U8", [len(q["absmax_codes"])], q["absmax_codes"])
        tensors[w + ".quant_map"] = ("F32", [16], pack(NF4, "float32"))
        tensors[w + ".nested_absmax"] = ("F32", [len(q["nested_absmax"])], pack(q["nested_absmax"], "float32"))
        tensors[w + ".nested_quant_map"] = ("F32", [256], pack(q["code"], "float32"))
        tensors[w + ".quant_state.bitsandbytes__nf4"] = ("U8", [len(state_bytes)], state_bytes)
        tensors[f"{name}.dequantized"] = (ST_DTYPE[dtype], list(shape), pack(deq, dtype))
    return tensors, inputs


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def check_bnb(tensors, inputs):
    import torch
    import bitsandbytes.functional as F
    ok = True
    code = F.create_dynamic_map(signed=True)
    mine = torch.tensor(dynamic_map(), dtype=torch.float32)
    same_map = torch.equal(code.cpu(), mine)
    print(f"dynamic map equal to bitsandbytes.functional.create_dynamic_map(): {same_map}")
    if not same_map:
        diff = (code.cpu() != mine).nonzero().flatten().tolist()
        print(f"  {len(diff)} entries differ, e.g. index {diff[:5]}: bnb {code.cpu()[diff[:5]].tolist()} "
              f"fixture {mine[diff[:5]].tolist()}")
        ok = False
    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    for name, (vals, shape, dtype) in inputs.items():
        x = torch.tensor(vals, dtype=torch.float32).reshape(shape).to(tdt[dtype]).cuda()
        packed, st = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
        d = st.as_dict(packed=True)
        w = f"{name}.weight"
        got = {w: packed.cpu().contiguous().view(torch.uint8).flatten().numpy().tobytes()}
        for k, v in d.items():
            got[f"{w}.{k}"] = (v.cpu().contiguous().flatten().numpy().tobytes() if k != "quant_state.bitsandbytes__nf4"
                               else bytes(v.cpu().tolist()))
        for k, b in got.items():
            exp = tensors[k][2] if k in tensors else None
            same = exp == b
            ok &= same
            print(f"{name}: {k}: {'equal' if same else 'DIFFERENT'}"
                  + ("" if same or exp is None else f" ({len(b)} vs {len(exp)} bytes)"))
            if not same and k.endswith("quant_state.bitsandbytes__nf4"):
                print(f"  bnb:     {b.decode(errors='replace')}\n  fixture: {(exp or b'').decode(errors='replace')}")
        deq = F.dequantize_4bit(packed, st).cpu()
        exp = torch.frombuffer(bytearray(tensors[f"{name}.dequantized"][2]), dtype=tdt[dtype]).reshape(shape)
        same = torch.equal(deq.view(-1).view(torch.int16 if dtype != "float32" else torch.int32),
                           exp.view(-1).view(torch.int16 if dtype != "float32" else torch.int32))
        ok &= same
        print(f"{name}: dequantize_4bit of bnb's state equals the fixture's dequantized: {same}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/nf4_bnb.safetensors")
    ap.add_argument("--check-bnb", action="store_true")
    args = ap.parse_args()
    tensors, inputs = build()
    if args.check_bnb:
        sys.exit(0 if check_bnb(tensors, inputs) else 1)
    write_safetensors(args.out, tensors)
    print(f"wrote {args.out}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
