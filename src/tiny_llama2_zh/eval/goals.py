"""What each post-training stage must show on the demo, checked against the files a demo run wrote.

Every goal is a figure, a threshold and a verdict: met, not met, or not measured (the run lacks the file). The
report card and `summary.md` print them for the run they describe; `benchmarks/post_training_seeds.py` checks them
on every seed. The goals are the project's (issue 19): a stage earns its place on the demo by moving its own measure
past a baseline that a reader can see, not by moving one number by noise.
"""

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from tiny_llama2_zh.data.tasks import TASKS
from tiny_llama2_zh.eval.markdown import percent, table

SFT_SENTIMENT_ACCURACY = 0.85
RM_MARGIN_OVER_BASELINES = 0.05  # pair accuracy above the better of the length and SFT log-prob baselines
RM_OVERALL_ACCURACY = 0.85
TASK_ACCURACY_SLACK = 0.01  # PPO and DPO keep every task's headline metric within 1 point of the SFT model's
ROUNDING = 1e-9  # a policy exactly 1 point (two rows of 200) below SFT keeps the task, whatever the float rounding
DPO_MARGIN_OVER_LOG_PROB = 0.05
JUDGE_RISE = 0.10  # PPO and DPO: the share of replies the independent judge reads as wanted, over the SFT model's
GRPO_PASS_GAP = 0.20  # pass@k - pass@1 of the SFT model on GRPO's task: the headroom GRPO can turn into pass@1
GRPO_RISE = 0.10  # greedy held-out accuracy, GRPO's model over the SFT model
PASS_K = 8


@dataclass
class Goal:
    stage: str
    goal: str
    figure: str  # what was measured, as a reader reads it
    met: bool | None  # None: not measured in this run
    # A goal the issue sets on the mean over seeds (SFT sentiment): its figure and the bar the mean must reach;
    # None: over seeds the goal must be met on every seed
    value: float | None = None
    mean_at_least: float | None = None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _task_metrics(evaluation: dict, stage: str) -> dict[str, dict]:
    """{task: metrics} of the model whose folder is STAGE/final in `tinyllm eval tasks`' result; with sampling
    (`--samples K`) also "pass@1" (greedy) and "pass@K"."""
    for row in evaluation.get("rows", []):
        if row.get("path") and Path(row["path"]).parent.name == stage:
            metrics = {}
            for task, scored in row["tasks"].items():
                metrics[task] = dict(scored["metrics"])
                if sampled := scored.get("pass_at_k"):
                    metrics[task]["pass@1"] = sampled["pass_at_1"]
                    metrics[task][f"pass@{sampled['samples']}"] = sampled["pass_at_k"]
            return metrics
    return {}


def _baseline_metrics(evaluation: dict, name_start: str) -> dict[str, dict]:
    for row in evaluation.get("rows", []):
        if row.get("kind") == "baseline" and row.get("name", "").startswith(name_start):
            return {task: scored["metrics"] for task, scored in row["tasks"].items()}
    return {}


def _keeps_tasks(stage: str, evaluation: dict) -> list[Goal]:
    """The stage's model keeps every task's headline metric within the slack of the SFT model's."""
    sft, policy = _task_metrics(evaluation, "sft"), _task_metrics(evaluation, stage)
    if not sft or not policy:
        return [Goal(stage, "task accuracy >= SFT - 1 point", "no task evaluation of both models", None)]
    goals = []
    for task, metrics in sft.items():
        headline = TASKS[task].headline if task in TASKS else next(iter(metrics))
        before, after = metrics.get(headline), policy.get(task, {}).get(headline)
        if before is None or after is None:
            continue
        goals.append(
            Goal(
                stage,
                f"{task} {headline} >= SFT - 1 point",
                f"{percent(after)} (SFT {percent(before)})",
                after >= before - TASK_ACCURACY_SLACK - ROUNDING,
            )
        )
    return goals


