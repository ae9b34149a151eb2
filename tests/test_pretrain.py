import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO_ROOT, smoke_config
from tiny_llama2_zh.config import ConfigError, load_config
from tiny_llama2_zh.presets import PRESETS
from tiny_llama2_zh.tokenizer import load_tokenizer
from tiny_llama2_zh.train.pretrain import PretrainConfig, pretrain, pretrain_arguments

SHIPPED_CONFIGS = sorted((REPO_ROOT / "configs" / "pretrain").glob("*.yaml"))


def test_two_step_pretraining_run_writes_a_loadable_model(small_tokenizer, token_files, tmp_path):
    # lr 1e-2 without warm-up: two steps must visibly help (at 3e-3 with the digit-splitting tokenizer the validation
    # loss moved by +0.002, i.e. not at all: a smoke test of "training trains" needs a step that does something)
    faster = ("train.learning_rate=1e-2", "train.warmup_steps=0")
    config = smoke_config(small_tokenizer, token_files, tmp_path / "run", *faster)
    result = pretrain(config)
    assert result["steps"] == 2 and result["tokens_seen"] == 2 * 2 * 32  # the batches' real tokens
    assert result["final_validation_loss"] < result["initial_validation_loss"] - 0.01
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert all(m["tokens_per_second"] > 0 for m in metrics if "loss" in m)
    assert (run / "loss.png").stat().st_size > 1000
    assert load_config(PretrainConfig, run / "config.yaml") == config  # the resolved config, reloadable
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {s["prompt"] for s in samples} == set(config.sample_prompts)

    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tokenizer = load_tokenizer(run / "final")
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tokenizer) == 1024
    batch = torch.stack([torch.arange(3, 35)])
    assert torch.isfinite(model(batch, labels=batch).loss)


def test_a_second_run_into_the_same_folder_is_refused(small_tokenizer, token_files, tmp_path):
    pretrain(smoke_config(small_tokenizer, token_files, tmp_path / "run", "train.max_steps=1"))
    with pytest.raises(FileExistsError, match="resume"):
        pretrain(smoke_config(small_tokenizer, token_files, tmp_path / "run", "train.max_steps=1"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid_and_say_how_to_run_them(path):
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith(f"# tinyllm pretrain --config configs/pretrain/{path.name}")
    config = load_config(PretrainConfig, path)
    context = config.model.max_position_embeddings or PRESETS[config.model.size].max_seq_len
    assert config.data.seq_len <= context
    # transformers validates the whole train: section as shipped (bf16 and torch.compile included)
    args = pretrain_arguments(config)
    assert args.max_steps == config.train["max_steps"] and args.learning_rate == config.train["learning_rate"]


def test_unknown_or_mistyped_keys_are_errors(tmp_path):
    path = REPO_ROOT / "configs" / "pretrain" / "demo.yaml"
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rat'\].*did you mean learning_rate"):
        pretrain_arguments(load_config(PretrainConfig, path, ["train.learning_rat=0.1"]))
    with pytest.raises(ConfigError, match="max_steps"):
        pretrain_arguments(load_config(PretrainConfig, path, ["train.max_steps=many"]))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['hiden_size'\].*did you mean hidden_size"):
        load_config(PretrainConfig, path, ["model.hiden_size=64"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  tokenizer: t\n  train: t.bin\ntrain:\n  output_dir: o\nmodle:\n  size: 9m\n")
    with pytest.raises(ConfigError, match=rf"{bad}.*modle"):
        load_config(PretrainConfig, bad)


def test_every_run_gets_its_own_copy_of_nested_defaults_and_options(tmp_path):
    """A run's arguments must not share a dict with the module's defaults, another run or the loaded config: a
    trainer or recipe adjusting its own `lr_scheduler_kwargs` would otherwise change every later run."""
    from transformers import TrainingArguments

    from tiny_llama2_zh.train.runner import RL_DEFAULTS, training_arguments

    first = training_arguments(TrainingArguments, {"output_dir": str(tmp_path / "a")}, **RL_DEFAULTS)
    first.lr_scheduler_kwargs["min_lr_rate"] = 0.5  # this run's own adjustment
    second = training_arguments(TrainingArguments, {"output_dir": str(tmp_path / "b")}, **RL_DEFAULTS)
    assert second.lr_scheduler_kwargs == {} and RL_DEFAULTS["lr_scheduler_kwargs"] == {}

    section = {"output_dir": str(tmp_path / "c"), "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}
    third = training_arguments(TrainingArguments, section)
    third.lr_scheduler_kwargs["min_lr_rate"] = 0.9
    assert section["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}  # the config as loaded (and saved) is untouched


def test_generate_and_eval_commands_on_a_trained_folder(small_tokenizer, token_files, tmp_path, capsys):
    from tiny_llama2_zh.cli import main

    pretrain(smoke_config(small_tokenizer, token_files, tmp_path / "run", "train.max_steps=3"))
    capsys.readouterr()  # the training run's own output
    final = str(tmp_path / "run" / "final")
    args = ["--model", final, "--prompt", "中国", "--max-new-tokens", "8"]
    assert main(["generate", *args]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("中国") and len(greedy.strip()) > len("中国")
    assert main(["generate", *args]) == 0 and capsys.readouterr().out == greedy  # greedy is deterministic
    assert main(["generate", *args, "--temperature", "0.9", "--top-p", "0.9", "--seed", "7"]) == 0
    capsys.readouterr()
    report = tmp_path / "ppl.json"
    data = str(token_files["validation"])
    assert main(["eval", "ppl", "--model", final, "--data", data, "--seq-len", "32", "--output", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"])) and result["tokens"] == result["blocks"] * 31
    assert main(["plot", str(tmp_path / "run"), "--output", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 1000
