"""The real-size recipes' options, proven on CPU: bf16 (CPU autocast) and torch.compile (inductor's CPU backend)
through the pretraining, SFT and DPO recipes, resume from a compiled bf16 checkpoint, the fused chunked loss under
autocast, fused AdamW, SDPA, gradient accumulation and activation checkpointing. Tiny shapes in CI; the slow tier
runs the recipes at the 24m shape.

Tolerances. bf16 keeps 8 significant bits: one rounding is a relative error of at most 2^-9 (0.2 %), and a loss
near ln(1024) = 6.93 held in bf16 has a resolution of 2^-5 = 0.03 nats. The matmuls accumulate in float32 and the
softmax of the loss runs in float32, so a few steps of bf16 training land far closer than that to float32 (measured:
2e-4 nats after 4 pretraining steps); `BF16_LOSS_NATS` = 0.02 nats, below one bf16 step of the loss itself, fails a
real dtype bug (a loss computed from bf16 logits, a mask in the wrong dtype) and passes rounding. Compiled and
eager float32 differ only by the order of float32 sums: 1e-5.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch._dynamo.utils import counters

from conftest import save_tiny_model, smoke_config, tiny_config
from test_dpo_grpo import dpo_recipe
from test_pretrain_robustness import step_losses
from test_sft import recipe as sft_recipe
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.train.pretrain import pretrain

BF16_LOSS_NATS = 0.02
GPU_OPTIONS = ("train.bf16=true", "train.torch_compile=true")

# The 24m preset's shape (presets.py) with the test tokenizer's vocabulary, for the slow tier.
SHAPE_24M = {"hidden_size": 288, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 6}
SHAPES = [pytest.param("tiny", id="tiny"), pytest.param("24m", id="24m", marks=pytest.mark.slow)]


def model_overrides(shape: str) -> list[str]:
    if shape == "tiny":
        return []
    return ["model.size=24m", *(f"model.{k}={v}" for k, v in SHAPE_24M.items()), "model.max_position_embeddings=512"]


def compiled_graphs() -> int:
    """Graphs dynamo has compiled since the last `counters.clear()`."""
    return counters["stats"]["unique_graphs"]


def safetensors_keys_and_dtypes(path: Path) -> dict[str, torch.dtype]:
    with safe_open(str(path), "pt") as weights:
        return {key: weights.get_tensor(key).dtype for key in weights.keys()}  # noqa: SIM118 (not a dict)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_losses_close(actual: dict[int, float], expected: dict[int, float], tolerance: float) -> None:
    assert sorted(actual) == sorted(expected)
    for step, loss in expected.items():
        assert actual[step] == pytest.approx(loss, abs=tolerance), f"step {step}: {actual[step]} vs {loss}"


# ------------------------------------------------------------------------------------------- the recipes, end to end
@pytest.mark.parametrize("shape", SHAPES)
def test_pretraining_in_bf16_with_compiled_layers_matches_float32_eager_and_resumes(
    shape, small_tokenizer, token_files, tmp_path
):
    steps = ["train.max_steps=4", "train.save_steps=2", "model.fused_loss_chunk_rows=16", *model_overrides(shape)]
    if shape == "24m":
        steps += ["data.seq_len=256", "train.per_device_train_batch_size=4"]

    def run(folder: Path, *extra: str) -> dict[int, float]:
        pretrain(smoke_config(small_tokenizer, token_files, folder, *steps, *extra))
        return step_losses(folder)

    reference = run(tmp_path / "eager")
    counters.clear()
    compiled = run(tmp_path / "compiled", *GPU_OPTIONS)
    # one graph for every layer and step: a fixed shape compiles once (grad mode on; evaluation and the samples
    # run the layers eagerly)
    assert compiled_graphs() == 1, dict(counters["stats"])
    assert_losses_close(compiled, reference, BF16_LOSS_NATS)
    assert compiled != reference  # bf16 did round something: the options were not silently ignored

    # The checkpoint holds float32 master weights under the model's own names (no `_orig_mod.` of torch.compile).
    checkpoint = tmp_path / "compiled" / "checkpoint-2"
    saved = safetensors_keys_and_dtypes(checkpoint / "model.safetensors")
    eager_saved = safetensors_keys_and_dtypes(tmp_path / "eager" / "checkpoint-2" / "model.safetensors")
    assert saved == eager_saved and set(saved.values()) == {torch.float32}

    # Killed after step 2 (its checkpoint kept), resumed: steps 3 and 4 as in the uninterrupted compiled run.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "compiled", resumed_dir)
    for later in ("checkpoint-4", "final"):
        shutil.rmtree(resumed_dir / later)
    resumed = run(resumed_dir, *GPU_OPTIONS, "resume=true")
    assert_losses_close(resumed, compiled, 1e-5)


@pytest.fixture(scope="module", params=SHAPES)
def model_dir(request, small_tokenizer, tmp_path_factory) -> Path:
    """A `final/`-like folder at the tiny shape or the 24m preset's."""
    fields = {} if request.param == "tiny" else SHAPE_24M
    return save_tiny_model(
        small_tokenizer, tmp_path_factory.mktemp(f"model_{request.param}"), max_position_embeddings=128, **fields
    )


