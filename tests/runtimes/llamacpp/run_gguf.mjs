// Runs a GGUF file in llama.cpp (the prebuilt libllama that node-llama-cpp ships) for tiny-llama2-zh's export
// checks and benchmark. Reads one JSON request on stdin, writes one JSON answer on stdout:
//   request: {"model": PATH, "threads": N, "contextSize": N,
//             "tokenize": [TEXT, ...],                 // -> "tokens": [[id, ...], ...] (with BOS, special tokens parsed)
//             "generate": [{"tokens": [id, ...], "maxTokens": N, "stop": [id, ...]}, ...],
//             "forced": [{"tokens": [id, ...], "from": K}, ...],  // teacher forcing: greedy next token after each
//                                                                // of tokens[K-1:], i.e. predictions of tokens[K:]
//             "chats": [[{"role": ROLE, "content": STR}, ...], ...]}  // rendered with the file's chat template by
//                                                 // @huggingface/jinja (node-llama-cpp's engine), generation prompt on
//   answer:  {"tokens": [...], "generated": [{"tokens": [...], "text": STR, "promptSeconds": S, "decodeSeconds": S}],
//             "forced": [[id, ...], ...], "rendered": [STR, ...]}
// Generation is greedy (temperature 0, no repeat penalty); a stop token is included in the output and ends it.
import {Template} from "@huggingface/jinja";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const request = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: request.model, gpuLayers: 0});
const answer = {tokens: [], generated: [], forced: [], rendered: []};
if (request.chats?.length) {
    const template = new Template(model.fileInfo.metadata.tokenizer.chat_template);
    for (const messages of request.chats) {
        answer.rendered.push(
            template.render({
                messages,
                bos_token: model.tokens.bosString,
                eos_token: model.tokens.eosString,
                add_generation_prompt: true,
            })
        );
    }
}

for (const text of request.tokenize ?? []) {
    // specialTokens=true: role tokens in a chat prompt become their ids, as transformers does for added tokens
    const tokens = model.tokenize(text, true);
    const bos = model.tokens.bos;
    const addBos = model.tokens.shouldPrependBosToken;
    answer.tokens.push(addBos && bos !== null && tokens[0] !== bos ? [bos, ...tokens] : tokens);
}

for (const job of request.generate ?? []) {
    const context = await model.createContext({
        contextSize: request.contextSize ?? 256,
        threads: request.threads ?? 1,
        sequences: 1,
    });
    const sequence = context.getSequence();
    const stop = new Set(job.stop ?? []);
    const out = [];
    const start = performance.now();
    let firstTokenAt = null;
    for await (const token of sequence.evaluate(job.tokens, {temperature: 0, yieldEogToken: true})) {
        if (firstTokenAt === null) firstTokenAt = performance.now();
        out.push(token);
        if (out.length >= job.maxTokens || stop.has(token)) break;
    }
    const end = performance.now();
    answer.generated.push({
        tokens: out,
        text: model.detokenize(out, false),
        promptSeconds: ((firstTokenAt ?? end) - start) / 1000,
        decodeSeconds: (end - (firstTokenAt ?? end)) / 1000,
    });
    await context.dispose();
}
for (const job of request.forced ?? []) {
    const context = await model.createContext({
        contextSize: request.contextSize ?? 256,
        threads: request.threads ?? 1,
        sequences: 1,
    });
    const input = job.tokens.map((token, index) =>
        index >= job.from - 1 ? [token, {generateNext: {token: true, options: {temperature: 0}}}] : token
    );
    const output = await context.getSequence().controlledEvaluate(input);
    answer.forced.push(output.slice(job.from - 1).map((item) => item?.next?.token ?? null));
    await context.dispose();
}
await model.dispose();
await llama.dispose();
process.stdout.write(JSON.stringify(answer));
