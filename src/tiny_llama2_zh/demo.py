"""The end-to-end demo on CPU, in one folder: embedded corpus -> tokenizer -> .bin -> pretraining -> demo tasks ->
SFT -> reward model -> PPO -> DPO -> GRPO -> quantisation -> exports -> evaluation -> report card.

Every stage is the real one the CLI runs on its own (`runs/demo.sh` runs them one command at a time); this module
only chains them, times them and writes `summary.md`. Stage options are overridden as `STAGE.section.key=value`,
e.g. `pretrain.train.max_steps=50 sft.train.max_steps=20`.

The run is resumable: `demo_state.json` records each finished stage (its wall time and results). Run the same
command again after an interruption and the demo continues at the stage it stopped in (a training stage resumes
from its newest checkpoint). `--from STAGE` re-runs STAGE and everything after it, `--only STAGE` just STAGE; the
stages before must have finished.
"""

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

from tiny_llama2_zh.config import ConfigError, load_config
from tiny_llama2_zh.data.demo_corpus import build_demo_corpus
from tiny_llama2_zh.data.pretokenized import write_token_file
from tiny_llama2_zh.data.tasks import TASKS, build_tasks
from tiny_llama2_zh.tokenizer import iter_texts, train_bpe_tokenizer

# The shipped recipes are package data (the repository's `configs/` links here), so the demo runs from any install.
PACKAGE_CONFIGS = Path(str(files("tiny_llama2_zh") / "configs"))
DEMO_CONFIGS = {
    "pretrain": PACKAGE_CONFIGS / "pretrain" / "demo.yaml",
    "sft": PACKAGE_CONFIGS / "sft" / "demo.yaml",
    "reward": PACKAGE_CONFIGS / "reward" / "demo.yaml",
    "ppo": PACKAGE_CONFIGS / "ppo" / "demo.yaml",
    "dpo": PACKAGE_CONFIGS / "dpo" / "demo.yaml",
    "grpo": PACKAGE_CONFIGS / "grpo" / "demo.yaml",
}
# each recipe stage's config class (module, class), to check the demo's overrides before anything runs
RECIPE_CLASSES = {
    "pretrain": ("tiny_llama2_zh.train.pretrain", "PretrainConfig"),
    "sft": ("tiny_llama2_zh.train.sft", "SFTRecipeConfig"),
    "reward": ("tiny_llama2_zh.train.reward", "RewardRecipeConfig"),
    "ppo": ("tiny_llama2_zh.train.ppo", "PPORecipeConfig"),
    "dpo": ("tiny_llama2_zh.train.dpo", "DPORecipeConfig"),
    "grpo": ("tiny_llama2_zh.train.grpo", "GRPORecipeConfig"),
}
ALIGNED = ("sft", "ppo", "dpo", "grpo")  # the policies compared side by side


def recipe_class(stage: str):
    """The config class of a recipe stage (imported on first use: the training modules are heavy)."""
    import importlib

    module, name = RECIPE_CLASSES[stage]
    return getattr(importlib.import_module(module), name)


DEMO_VOCAB_SIZE = 4096
# The SFT mix: every task's training file, sentiment twice (its replies are one label, so it gets the least signal
# per example; alone, 300 steps reached 83 % held-out accuracy where the even mix stayed near 70 %).
SFT_MIX = ("sentiment", "sentiment", "segmentation", "pinyin")
# Reward-model pairs: sentiment twice for the same reason as in SFT_MIX (with the even mix and 150 steps the reward
# model stayed at 53.5 % held-out sentiment accuracy; with this one it reached 80.5 %). Each file is capped by
# configs/reward/demo.yaml's data.max_train_examples.
REWARD_MIX = SFT_MIX
# RLHF prompts: the tasks whose replies the demo reward model can judge (pinyin it cannot: see the README)
PPO_TASKS = ("sentiment", "segmentation")
GRPO_TASK = "sentiment"  # the task whose checker gives the clearest signal to a 1.3M-parameter policy
EVAL_ROWS_PER_TASK = 200  # held-out rows per task in the demo's evaluation (all of them: `tinyllm eval tasks`)