def test_sft_with_packing_in_bf16_with_compiled_layers_matches_float32_eager(model_dir, tmp_path):
    """Packed rows change length at every step. Compiled whole by accelerate (Trainer's own torch_compile), the
    model recompiled at each of these 4 steps: the fused loss's chunk loop and create_causal_mask specialise on
    the length. Compiled layer by layer with dynamic shapes (runner.compile_decoder_layers): one graph."""
    from tiny_llama2_zh.train.sft import sft

    # one micro-batch per step (the demo recipe's 4 would put every packed row of this small set in each step)
    steps = [
        "train.max_steps=4",
        "train.packing=true",
        "model.fused_loss_chunk_rows=16",
        "train.gradient_accumulation_steps=1",
    ]
    reference = sft(sft_recipe(model_dir, tmp_path / "eager", *steps))
    counters.clear()
    compiled = sft(sft_recipe(model_dir, tmp_path / "compiled", *steps, *GPU_OPTIONS))
    assert compiled_graphs() == 1, dict(counters["stats"])  # one graph, its length dynamic from the first batch
    seen = [r["num_input_tokens_seen"] for r in records(tmp_path / "compiled" / "run") if "loss" in r]
    assert len({after - before for before, after in zip([0, *seen], seen)}) > 1  # the steps' lengths did vary
    assert_losses_close(
        step_losses(tmp_path / "compiled" / "run"), step_losses(tmp_path / "eager" / "run"), BF16_LOSS_NATS
    )
    assert compiled["final_validation_loss"] == pytest.approx(reference["final_validation_loss"], abs=BF16_LOSS_NATS)


def test_dpo_in_bf16_with_compiled_layers_matches_float32_eager(model_dir, tmp_path):
    """DPO's batches are padded to their longest pair, so lengths vary too; TRL prepares the frozen reference
    model in its __init__, where accelerate compiled it whole (a graph break in TRL's chunked log-prob kernel
    and a recompile per length): the runner unwraps it."""
    from tiny_llama2_zh.train.dpo import dpo

    steps = ["train.max_steps=3", "train.save_steps=3", "train.eval_steps=0", "train.logging_steps=1"]
    reference = dpo(dpo_recipe(model_dir, tmp_path / "eager", *steps))
    counters.clear()
    compiled = dpo(dpo_recipe(model_dir, tmp_path / "compiled", *steps, *GPU_OPTIONS))
    # 3 steps of 4 length-sorted micro-batches (the demo recipe's), lengths varying: no graph per length (batch and
    # length dynamic), but two for the attention mask -- a tensor, or None for a micro-batch whose rows are all one
    # length (it needs no padding); the reference model runs eagerly
    assert compiled_graphs() <= 2, dict(counters["stats"])
    assert_losses_close(
        step_losses(tmp_path / "compiled" / "run"), step_losses(tmp_path / "eager" / "run"), BF16_LOSS_NATS
    )
    assert compiled["final"]["margin"] == pytest.approx(reference["final"]["margin"], abs=BF16_LOSS_NATS)


