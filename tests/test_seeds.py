"""Determinism: a training stage run twice in one process with the same `train.seed` gives the same losses and the
same weights, and another seed gives other ones. This is what `tinyllm demo --seed N` and
benchmarks/post_training_seeds.py rest on: a spread over seeds means something only if one seed is one result.
(On CPU, with a fixed thread count; across CPU kinds and thread counts float sums may be ordered differently.)"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from test_sft import recipe
from tiny_llama2_zh.runfiles import METRICS_FILE, read_metrics
from tiny_llama2_zh.train.sft import sft

# what a run computes (not how fast): every loss, gradient norm and learning rate, at every step
COMPUTED = ("step", "loss", "grad_norm", "learning_rate", "eval_loss")


def _tiny_sft(tiny_model_dir: Path, folder: Path, seed: int) -> tuple[list[dict], dict[str, torch.Tensor], str]:
    """A 3-step SFT run (test_sft's tiny recipe) with `seed`: its metrics records, final weights and samples."""
    sft(recipe(tiny_model_dir, folder, f"train.seed={seed}", "train.eval_steps=1"))
    run = folder / "run"
    records = [{key: record[key] for key in COMPUTED if key in record} for record in read_metrics(run / METRICS_FILE)]
    weights = load_file(run / "final" / "model.safetensors")
    return records, weights, (run / "samples.jsonl").read_text(encoding="utf-8")


def test_the_same_seed_trains_the_same_model_and_another_seed_another(tiny_model_dir, tmp_path):
    first = _tiny_sft(tiny_model_dir, tmp_path / "first", seed=11)
    torch.manual_seed(12345)  # the process-wide RNG elsewhere must not matter: the run seeds itself
    second = _tiny_sft(tiny_model_dir, tmp_path / "second", seed=11)
    other = _tiny_sft(tiny_model_dir, tmp_path / "other", seed=12)

    assert sum("loss" in record for record in first[0]) == 3 and sum("eval_loss" in r for r in first[0]) >= 4
    assert second[0] == first[0]  # every training and held-out loss, gradient norm and learning rate, exactly
    assert first[1].keys() == second[1].keys()
    assert all(torch.equal(first[1][name], second[1][name]) for name in first[1]), "weights differ"
    assert second[2] == first[2]  # the sampled replies too

    train_losses = lambda run: [record["loss"] for record in run[0] if "loss" in record]  # noqa: E731
    assert train_losses(other) != train_losses(first)
    assert any(not torch.equal(first[1][name], other[1][name]) for name in first[1])
