#!/usr/bin/env python3
"""Compares two sets of token ids string by string.

Usage: compare_ids.py A B [texts.json]
A and B: a JSON array of id arrays, or a fixture {"cases": [{"text", "ids"}]} (its texts are used).
Prints the number of strings, of mismatches, and the first mismatches; exit 0 either way.
"""
import json
import sys


def load(path):
    j = json.load(open(path, encoding="utf-8"))
    if isinstance(j, dict):
        return [c["ids"] for c in j["cases"]], [c["text"] for c in j["cases"]]
    return j, None


def main():
    a, ta = load(sys.argv[1])
    b, tb = load(sys.argv[2])
    texts = json.load(open(sys.argv[3], encoding="utf-8")) if len(sys.argv) > 3 else (ta or tb)
    if len(a) != len(b):
        print(f"length differs: {len(a)} vs {len(b)}")
        return
    bad = [i for i in range(len(a)) if a[i] != b[i]]
    print(f"{len(a)} strings, {len(bad)} mismatches ({sys.argv[1]} vs {sys.argv[2]})")
    for i in bad[:8]:
        t = texts[i] if texts else "?"
        print(f"  #{i} text={json.dumps(t[:120], ensure_ascii=True)}\n    A={a[i][:40]}\n    B={b[i][:40]}")


if __name__ == "__main__":
    main()
