#!/usr/bin/env python3
"""Deterministic tokenizer test corpus (>= 2,000 strings) for the exactness fixture.

Categories: source code in several languages, English prose with contractions, whitespace runs,
numbers, many scripts (CJK, kana, Hangul, Arabic, Hebrew, Devanagari, Thai, Cyrillic, Greek, ...),
emoji (ZWJ, flags, skin tones, keycaps), combining marks and NFC cases (decomposed text, reordered
marks, conjoining Hangul jamo, singletons), fullwidth forms, Qwen special tokens written inline,
and random mixtures of all of these.

Characters on which the reference encoder (transformers.js, JavaScript regexes) is known to differ
from HF tokenizers (Oniguruma) are left out here and covered by edge_cases.py instead: U+0085 and
U+FEFF (JavaScript's \\s differs), U+017F and U+212A (case-insensitive contractions), and characters
assigned after Unicode 14 (the PCRE2 tables).

Usage: python3 tools/tokenizer_ref/gen_corpus.py > /tmp/corpus.json
"""
import json
import random
import sys

SEED = 20261124

CODE = [
    '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    seq = [0, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]


if __name__ == "__main__":
    print(fibonacci(20))  # 0 1 1 2 3 5 ...
''',
    '''#include <vector>
#include <cstdio>

template <typename T>
T sum(const std::vector<T>& xs) {
\tT total{};
\tfor (const auto& x : xs) total += x;
\treturn total;
}

int main(int argc, char** argv) {
\tstd::printf("%d\\n", sum<int>({1, 2, 3}));
\treturn argc > 1 ? 1 : 0;
}
''',
    '''fn main() {
    let words = vec!["alpha", "beta", "gamma"];
    let joined: String = words.iter().map(|w| w.to_uppercase()).collect::<Vec<_>>().join("-");
    println!("{joined} has {} chars", joined.len());
    match joined.as_str() {
        "" => unreachable!(),
        s if s.starts_with('A') => println!("starts with A"),
        _ => {}
    }
}
''',
    '''const fetchJson = async (url, { retries = 3 } = {}) => {
  for (let i = 0; i < retries; i++) {
    try {
      const res = await fetch(url);
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      return await res.json();
    } catch (err) {
      console.warn(`attempt ${i + 1} failed:`, err?.message ?? err);
    }
  }
  return null;
};
''',
    '''package main

import (
\t"fmt"
\t"strings"
)

func main() {
\tparts := strings.Split("a,b,,c", ",")
\tfor i, p := range parts {
\t\tfmt.Printf("%d:%q\\n", i, p)
\t}
}
''',
    '''public final class Greeter {
    private final String name;

    public Greeter(String name) { this.name = name; }

    @Override
    public String toString() {
        return "Hello, " + name + "!";
    }
}
''',
    '''SELECT u.id, u.email, COUNT(o.id) AS orders
FROM users AS u
LEFT JOIN orders o ON o.user_id = u.id AND o.created_at >= '2024-01-01'
WHERE u.deleted_at IS NULL
GROUP BY u.id, u.email
HAVING COUNT(o.id) > 3
ORDER BY orders DESC
LIMIT 50;
''',
    '''<!DOCTYPE html>
<html lang="en">
  <head><meta charset="utf-8"><title>Test &amp; page</title></head>
  <body>
    <div class="card" data-id="42">
      <p>Price: &euro;12.50 &mdash; <b>sale</b></p>
    </div>
  </body>
</html>
''',
    '''{
  "name": "qwentune",
  "version": "0.1.0",
  "dependencies": {"fmt": ">=9", "nlohmann_json": "3.11.2"},
  "tags": ["lora", "qwen", "moe"],
  "enabled": true,
  "ratio": 0.125,
  "nested": {"empty": [], "null": null}
}
''',
    '''#!/usr/bin/env bash
set -euo pipefail
for f in "$@"; do
  if [[ -f "$f" ]]; then
    wc -l -- "$f" | awk '{print $1}'
  else
    echo "missing: $f" >&2
  fi
done
''',
    '''\\begin{equation}
  \\mathcal{L}(\\theta) = -\\sum_{t=1}^{T} \\log p_\\theta(x_t \\mid x_{<t}) + \\lambda \\|\\theta\\|_2^2
\\end{equation}
''',
    '''  - name: Run tests
    run: |
      cmake -S . -B build -G Ninja
      ninja -C build
      ctest --test-dir build --output-on-failure
    env:
      CC: clang
      CXX: clang++
''',
    '''(defun square (x) (* x x))
(mapcar #'square '(1 2 3 4))
;; => (1 4 9 16)
''',
    '''diff --git a/src/main.c b/src/main.c
@@ -1,5 +1,6 @@
 #include <stdio.h>
+#include <stdlib.h>
 int main(void) {
-    printf("hi\\n");
+    puts("hi");
 }
''',
]

ENGLISH_WORDS = ("the of and to in is was for on that with as by at from it this be are have not "
                 "but had his they you were their one all we can her has there been if more when will "
                 "would who so no model token training data learning rate batch gradient weight layer "
                 "attention expert router memory kernel throughput latency benchmark figure table result "
                 "Paris London Tokyo Alice Bob NASA GPU CPU API JSON HTTP URL iPhone McDonald O'Brien "
                 "well-known state-of-the-art e.g. i.e. etc. Mr. Dr. U.S.A.").split()
CONTRACTIONS = ["it's", "don't", "they're", "we've", "I'm", "you'll", "she'd", "IT'S", "DON'T", "THEY'RE",
                "We'Ve", "I'M", "YOU'LL", "SHE'D", "John's", "JOHN'S", "can't", "won't", "'tis", "rock'n'roll",
                "it’s", "don’t", "'s", "'S", "'t", "'T", "'re", "'RE", "'ve", "'VE", "'m", "'M", "'ll", "'LL",
                "'d", "'D", "''s", "x's", "5's", "'s's"]

SCRIPTS = {
    "zh": ["我们今天去公园散步，天气非常好。", "机器学习是人工智能的一个分支。", "这个模型有三百亿个参数，但每次只激活三十亿。",
           "请把文件保存到桌面上。", "北京是中华人民共和国的首都。", "他说：“你好，世界！”", "数据集包含一万两千条对话。"],
    "zh_trad": ["電腦軟體開發需要耐心與細心。", "臺灣的夜市非常熱鬧。", "學習語言最重要的是堅持。"],
    "ja": ["今日はとても良い天気ですね。", "私は東京に住んでいます。", "カタカナとひらがなを混ぜて書きます。",
           "このプログラムはメモリを節約します。", "ラーメンを食べに行きませんか？", "「こんにちは」と彼女は言った。"],
    "ko": ["안녕하세요, 만나서 반갑습니다.", "한국어는 한글로 씁니다.", "이 모델은 매우 빠릅니다.",
           "서울의 겨울은 춥습니다.", "데이터를 불러오는 중입니다…"],
    "ar": ["مرحبا بالعالم، كيف حالك اليوم؟", "اللغة العربية جميلة جداً.", "تعلم الآلة فرع من الذكاء الاصطناعي.",
           "القاهرة عاصمة مصر.", "وُلِدَ الشاعرُ في القرنِ العاشرِ."],
    "he": ["שלום עולם, מה שלומך?", "העברית נכתבת מימין לשמאל.", "ירושלים היא עיר עתיקה."],
    "hi": ["नमस्ते, आप कैसे हैं?", "भारत एक विशाल देश है।", "मशीन लर्निंग कृत्रिम बुद्धिमत्ता का हिस्सा है।",
           "क्षत्रिय और ज्ञान शब्दों में संयुक्ताक्षर हैं।"],
    "th": ["สวัสดีครับ ยินดีที่ได้รู้จัก", "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ", "กรุงเทพมหานครเป็นเมืองหลวง"],
    "ru": ["Привет, мир! Как дела?", "Машинное обучение — это раздел искусственного интеллекта.",
           "Москва — столица России.", "ЁЖИК В ТУМАНЕ, ёжик в тумане."],
    "uk": ["Київ — столиця України.", "Ґанок, їжак, єнот і щука."],
    "el": ["Γειά σου κόσμε!", "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.", "ΑΒΓΔΕ αβγδε ς ΐ ΰ"],
    "vi": ["Tiếng Việt có nhiều dấu thanh.", "Hà Nội là thủ đô của Việt Nam.", "Người ta nói rằng học không bao giờ muộn."],
    "de": ["Die Straße ist sehr groß und schön.", "Grüße aus München! Übermorgen fahren wir.", "ÄÖÜ äöü ẞ ß"],
    "fr": ["L'été dernier, nous sommes allés à la plage.", "Ça coûte 12,50 € — c'est très cher !", "Où est l'hôpital ?"],
    "es": ["¿Dónde está la biblioteca? ¡Allí!", "El niño comió piña y jamón.", "Mañana será otro día."],
    "tr": ["İstanbul'da yaşıyorum, ılık bir gün.", "Işık ve ışık farklı yazılır."],
    "pl": ["Zażółć gęślą jaźń.", "Łódź jest dużym miastem."],
    "am": ["ሰላም ለዓለም።", "አማርኛ በግዕዝ ፊደል ይጻፋል።"],
    "ka": ["გამარჯობა, მსოფლიო!", "საქართველო ლამაზი ქვეყანაა."],
    "hy": ["Բարեւ աշխարհ։", "Երեւանը Հայաստանի մայրաքաղաքն է։"],
    "bn": ["আমি বাংলায় গান গাই।", "ঢাকা বাংলাদেশের রাজধানী।"],
    "ta": ["வணக்கம் உலகம்!", "தமிழ் ஒரு பழமையான மொழி."],
    "fa": ["سلام دنیا! حال شما چطور است؟", "تهران پایتخت ایران است."],
    "ur": ["سلام دنیا، آپ کیسے ہیں؟"],
    "my": ["မင်္ဂလာပါ ကမ္ဘာလောက"],
    "km": ["សួស្តី​ពិភពលោក"],
    "mn": ["Сайн байна уу? Монгол улс."],
}

EMOJI = ["😀", "😂", "🥲", "❤️", "👍", "👍🏻", "👍🏽", "👍🏿", "👨‍👩‍👧‍👦", "👩‍💻", "🧑🏽‍💻", "👨🏿‍🦰", "🏳️‍🌈", "🏴‍☠️",
         "🇺🇸", "🇯🇵", "🇩🇪", "🇨🇳", "🇧🇷", "🇺🇦", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "1️⃣", "#️⃣", "*️⃣", "©️", "™️", "☺️", "✌🏼",
         "🤷‍♀️", "🙋🏾‍♂️", "👁️‍🗨️", "🐈‍⬛", "🐕‍🦺", "🫠", "🧠", "🚀", "🔥", "💯", "🎉", "🍣", "⚽", "🇦🇶"]

COMBINING = [
    "e\u0301", "E\u0301", "a\u0300", "o\u0308", "u\u0308", "n\u0303", "c\u0327", "A\u030a", "a\u0323\u0302",
    "a\u0302\u0323", "q\u0307\u0323", "q\u0323\u0307", "o\u031b\u0301", "e\u0302\u0301", "\u1100\u1161",
    "\u1100\u1161\u11a8", "\u1112\u1161\u11ab\u1100\u1173\u11af", "\u212b", "\u2126", "\u0958", "\u0344",
    "\u0f73", "\u00c5\u0301", "Z\u0335\u0358\u0322a\u0337\u0341l\u0334g\u0336o\u0334", "\u0301", "\u0301\u0301x",
    "\u0915\u093c", "\u09c7\u09be", "\u0b47\u0b3e", "\u1025\u102e", "ｶﾞ", "\u30ab\u3099", "\u304b\u3099",
    "\u0041\u030a\u0327", "\u0069\u0307", "\u03b1\u0313\u0301", "\u1e9b\u0323",
]

FULLWIDTH = ["ＡＢＣ", "ｘｙｚ", "１２３４５", "！？", "（括弧）", "ｶﾀｶﾅ", "＂引用＂", "＠ｕｓｅｒ", "＃ｔａｇ", "１０％"]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
            "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
            "<tool_response>", "</tool_response>", "<think>", "</think>"]
NEAR_SPECIALS = ["<|im_start", "im_end|>", "<|im_end|", "<|IM_END|>", "< |im_end|>", "<think", "</think",
                 "<thinking>", "<|endoftext|", "<tool_call", "<|", "|>", "<<|im_start|>>", "<|im_start|><|im_start|>"]

WHITESPACE = [" ", "  ", "   ", "    ", "        ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", " \n", "\n ",
              "\u00a0", "\u3000", "\u2003", "\u2009", "\u202f", " \t \n", "\x0b", "\x0c", "\u2028", "\u2029"]


def prose(rng, n_words):
    out = []
    for i in range(n_words):
        w = rng.choice(ENGLISH_WORDS) if rng.random() > 0.15 else rng.choice(CONTRACTIONS)
        if i == 0 or (out and out[-1].endswith(".")):
            w = w[:1].upper() + w[1:]
        out.append(w)
        if rng.random() < 0.08:
            out[-1] += rng.choice([",", ".", ";", ":", "!", "?", "...", " —", " -", ")"])
    return " ".join(out)


def number(rng):
    kind = rng.randrange(9)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 40)))
    if kind == 1:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randrange(0, 9)}f}"
    if kind == 2:
        return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"
    if kind == 3:
        return f"+1 ({rng.randrange(200, 999)}) {rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}"
    if kind == 4:
        return hex(rng.getrandbits(rng.randrange(8, 130)))
    if kind == 5:
        return "".join(chr(0x0660 + rng.randrange(10)) for _ in range(rng.randrange(1, 12)))
    if kind == 6:
        return "".join(chr(0x0966 + rng.randrange(10)) for _ in range(rng.randrange(1, 12)))
    if kind == 7:
        return "".join(chr(0xFF10 + rng.randrange(10)) for _ in range(rng.randrange(1, 12)))
    return f"{rng.randrange(1, 10)}.{rng.randrange(10)}e{rng.choice(['-', '+', ''])}{rng.randrange(40)} ½ ¾ ² ³ Ⅻ ①"


def sentence(rng):
    lang = rng.choice(sorted(SCRIPTS))
    return rng.choice(SCRIPTS[lang])


# Code points from long-established blocks (Unicode <= 6) for random soup.
SOUP_RANGES = [(0x20, 0x7E), (0xA0, 0xFF), (0x100, 0x17E), (0x180, 0x24F), (0x300, 0x36F), (0x370, 0x3FF),
               (0x400, 0x4FF), (0x591, 0x5F4), (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE5B), (0x1100, 0x11FF),
               (0x2000, 0x2027), (0x2030, 0x205E), (0x2100, 0x214F), (0x2190, 0x21FF), (0x2200, 0x22FF),
               (0x2500, 0x257F), (0x3000, 0x303F), (0x3041, 0x3096), (0x30A0, 0x30FF), (0x4E00, 0x9FA5),
               (0xAC00, 0xD7A3), (0xFF01, 0xFF5E), (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F)]
EXCLUDE = {0x85, 0xFEFF, 0x17F, 0x212A, 0x180E}


def soup(rng, n):
    out = []
    for _ in range(n):
        lo, hi = rng.choice(SOUP_RANGES)
        cp = rng.randrange(lo, hi + 1)
        if cp in EXCLUDE:
            continue
        out.append(chr(cp))
    return "".join(out)


def code_window(rng):
    src = rng.choice(CODE)
    lines = src.split("\n")
    a = rng.randrange(len(lines))
    b = min(len(lines), a + rng.randrange(1, 10))
    text = "\n".join(lines[a:b])
    r = rng.random()
    if r < 0.2:
        text = text.replace("    ", "\t")
    elif r < 0.35:
        text = text.replace("\n", "\r\n")
    elif r < 0.5:
        text = "\n".join(line + " " * rng.randrange(0, 4) for line in text.split("\n"))
    return text


def whitespace_case(rng):
    parts = []
    for _ in range(rng.randrange(1, 8)):
        parts.append("".join(rng.choice(WHITESPACE) for _ in range(rng.randrange(1, 6))))
        if rng.random() < 0.6:
            parts.append(rng.choice(["x", "word", "Hello", "你好", "123", "!", "a b", "-", "é"]))
    if rng.random() < 0.5:
        parts.append(" " * rng.randrange(1, 40))
    return "".join(parts)


def special_case(rng):
    kind = rng.randrange(5)
    if kind == 0:
        turns = []
        for role in rng.sample(["system", "user", "assistant", "tool"], rng.randrange(1, 4)):
            content = prose(rng, rng.randrange(3, 20)) if rng.random() < 0.6 else sentence(rng)
            if role == "assistant" and rng.random() < 0.5:
                content = f"<think>\n{prose(rng, 8)}\n</think>\n\n{content}"
            if role == "assistant" and rng.random() < 0.3:
                content += '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            turns.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        return "".join(turns) + ("<|im_start|>assistant\n" if rng.random() < 0.5 else "")
    if kind == 1:
        return "".join(rng.choice(SPECIALS + NEAR_SPECIALS + [" ", "x", "\n", "é", "你"]) for _ in range(rng.randrange(1, 10)))
    if kind == 2:
        return prose(rng, 5) + rng.choice(SPECIALS) + prose(rng, 5)
    if kind == 3:
        return "<|fim_prefix|>" + code_window(rng) + "<|fim_suffix|>" + code_window(rng) + "<|fim_middle|>"
    return rng.choice(NEAR_SPECIALS) + sentence(rng) + rng.choice(SPECIALS) + rng.choice(EMOJI)


def mixed(rng):
    gens = [lambda: prose(rng, rng.randrange(1, 12)), lambda: sentence(rng), lambda: number(rng),
            lambda: rng.choice(EMOJI) * rng.randrange(1, 3), lambda: rng.choice(COMBINING),
            lambda: rng.choice(FULLWIDTH), lambda: rng.choice(SPECIALS), lambda: soup(rng, rng.randrange(1, 20)),
            lambda: code_window(rng), lambda: rng.choice(WHITESPACE)]
    return "".join(rng.choice(gens)() + rng.choice(["", " ", "", "\n", ", "]) for _ in range(rng.randrange(2, 8)))


def main():
    rng = random.Random(SEED)
    cases = []
    # Fixed cases first: every seed text alone, every special token alone, edge strings.
    cases += ["", " ", "  ", "\n", "a", "Hello world", "Hello, world!", "   leading", "trailing   ", "\t\tindented",
              "x\n\n\n", "\r\n\r\n", "a  b   c    d", "!!!???...", "'s", "'S", " 's", "don't stop", "DON'T STOP"]
    cases += CODE
    for lang in sorted(SCRIPTS):
        cases += SCRIPTS[lang]
    cases += EMOJI + COMBINING + FULLWIDTH + SPECIALS + NEAR_SPECIALS + WHITESPACE + CONTRACTIONS
    generators = [
        (250, code_window), (80, lambda r: "\n".join(code_window(r) for _ in range(3))),
        (250, lambda r: prose(r, r.randrange(1, 60))), (180, whitespace_case),
        (150, lambda r: " ".join(number(r) for _ in range(r.randrange(1, 5)))),
        (300, lambda r: "".join(sentence(r) + r.choice(["", " ", "\n"]) for _ in range(r.randrange(1, 4)))),
        (120, lambda r: "".join(r.choice(EMOJI) + r.choice(["", " ", "", "x"]) for _ in range(r.randrange(1, 8)))),
        (120, lambda r: "".join(r.choice(COMBINING) + r.choice(["", " ", "a"]) for _ in range(r.randrange(1, 6)))),
        (40, lambda r: "".join(r.choice(FULLWIDTH) for _ in range(r.randrange(1, 5)))),
        (220, special_case), (300, mixed), (100, lambda r: soup(r, r.randrange(1, 80))),
        (20, lambda r: r.choice(["x", "ab", " ", "\n", "é", "中", "😀", "1"]) * r.randrange(50, 400)),
    ]
    for count, gen in generators:
        for _ in range(count):
            cases.append(gen(rng))
    json.dump(cases, sys.stdout, ensure_ascii=False, indent=0)
    sys.stdout.write("\n")
    print(f"{len(cases)} strings, {sum(len(c.encode()) for c in cases)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
