"""RLOO: the one-config alternative to PPO, on TRL's `RLOOTrainer`, with the trained reward model as its reward.

    tinyllm rloo --config configs/rloo/demo.yaml \
        model.policy=runs/demo/sft/final model.reward_model=runs/demo/reward/final

REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"): k replies per prompt, each reply's baseline is
the mean reward of the other k-1, no value model, a KL penalty to the reference with coefficient `beta`. It needs
half of PPO's networks; `tinyllm ppo` and this recipe read the same prompt files and are measured the same way
(`train.rl.held_out_metrics`: reward-model score and KL on held-out prompts, sampled replies), so the two sit side
by side in the demo's summary.
"""

from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
from trl import RLOOConfig, RLOOTrainer

from tiny_llama2_zh.infer.generate import SamplingOptions, generate_reply, turn_end_ids
from tiny_llama2_zh.tokenizer import load_tokenizer
from tiny_llama2_zh.train.callbacks import SamplesCallback
from tiny_llama2_zh.train.rl import (
    PromptDataOptions,
    check_enough_prompts,
    held_out_metrics,
    load_rollout_prompts,
    open_ended_judge,
    prompt_ids,
    prompts_per_generation,
    reward_model_function,
    training_folders,
)
from tiny_llama2_zh.train.runner import RL_DEFAULTS, StageRun, training_arguments, trl_defaults


@dataclass
class RLOOModelOptions:
    policy: str  # an SFT model folder (TRL loads the reference from the same folder)
    reward_model: str  # a reward run's final/


@dataclass
class RLOORecipeConfig:
    model: RLOOModelOptions
    data: PromptDataOptions
    # Any option of TRL's RLOOConfig (num_generations, max_completion_length, beta, temperature, ...)
    train: dict[str, Any]
    sample_prompts: list[str] = field(default_factory=list)
    sample_max_new_tokens: int = 48
    resume: bool = False


def rloo_arguments(config: RLOORecipeConfig) -> RLOOConfig:
    return training_arguments(
        RLOOConfig,
        config.train,
        "train",
        **RL_DEFAULTS,
        num_generations=4,
        max_completion_length=48,
        beta=0.05,
        **trl_defaults(RLOOConfig),
    )


def rloo(config: RLOORecipeConfig, callbacks: list[TrainerCallback] | None = None) -> dict | None:
    args = rloo_arguments(config)
    policy_dir, reward_dir = training_folders(config.model.policy, config.model.reward_model)
    tokenizer = load_tokenizer(policy_dir)
    prompts = load_rollout_prompts(config.data, tokenizer)
    train_rows, train_report, eval_rows = prompts.train, prompts.train_report, prompts.held_out
    check_enough_prompts(len(train_rows), *prompts_per_generation(args))
    run = StageRun("rloo", config, args, resume=config.resume, language_model=False)
    policy = AutoModelForCausalLM.from_pretrained(str(policy_dir))
    policy.generation_config.eos_token_id = turn_end_ids(tokenizer)
    reward_model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(policy_dir)).eval()
    held_out, judge = prompt_ids(eval_rows, tokenizer), open_ended_judge(eval_rows)

    def measure() -> dict[str, float]:
        return held_out_metrics(
            policy, reference, reward_model_function(reward_model), held_out, tokenizer,
            args.max_completion_length, args.temperature, args.seed, judge=judge,
        )  # fmt: skip

    options = SamplingOptions(max_new_tokens=config.sample_max_new_tokens)

    def reply(model, prompt: str) -> str:
        return generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], options)[0]

    samples = SamplesCallback(config.sample_prompts, reply, run.output_dir / "samples.jsonl")
    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=reward_model,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": row["prompt"]} for row in train_rows]),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        callbacks=run.callbacks(samples if config.sample_prompts else None, callbacks),
    )
    run.attach(trainer)
    initial = run.evaluate_before(measure) if held_out else None
    output = run.train(trainer)
    final = run.evaluate_after(output.global_step, measure) if held_out else None
    summary = run.finish(
        trainer,
        tokenizer,
        {
            "policy": str(policy_dir),
            "reward_model": str(reward_dir),
            "prompts": train_report.as_dict(),
            "initial": initial,
            "final": final,
            "initial_validation_loss": None,
            "final_validation_loss": None,
        },
    )
    if summary is not None and initial and final:
        print(
            f"held-out prompts: reward-model score {initial['eval_score']:+.3f} -> {final['eval_score']:+.3f}, "
            f"KL to the reference {initial['eval_kl']:.3f} -> {final['eval_kl']:.3f} nats per reply"
        )
    return summary
