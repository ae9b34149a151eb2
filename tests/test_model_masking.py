"""Attention masks built by transformers' `create_causal_mask`: packed rows, chunked prefill, the input's device."""

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_config
from tiny_llama2_zh.model import TinyLlama2Attention, TinyLlama2ForCausalLM


def random_model(**overrides) -> TinyLlama2ForCausalLM:
    # A large init spread makes logits large and distinct, so the comparisons are between real numbers, not ~0.
    return TinyLlama2ForCausalLM(tiny_config(initializer_range=0.3, **overrides)).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_packed_sequences_attend_only_within_their_own_example(attn_implementation, use_cache):
    """TRL's padding_free / packing: examples concatenated in one row, position_ids restarting at 0, no
    attention_mask. Each example must give the logits it gives alone, not attend to the one before it."""
    model = random_model()
    model.set_attn_implementation(attn_implementation)
    first, second = torch.randint(3, 97, (1, 7)), torch.randint(3, 97, (1, 5))
    packed_ids = torch.cat([first, second], dim=1)  # (1, 12)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]  # 0..6, 0..4
    packed = model(packed_ids, position_ids=position_ids, use_cache=use_cache).logits
    alone = [model(ids, use_cache=use_cache).logits for ids in (first, second)]
    assert alone[1].abs().max() > 1.0
    torch.testing.assert_close(packed[:, :7], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 7:], alone[1], atol=1e-5, rtol=1e-5)


def test_packed_rows_in_a_batch_and_training_mode():
    model = random_model().train()  # dropout is 0: training mode only changes the cache/loss code paths
    ids = torch.randint(3, 97, (2, 10))
    # row 0: examples of 4 and 6 tokens; row 1: one example of 10 tokens
    position_ids = torch.stack([torch.cat([torch.arange(4), torch.arange(6)]), torch.arange(10)])
    packed = model(ids, position_ids=position_ids).logits
    torch.testing.assert_close(packed[0, :4], model(ids[:1, :4]).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 4:], model(ids[:1, 4:]).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1], model(ids[1:]).logits[0], atol=1e-5, rtol=1e-5)


def test_chunked_prefill_after_a_cache_equals_one_full_forward():
    model = random_model()
    ids = torch.randint(3, 97, (2, 9))
    full = model(ids, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    first = model(ids[:, :5], past_key_values=cache, use_cache=True).logits
    second = model(ids[:, 5:], past_key_values=cache, use_cache=True).logits  # 4 new tokens, no padding
    assert cache.get_seq_length() == 9
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=1e-5)


def test_masks_are_built_on_the_device_of_the_inputs():
    """On the meta device every tensor must be meta; the old hand-made mask was created on the CPU when a cache
    was followed by several new tokens without padding (chunked prefill), which fails on any accelerator."""
    with torch.device("meta"):
        model = TinyLlama2ForCausalLM(tiny_config()).eval()
    seen_masks: list[torch.Tensor] = []

    def record_mask(module, args):
        if args[2] is not None:  # TinyLlama2Attention.forward(x, rotary, attn_mask, past_key_values)
            seen_masks.append(args[2])

    for layer in model.modules():
        if isinstance(layer, TinyLlama2Attention):
            layer.register_forward_pre_hook(record_mask)
    ids = torch.randint(3, 97, (2, 9), device="meta")
    cache = DynamicCache(config=model.config)
    model(ids[:, :5], past_key_values=cache, use_cache=True)
    logits = model(ids[:, 5:], past_key_values=cache, use_cache=True).logits
    assert logits.device.type == "meta" and logits.shape == (2, 4, 97)
    assert seen_masks and all(mask.device.type == "meta" for mask in seen_masks)
