"""Quantisation: methods (torchao, torch.ao) and their folders (`methods`), and the size / perplexity / speed /
accuracy table (`report`)."""

from tiny_llama2_zh.quantize.methods import (
    METHODS,
    apply_method,
    is_quantized_folder,
    load_quantized,
    save_quantized,
)

__all__ = ["METHODS", "apply_method", "is_quantized_folder", "load_quantized", "save_quantized"]
