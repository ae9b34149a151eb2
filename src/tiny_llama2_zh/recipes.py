"""The training stages by name: the one list that the command line, the demo and the report card read.

A recipe is a YAML file checked against the stage's config class, run by the stage's function. Names only here (the
modules are imported when a recipe is loaded or run), so any floor may read the list without importing torch.
"""

import importlib
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    """A training stage: its module, the config class a YAML is checked against, the function that runs it."""

    module: str
    config_class: str
    function: str

    @property
    def shipped_config(self) -> str:
        """The demo recipe, relative to the repository (or the package: the repository's configs/ links there)."""
        return f"configs/{self.function}/demo.yaml"

    def demo_config(self) -> Path:
        """The demo recipe inside the installed package (package data), so it is found from any install."""
        return PACKAGE_DIR / self.shipped_config

    def config_type(self) -> type:
        """The config class (imports the recipe's module: heavy)."""
        return getattr(importlib.import_module(self.module), self.config_class)

    def load(self, config: str | Path, overrides: list[str]):
        """The recipe's typed config from a YAML file and `section.key=value` overrides (unknown keys refused)."""
        from tiny_llama2_zh.config import load_config

        return load_config(self.config_type(), config, overrides)

    def run(self, config) -> dict | None:
        return getattr(importlib.import_module(self.module), self.function)(config)


# Every training stage is a recipe: a YAML (its first line says how to run it), `section.key=value` overrides, and
# --resume. The one list of them: the command line, the demo and the report card read it.
RECIPES = {
    "pretrain": Recipe("tiny_llama2_zh.train.pretrain", "PretrainConfig", "pretrain"),
    "sft": Recipe("tiny_llama2_zh.train.sft", "SFTRecipeConfig", "sft"),
    "reward": Recipe("tiny_llama2_zh.train.reward", "RewardRecipeConfig", "reward"),
    "ppo": Recipe("tiny_llama2_zh.train.ppo", "PPORecipeConfig", "ppo"),
    "rloo": Recipe("tiny_llama2_zh.train.rloo", "RLOORecipeConfig", "rloo"),
    "dpo": Recipe("tiny_llama2_zh.train.dpo", "DPORecipeConfig", "dpo"),
    "grpo": Recipe("tiny_llama2_zh.train.grpo", "GRPORecipeConfig", "grpo"),
}
