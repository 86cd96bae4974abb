// Greedy tokens of llmtool exports through transformers.js (Node, onnxruntime-node, CPU, offline).
// Run by tests/test_interop_peers.py: node interop_transformers_js.mjs REQUEST.json, with
// NODE_PATH naming a node_modules that holds @huggingface/transformers. Prints one JSON object
// {dir: {"tokens": [[...] per row], "text_ids": tokenizer ids of the request's text}}.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const require = createRequire(path.join(process.env.NODE_PATH || process.cwd(), "noop.js"));
const { env, AutoModelForCausalLM, AutoTokenizer, Tensor } = await import(
  require.resolve("@huggingface/transformers")
);

const request = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
env.allowRemoteModels = false;
const result = {};
for (const dir of request.transformers_js) {
  env.localModelPath = path.dirname(dir) + "/";
  const name = path.basename(dir);
  // dtype left to transformers.js_config.dtype in config.json: the layout names its own file.
  const model = await AutoModelForCausalLM.from_pretrained(name, { device: "cpu" });
  const tokenizer = await AutoTokenizer.from_pretrained(name);
  const rows = request.rows;
  const length = Math.max(...rows.map((r) => r.length));
  const ids = [], mask = [];
  for (const r of rows) {
    const pad = length - r.length;  // left padding, as transformers.js batches for generation
    ids.push(...Array(pad).fill(0), ...r);
    mask.push(...Array(pad).fill(0), ...Array(r.length).fill(1));
  }
  const shape = [rows.length, length];
  const out = await model.generate({
    input_ids: new Tensor("int64", BigInt64Array.from(ids.map(BigInt)), shape),
    attention_mask: new Tensor("int64", BigInt64Array.from(mask.map(BigInt)), shape),
    max_new_tokens: request.new_tokens,
    do_sample: false,
  });
  const tokens = out.tolist().map((row) => row.slice(length).map(Number));
  const text_ids = Array.from(tokenizer.encode(request.text)).map(Number);
  result[dir] = { tokens, text_ids };
}
console.log(JSON.stringify(result));