# ------------------------------------------------------------------------------------------------ the model's paths
def random_model(**overrides) -> TinyLlama2ForCausalLM:
    return TinyLlama2ForCausalLM(tiny_config(initializer_range=0.3, **overrides))


def gradients(model: TinyLlama2ForCausalLM) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).norm() / expected.norm())


def test_generation_with_compiled_layers_runs_them_eagerly():
    """Decoding with a KV cache through compiled layers recompiled at every new cache layout until dynamo's limit
    (8) switched compilation off for the layers, training included: forwards without grad mode run eagerly."""
    model = random_model().eval()
    ids = torch.randint(3, 97, (2, 5))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    counters.clear()
    model.compile_layers()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    torch.testing.assert_close(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
    assert compiled_graphs() == 0 and torch.isfinite(loss)


def test_fused_loss_under_bf16_autocast_gives_the_plain_losss_gradients():
    """The chunked loss (LinearCrossEntropy) under autocast: bf16 matmuls, a float32 softmax and float32 weight
    gradients, within bf16 rounding of both the plain bf16 path and float32."""
    model = random_model().train()
    ids = torch.randint(3, 97, (3, 20))
    model(ids, labels=ids).loss.backward()
    float32 = gradients(model)
    results = {}
    for chunk_rows in (None, 7):  # 7 rows: the chunks do not divide the 57 rows evenly
        model.fused_loss_chunk_rows = chunk_rows
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        assert loss.dtype == torch.float32
        loss.backward()
        results[chunk_rows] = loss.detach(), gradients(model)
    (plain_loss, plain), (fused_loss, fused) = results[None], results[7]
    torch.testing.assert_close(fused_loss, plain_loss, atol=BF16_LOSS_NATS, rtol=0)
    for name, grad in float32.items():
        assert fused[name].dtype == torch.float32, name
        # the fused and the plain bf16 paths round the same products: within 3 % of the gradient's norm; against
        # float32, bf16 inputs to every matmul of two layers (measured up to 3.4 %, the embedding's): 6 %. A
        # gradient in the wrong dtype, or one chunk's rows scaled twice, is off by far more.
        assert relative_error(fused[name], plain[name]) < 0.03, name
        assert relative_error(fused[name], grad) < 0.06, name


def test_attention_runs_through_sdpa_and_its_flash_kernel_on_cpu():
    """The default attention is PyTorch's scaled_dot_product_attention. Which kernel runs: on a CPU, an
    unpadded causal batch (no mask: SDPA's is_causal) takes the flash-attention CPU kernel; a padded one passes
    a boolean mask and PyTorch's dispatcher picks (math or flash CPU, both fused in one op). On a GPU the same
    call dispatches to FlashAttention-2 or memory-efficient attention."""
    model = random_model().train()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 97, (2, 12))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(ids, labels=ids).loss.backward()
    names = {event.name for event in profile.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    sdpa = gradients(model)
    model.config._attn_implementation = "eager"
    model(ids, labels=ids).loss.backward()
    for name, grad in gradients(model).items():
        torch.testing.assert_close(sdpa[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_adamw_is_what_the_trainer_builds_and_steps_like_the_plain_one(tmp_path):
    """`optim: adamw_torch_fused` (the project default on a GPU, runner.project_defaults) is torch's fused AdamW,
    one kernel for all parameters; torch also has it for CPU tensors, so it runs here."""
    from transformers import Trainer, TrainingArguments

    from tiny_llama2_zh.train.runner import training_arguments

    models, optimizers = [], []
    for optim in ("adamw_torch_fused", "adamw_torch"):
        torch.manual_seed(0)
        model = random_model()
        args = training_arguments(TrainingArguments, {"output_dir": str(tmp_path / optim), "optim": optim})
        optimizer = Trainer(model=model, args=args).create_optimizer()
        assert bool(optimizer.defaults["fused"]) is (optim == "adamw_torch_fused")  # None: torch decides (not fused)
        assert optimizer.defaults["betas"] == (0.9, 0.95)
        assert optimizer.param_groups[0]["weight_decay"] == 0.1  # decayed matrices; norms are in a group without
        models.append(model)
        optimizers.append(optimizer)
    ids = torch.randint(3, 97, (2, 12))
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, fused), plain in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_accumulation_trains_like_the_bigger_batch(small_tokenizer, token_files, tmp_path):
    """2 micro-batches of 2 = one batch of 4: the same samples in the same order, the loss normalised over the
    whole step's tokens (num_items_in_batch reaches the fused loss), so the weights after two steps agree."""
    from tiny_llama2_zh.loading import load_model

    runs = {
        "big": ["train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1"],
        "accumulated": ["train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2"],
    }
    models = {}
    for name, options in runs.items():
        chunked = "model.fused_loss_chunk_rows=16"
        pretrain(smoke_config(small_tokenizer, token_files, tmp_path / name, chunked, *options))
        models[name] = load_model(tmp_path / name / "final")[0]
    assert_losses_close(step_losses(tmp_path / "accumulated"), step_losses(tmp_path / "big"), 1e-5)
    # the gradient norm before clipping: a micro-batch normalised on its own would halve it (Adam's update alone
    # would not show that: it divides the scale out)
    norms = {name: [r["grad_norm"] for r in records(tmp_path / name) if "grad_norm" in r] for name in runs}
    assert norms["accumulated"] == pytest.approx(norms["big"], rel=1e-4) and len(norms["big"]) == 2
    # float32 sums in another order; Adam's first steps (lr 3e-3, g / sqrt(v) near +-1) amplify those for tiny
    # gradients, so weights agree within 3 % of one step
    for (name, big), accumulated in zip(models["big"].named_parameters(), models["accumulated"].parameters()):
        torch.testing.assert_close(accumulated, big, atol=1e-4, rtol=1e-4, msg=name)


def test_activation_checkpointing_gives_the_same_gradients():
    """`gradient_checkpointing: true` (transformers' GradientCheckpointingLayer around each decoder layer):
    activations are recomputed in the backward pass, the gradients are the same."""
    model = random_model().train()
    model.fused_loss_chunk_rows = 16
    ids = torch.randint(3, 97, (2, 12))
    model(ids, labels=ids).loss.backward()
    plain = gradients(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(ids, labels=ids).loss.backward()
    # the layers' forward ran twice: once in the forward pass, once recomputed in the backward pass
    assert sum(event.name == "aten::_scaled_dot_product_flash_attention_for_cpu" for event in profile.events()) == 4
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, plain[name], msg=name)


# --------------------------------------------------------------------------------------------------------- sizing
def test_the_plan_counts_the_parameters_of_the_model_it_would_train():
    from tiny_llama2_zh.presets import count_parameters, preset_config
    from tiny_llama2_zh.train.plan import make_plan

    plan = make_plan("9m", 1e9, vocab_size=1024)
    built = TinyLlama2ForCausalLM(preset_config("9m", 1024))
    assert plan.parameters == sum(p.numel() for p in built.parameters()) == count_parameters(built.config)["total"]
    assert (plan.seq_len, plan.micro_batch) == (512, 64)  # configs/pretrain/9m.yaml's


def test_the_plans_flops_per_token_are_what_a_training_step_measures():
    """6N + 12·L·d·T against torch's FLOP counter over one forward and backward pass (its matmuls; the norms and
    the softmax, which the formula leaves out, it does not count either). The loss reads T-1 of T positions: -1.5 %
    here. Times the tokens/s a run logs, this is the MFU numerator (ThroughputCallback uses the same function)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tiny_llama2_zh.presets import preset_config
    from tiny_llama2_zh.train.plan import make_plan

    seq_len, batch = 64, 2
    plan = make_plan("9m", 1e9, vocab_size=1024, seq_len=seq_len, micro_batch=batch)
    # eager attention and the plain loss: the counter has no formula for SDPA's flash-attention CPU kernel, nor
    # for the in-place addmm_ of the fused loss; the arithmetic is the same
    model = TinyLlama2ForCausalLM(preset_config("9m", 1024, attn_implementation="eager")).train()
    ids = torch.randint(3, 1024, (batch, seq_len))
    with FlopCounterMode(display=False) as flops:
        model(ids, labels=ids).loss.backward()
    measured_per_token = flops.get_total_flops() / (batch * seq_len)
    assert measured_per_token == pytest.approx(plan.flops_per_token, rel=0.03)


def test_the_plans_memory_accounting_and_deepspeeds_estimator_differ_by_what_each_counts():
    """ZeRO paper: 2 + 2 + 12 bytes per parameter. DeepSpeed's estimators also count a float32 copy of the
    gradients (4 bytes, partitioned) and, for ZeRO-3, the largest layer gathered in float32."""
    from tiny_llama2_zh.train.plan import deepspeed_estimates, make_plan

    plan = make_plan("256m", 19e9, gpus=8)
    psi, n = plan.parameters, plan.gpus
    assert plan.model_state_bytes("DDP") == 16 * psi
    assert plan.model_state_bytes("ZeRO-1") == pytest.approx(4 * psi + 12 * psi / n)
    assert plan.model_state_bytes("ZeRO-2") == pytest.approx(2 * psi + 14 * psi / n)
    assert plan.model_state_bytes("ZeRO-3") == pytest.approx(16 * psi / n)
    assert plan.hours == pytest.approx(plan.flops_per_token * 19e9 / (8 * 989e12 * 0.4) / 3600)
    estimates = deepspeed_estimates(psi, plan.largest_layer_parameters, n)
    if estimates is None:
        pytest.skip("deepspeed is not installed")
    assert estimates["ZeRO-2"] == pytest.approx(plan.model_state_bytes("ZeRO-2") + 4 * psi / n, abs=1)
    largest = 4 * plan.largest_layer_parameters
    assert estimates["ZeRO-3"] == pytest.approx(plan.model_state_bytes("ZeRO-3") + 2 * psi / n + largest, abs=1)


def test_plan_command_prints_the_table(capsys):
    from tiny_llama2_zh.cli import main

    main(["plan", "--size", "24m", "--tokens", "1e9", "--gpus", "2", "--gpu", "a100"])
    table = capsys.readouterr().out
    assert "| model states per GPU, ZeRO-3" in table and "2 × A100 at 40% MFU" in table
    assert main(["plan", "--size", "24m", "--tokens", "1e9", "--gpu", "tpu"]) == 2  # a clear message, no traceback


# ------------------------------------------------------------------------------------------------ the GPU check
@pytest.mark.slow  # every part at a tiny shape: under 4 minutes on two quiet CPU cores
def test_the_gpu_check_runs_every_part_on_cpu(tmp_path):
    """The check's --cpu --tiny mode, a smoke test of the script itself. The time box per part is generous here:
    this test asserts that every part runs, and a CPU shared with other work (tests run niced) stretches wall time
    without bound; the script's own default box and its report (total seconds, load average) speak to the time."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--tiny", "--steps", "6",
               "--part-seconds", "1500", "--output", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=6000)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    errors = {name: part["error"] for name, part in report["parts"].items() if "error" in part}
    assert result.returncode == 0 and not errors, (errors, result.stderr[-3000:])
    parts = report["parts"]
    assert list(parts) == ["pretrain-24m", "pretrain-134m", "sft", "dpo", "grpo", "decode", "serve"]
    for size in ("24m", "134m"):
        pretraining = parts[f"pretrain-{size}"]
        assert pretraining["steps"] == 6 and pretraining["tokens_per_second"] > 0, pretraining
    # bf16 + compile ran: one graph for the layers at the tiny shape, which the 134m recipe (same shape) may reuse;
    # a recompile per step would count 6
    assert parts["pretrain-24m"]["compiled_graphs"] == 1 and parts["pretrain-134m"]["compiled_graphs"] <= 1
    assert all(parts[stage]["steps"] == 4 for stage in ("sft", "dpo", "grpo")), parts
    assert parts["decode"]["batch_1_tok_s"] > 0 and parts["decode"]["batch_8_tok_s"] > 0
    assert parts["serve"]["errors"] == 0
    assert len(report["load_average"]) == 2
    assert "| pretrain-134m |" in (tmp_path / "gpu_check.md").read_text()