def _replies_improve(stage: str, score_goal: str, before: dict, after: dict) -> list[Goal]:
    """Sampled replies (`train.rl.held_out_metrics`) before and after a stage: the reward model's mean score rises,
    and where an independent judge read them (`train.rl.open_ended_judge`: review, the share read as positive), its
    verdict rises by JUDGE_RISE: the score went up for the behaviour wanted, not around it."""
    score = f"{before['eval_score']:+.3f} -> {after['eval_score']:+.3f}"
    goals = [Goal(stage, score_goal, score, after["eval_score"] > before["eval_score"])]
    key = "eval_judge_positive"
    if key in before and key in after:
        goals.append(
            Goal(
                stage,
                f"replies an independent judge reads as positive rise >= {JUDGE_RISE * 100:.0f} points",
                f"{percent(before[key])} -> {percent(after[key])}",
                after[key] >= before[key] + JUDGE_RISE,
            )
        )
    return goals


def _above_chance(accuracy: float, chance: float, questions: int) -> bool:
    """Accuracy more than two standard errors of a guesser above chance."""
    return accuracy > chance + 2 * math.sqrt(chance * (1 - chance) / max(questions, 1))


def evaluate_goals(run_dir: str | Path, grpo_task: str | None = None) -> list[Goal]:
    """Every goal, checked on the demo folder `run_dir`."""
    run_dir = Path(run_dir)
    evaluation = _read(run_dir / "eval" / "tasks.json")
    goals: list[Goal] = []

    # SFT: the classification task, beside what a bag of character n-grams reaches on the same split
    sft = _task_metrics(evaluation, "sft").get("sentiment", {})
    words = _baseline_metrics(evaluation, "bag-of-words").get("sentiment", {})
    accuracy = sft.get("accuracy")
    beside = f" (bag-of-words baseline {percent(words['accuracy'])})" if "accuracy" in words else ""
    goals.append(
        Goal(
            "sft",
            f"held-out sentiment accuracy >= {percent(SFT_SENTIMENT_ACCURACY, 0)}",
            f"{percent(accuracy)}{beside}" if accuracy is not None else "not evaluated",
            None if accuracy is None else accuracy >= SFT_SENTIMENT_ACCURACY,
            value=accuracy,
            mean_at_least=SFT_SENTIMENT_ACCURACY,
        )
    )

    # reward model: every source above both baselines by a margin, and high overall
    reward = _read(run_dir / "reward" / "summary.json")
    final, baselines = reward.get("final") or {}, reward.get("baselines") or {}
    for source, values in (final.get("per_source") or {}).items():
        best = max(
            (report["per_source"][source]["accuracy"], name)
            for name, report in baselines.items()
            if source in report.get("per_source", {}) and name in ("longer reply", "SFT log-prob (sum)")
        )
        goals.append(
            Goal(
                "reward",
                f"{source} pair accuracy >= best baseline + {RM_MARGIN_OVER_BASELINES * 100:.0f} points",
                f"{percent(values['accuracy'])} ({best[1]} {percent(best[0])})",
                values["accuracy"] >= best[0] + RM_MARGIN_OVER_BASELINES,
            )
        )
    if "accuracy" in final:
        goals.append(
            Goal(
                "reward",
                f"overall pair accuracy >= {percent(RM_OVERALL_ACCURACY, 0)}",
                percent(final["accuracy"]),
                final["accuracy"] >= RM_OVERALL_ACCURACY,
            )
        )
    else:
        goals.append(Goal("reward", "held-out pair accuracy", "no reward run", None))

    # PPO: the reward model's score up, the tasks kept, the KL within its target
    ppo = _read(run_dir / "ppo" / "summary.json")
    before, after = ppo.get("initial") or {}, ppo.get("final") or {}
    if "eval_score" in before and "eval_score" in after:
        goals += _replies_improve("ppo", "reward-model score of held-out replies rises", before, after)
        target = _ppo_target_kl(run_dir)
        goals.append(
            Goal(
                "ppo",
                "KL to the SFT model within its target",
                f"{after['eval_kl']:.2f} nats / reply (target {target if target is not None else 'none'})",
                None if target is None else after["eval_kl"] <= target,
            )
        )
    goals += _keeps_tasks("ppo", evaluation)

    # DPO: its implicit reward ranks held-out pairs better than the SFT model's own log-probabilities
    dpo = _read(run_dir / "dpo" / "summary.json")
    log_prob = baselines.get("SFT log-prob (sum)", {}).get("accuracy")
    dpo_accuracy = (dpo.get("final") or {}).get("accuracy")
    goals.append(
        Goal(
            "dpo",
            f"implicit-reward pair accuracy >= SFT log-prob baseline + {DPO_MARGIN_OVER_LOG_PROB * 100:.0f} points",
            f"{percent(dpo_accuracy)} (SFT log-prob {percent(log_prob)})",
            None if dpo_accuracy is None or log_prob is None else dpo_accuracy >= log_prob + DPO_MARGIN_OVER_LOG_PROB,
        )
    )
    compared = _read(run_dir / "eval" / "policies.json").get("rows", [])
    policies = {Path(row["model"]).parent.name: row for row in compared}
    if "sft" in policies and "dpo" in policies:
        goal = "reward-model score of sampled replies above the SFT model's"
        goals += _replies_improve("dpo", goal, policies["sft"], policies["dpo"])
    goals += _keeps_tasks("dpo", evaluation)

    # GRPO: headroom on its task (pass@k well above pass@1), and greedy accuracy that uses it
    task = grpo_task or _grpo_task(run_dir)
    sft_task, grpo_metrics = _task_metrics(evaluation, "sft").get(task, {}), _task_metrics(evaluation, "grpo")
    headline = TASKS[task].headline if task in TASKS else "accuracy"
    pass_k = sft_task.get(f"pass@{PASS_K}")
    pass_1 = sft_task.get("pass@1", sft_task.get(headline))
    goals.append(
        Goal(
            "grpo",
            f"{task}: SFT pass@{PASS_K} - pass@1 >= {GRPO_PASS_GAP * 100:.0f} points",
            f"pass@1 {percent(pass_1)}, pass@{PASS_K} {percent(pass_k)}",
            None if pass_k is None or pass_1 is None else pass_k - pass_1 >= GRPO_PASS_GAP,
        )
    )
    after_grpo = grpo_metrics.get(task, {}).get(headline)
    goals.append(
        Goal(
            "grpo",
            f"{task}: greedy held-out {headline} rises >= {GRPO_RISE * 100:.0f} points",
            f"{percent(pass_1)} -> {percent(after_grpo)}",
            None if pass_1 is None or after_grpo is None else after_grpo >= pass_1 + GRPO_RISE,
        )
    )

    # multiple choice: a benchmark sized for the demo's models, measurably above chance for the SFT model
    mc = _read(run_dir / "eval" / "mc.json")
    best_subject = None
    for model in mc.get("models", []):
        if Path(model["name"]).parent.name != "sft":
            continue
        for subject in model["subjects"]:
            if (
                best_subject is None
                or subject["acc"] - subject["chance"] > best_subject["acc"] - best_subject["chance"]
            ):
                best_subject = subject
    goals.append(
        Goal(
            "eval",
            "a multiple-choice benchmark where the SFT model is above chance (2 standard errors)",
            "no multiple-choice run"
            if best_subject is None
            else f"{best_subject['subject']}: {percent(best_subject['acc'])} "
            f"(chance {percent(best_subject['chance'])}, {best_subject['questions']} questions)",
            None
            if best_subject is None
            else _above_chance(best_subject["acc"], best_subject["chance"], best_subject["questions"]),
        )
    )
    return goals


