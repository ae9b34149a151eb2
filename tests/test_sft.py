"""Supervised fine-tuning: what the loss covers, packing, bad conversations, the recipe end to end, LoRA merge."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO_ROOT
from tiny_llama2_zh.config import ConfigError, load_config
from tiny_llama2_zh.data.conversations import load_conversations
from tiny_llama2_zh.loading import load_model
from tiny_llama2_zh.tokenizer import ROLE_TOKENS, load_tokenizer, train_bpe_tokenizer
from tiny_llama2_zh.train.sft import SFTRecipeConfig, sft

SFT_YAML = REPO_ROOT / "configs" / "sft" / "demo.yaml"

CONVERSATIONS = [
    [{"role": "user", "content": "一加一等于几？"}, {"role": "assistant", "content": "二"}],
    [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "中国的首都是哪里？"},
        {"role": "assistant", "content": "北京"},
        {"role": "user", "content": "上海呢？"},
        {"role": "assistant", "content": "上海是直辖市"},
    ],
    [{"role": "user", "content": "判断情感：这本书很好"}, {"role": "assistant", "content": "正面"}],
    [{"role": "user", "content": "判断情感：质量太差了"}, {"role": "assistant", "content": "负面"}],
]


def write_conversations(path: Path, conversations: list, repeat: int = 1) -> Path:
    lines = [json.dumps({"messages": c}, ensure_ascii=False) for c in conversations] * repeat
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def recipe(tiny_model_dir, tmp_path, *extra) -> SFTRecipeConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_conversations(tmp_path / "train.jsonl", CONVERSATIONS, repeat=8)
    overrides = [
        f"model.init_from={tiny_model_dir}",
        f"data.train={data}",
        f"data.validation={data}",
        "data.max_validation_examples=8",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=3",
        "train.per_device_train_batch_size=4",
        "train.warmup_steps=0",
        "train.logging_steps=1",
        "train.eval_steps=0",
        "train.report_to=[]",
        "train.max_length=64",
        "sample_max_new_tokens=4",
        *extra,
    ]
    return load_config(SFTRecipeConfig, SFT_YAML, overrides)


def trainer_batch(tiny_model_dir, tmp_path, conversations, packing: bool):
    """The labelled batch TRL's SFTTrainer builds from `conversations` under the demo recipe's options."""
    from datasets import Dataset
    from trl import SFTTrainer

    from tiny_llama2_zh.train.sft import sft_arguments

    config = recipe(tiny_model_dir, tmp_path, f"train.packing={str(packing).lower()}")
    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = SFTTrainer(
        model=model,
        args=sft_arguments(config),
        train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
        processing_class=tokenizer,
    )
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return model, tokenizer, trainer.data_collator(rows)


def test_the_loss_covers_exactly_the_assistant_replies_and_their_end_of_turn(tiny_model_dir, tmp_path):
    _, tokenizer, batch = trainer_batch(tiny_model_dir, tmp_path, [CONVERSATIONS[1]], packing=False)
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tokenizer.decode(labelled) == "北京</s>上海是直辖市</s>"
    ids = batch["input_ids"][0].tolist()
    role_ids = tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS))
    assert [i for i in ids if i in role_ids] == tokenizer.convert_tokens_to_ids(
        ["<|system|>", "<|user|>", "<|assistant|>", "<|user|>", "<|assistant|>"]
    )  # each role is one id in context
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    prompt = tokenizer.apply_chat_template(CONVERSATIONS[1][:4], add_generation_prompt=True, return_dict=True)
    assert ids[: len(prompt["input_ids"])] == prompt["input_ids"]  # generation starts where training's reply does


def test_packed_and_padded_batches_give_the_same_loss_per_example(tiny_model_dir, tmp_path):
    model, _, padded = trainer_batch(tiny_model_dir, tmp_path / "padded", CONVERSATIONS, packing=False)
    _, _, packed = trainer_batch(tiny_model_dir, tmp_path / "packed", CONVERSATIONS, packing=True)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1  # one row, block-diagonal attention
    model.eval()

    def token_losses(batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**inputs).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return losses[labels != -100]

    # the same labelled tokens, in another order: compare the sorted per-token losses
    torch.testing.assert_close(token_losses(packed).sort().values, token_losses(padded).sort().values)


def test_the_conversation_mean_weighs_every_reply_alike_whatever_its_length(tiny_model_dir, tmp_path):
    """loss_mean_over: conversations -- the mean over rows of each row's mean reply-token loss (DAPO's sample-level
    loss), through the model's fused loss, equal to that mean computed by hand from the plain logits; and unlike the
    token mean, where the long reply outweighs the one-token ones."""
    from tiny_llama2_zh.train.sft import conversation_weights

    model, _, batch = trainer_batch(tiny_model_dir, tmp_path, CONVERSATIONS, packing=False)
    weights = conversation_weights(batch["labels"])
    torch.testing.assert_close(weights.sum(dim=1), torch.full((4,), 0.25))  # every row weighs a quarter
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    logits = model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token_losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    labelled = labels != -100
    by_hand = torch.stack([token_losses[row][labelled[row]].mean() for row in range(4)]).mean()
    token_mean = token_losses[labelled].mean()
    for chunk_rows in (None, 5):  # the plain path and the fused chunked one
        model.fused_loss_chunk_rows = chunk_rows
        loss = model(**inputs, labels=batch["labels"], loss_weights=weights).loss
        torch.testing.assert_close(loss, by_hand)
    assert not torch.isclose(by_hand, token_mean)  # the replies' lengths differ (1 to 8 tokens): so do the means


def test_the_conversation_mean_trains_and_needs_the_models_own_loss(tiny_model_dir, tmp_path):
    summary = sft(recipe(tiny_model_dir, tmp_path / "conversations", "loss_mean_over=conversations"))
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    with pytest.raises(ConfigError, match="fused_loss_chunk_rows"):
        sft(
            recipe(
                tiny_model_dir, tmp_path / "refused", "loss_mean_over=conversations", "model.fused_loss_chunk_rows=0"
            )
        )
    assert not (tmp_path / "refused" / "run").exists()  # refused before the run writes anything


def test_each_step_is_a_random_draw_sorted_longest_first():
    """LengthSortedSteps' sampler: every row once per pass, in steps of `step_rows` rows that are a random
    permutation's consecutive rows, each step sorted longest first (the micro-batches then pad little)."""
    from tiny_llama2_zh.train.runner import _StepSortedSampler

    lengths = [3, 40, 5, 38, 4, 41, 2, 39, 6, 37]
    sampler = _StepSortedSampler(lengths, step_rows=4)
    torch.manual_seed(0)
    order = list(sampler)
    torch.manual_seed(0)
    drawn = torch.randperm(len(lengths)).tolist()
    assert sorted(order) == list(range(len(lengths)))
    for start in range(0, len(lengths), 4):
        step = order[start : start + 4]
        assert set(step) == set(drawn[start : start + 4])  # the same rows as the random draw
        assert [lengths[i] for i in step] == sorted((lengths[i] for i in step), reverse=True)


