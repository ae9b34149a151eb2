"""The model against references we did not write: transformers' LlamaForCausalLM and our own no-cache path."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache

from conftest import tiny_config
from tiny_llama2_zh.export.hf_llama import to_hf_llama
from tiny_llama2_zh.model import (
    LinearCrossEntropy,
    TinyLlama2Config,
    TinyLlama2ForCausalLM,
    TinyLlama2ForSequenceClassification,
    llama2c_hidden_dim,
)


def random_model(**overrides) -> TinyLlama2ForCausalLM:
    # A large init spread makes logits large and distinct, so a parity check compares real numbers, not ~0.
    return TinyLlama2ForCausalLM(tiny_config(initializer_range=0.3, **overrides)).eval()


def left_padded(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask


def test_config_rejects_unknown_keys_and_derives_hidden_dim():
    with pytest.raises(TypeError, match="hiden_size"):
        TinyLlama2Config(hiden_size=64)
    config = TinyLlama2Config(hidden_size=288, num_attention_heads=6)
    assert config.intermediate_size == 768  # llama2.c's stories15M: dim 288 -> hidden 768
    assert llama2c_hidden_dim(64, 32) == 192
    assert config.dim == 288 and config.n_kv_heads == 6  # llama2.c names read the same fields
    with pytest.raises(StrictDataclassClassValidationError, match="divisible"):
        TinyLlama2Config(hidden_size=64, num_attention_heads=8, num_key_value_heads=3)


def test_tied_embeddings_and_no_biases():
    model = random_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_logits_match_transformers_llama(n_kv_heads):
    model = random_model(num_key_value_heads=n_kv_heads)
    llama = to_hf_llama(model).eval()
    ids = torch.randint(3, 97, (3, 17))
    ours, theirs = model(ids).logits, llama(ids).logits
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero tensors
    torch.testing.assert_close(ours, theirs)


def test_logits_match_transformers_llama_with_cache_and_left_padding():
    model = random_model()
    llama = to_hf_llama(model).eval()
    ids, mask = left_padded([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    valid = mask.bool()
    ours = model(ids, attention_mask=mask, position_ids=position_ids)
    theirs = llama(ids, attention_mask=mask, position_ids=position_ids)
    torch.testing.assert_close(ours.logits[valid], theirs.logits[valid])

    # one more token through each model's KV cache
    next_ids = torch.tensor([[20], [21]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    next_pos = position_ids[:, -1:] + 1
    ours2 = model(next_ids, attention_mask=mask2, position_ids=next_pos, past_key_values=ours.past_key_values)
    theirs2 = llama(next_ids, attention_mask=mask2, position_ids=next_pos, past_key_values=theirs.past_key_values)
    torch.testing.assert_close(ours2.logits, theirs2.logits)


def test_incremental_decoding_with_cache_equals_full_forward():
    model = random_model()
    ids = torch.randint(3, 97, (2, 12))
    full = model(ids, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    prefix = model(ids[:, :5], past_key_values=cache, use_cache=True)
    steps = [prefix.logits]
    for t in range(5, 12):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    chunked = DynamicCache(config=model.config)  # a multi-token chunk after a cache needs the offset causal mask
    model(ids[:, :4], past_key_values=chunked, use_cache=True)
    torch.testing.assert_close(model(ids[:, 4:], past_key_values=chunked, use_cache=True).logits, full[:, 4:])


def test_left_padding_does_not_change_real_tokens():
    model = random_model()
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    ids, mask = left_padded(rows)
    padded = model(ids, attention_mask=mask).logits  # positions derived from the mask
    for row, tokens in enumerate(rows):
        alone = model(torch.tensor([tokens])).logits[0]
        torch.testing.assert_close(padded[row, -len(tokens) :], alone)
    assert torch.isfinite(padded).all()  # rows of pure padding stay finite


def test_greedy_generate_cache_equals_no_cache_and_left_padding_equals_single():
    model = random_model()
    rows = [[5, 6, 7, 8, 9], [12, 13]]
    ids, mask = left_padded(rows)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(ids, attention_mask=mask, use_cache=True, **kwargs)
    without_cache = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)
    for row, tokens in enumerate(rows):
        single = model.generate(torch.tensor([tokens]), **kwargs)
        assert with_cache[row, ids.shape[1] :].tolist() == single[0, len(tokens) :].tolist()
    llama = to_hf_llama(model).eval()
    assert torch.equal(llama.generate(ids, attention_mask=mask, **kwargs), with_cache)


def test_loss_ignores_minus_100_labels():
    model = random_model()
    ids = torch.randint(3, 97, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(ids, labels=labels).loss, expected)


def test_sequence_classification_reads_the_last_real_token():
    config = tiny_config(initializer_range=0.3, num_labels=1)
    scorer = TinyLlama2ForSequenceClassification(config).eval()
    rows = [[5, 6, 7, 8], [9, 10]]
    alone = torch.cat([scorer(torch.tensor([r])).logits for r in rows])  # (2, 1)
    ids, mask = left_padded(rows)
    torch.testing.assert_close(scorer(ids, attention_mask=mask).logits, alone)
    right_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    right_mask = (right_ids != 0).long()
    torch.testing.assert_close(scorer(right_ids, attention_mask=right_mask).logits, alone)
    torch.testing.assert_close(scorer(right_ids).logits, alone)  # falls back to the pad id


def test_save_and_load_with_registered_classes(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model.py").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "tiny_llama2"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is TinyLlama2ForCausalLM
    ids = torch.randint(3, 97, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert torch.equal(scorer.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_load_with_remote_code_in_a_fresh_process(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 97, (1, 9))
    torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert "tiny_llama2_zh" not in sys.modules, "the package must not be needed"
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"])
        print(type(model).__module__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "transformers_modules" in result.stdout


@pytest.mark.parametrize("num_items", [None, 50])
def test_fused_linear_cross_entropy_equals_the_plain_loss_and_gradients(num_items):
    model = random_model()
    ids = torch.randint(3, 97, (3, 16))
    labels = ids.clone()
    labels[0, :5] = -100
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    results = []
    for chunk_rows in (None, 7):  # 7 rows per chunk: chunks do not divide the 45 rows evenly
        model.zero_grad(set_to_none=True)
        model.fused_loss_chunk_rows = chunk_rows
        output = model(ids, labels=labels, **kwargs)
        output.loss.backward()
        results.append((output.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert (output.logits is None) == (chunk_rows is not None)
    (plain_loss, plain_grads), (fused_loss, fused_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=name)
    with torch.no_grad():  # evaluation takes the same path without computing gradients
        torch.testing.assert_close(model(ids, labels=labels, **kwargs).loss, plain_loss)


@pytest.mark.parametrize("no_grad_mode", [torch.no_grad, torch.inference_mode])
def test_fused_loss_without_grad_mode_computes_no_gradients(no_grad_mode):
    """Evaluation runs under no_grad while the weights still require grad: the fused loss must not build the
    (vocab, dim) float32 weight gradient then. Measured as the largest single allocation seen by the profiler."""
    model = random_model(vocab_size=4096)
    model.fused_loss_chunk_rows = 8  # a logits chunk (8 x vocab) is 4x smaller than the gradient (dim 32 x vocab)
    ids = torch.randint(3, 4096, (2, 16))
    gradient_bytes = model.lm_head.weight.numel() * 4

    def largest_allocation() -> tuple[torch.Tensor, int]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = model(ids, labels=ids).loss
        return loss, max(event.self_cpu_memory_usage for event in prof.events())

    _, with_grad = largest_allocation()
    assert with_grad >= gradient_bytes  # the measure sees the gradient buffer when there is one
    with no_grad_mode():
        fused, without_grad = largest_allocation()
        model.fused_loss_chunk_rows = None
        plain = model(ids, labels=ids).loss
    assert without_grad < gradient_bytes
    torch.testing.assert_close(fused, plain)


def test_fused_loss_with_a_frozen_head_builds_no_weight_gradient():
    """LoRA SFT freezes the head (here tied to the frozen embedding) while the layers below still learn: the fused
    loss must not build the (vocab, dim) float32 weight gradient nobody reads, and the trainable weights must
    still get the plain loss's gradients."""
    model = random_model(vocab_size=4096)
    model.model.embed_tokens.weight.requires_grad_(False)  # the tied head with it
    assert not model.lm_head.weight.requires_grad
    ids = torch.randint(3, 4096, (2, 16))
    gradient_bytes = model.lm_head.weight.numel() * 4

    model.fused_loss_chunk_rows = 8  # a logits chunk (8 x vocab) is 4x smaller than the gradient (dim 32 x vocab)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fused = model(ids, labels=ids).loss
    assert max(event.self_cpu_memory_usage for event in prof.events()) < gradient_bytes
    fused.backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    model.fused_loss_chunk_rows = None  # the plain path: logits, then F.cross_entropy
    plain = model(ids, labels=ids).loss
    plain.backward()
    torch.testing.assert_close(fused, plain)
    assert fused_grads  # the layers below the head do learn
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(fused_grads[name], parameter.grad, msg=name)


