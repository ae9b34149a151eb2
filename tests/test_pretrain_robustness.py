"""Never lose work, never train garbage, scale past one process: kill-and-resume, divergence stop, torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from conftest import REPO_ROOT, smoke_config, smoke_overrides
from tiny_llama2_zh.errors import TrainingDivergedError
from tiny_llama2_zh.train.checkpoints import latest_complete_checkpoint
from tiny_llama2_zh.train.pretrain import pretrain

DEMO_YAML = REPO_ROOT / "configs" / "pretrain" / "demo.yaml"

# Runs the recipe in a child process; with KILL_AT_STEP set, the child SIGKILLs itself when that optimizer step
# ends: a real, unannounced death between checkpoints, as a preempted node or the OOM killer would cause.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import AutoModelForCausalLM, TrainerCallback
    from tiny_llama2_zh.config import load_config
    from tiny_llama2_zh.train.pretrain import PretrainConfig, pretrain

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

    config = load_config(PretrainConfig, sys.argv[1], sys.argv[2:])
    pretrain(config, callbacks=[KillAt()] if "KILL_AT_STEP" in os.environ else None)
    """
)


def overrides(small_tokenizer, token_files, output_dir, *extra) -> list[str]:
    batch = ["train.per_device_train_batch_size=4", "train.warmup_steps=2"]
    return smoke_overrides(small_tokenizer, token_files, output_dir, *batch, *extra)


def run_child(args: list[str], kill_at: int | None = None, launcher: list[str] | None = None):
    """The recipe in a child process: CHILD with the demo YAML and `args` as overrides, or `launcher + args`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at is not None:
        env["KILL_AT_STEP"] = str(kill_at)
    command = [*launcher, *args] if launcher else [sys.executable, "-c", CHILD, str(DEMO_YAML), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert len(losses) == len([r for r in records if "loss" in r]), "a step was logged twice"
    return losses


def test_sigkill_between_checkpoints_then_resume_matches_an_uninterrupted_run(small_tokenizer, token_files, tmp_path):
    steps = ["train.max_steps=8", "train.save_steps=3"]
    reference = run_child(overrides(small_tokenizer, token_files, tmp_path / "reference", *steps))
    assert reference.returncode == 0, reference.stderr[-3000:]

    crashed = tmp_path / "crashed"
    killed = run_child(overrides(small_tokenizer, token_files, crashed, *steps), kill_at=5)
    assert killed.returncode == -signal.SIGKILL
    assert latest_complete_checkpoint(crashed) == crashed / "checkpoint-3"
    assert (crashed / "checkpoint-3" / "config.yaml").is_file()  # the resolved config beside the checkpoint
    # the checkpoint's arguments as JSON, not transformers' pickle: the resume below needs none
    assert not (crashed / "checkpoint-3" / "training_args.bin").exists()
    assert json.loads((crashed / "checkpoint-3" / "training_args.json").read_text())["save_steps"] == 3
    # a checkpoint whose writing was cut short (no trainer_state.json yet) must be ignored, not resumed from
    shutil.copytree(crashed / "checkpoint-3", crashed / "checkpoint-6")
    (crashed / "checkpoint-6" / "trainer_state.json").unlink()

    resumed = run_child(overrides(small_tokenizer, token_files, crashed, *steps, "resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-3" in resumed.stdout

    expected, actual = step_losses(tmp_path / "reference"), step_losses(crashed)
    assert sorted(actual) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], abs=1e-6), step


class PoisonWeights(TrainerCallback):
    """Turns one weight into NaN after `step`, as an fp16 overflow would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")


def test_non_finite_loss_stops_with_step_and_last_good_checkpoint(small_tokenizer, token_files, tmp_path):
    config = smoke_config(small_tokenizer, token_files, tmp_path / "run", "train.max_steps=6", "train.save_steps=2")
    with pytest.raises(TrainingDivergedError) as error:
        pretrain(config, callbacks=[PoisonWeights(step=3)])
    message = str(error.value)
    assert "step 4" in message and "gradient norm is nan" in message and "Nothing of this step was applied" in message
    assert str(tmp_path / "run" / "checkpoint-2") in message
    assert not (tmp_path / "run" / "checkpoint-4").exists()


