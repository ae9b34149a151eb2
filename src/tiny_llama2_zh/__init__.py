"""tiny-llama2-zh: build a small Chinese Llama 2 from scratch, every stage measured.

Importing the package registers the model with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(folder)` works without `trust_remote_code`.
"""

import logging

# transformers imports torchao when it is installed; on a CPU build torchao logs a warning for each optional CUDA
# kernel library it cannot load, and torch a deprecation line for each of torchao's enums. None of them is used here.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from tiny_llama2_zh.model import (  # noqa: E402
    TinyLlama2Config,
    TinyLlama2ForCausalLM,
    TinyLlama2ForSequenceClassification,
    TinyLlama2Model,
)

__version__ = "0.1.0"

AutoConfig.register(TinyLlama2Config.model_type, TinyLlama2Config, exist_ok=True)
AutoModel.register(TinyLlama2Config, TinyLlama2Model, exist_ok=True)
AutoModelForCausalLM.register(TinyLlama2Config, TinyLlama2ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(TinyLlama2Config, TinyLlama2ForSequenceClassification, exist_ok=True)

# save_pretrained() copies model.py beside the weights and writes `auto_map` into config.json, so a folder
# also loads in a process that has never imported this package (trust_remote_code=True).
TinyLlama2Config.register_for_auto_class()
TinyLlama2Model.register_for_auto_class("AutoModel")
TinyLlama2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
TinyLlama2ForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "TinyLlama2Config",
    "TinyLlama2ForCausalLM",
    "TinyLlama2ForSequenceClassification",
    "TinyLlama2Model",
    "__version__",
]
