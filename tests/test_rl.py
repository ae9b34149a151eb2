"""What the reinforcement-learning stages share (train/rl.py), checked through the command line for every RL stage
(ppo, rloo, grpo): a quantised starting folder is refused naming its float source, too few prompts for one step is
refused naming the counts, and in both cases before a run folder is written."""

import json
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from tiny_llama2_zh.cli import main

REVIEWS = ["这本书很好看", "质量太差了", "物流很快", "包装破损", "非常满意", "不推荐购买", "孩子很喜欢", "用了两天就坏"]


def is_pickle(path: Path) -> bool:
    """A pickle (protocol 2 to 5: 0x80 and the protocol), or torch.save's zip holding one. A safetensors file starts
    with its 8-byte header length (which may begin with 0x80), then its JSON header."""
    with path.open("rb") as file:
        head = file.read(9)
    if len(head) < 2 or (path.suffix == ".safetensors" and head[8:9] == b"{"):
        return False
    return (head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04")


def pickle_files(folder: Path) -> list[Path]:
    """Files under `folder` that are pickles: loading one runs code."""
    return [path for path in folder.rglob("*") if path.is_file() and is_pickle(path)]


def assert_shipped_folder_is_pickle_free(final: Path) -> None:
    """A run's final/ holds no pickle, and its training arguments stay readable as JSON."""
    assert final.is_dir()
    assert pickle_files(final) == [] and not list(final.rglob("*.bin"))
    arguments = json.loads((final / "training_args.json").read_text(encoding="utf-8"))
    assert Path(arguments["output_dir"]) == final.parent


def write_sentiment_prompts(folder: Path, count: int) -> Path:
    """`count` checkable sentiment prompts as a chat file in a `sentiment/` task folder (GRPO's checkers need it)."""
    path = folder / "sentiment" / "sft-train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"判断：{REVIEWS[i % len(REVIEWS)]}{i}"},
                {"role": "assistant", "content": ["正面", "负面"][i % 2]},
            ]
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def rl_argv(stage: str, policy: Path, reward_model: Path, prompts: Path, output_dir: Path, *extra: str) -> list[str]:
    """`tinyllm STAGE --config configs/STAGE/demo.yaml ...` for a tiny run: 8 prompts make one step of each."""
    model = (
        [f"model.init_from={policy}"]
        if stage == "grpo"
        else [f"model.policy={policy}", f"model.reward_model={reward_model}"]
    )
    batch = {
        "ppo": [
            "ppo.rollout_batch_size=8",
            "ppo.mini_batch_size=4",
            "ppo.ppo_epochs=1",
            "ppo.max_new_tokens=4",
            f"data.ptx={prompts}",
        ],
        "rloo": ["train.per_device_train_batch_size=8", "train.num_generations=4", "train.max_completion_length=4"],
        "grpo": ["train.per_device_train_batch_size=8", "train.num_generations=4", "train.max_completion_length=4"],
    }[stage]
    return [
        stage,
        "--config",
        str(REPO_ROOT / "configs" / stage / "demo.yaml"),
        *model,
        f"data.prompts={prompts}",
        f"data.validation={prompts}",
        f"train.output_dir={output_dir}",
        "train.max_steps=2",
        "train.save_steps=2",
        "train.eval_steps=0",
        "train.report_to=[]",
        *batch,
        *extra,
    ]


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from tiny_llama2_zh.loading import load_model
    from tiny_llama2_zh.quantize.methods import apply_method, save_quantized

    model, tokenizer = load_model(tiny_model_dir, "cpu")
    folder = tmp_path_factory.mktemp("quantized")
    return save_quantized(apply_method(model, "int8-dynamic"), tokenizer, folder, "int8-dynamic", 32, tiny_model_dir)


@pytest.mark.parametrize("stage", ["ppo", "rloo", "grpo"])
def test_an_rl_stage_refuses_a_quantized_policy_naming_its_float_source(
    stage, tiny_model_dir, quantized_dir, tmp_path, capsys
):
    prompts = write_sentiment_prompts(tmp_path / "tasks", 8)
    output_dir = tmp_path / "run"
    assert main(rl_argv(stage, quantized_dir, tiny_model_dir, prompts, output_dir)) == 2
    error = capsys.readouterr().err
    assert f"{quantized_dir} is a quantised folder (int8-dynamic); training needs a float model folder" in error
    assert f"the one it was quantised from ({tiny_model_dir})" in error
    assert not output_dir.exists()


@pytest.mark.parametrize(
    ("stage", "batch", "counts"),
    [
        ("ppo", ["ppo.rollout_batch_size=8"], "ppo.rollout_batch_size 8"),
        (
            "rloo",
            ["train.per_device_train_batch_size=64", "train.num_generations=8"],
            "64 replies per generation batch = 8 prompts x train.num_generations 8",
        ),
        (
            "grpo",
            ["train.per_device_train_batch_size=64", "train.num_generations=8"],
            "64 replies per generation batch = 8 prompts x train.num_generations 8",
        ),
    ],
)
def test_an_rl_stage_refuses_fewer_prompts_than_one_step_needs(stage, batch, counts, tiny_model_dir, tmp_path, capsys):
    prompts = write_sentiment_prompts(tmp_path / "tasks", 7)
    output_dir = tmp_path / "run"
    assert main(rl_argv(stage, tiny_model_dir, tiny_model_dir, prompts, output_dir, *batch)) == 2
    error = capsys.readouterr().err
    assert "data.prompts: 7 usable prompts, fewer than the 8 that one step needs" in error and counts in error
    assert not output_dir.exists()
