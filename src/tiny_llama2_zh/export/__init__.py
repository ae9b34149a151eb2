"""Exports to the runtimes users run small models in: transformers' plain Llama (`hf_llama`), llama.cpp
(`gguf`) and karpathy/llama2.c (`llama2c`). Each export is checked by the runtime itself in the tests."""

from tiny_llama2_zh.export.hf_llama import to_hf_llama, to_hf_llama_config

__all__ = ["to_hf_llama", "to_hf_llama_config"]