@pytest.fixture(scope="module")
def single_process_run(small_tokenizer, token_files, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    single = run_child(overrides(small_tokenizer, token_files, run_dir, "train.max_steps=4"))
    assert single.returncode == 0, single.stderr[-3000:]
    return run_dir


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


NO_DEEPSPEED = pytest.mark.skipif(not deepspeed_available(), reason="deepspeed not installed")


@pytest.mark.distributed
@pytest.mark.parametrize(
    "engine",
    [
        "ddp",
        # ZeRO-1 and ZeRO-3 take minutes on 2 cores: the slow tier (pytest -m slow); ZeRO-2 runs in CI
        pytest.param("zero1", marks=[NO_DEEPSPEED, pytest.mark.slow]),
        pytest.param("zero2", marks=NO_DEEPSPEED),
        pytest.param("zero3", marks=[NO_DEEPSPEED, pytest.mark.slow]),
    ],
)
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(
    engine, single_process_run, small_tokenizer, token_files, tmp_path
):
    """torchrun on CPU (gloo): plain DDP, and DeepSpeed ZeRO-2/3 through the Trainer with the shipped configs."""
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "-m", "tiny_llama2_zh.cli"]
    extra = ["train.max_steps=4", "train.per_device_train_batch_size=2"]
    if engine != "ddp":
        extra.append(f"train.deepspeed={REPO_ROOT / 'configs' / 'deepspeed' / f'{engine}.json'}")
    args = ["pretrain", "--config", str(DEMO_YAML), *overrides(small_tokenizer, token_files, tmp_path / "run", *extra)]
    distributed = run_child(args, launcher=torchrun)
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    one, two = step_losses(single_process_run), step_losses(tmp_path / "run")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
    # both processes trained one model, and it is the single-process run's model
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(single_process_run / "final").state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-4, rtol=1e-4)


# The CLI under torchrun, with an audit hook (PEP 578) on every process but rank 0 that notes each time it opens a
# metrics.jsonl* file for writing or renames one: only the main process may write the run's records.
AUDITED_CLI = textwrap.dedent(
    """
    import os, sys
    log = sys.argv.pop(1)
    if int(os.environ["RANK"]) != 0:
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

        def is_metrics(path):
            named = isinstance(path, (str, os.PathLike))
            return named and os.path.basename(os.fspath(path)).startswith("metrics.jsonl")

        def audit(event, args):
            writes = event == "open" and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR)
            if (writes and is_metrics(args[0])) or (event == "os.rename" and is_metrics(args[1])):
                os.write(log_fd, f"rank {os.environ['RANK']}: {event} {args[:2]}\\n".encode())

        sys.addaudithook(audit)
    from tiny_llama2_zh.cli import main
    sys.exit(main())
    """
)


@pytest.mark.distributed
def test_torchrun_resume_truncates_metrics_on_the_main_process_only(small_tokenizer, token_files, tmp_path):
    """Resuming drops the records after the checkpoint from metrics.jsonl: done by every rank (one shared `.tmp`
    name), the ranks raced over the file. Rank 1 must not touch it, and each step is recorded once."""
    run_dir = tmp_path / "run"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2"]
    args = ["pretrain", "--config", str(DEMO_YAML)]
    steps = ["train.max_steps=4", "train.save_steps=2", "train.per_device_train_batch_size=2"]
    cli = [*torchrun, "-m", "tiny_llama2_zh.cli"]
    first = run_child([*args, *overrides(small_tokenizer, token_files, run_dir, *steps)], launcher=cli)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.rmtree(run_dir / "checkpoint-4")  # as if the run died after logging steps 3 and 4, before saving them
    assert sorted(step_losses(run_dir)) == [1, 2, 3, 4]

    script, log = tmp_path / "audited_cli.py", tmp_path / "rank1-metrics-writes.txt"
    script.write_text(AUDITED_CLI)
    resume = [*args, *overrides(small_tokenizer, token_files, run_dir, *steps, "resume=true")]
    resumed = run_child([str(script), str(log), *resume], launcher=torchrun)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-2" in resumed.stdout
    assert log.read_text() == ""  # the file exists: rank 1 did install its audit hook, and it noted nothing
    assert sorted(step_losses(run_dir)) == [1, 2, 3, 4]  # steps 3 and 4 recomputed, each recorded once
    finals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("final")]
    assert len(finals) == 1
