"""Quantisation: the methods (`METHODS`, named here so that `tinyllm quantize --help` needs no torch), their
implementation and folders (`methods`), and the size / perplexity / speed / accuracy table (`report`)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    library: str
    summary: str


METHODS: dict[str, Method] = {
    "int8-weight": Method("int8-weight", "torchao", "int8 weights per output channel, float32 activations"),
    "int8-dynamic": Method("int8-dynamic", "torch.ao", "int8 weights per channel, activations int8 per batch (fbgemm)"),
    "int4-weight": Method("int4-weight", "torchao", "int4 weights per group of input channels, float32 activations"),
}
