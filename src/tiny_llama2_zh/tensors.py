"""Small tensor helpers that several floors share (evaluation, inference, the RL stages); they import nothing from
the package, so any module may use them."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch `model` to evaluation mode (no dropout) for the block and back to the mode it was in, even when the
    block raises: a trainer's model is measured mid-run and must go on training afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), in float32: (..., V), (...) -> (...).

    As TRL's `selective_log_softmax`: the chosen logit minus the log-sum-exp of its row, so the full (..., V)
    log-softmax is never materialised (with a 64k vocabulary that is most of an RL step's memory)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)
