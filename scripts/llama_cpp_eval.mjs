// Dev-only: loads a GGUF file in real llama.cpp (node-llama-cpp's prebuilt CPU build) and prints one JSON object with
// its tokenization of a text, the text's mean negative log-likelihood and a few greedy tokens. Run it through
// scripts/llama-cpp.sh, which installs node-llama-cpp under ~/.cache/ferrotune-dev and sets FERROTUNE_NLC_DIR.
//
//   node llama_cpp_eval.mjs FILE.gguf TEXT_FILE [--greedy N] [--prompt P] [--ctx N] [--threads N] [--kv F32|F16]
//
// The KV cache is F32 unless --kv F16 (llama.cpp's own default, which adds ~1e-4 relative noise) is given.
// token_ids: llama.cpp's tokenization of TEXT_FILE (no special-token parsing), with BOS prepended when the GGUF's
//   metadata asks for it (llama_vocab_get_add_bos) and EOS appended when it asks for that.
// mean_nll: mean over i >= 1 of -log p(ids[i] | ids[<i]) in nats, from the full vocabulary's raw logits (log-softmax
//   done here in double precision), not from a top-k list.
// greedy_ids: N tokens after the tokenized --prompt (BOS as above), argmax at each step (temperature 0), EOG included.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const usage = "usage: llama_cpp_eval.mjs FILE.gguf TEXT_FILE [--greedy N] [--prompt P] [--ctx N] [--threads N] [--kv F32|F16]";
const args = process.argv.slice(2);
const pos = [];
const opt = { greedy: 0, prompt: null, ctx: 512, threads: 2, kv: "F32" };
for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === "--greedy") opt.greedy = parseInt(args[++i], 10);
    else if (a === "--prompt") opt.prompt = args[++i];
    else if (a === "--ctx") opt.ctx = parseInt(args[++i], 10);
    else if (a === "--threads") opt.threads = parseInt(args[++i], 10);
    else if (a === "--kv") opt.kv = String(args[++i]).toUpperCase();
    else if (a.startsWith("--")) { console.error(usage); process.exit(2); }
    else pos.push(a);
}
if (pos.length !== 2 || !(opt.greedy >= 0) || !(opt.ctx > 0) || !(opt.threads > 0) || !["F32", "F16"].includes(opt.kv)) { console.error(usage); process.exit(2); }
const [ggufPath, textPath] = pos;
const text = fs.readFileSync(textPath, "utf8");

const nlcDir = process.env.FERROTUNE_NLC_DIR;
if (!nlcDir) { console.error("FERROTUNE_NLC_DIR is not set: run this through scripts/llama-cpp.sh"); process.exit(2); }
const nlcPkg = path.join(nlcDir, "node_modules", "node-llama-cpp");
const { getLlama } = await import(pathToFileURL(path.join(nlcPkg, "dist", "index.js")).href);

// CPU only, never build llama.cpp from source, never download anything: use the installed prebuilt binary or fail.
const llama = await getLlama({
    gpu: false, build: "never", usePrebuiltBinaries: true, skipDownload: true, progressLogs: false,
    maxThreads: opt.threads, logLevel: "warn", logger: (level, message) => process.stderr.write(`[llama.cpp ${level}] ${message.trimEnd()}\n`),
});
const model = await llama.loadModel({ modelPath: path.resolve(ggufPath), gpuLayers: 0 });
const context = await model.createContext({ contextSize: opt.ctx, batchSize: opt.ctx, threads: opt.threads, sequences: 1, flashAttention: false,
    experimentalKvCacheKeyType: opt.kv, experimentalKvCacheValueType: opt.kv });
const sequence = context.getSequence();

// Tokenizes like llama.cpp's common_tokenize(add_special = true, parse_special = false).
function tokenize(s) {
    const ids = model.tokenize(s, false);
    if (model.tokens.shouldPrependBosToken && model.tokens.bos != null) ids.unshift(model.tokens.bos);
    if (model.tokens.shouldAppendEosToken && model.tokens.eos != null) ids.push(model.tokens.eos);
    return ids;
}