def test_length_sorted_micro_batches_train_what_one_batch_trains(tiny_model_dir, tmp_path):
    """A step of 8 conversations as one batch, or as 4 micro-batches of 2 sorted by length (the demo's SFT
    splits its 32 into 4): the same rows, the same conversation-mean loss, so the same trained weights."""
    finals = {}
    for batch, accumulation in ((8, 1), (2, 4)):
        run = tmp_path / f"{batch}x{accumulation}"
        sft(
            recipe(
                tiny_model_dir,
                run,
                "loss_mean_over=conversations",
                "train.max_steps=2",
                f"train.per_device_train_batch_size={batch}",
                f"train.gradient_accumulation_steps={accumulation}",
                "train.learning_rate=0.01",
                # updates linear in the gradient, unclipped: Adam's first step is the gradient's sign, and clipping
                # would hide a gradient of the wrong scale
                "train.optim=sgd",
                "train.max_grad_norm=0",
            )
        )
        finals[batch] = AutoModelForCausalLM.from_pretrained(run / "run" / "final").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name, weight in finals[8].items():
        torch.testing.assert_close(finals[2][name], weight, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(finals[8][name], initial[name]) for name in initial)  # it trained


@pytest.mark.parametrize("mean", ["tokens", "conversations"])
def test_the_final_validation_loss_is_the_periodic_evaluations_measure(tiny_model_dir, tmp_path, mean):
    """The records before and after training and the Trainer's periodic evaluations are one curve: after the last
    step both measure the same model on the same rows, with the recipe's own loss mean."""
    sft(recipe(tiny_model_dir, tmp_path, f"loss_mean_over={mean}", "train.eval_steps=3"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    periodic = next(r for r in records if r.get("step") == 3 and "eval_loss" in r and not r.get("final"))
    final = next(r for r in records if r.get("final"))
    assert final["eval_loss"] == pytest.approx(periodic["eval_loss"], rel=1e-5)


def test_bad_conversations_are_skipped_counted_and_located(small_tokenizer, tmp_path):
    bad = [
        [{"role": "user", "content": "你好"}, {"role": "bot", "content": "嗨"}],
        [
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "嗨"},
            {"role": "assistant", "content": "嗨"},
        ],
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "  "}],
        [{"role": "user", "content": "你好"}],
        [{"role": "user", "content": "长" * 300}, {"role": "assistant", "content": "好"}],
    ]
    path = write_conversations(tmp_path / "bad.jsonl", [CONVERSATIONS[0], *bad])
    with path.open("a", encoding="utf-8") as out:
        out.write("{not json\n")
    tokenizer = load_tokenizer(small_tokenizer)
    kept, report = load_conversations(str(path), tokenizer, max_length=64)
    assert len(kept) == 1 and report.read == 7
    assert dict(report.skipped) == {
        "unknown role 'bot'": 1,
        "two assistant turns in a row": 1,
        "empty reply": 1,
        "no assistant reply": 1,
        "longer than max_length 64": 1,
        "malformed line (JSONDecodeError)": 1,
    }
    assert any(example.startswith(f"{path}:2:") for example in report.examples)
    # truncate_left keeps the last exchange of a long conversation
    long = [{"role": "user", "content": "长" * 300}, {"role": "assistant", "content": "好"}, *CONVERSATIONS[0]]
    kept, report = load_conversations(
        str(write_conversations(tmp_path / "long.jsonl", [long])), tokenizer, 64, "truncate_left"
    )
    assert kept == [{"messages": CONVERSATIONS[0]}] and report.truncated == 1