@dataclass
class DemoReport:
    output_dir: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    corpus: dict = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    initial_validation_loss: float | None = None
    final_validation_loss: float | None = None
    samples: dict[str, str] = field(default_factory=dict)
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    reward_table: str = ""
    ppo: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    grpo: dict = field(default_factory=dict)
    side_by_side: str = ""
    eval_rows_per_task: int = EVAL_ROWS_PER_TASK
    task_table: str = ""
    dialogue: list[dict[str, str]] = field(default_factory=list)

    quantize_table: str = ""
    export_table: str = ""
    benchmark_table: str = ""

    def markdown(self) -> str:
        """summary.md: each finished stage's figures (a partial run shows the stages it has)."""
        lines = ["# tiny-llama2-zh demo", ""]
        if self.corpus:
            train, validation = self.corpus["train"], self.corpus["validation"]
            lines.append(
                f"- corpus: {train['documents']:,} train / {validation['documents']:,} validation documents "
                f"({train['characters']:,} / {validation['characters']:,} characters)"
            )
        if self.tokens:
            lines.append(f"- tokens: {self.tokens['train']:,} train / {self.tokens['validation']:,} validation")
        if self.parameters:
            lines += [
                f"- model: {self.parameters['total']:,} parameters "
                f"({self.parameters['non_embedding']:,} without embedding)",
                f"- pretraining validation loss: {self.initial_validation_loss:.3f} before training -> "
                f"{self.final_validation_loss:.3f} after",
            ]
        if self.tasks:
            lines.append(
                "- SFT tasks (train / held-out prompts): "
                + ", ".join(f"{task} {c['train']:,} / {c['test']:,}" for task, c in self.tasks.items())
            )
        if self.sft:
            lines.append(
                f"- SFT validation loss (assistant tokens): {self.sft['initial_validation_loss']:.3f} -> "
                f"{self.sft['final_validation_loss']:.3f} in {self.sft['steps']} steps"
            )
        lines.append("- wall time: " + ", ".join(f"{stage} {sec:.1f}s" for stage, sec in self.stage_seconds.items()))
        sections = [
            ("Reward model: held-out pair accuracy (chosen scored above rejected)", self.reward_table),
            ("PPO: held-out prompts (sampled replies, temperature 1)", self._ppo_table()),
            ("SFT, PPO, DPO and GRPO side by side", self.side_by_side),
            (
                f"Held-out task accuracy ({self.eval_rows_per_task} test rows per task, chosen by prompt hash; greedy)",
                self.task_table,
            ),
            ("Benchmarks: multiple choice by log-likelihood", self.benchmark_table),
            ("Quantisation: size, perplexity, accuracy and speed against float32", self.quantize_table),
            ("Exports, each checked by the runtime that runs it", self.export_table),
        ]
        for title, table in sections:
            if table:
                lines += ["", f"## {title}", "", table]
        if self.dialogue:
            lines += ["", "## A dialogue with the SFT model (held-out prompts, greedy)", ""]
        for turn in self.dialogue:
            quoted = {role: text.replace("\n", "  \n> ") for role, text in turn.items()}  # keep lines in the quote
            lines += [f"> **user:** {quoted['user']}", ">", f"> **assistant:** {quoted['assistant']}", ""]
        if self.samples:
            lines += ["", "## Pretrained model: sampled continuations (temperature 0.8, top-p 0.9)", ""]
        for prompt, continuation in self.samples.items():
            lines += [f"- **{prompt}**{continuation}", ""]
        return "\n".join(lines)

    def _ppo_table(self) -> str:
        rows = [
            (name, m) for name, m in (("SFT (PPO step 0)", self.ppo.get("initial")), ("PPO", self.ppo.get("final")))
        ]
        if not any(m for _, m in rows):
            return ""
        return "\n".join(
            [
                "| policy | reward-model score | KL to SFT (nats / reply) | reply length |",
                "|---|---:|---:|---:|",
                *(
                    f"| {name} | {m['eval_score']:+.3f} | {m['eval_kl']:.3f} | {m['eval_response_length']:.1f} |"
                    for name, m in rows
                    if m
                ),
            ]
        )


