"""Quantisation: each method's folder reloads to the very same model, loads wherever a model folder does, stores the
tied embedding once, and a folder that does not match its recipe is refused."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny_model
from tiny_llama2_zh.cli import main
from tiny_llama2_zh.infer.generate import SamplingOptions, generate_text
from tiny_llama2_zh.loading import init_tokenizer, load_model
from tiny_llama2_zh.quantize import METHODS
from tiny_llama2_zh.quantize.methods import (
    WEIGHTS_FILE,
    _pack_int4,
    _unpack_int4,
    apply_method,
    load_quantized,
    save_quantized,
)
from tiny_llama2_zh.quantize.report import markdown_table, quantize_report


@pytest.fixture(scope="module")
def float_model_dir(small_tokenizer, tmp_path_factory) -> Path:
    # width 128 (as the demo model): scales are a small share of each row, as in real models
    folder = tmp_path_factory.mktemp("float_model")
    return save_tiny_model(small_tokenizer, folder, hidden_size=128, initializer_range=0.1)


def quantized_folder(float_model_dir: Path, folder: Path, method: str) -> Path:
    model, tokenizer = load_model(float_model_dir, "cpu")
    return save_quantized(apply_method(model, method, 32), tokenizer, folder, method, 32, float_model_dir)


@pytest.fixture(scope="module")
def prompt_ids(small_tokenizer) -> torch.Tensor:
    from tiny_llama2_zh.tokenizer import load_tokenizer

    return load_tokenizer(small_tokenizer)("今天天气很好，我们去公园", return_tensors="pt").input_ids


def test_cli_lists_every_method(capsys):
    """`tinyllm quantize --help` reads the one registry of methods (quantize/__init__.py)."""
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "{" + ",".join(METHODS) + "}" in capsys.readouterr().out


@pytest.mark.parametrize("method", list(METHODS))
def test_a_quantized_folder_reloads_to_the_same_model_and_stays_close_to_float(
    method, float_model_dir, prompt_ids, tmp_path
):
    reference, _ = load_model(float_model_dir, "cpu")
    model, tokenizer = load_model(float_model_dir, "cpu")
    quantized = apply_method(model, method, 32)
    with torch.inference_mode():
        expected, logits = reference(prompt_ids).logits, quantized(prompt_ids).logits
    similarity = torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0)
    assert similarity > (0.98 if method.startswith("int8") else 0.9)
    assert not torch.equal(logits, expected)  # the weights really changed

    folder = save_quantized(quantized, tokenizer, tmp_path / method, method, 32, float_model_dir)
    reloaded, reloaded_tokenizer = load_model(folder)  # the loader every command uses
    with torch.inference_mode():
        assert torch.equal(reloaded(prompt_ids).logits, logits)  # stored integers are used as they are
    options = SamplingOptions(max_new_tokens=8)
    assert generate_text(reloaded, reloaded_tokenizer, "今天", options) == generate_text(
        quantized, tokenizer, "今天", options
    )
    assert json.loads((folder / "quantization.json").read_text())["method"] == method


@pytest.mark.parametrize("method", list(METHODS))
def test_the_tied_embedding_is_stored_once_and_int8_is_over_3_5x_smaller(method, float_model_dir, tmp_path):
    folder = quantized_folder(float_model_dir, tmp_path / method, method)
    stored = load_file(folder / WEIGHTS_FILE)
    embedding_keys = [key for key in stored if key.startswith(("model.embed_tokens", "lm_head"))]
    # one matrix (qdata, scale, zero_point) for both the embedding and the head
    assert len(embedding_keys) == 3, embedding_keys
    assert all(value.dtype in (torch.int8, torch.uint8) for key, value in stored.items() if key.endswith(".qdata"))
    ratio = (float_model_dir / "model.safetensors").stat().st_size / (folder / WEIGHTS_FILE).stat().st_size
    assert ratio >= (5.0 if method == "int4-weight" else 3.5)


def test_int4_packing_round_trips_every_value():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    packed = _pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(_unpack_int4(packed), values)


def test_a_folder_that_does_not_match_its_recipe_is_refused(float_model_dir, tmp_path):
    folder = quantized_folder(float_model_dir, tmp_path / "q", "int8-weight")
    stored = load_file(folder / WEIGHTS_FILE)
    del stored["model.layers.1.mlp.down_proj.weight.scale"]
    save_file(stored, folder / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.down_proj.weight.scale'\]"):
        load_quantized(folder)

    recipe = json.loads((folder / "quantization.json").read_text())
    (folder / "quantization.json").write_text(json.dumps({**recipe, "method": "int3"}))
    with pytest.raises(ValueError, match="unknown quantisation method 'int3'"):
        load_quantized(folder)


def test_bad_options_are_refused(float_model_dir, tmp_path):
    model, _ = load_model(float_model_dir, "cpu")
    with pytest.raises(ValueError, match="must be a power of two"):
        apply_method(model, "int4-weight", 24)
    with pytest.raises(ValueError, match="does not divide the model's input width 128"):
        apply_method(model, "int4-weight", 256)
    folder = quantized_folder(float_model_dir, tmp_path / "dynamic", "int8-dynamic")
    with pytest.raises(ValueError, match="fbgemm's CPU kernels"):
        load_quantized(folder, device="cuda")


def test_cli_quantizes_and_reports_errors_without_a_traceback(float_model_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(float_model_dir), "--output", str(tmp_path / "q")]) == 2
    assert "--method is required" in capsys.readouterr().err
    output = tmp_path / "int8"
    argv = ["quantize", "--model", str(float_model_dir), "--output", str(output), "--method", "int8-weight"]
    assert main(argv) == 0
    assert (output / WEIGHTS_FILE).is_file() and (output / "tokenizer.json").is_file()
    # a quantised folder is not quantised again, nor exported: both need float weights
    for argv in (
        ["quantize", "--model", str(output), "--output", str(tmp_path / "again"), "--method", "int4-weight"],
        ["export", "gguf", "--model", str(output), "--output", str(tmp_path / "q.gguf")],
    ):
        assert main(argv) == 2
        assert f"is a quantised folder (int8-weight); {argv[0]} needs a float model folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"training needs a float model folder, e\.g\. the one it was quantised from"):
        init_tokenizer(output)  # where sft, reward and dpo read their starting folder


def test_cli_report_passes_every_option_through(float_model_dir, token_files, tmp_path, capsys):
    output = tmp_path / "report"
    argv = ["quantize", "--report", "--model", str(float_model_dir), "--output", str(output), "--shape", "none"]
    assert (
        main([*argv, "--validation", str(token_files["validation"]), "--max-blocks", "1", "--method", "int4-weight"])
        == 0
    )
    report = json.loads((output / "quantize_report.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["float32", "int4-weight"]
    assert report["validation_blocks"] == 1 and report["rows"][1]["perplexity"] > 1
    assert "| int4-weight |" in capsys.readouterr().out


def test_report_measures_every_method_against_float(float_model_dir, token_files, tmp_path):
    report = quantize_report(
        [float_model_dir], tmp_path / "report", validation=token_files["validation"], max_blocks=2, shape=None,
        progress=lambda message: None, decode_tokens=4, repeats=1,
    )  # fmt: skip
    rows = report["rows"]
    assert [row["method"] for row in rows] == ["float32", *METHODS]
    assert rows[0]["perplexity_change"] == 0.0
    for row in rows[1:]:
        assert row["size_bytes"] * 3.5 <= rows[0]["size_bytes"]
        assert row["perplexity"] > 1 and row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
        if row["method"].startswith("int8"):
            assert abs(row["perplexity_change"]) < 0.05
    table = markdown_table(report)
    assert table.count("\n| ") == len(rows) and "int4-weight" in table
    header = (tmp_path / "report" / "quantize_report.md").read_text().splitlines()[0]
    assert [cell.strip() for cell in header.strip("|").split("|")][:2] == ["model", "method"]
