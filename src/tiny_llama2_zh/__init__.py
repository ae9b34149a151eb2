"""tiny-llama2-zh: build a small Chinese Llama 2 from scratch, every stage measured.

Importing the package is cheap (no torch, no transformers), so that `tinyllm --help` answers at once. The model
classes load on first use (`tiny_llama2_zh.TinyLlama2ForCausalLM`, or `tiny_llama2_zh.model` directly); importing
`tiny_llama2_zh.model` registers them with transformers' Auto classes.
"""

import logging

# transformers imports torchao when it is installed; on a CPU build torchao logs a warning for each optional CUDA
# kernel library it cannot load, and torch a deprecation line for each of torchao's enums. None of them is used here.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"

__all__ = [
    "TinyLlama2Config",
    "TinyLlama2ForCausalLM",
    "TinyLlama2ForSequenceClassification",
    "TinyLlama2Model",
    "__version__",
]


def __getattr__(name: str):
    """The model classes, imported on first access (PEP 562)."""
    if name in __all__:
        from tiny_llama2_zh import model

        return getattr(model, name)
    raise AttributeError(f"module 'tiny_llama2_zh' has no attribute {name!r}")
