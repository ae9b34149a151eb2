"""The shared tensor helpers: log-probabilities of chosen tokens and the evaluation-mode context."""

import pytest
import torch
from torch import nn

from tiny_llama2_zh.tensors import eval_mode, token_log_probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_log_probs_equal_the_full_log_softmax_gathered(temperature):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator, dtype=torch.bfloat16)
    tokens = torch.randint(0, 11, (3, 5), generator=generator)
    naive = torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    got = token_log_probs(logits, tokens, temperature)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    torch.testing.assert_close(got, naive, atol=1e-6, rtol=1e-6)


def test_eval_mode_restores_the_mode_even_when_the_block_raises():
    model = nn.Sequential(nn.Dropout(0.5))
    model.train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError("measured mid-run")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training
