#!/usr/bin/env python3
r"""Edge-case fixture from HF tokenizers itself (run where `tokenizers` is installed, e.g. the GPU
machine): characters on which transformers.js (the source of qwen3_reference.json) differs from HF
or may differ (U+0085, U+FEFF, U+180E, U+001C..U+001F, long s and Kelvin sign in contractions,
ligatures), characters assigned in Unicode 15/15.1 (newer than the PCRE2 tables), very long pieces,
controls, noncharacters, private use, zero-width characters, digits of many scripts, NFC next to
special tokens.

Each case: {"text", "ids", "pieces"} plus "nfc" = HF's decode(ids) when that differs from the text.
"pieces" are HF's pre-tokenizer pieces of the normalised text (added tokens not split out), in
byte-level form: they pin down the regex semantics (e.g. whether U+0085 is \s) even where the ids
would come out the same either way.
Cases listed in KNOWN_DIFFERENT carry "known_diff": a reason; the C++ test expects qwentune to
differ from HF on exactly those (so a change either way is noticed).

Usage: python3 tools/tokenizer_ref/hf_edge_cases.py data/qwen3-tokenizer/tokenizer.json OUT.json
"""
import json
import sys

CASES = [
    # White space per Oniguruma (Unicode White_Space) vs JavaScript / PCRE2.
    "\u0085abc", "\u180eabc", "\ufeffabc", "\x1cabc", "\x1fabc", "abc\u0085", "abc\u0085 ", "a\u0085\u0085b",
    "x\u0085 y", "\u0085\n", "\u2028abc", "\u00a0abc", "\u3000abc", "\u200babc", "a\u180e\u180e b",
    "a\u0085b", "\u0085", "x \u0085\u0085 y", "line1\u0085line2 ", "\u0085\n", " \u0085",
    "\ufeffHello", "a \ufeff b", "\ufeff\ufeff", "\ufeff",
    "a\u180eb", " \u180e ", "\u180e",
    "a\x1cb\x1dc\x1ed\x1fe", "\x1c \x1f", "x\x1c\x1c  y",
    "\u2028", "a\u2028b", "\u2029\u2029 c", "\u00a0\u00a0y", "\u3000\u3000x", "x\u2009\u2009", "\u200b\u200c\u200d\u2060",
    "a\x00b", "\x00", "\x7f\x80\x9f", "\t\x0b\x0c\r\n",
    # Case-insensitive contractions: Unicode case folding.
    "it'\u017f", "'\u017f", "'\u212a", "we'LL", "THEY'RE", "I'M", "'\ufb05", "'\ufb06", "'\u017ft", "x'S y'T",
    "'\u0130", "'\u0131", "\u2019s \u2019S",
    # Unicode 15 / 15.1 letters, digits and symbols (PCRE2 10.42 knows Unicode 14).
    "\U0001E030\U0001E031", "\U00011F04\U00011F05", "\U00031350\U00031351", "\U0001F6DC", "\u2FFC", "\u0CF3",
    "\U0001E4D0\U0001E4F0", "\U00011F50",
    # Noncharacters, private use, tags, variation selectors.
    "\uffff", "\U0010ffff", "\ue000\uf8ff", "\U000f0000", "\U000e0041\U000e007f", "\ufe0f", "a\u180bb",
    # Digits of many scripts and number forms.
    "\u0663\u0664\u0665", "\u0e51\u0e52\u0e53", "\U0001d7cf\U0001d7d0", "\u2460\u2461", "\u216b\u2169", "\u00b2\u00b3\u00b9",
    "12345678901234567890", "3.14159e-10", "\uff11\uff12",
    # NFC next to special tokens: normalisation happens between them.
    "<|im_end|>\u0338", "a<|im_end|>\u0301", "e\u0301<|im_start|>", ">\u0338", "<think>\u0301</think>",
    "\u1100\u1161\u11a8", "\u212b\u2126",
    # Combining marks after spaces and punctuation.
    " \u0301x", "!\u0301", "\u0301\u0302\u0303",
    # Long pieces (BPE heap path).
    " " * 5000, "a" * 10000, "\u4e2d\u6587" * 1500, "\U0001F600" * 1000, "ab" * 3000, "\n" * 3000,
    "\t" * 700 + "x", "x" + " " * 999 + "y", "1" * 4000, "\u0915\u094d\u0937" * 800,
]

KNOWN_DIFFERENT = {}


def main():
    from tokenizers import Tokenizer
    import tokenizers

    tok = Tokenizer.from_file(sys.argv[1])
    lines = []
    for text in CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        normalized = tok.normalizer.normalize_str(text) if tok.normalizer else text
        pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(normalized)]
        case = {"text": text, "ids": ids, "pieces": pieces}
        back = tok.decode(ids, skip_special_tokens=False)
        if back != text:
            case["nfc"] = back
        if text in KNOWN_DIFFERENT:
            case["known_diff"] = KNOWN_DIFFERENT[text]
        lines.append(json.dumps(case, ensure_ascii=False))
    meta = {"source": f"HF tokenizers {tokenizers.__version__}, add_special_tokens=False",
            "generator": "tools/tokenizer_ref/hf_edge_cases.py", "count": len(CASES)}
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write('{"meta": ' + json.dumps(meta) + ',\n"cases": [\n' + ",\n".join(lines) + "\n]}\n")
    print(f"wrote {len(CASES)} HF edge cases to {sys.argv[2]}", file=sys.stderr)


if __name__ == "__main__":
    main()