def test_sft_recipe_trains_saves_and_chats(tiny_model_dir, tmp_path):
    result = sft(recipe(tiny_model_dir, tmp_path))
    assert result["steps"] == 3 and result["final_validation_loss"] < result["initial_validation_loss"]
    run = tmp_path / "run"
    assert (run / "loss.png").is_file() and (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_second"] > 0 for r in records if "loss" in r)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 3 and all("reply" in s for s in samples)  # the demo recipe's three sample prompts
    model, tokenizer = load_model(run / "final")
    assert model.generation_config.eos_token_id == sorted(
        {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS))}
    )


def test_periodic_evaluation_without_validation_data_is_refused(tiny_model_dir, tmp_path):
    from tiny_llama2_zh.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.validation"):
        sft(recipe(tiny_model_dir, tmp_path, "data.validation=null", "train.eval_steps=2"))
    assert not (tmp_path / "run").exists()


def test_init_from_a_folder_with_another_tokenizer_is_refused(tiny_model_dir, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("完全不同的分词器训练文本。\n" * 50, encoding="utf-8")
    train_bpe_tokenizer([other], vocab_size=300, output_dir=tmp_path / "other_tokenizer")
    with pytest.raises(ValueError, match=r"made with tokenizer [0-9a-f]{16}, not with .*\([0-9a-f]{16}\)"):
        sft(recipe(tiny_model_dir, tmp_path, f"model.tokenizer={tmp_path / 'other_tokenizer'}"))
    assert not (tmp_path / "run").exists()


def test_lora_trains_adapters_only_and_merges_into_a_plain_folder(tiny_model_dir, tmp_path, capsys):
    result = sft(recipe(tiny_model_dir, tmp_path, "model.lora={r: 4, alpha: 8, dropout: 0.0}"))
    assert result["lora"] and 0 < result["parameters"]["trainable"] < result["parameters"]["total"] / 5
    adapter = tmp_path / "run" / "final"
    assert (adapter / "adapter_config.json").is_file()

    from peft import PeftModel

    from tiny_llama2_zh.cli import main

    capsys.readouterr()
    assert main(["lora", "merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    assert "merged model" in capsys.readouterr().out
    base, _ = load_model(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    merged, _ = load_model(tmp_path / "merged")
    batch = torch.tensor([[1, 40, 41, 42, 43, 44]])
    expected = with_adapter(batch).logits
    assert not torch.allclose(expected, load_model(tiny_model_dir)[0](batch).logits)  # the adapter changed something
    torch.testing.assert_close(merged(batch).logits, expected, atol=1e-5, rtol=1e-5)

    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}, trust_remote_code=True)
        print(model(torch.tensor([[1, 40, 41, 42, 43, 44]])).logits[0, -1, :3].tolist())
        """
    )
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(json.loads(fresh.stdout.strip().splitlines()[-1])), expected[0, -1, :3])
    assert main(["lora", "merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 2  # not empty


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs" / "sft").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sft_configs_are_valid_and_say_how_to_run_them(path):
    from tiny_llama2_zh.train.sft import sft_arguments

    assert (
        path.read_text(encoding="utf-8").splitlines()[0].startswith(f"# tinyllm sft --config configs/sft/{path.name}")
    )
    config = load_config(SFTRecipeConfig, path)
    args = sft_arguments(config)  # TRL's SFTConfig validates the whole train: section as shipped
    assert args.assistant_only_loss and args.max_length == config.train["max_length"]
    if config.model.lora:
        from tiny_llama2_zh.train.lora import peft_config

        assert peft_config(config.model.lora).r == config.model.lora.r


@pytest.mark.distributed
def test_torchrun_two_processes_match_one_process(tiny_model_dir, tmp_path):
    """The same recipe under `torchrun` on CPU (gloo), as pretraining is tested: same global batch, same losses."""
    single = recipe(tiny_model_dir, tmp_path / "single", "train.packing=false", "sample_prompts=[]")
    sft(single)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "-m", "tiny_llama2_zh.cli"]
    data = tmp_path / "single" / "train.jsonl"
    overrides = [
        f"model.init_from={tiny_model_dir}",
        f"data.train={data}",
        f"data.validation={data}",
        "data.max_validation_examples=8",
        f"train.output_dir={tmp_path / 'two'}",
        *("train.max_steps=3", "train.per_device_train_batch_size=2", "train.warmup_steps=0", "train.logging_steps=1"),
        *("train.eval_steps=0", "train.report_to=[]", "train.max_length=64", "train.packing=false"),
        "sample_prompts=[]",
    ]
    result = subprocess.run(
        [*torchrun, "sft", "--config", str(SFT_YAML), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    def losses(run: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    one, two = losses(tmp_path / "single" / "run"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
