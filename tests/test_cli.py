import argparse
import json
import subprocess
import sys

import pytest

from tiny_llama2_zh.cli import _subcommand_parser, build_parser, command_paths, main
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.presets import PRESETS, preset_config


def command_parser(path: tuple[str, ...]):
    """The parser of one command (its own options, not the root's)."""
    if (subcommand := _subcommand_parser(list(path))) is not None:  # `reward score`: beside the recipe's parser
        return subcommand
    parser = build_parser(list(path))
    for name in path:
        parser = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
    return parser


PATHS = [path for path, _ in command_paths()]


@pytest.mark.parametrize("path", PATHS, ids=" ".join)
def test_every_command_explains_its_options(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: tinyllm " + " ".join(path))
    parser = command_parser(path)
    undocumented = [
        action.dest
        for action in parser._actions
        if not action.help and action.dest != "help" and not isinstance(action, argparse._SubParsersAction)
    ]
    assert not undocumented, f"tinyllm {' '.join(path)}: options without help: {undocumented}"


def test_the_help_walk_reaches_every_leaf_option():
    """The walk above really looks at each subcommand's own options (it once looked at the root parser only)."""
    options = command_parser(("eval", "mc"))._option_string_actions
    assert "--idioms" in options and "--shots" in options
    assert "--config" in command_parser(("sft",))._option_string_actions


def test_help_at_every_level_imports_no_torch():
    """`tinyllm --help` and every `tinyllm COMMAND --help` answer without importing torch or transformers: one
    process builds every command's parser (all their modules imported) and then looks."""
    code = (
        "import sys\n"
        "from tiny_llama2_zh.cli import build_parser, command_paths\n"
        "for path, _ in command_paths():\n"
        "    build_parser(list(path))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'datasets', 'fastapi') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


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


def test_debug_shows_the_traceback_of_a_project_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2  # one line, no traceback
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl does not exist"):
        main(["--debug", "plot", str(tmp_path)])


def test_an_error_that_is_not_the_projects_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError raised inside a library is a bug to report, not bad input: it must not shrink to one line."""

    def library_bug(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr("tiny_llama2_zh.runfiles.plot_curves", library_bug)
    with pytest.raises(ValueError, match="broadcast"):
        main(["plot", str(tmp_path)])
