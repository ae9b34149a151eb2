import json
import subprocess
import sys

import pytest

from tiny_llama2_zh.cli import COMMANDS, build_parser, main
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.presets import PRESETS, preset_config


def command_paths(commands=COMMANDS, prefix=()):
    for command in commands:
        path = (*prefix, command.name)
        yield path
        yield from command_paths(command.subcommands, path)


@pytest.mark.parametrize("path", list(command_paths()), ids=" ".join)
def test_every_command_explains_its_options(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: tinyllm " + " ".join(path))
    for action in build_parser()._actions:  # every option of the command carries a help text
        assert action.help or action.option_strings == []


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-m", "tiny_llama2_zh.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "pretrain" in result.stdout and "demo" in result.stdout


def test_sizes_table_counts_are_the_models_real_counts(capsys):
    assert main(["sizes", "--vocab-size", "64798", "--json"]) == 0
    rows = {row["preset"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == list(PRESETS)
    for name in ("9m", "24m"):  # building every preset would take a minute; these two cover GQA and MHA
        model = TinyLlama2ForCausalLM(preset_config(name, vocab_size=64798))
        assert rows[name]["total"] == sum(p.numel() for p in model.parameters())


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["reward", "ppo", "rloo", "dpo", "grpo"])
def test_post_training_commands_refuse_a_missing_model_folder_with_a_message(stage, tmp_path, capsys):
    from conftest import REPO_ROOT

    config = REPO_ROOT / "configs" / stage / "demo.yaml"
    key = "model.policy" if stage in ("ppo", "rloo") else "model.init_from"
    argv = [stage, "--config", str(config), f"{key}={tmp_path / 'nothing'}", f"train.output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'nothing'} is not a saved model folder" in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_ppo_refuses_checkpoints_inside_a_rollout(capsys, tmp_path):
    from conftest import REPO_ROOT

    argv = ["ppo", "--config", str(REPO_ROOT / "configs" / "ppo" / "demo.yaml"), "train.save_steps=6"]
    assert main([*argv, f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert "must be a multiple of 4 (the steps per rollout)" in capsys.readouterr().err
