#!/usr/bin/env python3
"""NFC test cases from CPython's unicodedata.normalize (an independent implementation of the same
algorithm) for tests/test_tokenizer.cpp: every code point with a canonical decomposition (alone and
in its NFD form, followed by a combining mark), conjoining Hangul jamo, and random sequences of
starters, combining marks (out of canonical order) and jamo.

Usage: python3 tools/tokenizer_ref/gen_nfc_cases.py > tests/data/tokenizer/nfc_cases.json
"""
import json
import random
import sys
import unicodedata as ud


def main():
    rng = random.Random(7)
    cases = []
    decomposable = [cp for cp in range(0x110000)
                    if not 0xD800 <= cp <= 0xDFFF and ud.decomposition(chr(cp))
                    and not ud.decomposition(chr(cp)).startswith("<")]
    for cp in decomposable:
        ch = chr(cp)
        cases.append(ch)
        cases.append(ud.normalize("NFD", ch) + "\u0323")
    marks = [cp for cp in range(0x300, 0x370)] + [0x0323, 0x0327, 0x0328, 0x093C, 0x05B0, 0x0E48, 0x3099, 0x309A]
    starters = [ord(c) for c in "aeiouAEIOUcnszCNSZwyWY"] + [0x3B1, 0x3B7, 0x3C9, 0x41, 0x915, 0x304B, 0x30AB, 0x1B05]
    jamo = list(range(0x1100, 0x1113)) + list(range(0x1161, 0x1176)) + list(range(0x11A8, 0x11C3))
    for _ in range(3000):
        s = []
        for _ in range(rng.randrange(1, 8)):
            r = rng.random()
            if r < 0.4:
                s.append(chr(rng.choice(starters)))
            elif r < 0.75:
                s.append(chr(rng.choice(marks)))
            elif r < 0.95:
                s.append(chr(rng.choice(jamo)))
            else:
                s.append(chr(rng.choice(decomposable)))
        cases.append("".join(s))
    out = [{"in": c, "nfc": ud.normalize("NFC", c)} for c in cases]
    json.dump({"unicode": ud.unidata_version, "cases": out}, sys.stdout, ensure_ascii=False, indent=0)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