def test_fused_loss_gradients_when_only_the_head_learns():
    """The other side: a trainable head over a frozen body (no gradient wanted for the hidden states) gets the
    plain cross-entropy's weight gradient, and the function hands back no hidden-state gradient."""
    torch.manual_seed(0)
    hidden = torch.randn(21, 16)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (21,))
    labels[:4] = -100
    normalizer = (labels != -100).sum().float()
    fused = LinearCrossEntropy.apply(hidden, weight, labels, normalizer, 5, True)
    saved_hidden_gradient, _ = fused.grad_fn.saved_tensors
    assert saved_hidden_gradient is None
    (fused_grad,) = torch.autograd.grad(fused, weight)
    plain = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum") / normalizer
    (plain_grad,) = torch.autograd.grad(plain, weight)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fused_grad, plain_grad)


def test_fused_loss_under_bf16_autocast_is_close_to_the_plain_loss():
    model = random_model()
    ids = torch.randint(3, 97, (2, 16))
    losses = []
    for chunk_rows in (None, 8):
        model.fused_loss_chunk_rows = chunk_rows
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert model.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(model.lm_head.weight.grad).all()
        model.zero_grad(set_to_none=True)
        losses.append(loss.float())
    torch.testing.assert_close(losses[1], losses[0], atol=0.05, rtol=0.01)
