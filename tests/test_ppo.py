"""PPO (train/ppo.py): the first minibatch is on-policy, a toy reward is raised, masks ignore what follows a
reply's end, a resumed run continues exactly, a NaN reward stops the run, and the recipe runs end to end."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from conftest import REPO_ROOT, save_tiny_model
from test_rl import assert_shipped_folder_is_pickle_free
from tiny_llama2_zh.config import ConfigError, load_config
from tiny_llama2_zh.errors import TrainingDivergedError
from tiny_llama2_zh.infer.generate import sample_replies
from tiny_llama2_zh.tokenizer import load_tokenizer, train_bpe_tokenizer
from tiny_llama2_zh.train.ppo import (
    PolicyAndValue,
    PPOModelOptions,
    PPOOptions,
    PPORecipeConfig,
    PPOTrainer,
    adapted_kl_coef,
    gae,
    ppo,
    ppo_arguments,
    ptx_examples,
    reference_kl,
    sft_loss,
    whiten,
)
from tiny_llama2_zh.train.reward import load_reward_model
from tiny_llama2_zh.train.rl import PromptDataOptions, prompt_ids

PPO_YAML = REPO_ROOT / "configs" / "ppo" / "demo.yaml"
PROMPTS = ["这本书很好看", "质量太差了", "物流很快", "包装破损", "非常满意", "不推荐购买", "孩子很喜欢", "用了两天就坏"]


def half_the_vocabulary(sequences, mask, positions, prompt_width):
    """A toy reward: +1 for every reply token whose id is even."""
    replies, reply_mask = sequences[:, prompt_width:], mask[:, prompt_width:]
    return ((replies % 2 == 0) * reply_mask).sum(-1).float()


def make_trainer(model_dir, tmp_path, reward=half_the_vocabulary, max_steps=8, ppo_options=None, **train):
    tokenizer = load_tokenizer(model_dir)
    options = PPOOptions(
        rollout_batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=8, missing_eos_penalty=0,
        **(ppo_options or {}),
    )  # fmt: skip
    config = PPORecipeConfig(
        model=PPOModelOptions(policy=str(model_dir), reward_model=str(model_dir)),
        data=PromptDataOptions(prompts="unused"),
        ppo=options,
        train={
            "output_dir": str(tmp_path / "run"),
            "max_steps": max_steps,
            "learning_rate": 3e-3,
            "save_strategy": "no",
            "report_to": [],
            **train,
        },
    )
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]
    return PPOTrainer(
        model=PolicyAndValue(
            AutoModelForCausalLM.from_pretrained(model_dir), load_reward_model(str(model_dir), tokenizer.pad_token_id)
        ),
        ref_policy=AutoModelForCausalLM.from_pretrained(model_dir),
        reward=reward,
        tokenizer=tokenizer,
        prompts=prompt_ids(rows, tokenizer),
        options=options,
        args=ppo_arguments(config),
        eval_prompts=prompt_ids(rows, tokenizer) * 4,
    )


def test_the_first_minibatch_is_on_policy_kl_zero_ratio_one(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    trainer.compute_loss(trainer.model, {"rollout": 0, "epoch": 0, "minibatch": 0})
    stats = {name: values[0] for name, values in trainer._stats.items()}
    assert stats["kl"] == 0.0  # the policy is the reference
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5) and stats["clip_fraction"] == 0.0
    assert stats["approx_kl"] < 1e-10


def test_a_few_ppo_steps_raise_a_toy_reward(tiny_model_dir, tmp_path):
    # a random tiny model samples almost uniformly: a high learning rate moves it within a few rollouts
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=48, learning_rate=0.1)
    before = trainer.held_out_metrics()["eval_score"]
    trainer.train()
    after = trainer.held_out_metrics()["eval_score"]
    assert after > before + 1.5, (before, after)  # of 8 reply tokens, about 4 were even at the start


def test_masks_ignore_padding_and_everything_after_the_end(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    prompts = trainer.rollout_prompts(0)
    from tiny_llama2_zh.infer.generate import left_pad

    ids, mask = left_pad(prompts, trainer.pad_id, "cpu")
    end_ids = list(range(3, 1024, 3))  # a third of the vocabulary ends a reply: most replies end early
    sequences, _full_mask, reply_mask, ended = sample_replies(trainer.model.policy, ids, mask, end_ids, 0, 8, 1.0)
    replies = sequences[:, ids.shape[1] :]
    assert ended.any() and (reply_mask.sum(-1) < 8).any()
    for row, reply_row, ended_row in zip(replies, reply_mask, ended):
        is_end = torch.isin(row, torch.tensor(end_ids))
        last = int(is_end.int().argmax()) if ended_row else len(row) - 1
        assert reply_row.tolist() == [1] * (last + 1) + [0] * (len(row) - last - 1)
        assert (row[last + 1 :] == 0).all()

    rollout = trainer.make_rollout(prompts)
    loss, _ = trainer.ppo_loss(rollout)
    scrambled = rollout.select(torch.arange(8))
    outside = scrambled.attention_mask == 0
    scrambled.sequences = torch.where(outside, torch.randint(5, 1000, outside.shape), scrambled.sequences)
    scrambled.log_probs = torch.where(scrambled.reply_mask.bool(), scrambled.log_probs, 5.0)
    scrambled.advantages = torch.where(scrambled.reply_mask.bool(), scrambled.advantages, -7.0)
    loss_scrambled, _ = trainer.ppo_loss(scrambled)
    torch.testing.assert_close(loss_scrambled, loss)


def test_gae_matches_a_hand_computed_example():
    # gamma 0.9, lambda 0.8: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}, V_3 = 0
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, -0.5]])
    # delta = [1 + 0.9 - 0.5, 0 - 0.45 - 1, 2 + 0.5] = [1.4, -1.45, 2.5]; A_2 = 2.5,
    # A_1 = -1.45 + 0.72 * 2.5 = 0.35, A_0 = 1.4 + 0.72 * 0.35 = 1.652
    torch.testing.assert_close(gae(rewards, values, gamma=0.9, lam=0.8), torch.tensor([[1.652, 0.35, 2.5]]))


def test_whitening_uses_the_real_tokens_only_and_zeroes_the_rest():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, -50.0, 7.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    whitened = whiten(values, mask)
    # real tokens 1, 2, 3: mean 2, (population) variance 2/3
    expected = torch.tensor([[-1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]) / (2 / 3) ** 0.5
    torch.testing.assert_close(whitened, expected)
    real = whitened[mask.bool()]
    assert abs(float(real.mean())) < 1e-6 and float(real.var(unbiased=False)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        (6.0, 0.05 * (1 + 0.2 * 32 / 1000)),  # 6 / 4 - 1 = 0.5, clipped to 0.2: 0.05032
        (3.5, 0.05 * (1 - 0.125 * 32 / 1000)),  # 3.5 / 4 - 1 = -0.125: 0.0498
        (0.0, 0.05 * (1 - 0.2 * 32 / 1000)),  # -1, clipped to -0.2: 0.04968
        (4.0, 0.05),  # on target
    ],
)
def test_the_adaptive_kl_controller_matches_ziegler_et_al(kl, expected):
    # Ziegler et al. 2019, sec. 2.2: e = clip(KL / target - 1, -0.2, 0.2), beta <- beta (1 + e n / horizon)
    assert adapted_kl_coef(0.05, kl, target=4.0, n_steps=32, horizon=1000) == pytest.approx(expected, rel=1e-12)
    assert adapted_kl_coef(0.05, kl, target=None, n_steps=32, horizon=1000) == 0.05  # fixed coefficient


def test_a_rollout_updates_the_kl_coefficient_from_its_own_kl(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, ppo_options={"kl_coef": 0.1, "target_kl": 0.5, "kl_horizon": 40})
    with torch.no_grad():  # a policy that is not the reference: the rollout's KL is not 0
        for weight in trainer.model.policy.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    stats = trainer.make_rollout(trainer.rollout_prompts(0)).stats
    assert stats["kl_coef"] == 0.1 and stats["kl"] != 0.0
    error = max(-0.2, min(0.2, stats["kl"] / 0.5 - 1))
    assert trainer.kl_coef == pytest.approx(0.1 * (1 + error * 8 / 40))


def test_the_critic_warmup_trains_the_value_model_only(tiny_model_dir, tmp_path):
    # one rollout of warm-up (4 optimizer steps), with weight decay on: the policy must not move at all
    trainer = make_trainer(
        tiny_model_dir, tmp_path, max_steps=4, ppo_options={"critic_warmup_rollouts": 1}, weight_decay=0.1,
        learning_rate=1e-2,
    )  # fmt: skip
    policy = {k: v.clone() for k, v in trainer.model.policy.state_dict().items()}
    value = {k: v.clone() for k, v in trainer.model.value_model.state_dict().items()}
    trainer.train()
    for name, weight in trainer.model.policy.state_dict().items():
        torch.testing.assert_close(weight, policy[name], rtol=0, atol=0, msg=f"policy {name} moved in warm-up")
    changed = [k for k, v in trainer.model.value_model.state_dict().items() if not torch.equal(v, value[k])]
    assert "score.weight" in changed and any(k.startswith("model.layers.") for k in changed)


def test_a_nan_reward_stops_the_run_naming_the_step(tiny_model_dir, tmp_path):
    def broken(sequences, mask, positions, prompt_width):
        return torch.full((len(sequences),), float("nan"))

    trainer = make_trainer(tiny_model_dir, tmp_path, reward=broken)
    with pytest.raises(TrainingDivergedError, match="reward was not finite for 8 of 8 replies at step 1"):
        trainer.train()


@pytest.fixture(scope="module")
def tiny_reward_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_reward")
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_reward_model(str(tiny_model_dir), tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recipe(policy_dir, reward_dir, tmp_path, *extra) -> PPORecipeConfig:
    prompts = tmp_path / "tasks" / "toy" / "sft-train.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "好"}]} for p in PROMPTS]
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    overrides = [
        f"model.policy={policy_dir}",
        f"model.reward_model={reward_dir}",
        f"data.prompts={prompts}",
        f"data.validation={prompts}",
        f"data.ptx={prompts}",  # the demo recipe's PPO-ptx, on the toy conversations
        "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=6",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=4",
        "train.save_steps=2",
        "train.eval_steps=2",
        "train.logging_steps=2",
        "train.learning_rate=1e-3",
        "train.report_to=[]",
        "sample_prompts=[你好]",
        "sample_max_new_tokens=4",
        *extra,
    ]
    return load_config(PPORecipeConfig, PPO_YAML, overrides)


class StopAfterFirstCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_the_recipe_runs_and_a_resumed_run_continues_exactly(tiny_model_dir, tiny_reward_dir, tmp_path, capsys):
    straight = ppo(recipe(tiny_model_dir, tiny_reward_dir, tmp_path / "a"))
    run = tmp_path / "a" / "run"
    assert straight["rollouts"] == 2 and (run / "final" / "value_model" / "config.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[0]["eval_kl"] == 0.0
    logged = [r for r in records if "policy_loss" in r]
    assert len(logged) == 2 and all(
        {"score", "kl", "value_loss", "clip_fraction", "entropy"} <= r.keys() for r in logged
    )
    assert (run / "loss.png").is_file() and (run / "samples.jsonl").is_file()
    assert_shipped_folder_is_pickle_free(run / "final")

    with pytest.raises(KeyboardInterrupt):
        ppo(recipe(tiny_model_dir, tiny_reward_dir, tmp_path / "b"), callbacks=[StopAfterFirstCheckpoint()])
    capsys.readouterr()
    resumed = ppo(recipe(tiny_model_dir, tiny_reward_dir, tmp_path / "b", "resume=true"))
    assert (
        resumed["steps"] == 4 and f"resuming from {tmp_path / 'b' / 'run' / 'checkpoint-2'}" in capsys.readouterr().out
    )
    expected = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    for name, value in AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "run" / "final").state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


def write_conversations(path: Path, rows: list[dict]) -> Path:
    """`load_prompts` rows (a prompt and its reference reply) as an SFT chat file at path, for data.ptx."""
    path.parent.mkdir(parents=True)
    conversations = [{"messages": [*row["prompt"], {"role": "assistant", "content": row["reference"]}]} for row in rows]
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations), encoding="utf-8")
    return path


def test_ptx_loss_is_the_sft_loss_of_the_replies_and_pulls_the_policy_toward_them(
    tiny_model_dir, tiny_reward_dir, tmp_path
):
    tokenizer = load_tokenizer(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": p}], "reference": "好的"} for p in PROMPTS[:2]]
    examples = ptx_examples(rows, tokenizer)
    # by hand: the cross-entropy of each reply token (and its closing eos) given everything before it
    total, count = 0.0, 0
    for ids, start in examples:
        logits = policy(input_ids=torch.tensor([ids])).logits[0].float()
        log_probs = torch.log_softmax(logits[:-1], -1)
        for position in range(start, len(ids)):
            total -= float(log_probs[position - 1, ids[position]])
            count += 1
    assert count > 2 and float(sft_loss(policy, examples, tokenizer.pad_token_id)) == pytest.approx(total / count, 1e-5)

    # with ptx the policy learns the ptx conversations' replies, which plain PPO does not
    with pytest.raises(ConfigError, match=r"data\.ptx"):
        ppo(recipe(tiny_model_dir, tiny_reward_dir, tmp_path / "none", "ppo.ptx_coef=1.0", "data.ptx="))
    sft_file = write_conversations(tmp_path / "sft" / "toy" / "sft-train.jsonl", rows)
    losses = {}
    labels = [f"data.ptx={sft_file}", "ppo.ptx_coef=1.0", "ppo.ptx_target=labels"]  # the demo pulls toward SFT
    for name, extra in (("plain", ["ppo.ptx_coef=0"]), ("ptx", labels)):
        ppo(recipe(tiny_model_dir, tiny_reward_dir, tmp_path / name, "train.learning_rate=1e-2", *extra))
        trained = AutoModelForCausalLM.from_pretrained(tmp_path / name / "run" / "final")
        losses[name] = float(sft_loss(trained, examples, tokenizer.pad_token_id))
    assert losses["ptx"] < losses["plain"] - 0.5, losses  # measured 5.53 against 6.9 at the start


def test_ptx_toward_the_reference_is_its_kl_and_keeps_the_policy_near_the_sft_model(
    tiny_model_dir, tiny_reward_dir, tmp_path
):
    tokenizer = load_tokenizer(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": p}], "reference": "好的"} for p in PROMPTS[:2]]
    examples = ptx_examples(rows, tokenizer)
    pad = tokenizer.pad_token_id
    assert float(reference_kl(policy, reference, examples, pad)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.05 * torch.randn_like(policy.lm_head.weight))
    # by hand: sum_v p_ref(v) log(p_ref(v) / p_policy(v)) at each reply token's prediction, averaged over them
    total, count = 0.0, 0
    for ids, start in examples:
        with torch.no_grad():
            ref_log = torch.log_softmax(reference(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            pol_log = torch.log_softmax(policy(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        for position in range(start, len(ids)):
            p, q = ref_log[position - 1], pol_log[position - 1]
            total += float((p.exp() * (p - q)).sum())
            count += 1
    assert total > 0 and float(reference_kl(policy, reference, examples, pad)) == pytest.approx(total / count, 1e-4)

    with pytest.raises(ConfigError, match="ptx_target"):
        ppo(recipe(tiny_model_dir, tiny_reward_dir, tmp_path / "bad", "ppo.ptx_target=replies"))
    sft_file = write_conversations(tmp_path / "sft" / "toy" / "sft-train.jsonl", rows)
    drift = {}
    for name, extra in (
        ("plain", ["ppo.ptx_coef=0"]),
        ("reference", [f"data.ptx={sft_file}", "ppo.ptx_coef=5.0", "ppo.ptx_target=reference"]),
    ):
        ppo(recipe(tiny_model_dir, tiny_reward_dir, tmp_path / name, "train.learning_rate=1e-2", *extra))
        trained = AutoModelForCausalLM.from_pretrained(tmp_path / name / "run" / "final")
        drift[name] = float(reference_kl(trained, reference, examples, pad))
    assert drift["reference"] < 0.5 * drift["plain"], drift  # measured 0.0040 against 0.0109


def test_a_reward_model_with_another_tokenizer_is_refused(tiny_model_dir, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("完全不同的分词器训练文本。\n" * 50, encoding="utf-8")
    train_bpe_tokenizer([text], vocab_size=300, output_dir=tmp_path / "other_tokenizer")
    other = save_tiny_model(tmp_path / "other_tokenizer", tmp_path / "other_model")
    with pytest.raises(ValueError, match=r"tokenizer [0-9a-f]{16}\).*tokenizer [0-9a-f]{16}\)"):
        ppo(recipe(tiny_model_dir, other, tmp_path))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs" / "ppo").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_ppo_configs_are_valid_and_say_how_to_run_them(path):
    assert (
        path.read_text(encoding="utf-8").splitlines()[0].startswith(f"# tinyllm ppo --config configs/ppo/{path.name}")
    )
    config = load_config(PPORecipeConfig, path)
    config.ppo.check()
    args = ppo_arguments(config)
    assert args.max_steps % config.ppo.steps_per_rollout == 0 and args.save_steps % config.ppo.steps_per_rollout == 0


def test_rloo_recipe_runs_on_trl_with_the_reward_model(tiny_model_dir, tiny_reward_dir, tmp_path):
    from tiny_llama2_zh.train.rloo import RLOORecipeConfig, rloo

    prompts = recipe(tiny_model_dir, tiny_reward_dir, tmp_path).data.prompts  # writes the prompt file
    overrides = [
        f"model.policy={tiny_model_dir}",
        f"model.reward_model={tiny_reward_dir}",
        f"data.prompts={prompts}",
        f"data.validation={prompts}",
        f"train.output_dir={tmp_path / 'rloo'}",
        "train.max_steps=2",
        "train.per_device_train_batch_size=8",
        "train.num_generations=4",
        "train.max_completion_length=6",
        "train.logging_steps=1",
        "train.report_to=[]",
    ]
    result = rloo(load_config(RLOORecipeConfig, REPO_ROOT / "configs" / "rloo" / "demo.yaml", overrides))
    assert result["steps"] == 2 and result["initial"]["eval_kl"] == 0.0 and result["final"]["eval_kl"] != 0.0
    assert (tmp_path / "rloo" / "final" / "config.json").is_file() and (tmp_path / "rloo" / "loss.png").is_file()
    assert_shipped_folder_is_pickle_free(tmp_path / "rloo" / "final")
