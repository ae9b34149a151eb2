"""GRPO with verifiable rewards: TRL's `GRPOTrainer` on task prompts whose answers can be checked exactly.

    tinyllm grpo --config configs/grpo/demo.yaml model.init_from=runs/demo/sft/final

Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath): `num_generations` replies per prompt, each
reply's advantage its reward relative to its group's, no value model, no reward model: the rewards are the checkers
in `train/rewards.py` (the right sentiment label, the segmentation's word F1, the pinyin's syllables, plus a format
reward), plain Python, on prompts from `tinyllm data tasks` (the task is the name of the folder a file is in).
Generation is transformers' `generate` (no vLLM), so it runs on a CPU. TRL's defaults otherwise: the DAPO loss,
`beta: 0` (no reference model; set beta > 0 for a KL penalty, and TRL loads the reference from the same folder).

Measured before and after, on held-out prompts never trained on: greedy accuracy per task (a reply counts when its
checker gives full marks) and the mean reward; TRL logs the reward's mean and spread within groups, KL (beta > 0)
and completion lengths every step. Prompts whose answer cannot be checked are skipped and counted; a reward function
that raises is counted and reported with its prompt (`rewards.guarded`), never a silent crash.
"""

from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from tiny_llama2_zh.config import ConfigError
from tiny_llama2_zh.data.jsonl import ReadReport
from tiny_llama2_zh.infer.generate import greedy_replies, turn_end_ids
from tiny_llama2_zh.tensors import eval_mode
from tiny_llama2_zh.tokenizer import load_tokenizer
from tiny_llama2_zh.train.lora import LoraOptions, count_trainable, peft_config
from tiny_llama2_zh.train.rewards import CORRECTNESS, REWARD_FUNCTIONS, RewardErrors, answer_problem, guarded
from tiny_llama2_zh.train.rl import (
    PromptDataOptions,
    check_enough_prompts,
    load_rollout_prompts,
    prompts_per_generation,
    training_folders,
)
from tiny_llama2_zh.train.runner import RL_DEFAULTS, HeldOutEvaluation, StageRun, training_arguments, trl_defaults


@dataclass
class GRPOModelOptions:
    init_from: str  # an SFT model folder
    lora: LoraOptions | None = None


@dataclass
class GRPODataOptions(PromptDataOptions):
    # prompts: task chat files (`tinyllm data tasks`: <task>/sft-train.jsonl, the task is the folder), globs allowed
    validation: str | list[str]  # held-out task files (required): accuracy before and after
    max_validation_prompts: int = 200  # per file


@dataclass
class GRPORecipeConfig:
    model: GRPOModelOptions
    data: GRPODataOptions
    # Any option of TRL's GRPOConfig (num_generations, max_completion_length, beta, loss_type, reward_weights, ...)
    train: dict[str, Any]
    eval_max_new_tokens: int = 48
    # the reward functions summed (weights: train.reward_weights), names of train/rewards.REWARD_FUNCTIONS
    rewards: list[str] = field(default_factory=lambda: ["correctness", "format"])
    resume: bool = False

    def __post_init__(self) -> None:
        unknown = [name for name in self.rewards if name not in REWARD_FUNCTIONS]
        if unknown or not self.rewards:
            raise ConfigError(f"rewards: {unknown or 'empty'}; choose from {', '.join(REWARD_FUNCTIONS)}")


def grpo_arguments(config: GRPORecipeConfig) -> GRPOConfig:
    return training_arguments(
        GRPOConfig,
        config.train,
        "train",
        **RL_DEFAULTS,
        num_generations=8,
        max_completion_length=48,
        **trl_defaults(GRPOConfig),
    )


def task_rows(rows: list[dict], report: ReadReport | None) -> tuple[list[dict], dict]:
    """The prompt rows (`load_prompts`) with their task and checkable answer, and the counts: read, kept, skipped
    by the reader, and those whose answer cannot be checked (counted by reason)."""
    report = report or ReadReport(unit="prompts")
    kept, unchecked = [], {}
    for row in rows:
        problem = answer_problem(row["source"], row["reference"])
        if problem is None:
            kept.append({"prompt": row["prompt"], "task": row["source"], "answer": row["reference"]})
        else:
            unchecked[problem] = unchecked.get(problem, 0) + 1
    summary = {"read": report.read, "kept": len(kept), "skipped": dict(report.skipped), "unchecked": unchecked}
    return kept, summary


