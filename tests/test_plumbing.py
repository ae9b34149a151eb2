"""The training plumbing every stage shares: option validation before anything is written, refuse-or-resume,
sampling that leaves the run's randomness alone, TRL loading our folders, and the package's layering."""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import TrainerCallback

from conftest import REPO_ROOT, smoke_config, smoke_overrides
from tiny_llama2_zh.cli import main
from tiny_llama2_zh.config import ConfigError, load_config, parse_override
from tiny_llama2_zh.train.pretrain import PretrainConfig, pretrain, pretrain_arguments

DEMO_YAML = REPO_ROOT / "configs" / "pretrain" / "demo.yaml"
PACKAGE = REPO_ROOT / "src" / "tiny_llama2_zh"


def test_exponent_floats_parse_as_numbers_in_yaml_and_overrides(tmp_path):
    assert parse_override("train.learning_rate=3e-4") == (["train", "learning_rate"], 3e-4)
    yaml_file = tmp_path / "lr.yaml"
    yaml_file.write_text(DEMO_YAML.read_text(encoding="utf-8").replace("learning_rate: 0.003", "learning_rate: 3e-4"))
    config = load_config(PretrainConfig, yaml_file)
    assert pretrain_arguments(config).learning_rate == pytest.approx(3e-4)
    # the README's override example
    assert (
        pretrain_arguments(load_config(PretrainConfig, DEMO_YAML, ["train.learning_rate=3e-4"])).learning_rate == 3e-4
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=0", "train nothing"),
        ("train.learning_rate=-0.001", "positive finite"),
        ("train.learning_rate=.inf", "positive finite"),
        ("train.per_device_train_batch_size=0", "at least 1"),
        ("train.eval_strategie=steps", "did you mean eval_strategy"),
        ("model.hidden_size=30", "not divisible"),
    ],
)
def test_impossible_options_are_refused_before_anything_is_written(
    override, message, small_tokenizer, token_files, tmp_path
):
    run = tmp_path / "run"
    config = smoke_config(small_tokenizer, token_files, run, override)
    with pytest.raises((ConfigError, ValueError), match=message):
        pretrain(config)
    assert not run.exists()


def test_cli_prints_config_problems_and_missing_data_without_a_traceback(
    small_tokenizer, token_files, tmp_path, capsys
):
    overrides = smoke_overrides(small_tokenizer, token_files, tmp_path / "run", "model.num_attention_heads=3")
    assert main(["pretrain", "--config", str(DEMO_YAML), *overrides]) == 2
    error = capsys.readouterr().err
    assert "not divisible by num_attention_heads 3" in error and "Traceback" not in error

    missing = tmp_path / "data" / "validation.bin"
    overrides = smoke_overrides(small_tokenizer, token_files, tmp_path / "run", f"data.validation={missing}")
    assert main(["pretrain", "--config", str(DEMO_YAML), *overrides]) == 2
    error = capsys.readouterr().err
    assert f"{missing} does not exist" in error and "tinyllm data prepare" in error
    assert not (tmp_path / "run").exists()


class FailAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        raise RuntimeError("the machine went away")