def _ppo_target_kl(run_dir: Path) -> float | None:
    import yaml

    try:
        config = yaml.safe_load((run_dir / "ppo" / "config.yaml").read_text(encoding="utf-8"))
    except OSError:
        return None
    return (config.get("ppo") or {}).get("target_kl")


def _grpo_task(run_dir: Path) -> str:
    """The task GRPO trained on: the folder its prompt file is in (tasks/<task>/sft-train.jsonl)."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "grpo" / "config.yaml").read_text(encoding="utf-8"))
    except OSError:
        return "sentiment"
    prompts = config["data"]["prompts"]
    return Path(prompts[0] if isinstance(prompts, list) else prompts).parent.name


def goals_table(goals: list[dict]) -> str:
    """The goals (as `goals_as_dicts` gives them, the form summary.json keeps) as a markdown table."""
    return table(
        ("stage", "goal", "measured", "verdict"),
        [(goal["stage"], goal["goal"], goal["figure"], goal["verdict"]) for goal in goals],
        left=4,
    )


def goals_as_dicts(goals: list[Goal]) -> list[dict]:
    return [{**asdict(goal), "verdict": goal.verdict} for goal in goals]


def goals_over_seeds(runs: dict[int, Path], grpo_task: str | None = None) -> list[dict]:
    """Every goal on every seed's demo folder (`benchmarks/post_training_seeds.py`): each seed's figure and verdict,
    and whether it is met over the seeds (`over_seeds`: on every seed, or for a goal set on the mean -- SFT
    sentiment -- by the mean of its figures); plus the one goal only several seeds can show, GRPO's worst seed after
    beating its best seed before."""
    per_seed = {seed: evaluate_goals(folder, grpo_task) for seed, folder in runs.items()}
    rows: list[dict] = []
    for position, goal in enumerate(next(iter(per_seed.values()), [])):
        seeds = {seed: goals[position] for seed, goals in per_seed.items() if len(goals) > position}
        verdicts = [g.met for g in seeds.values()]
        figures: dict = {seed: g.figure for seed, g in seeds.items()}
        over_seeds = None if None in verdicts else all(verdicts)
        values = [g.value for g in seeds.values()]
        if goal.mean_at_least is not None:
            over_seeds = None
            if None not in values and len(values) == len(runs):
                mean = statistics.fmean(values)
                figures["mean"] = f"mean {percent(mean)}"
                over_seeds = mean >= goal.mean_at_least - ROUNDING
        rows.append(
            {
                "stage": goal.stage,
                "goal": goal.goal + (" (mean over seeds)" if goal.mean_at_least is not None else ""),
                "figures": figures,
                "met": {seed: g.met for seed, g in seeds.items()},
                "over_seeds": over_seeds,
            }
        )
    befores, afters = [], []
    for folder in runs.values():
        task = grpo_task or _grpo_task(Path(folder))
        evaluation = _read(Path(folder) / "eval" / "tasks.json")
        headline = TASKS[task].headline if task in TASKS else "accuracy"
        before = _task_metrics(evaluation, "sft").get(task, {}).get(headline)
        after = _task_metrics(evaluation, "grpo").get(task, {}).get(headline)
        if before is not None and after is not None:
            befores.append(before)
            afters.append(after)
    measured = len(befores) == len(runs) and len(runs) > 1
    rows.append(
        {
            "stage": "grpo",
            "goal": "greedy held-out accuracy: the worst seed after GRPO beats the best seed before",
            "figures": {"all": f"worst after {percent(min(afters))}, best before {percent(max(befores))}"}
            if measured
            else {"all": "needs every seed's evaluation, and two seeds or more"},
            "met": {},
            "over_seeds": (min(afters) > max(befores)) if measured else None,
        }
    )
    return rows


def seeds_goals_table(rows: list[dict], seeds: list[int]) -> str:
    verdict = {True: "met", False: "NOT met", None: "not measured"}
    cells = []
    for row in rows:
        per_seed = " / ".join(verdict[row["met"][seed]] for seed in seeds if seed in row["met"]) or "—"
        figures = " / ".join(str(figure) for figure in row["figures"].values())
        cells.append((row["stage"], row["goal"], figures, per_seed, verdict[row["over_seeds"]]))
    headers = ("stage", "goal", f"measured ({' / '.join(map(str, seeds))})", "per seed", "over seeds")
    return table(headers, cells, left=5)