def task_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int) -> dict[str, float]:
    """Greedy replies to the rows: per task and overall, the fraction with full marks and the mean reward."""
    with eval_mode(model):
        replies = greedy_replies(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens)
    scores: dict[str, list[float]] = {}
    for row, reply in zip(rows, replies, strict=True):
        scores.setdefault(row["task"], []).append(CORRECTNESS[row["task"]](row["answer"], reply))
    everything = [score for values in scores.values() for score in values]
    metrics = {"eval_accuracy": sum(s == 1.0 for s in everything) / len(everything)}
    metrics["eval_reward"] = sum(everything) / len(everything)
    for task, values in sorted(scores.items()):
        metrics[f"eval_{task}_accuracy"] = sum(s == 1.0 for s in values) / len(values)
    return metrics


class HeldOutTasksGRPOTrainer(HeldOutEvaluation, GRPOTrainer):
    """TRL's GRPOTrainer whose evaluation is greedy task accuracy on the held-out prompts."""

    def __init__(self, *args, held_out: list[dict], eval_max_new_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.held_out, self.eval_max_new_tokens = held_out, eval_max_new_tokens

    def held_out_metrics(self) -> dict[str, float]:
        return task_accuracy(self.model, self.processing_class, self.held_out, self.eval_max_new_tokens)


def grpo(config: GRPORecipeConfig, callbacks: list[TrainerCallback] | None = None) -> dict | None:
    args = grpo_arguments(config)
    (init_from,) = training_folders(config.model.init_from)
    tokenizer = load_tokenizer(init_from)
    prompts = load_rollout_prompts(config.data, tokenizer)
    train_rows, train_report = task_rows(prompts.train, prompts.train_report)
    eval_rows, eval_report = task_rows(prompts.held_out, prompts.held_out_report)
    for name, report in (("prompts", train_report), ("held-out prompts", eval_report)):
        if report["unchecked"]:
            print(f"{name} whose answer cannot be checked: {report['unchecked']}")
    if not train_rows or not eval_rows:
        raise ConfigError(f"data.{'prompts' if not train_rows else 'validation'}: no prompt with a checkable answer")
    check_enough_prompts(len(train_rows), *prompts_per_generation(args))

    run = StageRun("grpo", config, args, resume=config.resume, language_model=False)
    model = AutoModelForCausalLM.from_pretrained(str(init_from))
    model.generation_config.eos_token_id = turn_end_ids(tokenizer)
    errors = RewardErrors()
    trainer = HeldOutTasksGRPOTrainer(
        model=model,
        reward_funcs=[guarded(REWARD_FUNCTIONS[name], errors) for name in config.rewards],
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows[:1]),  # the Trainer wants one; evaluation uses `held_out`
        processing_class=tokenizer,
        peft_config=peft_config(config.model.lora) if config.model.lora else None,
        callbacks=run.callbacks(None, callbacks),
        held_out=eval_rows,
        eval_max_new_tokens=config.eval_max_new_tokens,
    )
    parameters = count_trainable(trainer.model)
    run.attach(trainer)
    initial = run.evaluate_before(trainer.held_out_metrics)
    output = run.train(trainer)
    final = run.evaluate_after(output.global_step, trainer.held_out_metrics)
    if errors.counts:
        print(f"reward functions raised {sum(errors.counts.values())} times: {dict(errors.counts)}")
        for example in errors.examples[:5]:
            print(f"  {example}")
    summary = run.finish(
        trainer,
        tokenizer,
        {
            "init_from": str(init_from),
            "parameters": parameters,
            "prompts": train_report,
            "held_out_prompts": eval_report,
            "reward_errors": {"counts": dict(errors.counts), "examples": errors.examples},
            "initial": initial,
            "final": final,
            "initial_validation_loss": None,
            "final_validation_loss": None,
        },
    )
    if summary is not None and initial and final:
        print(
            f"held-out accuracy {initial['eval_accuracy']:.1%} -> {final['eval_accuracy']:.1%}, "
            f"mean reward {initial['eval_reward']:.3f} -> {final['eval_reward']:.3f}"
        )
    return summary
