"""Exports to the runtimes users run small models in: transformers' plain Llama (`hf_llama`), llama.cpp
(`gguf`) and karpathy/llama2.c (`llama2c`). Each export is checked by the runtime itself in the tests
(tests/test_export.py): transformers' LlamaForCausalLM, llama.cpp through node-llama-cpp, llama2.c's run.c/runq.c.

Each format is its own module (`from tiny_llama2_zh.export.gguf import export_gguf`, ...); this package imports
nothing, so `tinyllm export --help` needs no torch."""