def side_by_side(output_dir: Path, evaluation: dict, ppo_config, stage_seconds: dict[str, float]) -> str:
    """One row per policy (SFT, PPO, DPO, GRPO): held-out task accuracy (from `evaluation`), the reward model's
    mean score of sampled replies to PPO's held-out prompts and the KL to the SFT model there (the measure PPO,
    RLOO and DPO report), and the wall time of the stage that made it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tiny_llama2_zh.data.conversations import load_prompts
    from tiny_llama2_zh.tokenizer import load_tokenizer
    from tiny_llama2_zh.train.rl import held_out_metrics, prompt_ids, reward_model_function

    tokenizer = load_tokenizer(output_dir / "sft" / "final")
    rows, _ = load_prompts(
        ppo_config.data.validation,
        tokenizer,
        ppo_config.data.max_prompt_length,
        ppo_config.data.max_validation_prompts,
    )
    prompts = prompt_ids(rows, tokenizer)
    reward_model = AutoModelForSequenceClassification.from_pretrained(output_dir / "reward" / "final").eval()
    reference = AutoModelForCausalLM.from_pretrained(output_dir / "sft" / "final").eval()
    by_path = {Path(row["path"]).parent.name: row["tasks"] for row in evaluation["rows"] if row.get("path")}
    lines = [
        "| policy | sentiment acc | seg F1 | pinyin syllable acc | RM score | KL to SFT (nats/reply) | stage time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in ALIGNED:
        policy = AutoModelForCausalLM.from_pretrained(output_dir / stage / "final").eval()
        measured = held_out_metrics(
            policy, reference, reward_model_function(reward_model), prompts, tokenizer,
            ppo_config.ppo.max_new_tokens, ppo_config.ppo.temperature, seed=1337,
        )  # fmt: skip
        tasks = by_path[stage]
        cells = [
            f"{tasks['sentiment']['metrics']['accuracy']:.1%}",
            f"{tasks['segmentation']['metrics']['f1']:.1%}",
            f"{tasks['pinyin']['metrics']['syllable_accuracy']:.1%}",
            f"{measured['eval_score']:+.3f}",
            f"{measured['eval_kl']:.3f}",
            f"{stage_seconds.get(stage, 0.0):.0f} s",
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """['pretrain.train.max_steps=5', 'sft.train.max_steps=2'] -> {'pretrain': [...], 'sft': [...]}."""
    by_stage: dict[str, list[str]] = {stage: [] for stage in [*DEMO_CONFIGS, *STAGE_OPTIONS]}
    for override in overrides:
        stage, _, rest = override.partition(".")
        if stage not in by_stage or not rest:
            raise ConfigError(
                f"demo override {override!r}: write STAGE.section.key=value, STAGE one of {list(by_stage)}"
            )
        by_stage[stage].append(rest)
    return by_stage


STAGES = (
    "corpus", "tokenizer", "tokenize", "pretrain", "tasks", "sft", "reward", "ppo", "dpo", "grpo",
    "quantize", "export", "eval", "report",
)  # fmt: skip
STATE_FILE = "demo_state.json"


@dataclass
class QuantizeStageOptions:
    """The demo's quantisation stage (`quantize.KEY=VALUE` on the demo command line)."""

    shape: str = "24m"  # size preset measured with random weights beside the trained models; "none" skips it
    task_rows: int = 100  # held-out rows per task for the quantised SFT models' accuracy
    validation_blocks: int = 32
    decode_tokens: int = 64
    repeats: int = 3