def test_a_run_that_failed_at_start_up_does_not_block_its_folder(small_tokenizer, token_files, tmp_path):
    config = smoke_config(small_tokenizer, token_files, tmp_path / "run", "train.max_steps=1")
    with pytest.raises(RuntimeError, match="went away"):
        pretrain(config, callbacks=[FailAtStart()])
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # the step-0 evaluation was recorded
    result = pretrain(config)  # no --resume needed: nothing was trained
    assert result["steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r and not r.get("final")] == [0]


def test_eval_ppl_refuses_zero_blocks(small_tokenizer, token_files, tmp_path, capsys):
    pretrain(smoke_config(small_tokenizer, token_files, tmp_path / "run", "train.max_steps=1"))
    capsys.readouterr()
    args = ["eval", "ppl", "--model", str(tmp_path / "run" / "final"), "--data", str(token_files["validation"])]
    assert main([*args, "--seq-len", "32", "--max-blocks", "0"]) == 2
    assert "--max-blocks must be at least 1" in capsys.readouterr().err
    assert main([*args, "--seq-len", "100000"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_sampling_during_training_leaves_the_training_randomness_alone(small_tokenizer, token_files, tmp_path):
    """Dropout draws from the global RNG; samples at every evaluation must not reseed it."""
    common = ["train.max_steps=4", "train.eval_steps=1", "model.dropout=0.2", "sample_max_new_tokens=3"]
    pretrain(smoke_config(small_tokenizer, token_files, tmp_path / "with", *common))
    pretrain(smoke_config(small_tokenizer, token_files, tmp_path / "without", *common, "sample_prompts=[]"))
    with_samples, without = step_losses(tmp_path / "with"), step_losses(tmp_path / "without")
    assert (tmp_path / "with" / "samples.jsonl").stat().st_size > 0
    assert sorted(with_samples) == [1, 2, 3, 4]
    assert with_samples == without


@pytest.fixture(scope="module")
def saved_model(small_tokenizer, token_files, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trl") / "run"
    pretrain(smoke_config(small_tokenizer, token_files, run, "train.max_steps=1", "train.eval_steps=0"))
    return run / "final"


def test_trl_loads_a_saved_folder_through_its_own_loader(saved_model):
    import torch
    from trl.trainer.utils import create_model_from_path

    from tiny_llama2_zh.loading import load_model

    model = create_model_from_path(str(saved_model))
    ours, _ = load_model(saved_model)
    assert type(model).__name__ == "TinyLlama2ForCausalLM"
    assert model.config._name_or_path == str(saved_model)  # where TRL reloads a reference model from
    batch = torch.tensor([[1, 5, 9, 12]])
    torch.testing.assert_close(model(batch).logits, ours(batch).logits)


def test_trl_loads_a_saved_folder_in_a_process_that_never_imports_the_package(saved_model):
    script = textwrap.dedent(
        f"""
        import sys
        from trl.trainer.utils import create_model_from_path
        model = create_model_from_path({str(saved_model)!r}, trust_remote_code=True)
        assert not any(name.startswith("tiny_llama2_zh") for name in sys.modules), "the package was imported"
        print(type(model).__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("TinyLlama2ForCausalLM")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


# The floors of the package, lowest first (README, "Architecture"): a module imports only from its own floor or
# below, so that each floor can be read, tested and reused without the ones above it. Longest prefix wins.
FLOORS = {
    # 0: foundations, importable alone (model.py imports nothing of the package: it is copied beside the weights)
    "model": 0, "presets": 0, "tokenizer": 0, "tensors": 0, "errors": 0, "config": 0, "runfiles": 0, "recipes": 0,
    "__init__": 0,
    # 1: data (and the names of the quantisation methods)
    "data": 1, "quantize.__init__": 1,
    # 2: loading a model folder (float or quantised weights) and decoding with it
    "loading": 2, "quantize.methods": 2, "infer": 2,
    # 3: measuring models
    "eval": 3,
    # 4: training stages (they measure themselves with eval)
    "train": 4,
    # 5: what is made from trained models: quantisation reports, exports
    "quantize": 5, "export": 5,
    # 6: the pipeline and the command line
    "demo": 6, "cli": 6,
}  # fmt: skip
RECIPE_MODULES = {f"train.{stage}" for stage in ("pretrain", "sft", "reward", "ppo", "rloo", "dpo", "grpo")}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def floor(name: str) -> int:
    keys = [key for key in FLOORS if name == key or name.startswith(key + ".")]
    assert keys, f"tiny_llama2_zh.{name} is on no floor: add it to FLOORS (and the README's Architecture section)"
    return FLOORS[max(keys, key=len)]


def package_imports(path: Path) -> set[str]:
    """The package modules `path` imports (at the top or inside functions), without the `tiny_llama2_zh.` prefix."""
    names = set()
    for name in imported_modules(path):
        if name.startswith("tiny_llama2_zh."):
            name = name.removeprefix("tiny_llama2_zh.")
            names.add(f"{name}.__init__" if (PACKAGE / name.replace(".", "/")).is_dir() else name)
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_lower_floors_never_import_higher_ones(path):
    name = module_name(path)
    upward = [other for other in package_imports(path) if floor(other) > floor(name)]
    assert not upward, f"tiny_llama2_zh.{name} (floor {floor(name)}) imports from a higher floor: {upward}"


@pytest.mark.parametrize("recipe", sorted(RECIPE_MODULES))
def test_recipes_never_import_each_other(recipe):
    others = package_imports(PACKAGE / (recipe.replace(".", "/") + ".py")) & (RECIPE_MODULES - {recipe})
    assert not others, f"tiny_llama2_zh.{recipe} imports the recipe(s) {others}: shared code belongs in train/rl.py"


def test_the_layering_check_can_fail(tmp_path):
    """The checks above read real import statements: a module that imports upward is caught."""
    upward = tmp_path / "data" / "bad.py"
    upward.parent.mkdir()
    upward.write_text("def f():\n    from tiny_llama2_zh.train.sft import sft\n", encoding="utf-8")
    assert package_imports(upward) == {"train.sft"} and floor("train.sft") > floor("data.bad")
    assert not {name.split(".")[0] for name in imported_modules(PACKAGE / "model.py")} & {"tiny_llama2_zh"}


def test_the_demo_recipe_ships_inside_the_package():
    from tiny_llama2_zh.recipes import RECIPES

    for recipe in RECIPES.values():
        path = recipe.demo_config()
        assert path.is_file() and PACKAGE.resolve() in path.resolve().parents