// -log softmax(logits)[target], with logits a Map token -> logit over the whole vocabulary.
function nll(logits, target) {
    let max = -Infinity;
    for (const v of logits.values()) if (v > max) max = v;
    let sum = 0;
    for (const v of logits.values()) sum += Math.exp(v - max);
    const t = logits.get(target);
    if (t === undefined) throw new Error(`token ${target} missing from the logits`);
    return max + Math.log(sum) - t;
}

const ids = tokenize(text);
if (ids.length < 2) throw new Error("the text gives fewer than 2 tokens");
if (ids.length > opt.ctx) throw new Error(`the text gives ${ids.length} tokens, more than --ctx ${opt.ctx}`);
// Raw logits for every position but the last; temperature 0 means a greedy sampler, which leaves the logits alone.
const next = { logits: true, token: true, options: { temperature: 0 } };
const out = await sequence.controlledEvaluate(ids.map((t, i) => (i < ids.length - 1 ? [t, { generateNext: next }] : t)));
// The candidates the addon fills are all llama_vocab_n_tokens() tokens, so every map has the vocabulary's size.
const nVocab = out[0].next.logits.size;
let total = 0;
const perToken = [];
for (let i = 0; i + 1 < ids.length; i++) {
    const logits = out[i].next.logits;
    if (logits.size !== nVocab) throw new Error(`got ${logits.size} logits at position ${i}, expected ${nVocab}`);
    const v = nll(logits, ids[i + 1]);
    perToken.push(v);
    total += v;
}

// Greedy continuation of the prompt, one token at a time, in a fresh history.
let greedy = null;
if (opt.greedy > 0) {
    await sequence.clearHistory();
    const promptIds = tokenize(opt.prompt ?? "");
    if (promptIds.length === 0) throw new Error("--greedy needs a --prompt that gives at least one token (the model adds no BOS)");
    if (promptIds.length + opt.greedy > opt.ctx) throw new Error("prompt + --greedy is longer than --ctx");
    greedy = [];
    let feed = promptIds;
    for (let k = 0; k < opt.greedy; k++) {
        const r = await sequence.controlledEvaluate(feed.map((t, i) => (i === feed.length - 1 ? [t, { generateNext: { token: true, options: { temperature: 0 } } }] : t)));
        const tok = r[feed.length - 1].next.token;
        if (tok == null) throw new Error("llama.cpp gave no token");
        greedy.push(tok);
        feed = [tok];
    }
}

const nlcVersion = JSON.parse(fs.readFileSync(path.join(nlcPkg, "package.json"), "utf8")).version;
// The shipped llama.cpp source bundle starts with a text header whose first ref line names the commit built.
let commit = null;
try {
    const head = fs.readFileSync(path.join(nlcPkg, "llama", "gitRelease.bundle")).subarray(0, 200).toString("latin1");
    commit = (head.match(/^([0-9a-f]{40}) /m) ?? [])[1] ?? null;
} catch { /* no bundle: leave null */ }

console.log(JSON.stringify({
    file: path.resolve(ggufPath),
    n_tokens: ids.length,
    token_ids: ids,
    mean_nll: total / perToken.length,
    max_token_nll: Math.max(...perToken),
    greedy_prompt_ids: opt.greedy > 0 ? tokenize(opt.prompt ?? "") : null,
    greedy_ids: greedy,
    add_bos: model.tokens.shouldPrependBosToken, add_eos: model.tokens.shouldAppendEosToken,
    n_vocab: nVocab, train_context_size: model.trainContextSize,
    llama_cpp: { ...llama.llamaCppRelease, commit, build_type: llama.buildType, gpu: llama.gpu, node_llama_cpp: nlcVersion, threads: opt.threads, context_size: opt.ctx, kv_cache_type: opt.kv },
}));
await context.dispose();
await model.dispose();
await llama.dispose();