@dataclass
class EvalStageOptions:
    """The demo's evaluation stage (`eval.KEY=VALUE`); the task rows are --eval-rows."""

    mc_questions: int = 300  # idiom multiple-choice questions per task (of 3,080 held-out idioms)


@dataclass
class DemoRun:
    """One demo folder and what its finished stages produced (`demo_state.json`)."""

    output_dir: Path
    overrides: dict[str, list[str]]
    eval_rows: int
    stages: dict[str, dict] = field(default_factory=dict)  # stage -> {"seconds": float, "result": dict}

    @property
    def state_file(self) -> Path:
        return self.output_dir / STATE_FILE

    def save(self) -> None:
        partial = self.state_file.with_suffix(".json.partial")
        partial.write_text(json.dumps({"stages": self.stages}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        partial.replace(self.state_file)

    def result(self, stage: str) -> dict:
        return self.stages[stage]["result"]

    def recipe(self, stage: str, overrides: list[str], resume: bool = True):
        """A stage's demo recipe with the demo's paths, its run folder OUTPUT/STAGE and the command line's overrides;
        a stage whose folder an interrupted run left behind resumes from its newest checkpoint."""
        folder = self.output_dir / stage
        resuming = ["resume=true"] if resume and folder.exists() else []
        paths = [*overrides, f"train.output_dir={folder}"]
        return load_config(recipe_class(stage), DEMO_CONFIGS[stage], [*paths, *self.overrides[stage], *resuming])


def _stage_corpus(run: DemoRun) -> dict:
    stats = build_demo_corpus(run.output_dir / "corpus")
    print(f"[demo] {stats.summary()}")
    return {"corpus": asdict(stats)}


def _stage_tokenizer(run: DemoRun) -> dict:
    train_bpe_tokenizer([run.output_dir / "corpus" / "train.jsonl"], DEMO_VOCAB_SIZE, run.output_dir / "tokenizer")
    return {}


def _stage_tokenize(run: DemoRun) -> dict:
    from tiny_llama2_zh.tokenizer import load_tokenizer

    tokenizer, tokens = load_tokenizer(run.output_dir / "tokenizer"), {}
    for split in ("train", "validation"):
        manifest = write_token_file(
            iter_texts([run.output_dir / "corpus" / f"{split}.jsonl"]),
            tokenizer,
            run.output_dir / "data" / f"{split}.bin",
            sources=["demo"],
            total=run.result("corpus")["corpus"][split]["documents"],
        )
        tokens[split] = manifest.num_tokens
    return {"tokens": tokens}


def _stage_pretrain(run: DemoRun) -> dict:
    from tiny_llama2_zh.train.pretrain import pretrain

    out = run.output_dir
    config = run.recipe(
        "pretrain",
        [
            f"data.tokenizer={out / 'tokenizer'}",
            f"data.train={out / 'data' / 'train.bin'}",
            f"data.validation={out / 'data' / 'validation.bin'}",
        ],
    )
    result = pretrain(config)
    keys = ("parameters", "initial_validation_loss", "final_validation_loss", "samples")
    return {key: result[key] for key in keys}


def _stage_tasks(run: DemoRun) -> dict:
    return {"tasks": build_tasks(run.output_dir / "tasks")}


def _task_files(run: DemoRun, tasks, name: str) -> str:
    return str([str(run.output_dir / "tasks" / task / name) for task in tasks])


def _stage_sft(run: DemoRun) -> dict:
    from tiny_llama2_zh.train.sft import sft

    config = run.recipe(
        "sft",
        [
            f"model.init_from={run.output_dir / 'pretrain' / 'final'}",
            f"data.train={_task_files(run, SFT_MIX, 'sft-train.jsonl')}",
            f"data.validation={_task_files(run, TASKS, 'sft-test.jsonl')}",
        ],
    )
    result = sft(config)
    return {"sft": {key: result[key] for key in ("steps", "initial_validation_loss", "final_validation_loss")}}


def _stage_reward(run: DemoRun) -> dict:
    from tiny_llama2_zh.eval.preferences import markdown_table as pair_table
    from tiny_llama2_zh.train.reward import reward

    config = run.recipe(
        "reward",
        [
            f"model.init_from={run.output_dir / 'sft' / 'final'}",
            f"data.train={_task_files(run, REWARD_MIX, 'preference-train.jsonl')}",
            f"data.validation={_task_files(run, TASKS, 'preference-test.jsonl')}",
        ],
    )
    result = reward(config)
    return {"reward_table": pair_table({**result["baselines"], "reward model": result["final"]})}


def _ppo_config(run: DemoRun, resume: bool = True):
    overrides = [
        f"model.policy={run.output_dir / 'sft' / 'final'}",
        f"model.reward_model={run.output_dir / 'reward' / 'final'}",
        f"data.prompts={_task_files(run, PPO_TASKS, 'sft-train.jsonl')}",
        f"data.validation={_task_files(run, PPO_TASKS, 'sft-test.jsonl')}",
    ]
    return run.recipe("ppo", overrides, resume)


def _stage_ppo(run: DemoRun) -> dict:
    from tiny_llama2_zh.train.ppo import ppo

    result = ppo(_ppo_config(run))
    return {"ppo": {key: result[key] for key in ("steps", "rollouts", "initial", "final", "train_seconds")}}


def _stage_dpo(run: DemoRun) -> dict:
    from tiny_llama2_zh.train.dpo import dpo

    config = run.recipe(
        "dpo",
        [
            f"model.init_from={run.output_dir / 'sft' / 'final'}",
            f"model.reward_model={run.output_dir / 'reward' / 'final'}",
            f"data.train={_task_files(run, REWARD_MIX, 'preference-train.jsonl')}",
            f"data.validation={_task_files(run, TASKS, 'preference-test.jsonl')}",
        ],
    )
    result = dpo(config)
    return {"dpo": {key: result[key] for key in ("steps", "initial", "final", "replies", "train_seconds")}}


def _stage_grpo(run: DemoRun) -> dict:
    from tiny_llama2_zh.train.grpo import grpo

    tasks = run.output_dir / "tasks" / GRPO_TASK
    config = run.recipe(
        "grpo",
        [
            f"model.init_from={run.output_dir / 'sft' / 'final'}",
            f"data.prompts={tasks / 'sft-train.jsonl'}",
            f"data.validation={tasks / 'sft-test.jsonl'}",
        ],
    )
    result = grpo(config)
    return {"grpo": {key: result[key] for key in ("steps", "initial", "final", "train_seconds")}}


def _stage_quantize(run: DemoRun) -> dict:
    from tiny_llama2_zh.quantize.report import markdown_table, quantize_report

    out = run.output_dir
    options = load_config(QuantizeStageOptions, None, run.overrides["quantize"])
    report = quantize_report(
        [out / "pretrain" / "final", out / "sft" / "final"],
        out / "quantize",
        validation=out / "data" / "validation.bin",
        max_blocks=options.validation_blocks,
        tasks_dir=out / "tasks",
        tasks_models=[out / "sft" / "final"],
        limit=options.task_rows,
        shape=None if options.shape == "none" else options.shape,
        decode_tokens=options.decode_tokens,
        repeats=options.repeats,
    )
    return {"quantize_table": markdown_table(report)}


@dataclass
class ExportStageOptions:
    """The demo's export stage (`export.KEY=VALUE`): how many held-out chat prompts and texts each runtime is
    checked on."""

    prompts: int = 8
    texts: int = 32
    new_tokens: int = 24


def _pytorch_greedy(model, prompts: list[list[int]], new_tokens: int, stop: list[int]) -> list[list[int]]:
    """Greedy continuation ids of each prompt, cut after the first stop id (the reply's end), batch 1."""
    import torch

    replies = []
    with torch.inference_mode():
        for ids in prompts:
            output = model.generate(
                torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=0
            )[0, len(ids) :].tolist()
            replies.append(output[: next((i + 1 for i, t in enumerate(output) if t in stop), len(output))])
    return replies


def _stage_export(run: DemoRun) -> dict:
    """The SFT model as a plain transformers Llama folder, as GGUF (f32, q8_0) and — where its vocabulary allows —
    as llama2.c files; each checked by the runtime that runs it on held-out prompts (greedy replies) and texts
    (token ids). A runtime that is not installed is reported as such, not as a pass."""
    from transformers import LlamaForCausalLM

    from tiny_llama2_zh.export.gguf import export_gguf
    from tiny_llama2_zh.export.hf_llama import export_hf_llama
    from tiny_llama2_zh.export.llama2c import export_llama2c
    from tiny_llama2_zh.export.llamacpp import llamacpp_missing, run_gguf
    from tiny_llama2_zh.infer.generate import chat_prompt_ids, turn_end_ids
    from tiny_llama2_zh.loading import load_model

    options = load_config(ExportStageOptions, None, run.overrides["export"])
    out, source = run.output_dir / "export", run.output_dir / "sft" / "final"
    model, tokenizer = load_model(source, "cpu")
    stop = turn_end_ids(tokenizer)
    rows = [json.loads(line) for line in (run.output_dir / "tasks" / "sentiment" / "sft-test.jsonl").open()]
    prompts = [chat_prompt_ids(tokenizer, row["messages"][:1], 200)[0] for row in rows[: options.prompts]]
    expected = _pytorch_greedy(model, prompts, options.new_tokens, stop)
    validation = run.output_dir / "corpus" / "validation.jsonl"
    texts = [json.loads(line)["text"][:200] for _, line in zip(range(options.texts), validation.open())]
    table = ["| format | file | size | checked by | result |", "|---|---|---:|---|---|"]

    folder = export_hf_llama(source, out / "hf-llama", overwrite=True)
    llama = LlamaForCausalLM.from_pretrained(folder).eval()  # no remote code: transformers' own Llama
    same = sum(a == b for a, b in zip(_pytorch_greedy(llama, prompts, options.new_tokens, stop), expected))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    table.append(
        f"| transformers Llama | `{folder}` | {size / 1e6:.2f} MB | transformers `LlamaForCausalLM` (no remote code) "
        f"| greedy replies equal ours: {same}/{len(prompts)} |"
    )
    missing = llamacpp_missing()
    for kind in ("f32", "q8_0"):
        path = export_gguf(source, out / f"sft-{kind}.gguf", kind, overwrite=True)
        if missing:
            result, checker = f"not checked: {missing}", "llama.cpp (not installed)"
        else:
            answer = run_gguf(
                {
                    "model": str(path),
                    "threads": 2,
                    "tokenize": texts,
                    "generate": [{"tokens": ids, "maxTokens": options.new_tokens, "stop": stop} for ids in prompts],
                }
            )
            ids_equal = sum(got == tokenizer(text)["input_ids"] for got, text in zip(answer["tokens"], texts))
            replies_equal = sum(g["tokens"] == want for g, want in zip(answer["generated"], expected))
            result = f"token ids equal ours: {ids_equal}/{len(texts)} texts; greedy replies equal ours: "
            result += f"{replies_equal}/{len(prompts)}"
            checker = "llama.cpp (node-llama-cpp's prebuilt libllama)"
        table.append(f"| GGUF {kind} | `{path}` | {path.stat().st_size / 1e6:.2f} MB | {checker} | {result} |")
    try:
        path, _ = export_llama2c(source, out / "sft-llama2c.bin", 0, overwrite=True)
        table.append(
            f"| llama2.c v0 | `{path}` | {path.stat().st_size / 1e6:.2f} MB | (run.c: see the tests) | written |"
        )
    except ValueError as refusal:  # the demo's byte-level BPE: run.c's tokenizer cannot hold it
        reason = str(refusal).split(": ", 1)[-1]
        table.append(f"| llama2.c | — | — | refused before writing | {reason} |")
    markdown = "\n".join(table)
    (out / "exports.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    return {"export_table": markdown}


def _idiom_table(result: dict) -> str:
    """One row per model: accuracy on each idiom task, chance beside it."""
    subjects = [subject["subject"] for subject in result["models"][0]["subjects"]]
    lines = [
        "| model | " + " | ".join(f"{subject} acc" for subject in subjects) + " | chance | questions per task |",
        "|---|" + "---:|" * (len(subjects) + 2),
    ]
    for model in result["models"]:
        accuracy = {subject["subject"]: subject["acc"] for subject in model["subjects"]}
        cells = [f"{100 * accuracy[subject]:.1f}%" for subject in subjects]
        chance, questions = model["subjects"][0]["chance"], model["subjects"][0]["questions"]
        lines.append(
            f"| {Path(model['name']).parent.name} | " + " | ".join(cells) + f" | {100 * chance:.0f}% | {questions} |"
        )
    return "\n".join(lines)


def _stage_eval(run: DemoRun) -> dict:
    from tiny_llama2_zh.eval import multiple_choice
    from tiny_llama2_zh.eval.tasks import evaluate_tasks, markdown_table
    from tiny_llama2_zh.infer.generate import SamplingOptions, generate_reply
    from tiny_llama2_zh.loading import load_model

    out, tasks_dir = run.output_dir, run.output_dir / "tasks"
    options = load_config(EvalStageOptions, None, run.overrides["eval"])
    models = [out / stage / "final" for stage in ("pretrain", *ALIGNED)]
    evaluation = evaluate_tasks(models, tasks_dir, limit=run.eval_rows)
    (out / "eval").mkdir(exist_ok=True)
    (out / "eval" / "tasks.json").write_text(json.dumps(evaluation, indent=2, ensure_ascii=False) + "\n")
    task_table = markdown_table(evaluation)
    print(task_table)
    idioms = multiple_choice.load_tasks(idioms=True, limit=options.mc_questions)
    mc_result = multiple_choice.evaluate_mc(models, idioms, limit=options.mc_questions)
    multiple_choice.write_outputs(mc_result, out / "eval")
    benchmark_table = _idiom_table(mc_result)
    print(benchmark_table)
    stage_seconds = {stage: done["seconds"] for stage, done in run.stages.items()}
    table = side_by_side(out, evaluation, _ppo_config(run, resume=False), stage_seconds)
    print(table)
    model, chat_tokenizer = load_model(out / "sft" / "final")
    dialogue = []
    for task in TASKS:
        first = json.loads((tasks_dir / task / "sft-test.jsonl").read_text(encoding="utf-8").splitlines()[0])
        question = first["messages"][0]["content"]
        answer, _ = generate_reply(
            model, chat_tokenizer, [{"role": "user", "content": question}], SamplingOptions(max_new_tokens=48)
        )
        dialogue.append({"user": question, "assistant": answer})
    return {"task_table": task_table, "side_by_side": table, "dialogue": dialogue, "benchmark_table": benchmark_table}


def _stage_report(run: DemoRun) -> dict:
    report = DemoReport(output_dir=str(run.output_dir), eval_rows_per_task=run.eval_rows)
    for stage in STAGES[:-1]:
        for key, value in run.stages.get(stage, {}).get("result", {}).items():
            setattr(report, key, value)
    report.stage_seconds = {stage: done["seconds"] for stage, done in run.stages.items() if stage != "report"}
    report.stage_seconds["total"] = round(sum(report.stage_seconds.values()), 2)
    (run.output_dir / "summary.json").write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")
    (run.output_dir / "summary.md").write_text(report.markdown() + "\n", encoding="utf-8")
    from tiny_llama2_zh.eval.report import write_report

    print(f"[demo] report card: {write_report([run.output_dir])}")
    return {}


STAGE_FUNCTIONS = {stage: globals()[f"_stage_{stage}"] for stage in STAGES}
STAGE_OPTIONS = {
    "quantize": QuantizeStageOptions,
    "export": ExportStageOptions,
    "eval": EvalStageOptions,
}  # stages without a recipe YAML that take demo overrides


def check_overrides(by_stage: dict[str, list[str]]) -> None:
    """Every stage's overrides against its config class now, so that a typo in the last stage's option fails at
    once rather than after the stages before it have run (unknown keys and wrong types are ConfigErrors). A recipe's
    `train:` options are checked against TRL's argument class when the stage builds it, not here."""

    for stage, overrides in by_stage.items():
        if not overrides:
            continue
        if stage in STAGE_OPTIONS:
            load_config(STAGE_OPTIONS[stage], None, overrides)
        else:
            load_config(recipe_class(stage), DEMO_CONFIGS[stage], overrides)


def _load_run(output_dir: Path, overrides: list[str], eval_rows: int, force: bool) -> DemoRun:
    run = DemoRun(output_dir, split_overrides(overrides), eval_rows)
    check_overrides(run.overrides)
    if force and output_dir.exists():
        print(f"--force: removing the earlier demo run in {output_dir}")
        shutil.rmtree(output_dir)
    if run.state_file.is_file():
        run.stages = json.loads(run.state_file.read_text(encoding="utf-8"))["stages"]
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(
            f"{output_dir} holds files but no {STATE_FILE}, so it is not a demo run this command can continue; "
            "choose another --output, or pass --force to replace it"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    return run


def _selected_stages(run: DemoRun, from_stage: str | None, only: str | None) -> list[str]:
    """The stages to run now: --only's, --from's and after, or (a plain run) every stage not finished yet."""
    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGES:
            raise ValueError(f"{name} {value!r}: not a demo stage; stages: {', '.join(STAGES)}")
    if from_stage and only:
        raise ValueError("pass --from or --only, not both")
    first = from_stage or only
    if first is None:
        todo = [stage for stage in STAGES if stage not in run.stages]
        if not todo:
            raise FileExistsError(
                f"the demo in {run.output_dir} has finished every stage; re-run part of it with --from STAGE or "
                "--only STAGE, choose another --output, or pass --force to start over"
            )
        return todo
    missing = [stage for stage in STAGES[: STAGES.index(first)] if stage not in run.stages]
    if missing:
        raise ValueError(f"stage {first} needs the stages before it; not finished yet: {', '.join(missing)}")
    return [only] if only else list(STAGES[STAGES.index(first) :])


def run_demo(
    output_dir: str | Path,
    overrides: list[str] | None = None,
    force: bool = False,
    eval_rows: int = EVAL_ROWS_PER_TASK,
    from_stage: str | None = None,
    only: str | None = None,
) -> DemoReport:
    """Run the selected stages (see the module docstring) and return the report of the whole run."""
    run = _load_run(Path(output_dir), overrides or [], eval_rows, force)
    selected = _selected_stages(run, from_stage, only)
    if run.stages and selected[0] != STAGES[0]:
        print(f"[demo] continuing {run.output_dir} at stage {selected[0]}")
    for stage in selected:
        folder = run.output_dir / stage
        if stage in run.stages and folder.is_dir() and stage in DEMO_CONFIGS:
            # asked for by --from/--only: the earlier run of this stage is replaced, and says so
            print(f"[demo] re-running {stage}: removing its earlier run folder {folder}")
            shutil.rmtree(folder)
        run.stages.pop(stage, None)
        run.save()
        started = time.perf_counter()
        result = STAGE_FUNCTIONS[stage](run)
        run.stages[stage] = {"seconds": round(time.perf_counter() - started, 2), "result": result}
        run.save()
        print(f"[demo] {stage}: {run.stages[stage]['seconds']:.1f}s")
    if selected[-1] != "report":
        _stage_report(run)
    return _report_of(run)


def _report_of(run: DemoRun) -> DemoReport:
    return DemoReport(**json.loads((run.output_dir / "summary.json").read_text(encoding="utf-8")))
