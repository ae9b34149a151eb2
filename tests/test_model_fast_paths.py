"""The speed paths give the numbers of the plain ones: fused q/k/v and gate/up matmuls, compiled layers."""

import pytest
import torch
from torch import nn

from conftest import tiny_config
from tiny_llama2_zh.export.hf_llama import to_hf_llama
from tiny_llama2_zh.model import TinyLlama2ForCausalLM, plain_linears


def random_model(**overrides) -> TinyLlama2ForCausalLM:
    return TinyLlama2ForCausalLM(tiny_config(initializer_range=0.3, **overrides)).eval()


class Wrapped(nn.Module):
    """Stands for any replacement of a projection (an adapter, a quantised layer): not a plain nn.Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_fused_and_unfused_projections_give_the_same_logits_and_gradients():
    model = random_model()
    ids = torch.randint(3, 97, (2, 11))
    fused = model(ids, labels=ids)
    fused.loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for layer in model.model.layers:  # the same weights, behind modules the fused path must not bypass
        for holder, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            for name in names:
                setattr(holder, name, Wrapped(getattr(holder, name)))
    assert not plain_linears(model.model.layers[0].self_attn.q_proj)
    unfused = model(ids, labels=ids)
    unfused.loss.backward()
    torch.testing.assert_close(unfused.logits, fused.logits)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, fused_grads[name.replace(".linear", "")], msg=name)


def test_forward_hooks_on_a_projection_are_honoured():
    model = random_model()
    ids = torch.randint(3, 97, (1, 9))
    before = model(ids).logits
    handle = model.model.layers[0].mlp.up_proj.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        hooked = model(ids).logits
    finally:
        handle.remove()
    assert not torch.allclose(hooked, before)
    llama = to_hf_llama(model).eval()
    llama.model.layers[0].mlp.up_proj.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    torch.testing.assert_close(hooked, llama(ids).logits)


def test_lora_adapters_on_the_projections_are_applied():
    peft = pytest.importorskip("peft")
    model = random_model()
    ids = torch.randint(3, 97, (1, 9))
    base = model(ids).logits
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config).eval()
    adapted = lora(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    with lora.disable_adapter():
        torch.testing.assert_close(lora(input_ids=ids).logits, base)
    merged = lora.merge_and_unload()  # the adapters folded into plain Linear weights: the fused path again
    assert plain_linears(merged.model.layers[0].self_attn.q_proj)
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # torch.compile takes ~15 s on two CPU cores
def test_compiled_layers_train_like_eager_ones_and_keep_parameter_names():
    eager = random_model().train()
    compiled = random_model().train()
    compiled.load_state_dict(eager.state_dict())
    assert compiled.compile_layers() is compiled
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids = torch.randint(3, 97, (2, 16))
    for model in (eager, compiled):
        model.fused_loss_chunk_rows = 8
        model(ids, labels=ids).loss.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
