#!/usr/bin/env python3
"""Deterministic ~10 MB tokenizer benchmark corpus: a JSON array of ~30k strings.

About 6 MB of source code (the running Python's own standard library, files in sorted order, cut
into 12-line chunks) and about 4 MB of multilingual text (paragraphs assembled with a fixed seed from
the seed sentences (recombined word by word, or character by character for CJK and Thai), prose,
number, emoji and special-token generators of tools/tokenizer_ref/gen_corpus.py).
The code part depends on the Python version that runs this; run it where the benchmark runs.

Usage: python3 bench/tokenizer/make_corpus.py OUT.json [total_MB]
"""
import json
import os
import random
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools", "tokenizer_ref"))
import gen_corpus as g  # noqa: E402


def code_chunks(limit_bytes):
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__", "test", "tests"))
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    total = 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (UnicodeDecodeError, OSError):
            continue
        for i in range(0, len(lines), 12):
            chunk = "\n".join(lines[i:i + 12])
            if not chunk.strip():
                continue
            yield chunk
            total += len(chunk.encode())
            if total >= limit_bytes:
                return


# Languages written without spaces between words: sentences are drawn as runs of characters.
NO_SPACES = {"zh", "zh_trad", "ja", "th", "km", "my"}


def unit_pools():
    """Per language: the words (or, without spaces, the characters) of its seed sentences."""
    pools = {}
    for lang, sents in g.SCRIPTS.items():
        text = " ".join(sents)
        if lang in NO_SPACES:
            pools[lang] = [c for c in text if not c.isspace() and c not in "，。！？：“”「」、…"]
        else:
            pools[lang] = [w.strip(".,!?;:—…«»()\"“”") for w in text.split()]
            pools[lang] = [w for w in pools[lang] if w]
    return pools


def pseudo_sentence(rng, pools):
    """A new sentence in a random language from its words/characters, so that the text is not a
    handful of sentences repeated (which would flatter any tokenizer cache)."""
    lang = rng.choice(sorted(pools))
    units = pools[lang]
    n = rng.randrange(3, 25)
    sep = "" if lang in NO_SPACES else " "
    s = sep.join(rng.choice(units) for _ in range(n))
    end = "。" if lang in ("zh", "zh_trad", "ja") else rng.choice([".", "!", "?", ",", ""])
    return s + end


def text_paragraphs(limit_bytes, rng):
    pools = unit_pools()
    total = 0
    while total < limit_bytes:
        parts = []
        for _ in range(rng.randrange(1, 5)):
            r = rng.random()
            if r < 0.45:
                parts.append(pseudo_sentence(rng, pools))
            elif r < 0.75:
                parts.append(g.prose(rng, rng.randrange(5, 40)))
            elif r < 0.85:
                parts.append(g.number(rng))
            elif r < 0.93:
                parts.append(rng.choice(g.EMOJI))
            else:
                parts.append(g.special_case(rng))
        p = rng.choice([" ", "\n", " ", "\n\n"]).join(parts)
        total += len(p.encode())
        yield p


def main():
    out = sys.argv[1]
    total_mb = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    rng = random.Random(4242)
    texts = list(code_chunks(int(total_mb * 0.6e6))) + list(text_paragraphs(int(total_mb * 0.4e6), rng))
    rng.shuffle(texts)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(texts, f, ensure_ascii=False)
    print(f"corpus: {len(texts)} strings, {sum(len(t.encode()) for t in texts) / 1e6:.2f} MB -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
