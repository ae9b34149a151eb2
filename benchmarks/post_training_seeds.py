"""Post-training over several seeds, from one pretrained model: the mean, min and max of every figure it reports.

    python benchmarks/post_training_seeds.py --demo runs/demo --seeds 3 [--output runs/seeds] [--first-seed 1337]
        [STAGE.KEY=VALUE ...]

Prints each seed's progress (the demo's own `[demo] tinyllm ...` lines), then the table, and where it wrote
OUTPUT/seeds.md and OUTPUT/seeds.json.

Why: one demo run is one draw. The same code with a slightly different float sum once gave a reward model with 46 %
held-out sentiment accuracy where the README quoted 79.5 % (issue 19), so a single run cannot say whether a stage
works. This reruns every post-training stage (sft, reward, ppo, dpo, grpo, then eval) for seeds FIRST..FIRST+K-1
(default 1337, 1338, 1339: the demo's own seed first, so seed-1337 also checks that the demo reproduces itself)
and tabulates the spread.

How: the demo folder's corpus, tokenizer, token files, pretrained model and tasks are reused, never retrained:
OUTPUT/seed-N/ holds links to them and a `demo_state.json` that marks those stages finished (and quantize and export,
which measure the SFT model's formats, not post-training, as skipped), and then `tinyllm demo --seed N` continues
that folder (`demo.run_demo`): the demo's own stage commands with every training stage at train.seed=N and every
sampling command at --seed N. STAGE.KEY=VALUE overrides the post-training stages as in `tinyllm demo` (a short
check: sft.train.max_steps=20 ...). Resumable: a finished seed folder is skipped, an interrupted one continues at
the stage it stopped in.

Figures (`figures`): every number of each seed's summary.json under the post-training stages (held-out figures before
and after training, the reward model's baselines, DPO's scored replies) and of eval/*.json (every model and baseline
on the held-out tasks, the policies' reward-model score and KL, multiple choice), named by its path in the JSON,
with list items named by their model (`eval/tasks[sft].tasks.sentiment.metrics.accuracy`). New figures in those
files get rows without a change here. Left out: bookkeeping (`NOT_FIGURES`: wall time, steps, samples, settings)
and whole numbers equal in every seed (rows evaluated, pair counts).
"""

import argparse
import json
import math
import shlex
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path, PurePath

from tiny_llama2_zh.demo import BY_NAME, DEFAULT_SEED, STAGE_NAMES, STATE_FILE, DemoRun, checked_overrides, run_demo
from tiny_llama2_zh.errors import TrainingDivergedError, UsageError
from tiny_llama2_zh.eval.goals import goals_over_seeds, seeds_goals_table
from tiny_llama2_zh.eval.markdown import table, write_result

POST_TRAINING = ("sft", "reward", "ppo", "dpo", "grpo", "eval")  # rerun for every seed
REUSED = STAGE_NAMES[: STAGE_NAMES.index(POST_TRAINING[0])]  # corpus, tokenizer, tokenize, pretrain, tasks
NOT_RERUN = tuple(name for name in STAGE_NAMES[len(REUSED) :] if name not in (*POST_TRAINING, "report"))
TRAINING = tuple(name for name in POST_TRAINING if BY_NAME[name].recipe)
SKIPPED_NOTE = "not rerun per seed (benchmarks/post_training_seeds.py): it measures formats, not post-training"
# Keys whose values are not results: what a stage read, printed and took (summary.json), and the settings of an
# evaluation (eval/*.json). The reward model's calibration buckets are left out too (their counts shift per seed).
NOT_FIGURES = frozenset(
    {
        *("data", "parameters", "steps", "train_seconds", "tokens_seen", "samples", "examples", "prompts"),
        *("held_out_prompts", "reward_errors", "rollouts", "calibration"),
        *("seed", "limit", "shots", "temperature", "max_new_tokens"),
    }
)
ERRORS = (UsageError, FileNotFoundError, FileExistsError, TrainingDivergedError)  # as `tinyllm` reports them


# ------------------------------------------------------------------------------------------------- figures
def _model_name(text: str) -> str:
    """A list item's name: a model folder by its stage (runs/seeds/seed-1/sft/final -> sft), anything else as is."""
    if "/" not in text:
        return text
    path = PurePath(text)
    return path.parent.name if path.name == "final" else path.name


def _label(item: object, index: int) -> str:
    if isinstance(item, dict):
        if isinstance(item.get("benchmark"), str) and isinstance(item.get("subject"), str):
            return f"{item['benchmark']}/{item['subject']}"
        for key in ("model", "name", "path"):
            if isinstance(item.get(key), str) and item[key]:
                return _model_name(item[key])
    return str(index)


def flatten(value: object, path: str) -> Iterator[tuple[str, int | float]]:
    """(path, number) for every finite number under `value`; dict keys join with '.', list items are named by
    their model (`_label`) in brackets in place of the list's key ("rows"); bools, strings and the keys of
    NOT_FIGURES are skipped."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if math.isfinite(value):
            yield path, value
    elif isinstance(value, dict):
        for key, inner in value.items():
            if key not in NOT_FIGURES:  # a list's items are named by their labels, not by the list's key
                yield from flatten(inner, path if isinstance(inner, list) else f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from flatten(item, f"{path}[{_label(item, index)}]")


def figures(seed_dir: Path) -> dict[str, int | float]:
    """Every figure of one seed's folder: its summary.json under the post-training stages, then eval/*.json."""
    summary = json.loads((seed_dir / "summary.json").read_text(encoding="utf-8"))
    found = {}
    for stage in TRAINING:
        found.update(flatten(summary.get(stage), stage))
    for path in sorted((seed_dir / "eval").glob("*.json")):
        found.update(flatten(json.loads(path.read_text(encoding="utf-8")), f"eval/{path.stem}"))
    return found


def spread(per_seed: dict[int, dict[str, int | float]]) -> dict[str, dict]:
    """Per figure (in the order first seen): mean, min, max over the seeds that have it, and each seed's value.
    A whole number equal in every seed is a count or a setting (rows evaluated), not a result: left out."""
    names = dict.fromkeys(name for found in per_seed.values() for name in found)
    rows = {}
    for name in names:
        values = {seed: found[name] for seed, found in per_seed.items() if name in found}
        if all(isinstance(v, int) for v in values.values()) and len(set(values.values())) == 1:
            continue
        numbers = list(values.values())
        rows[name] = {"mean": statistics.fmean(numbers), "min": min(numbers), "max": max(numbers), "values": values}
    return rows


def _number(value: float) -> str:
    return f"{value:.4g}"


def markdown(rows: dict[str, dict], seeds: list[int], command: str, intro: str) -> str:
    """seeds.md: one table per source (a stage's summary, an eval file), one row per figure."""
    lines = [f"# Post-training over {len(seeds)} seeds", "", f"Made by `{command}`.", "", intro, ""]
    headers = ("figure", "mean", "min", "max", f"per seed ({' / '.join(map(str, seeds))})")
    sources = dict.fromkeys(name.split(".")[0].split("[")[0] for name in rows)
    for source in sources:
        chosen = [name for name in rows if name.split(".")[0].split("[")[0] == source]
        cells = [
            (name, _number(rows[name]["mean"]), _number(rows[name]["min"]), _number(rows[name]["max"]),
             " / ".join(_number(rows[name]["values"][seed]) if seed in rows[name]["values"] else "—" for seed in seeds))
            for name in chosen
        ]  # fmt: skip
        lines += [f"## {source}", "", table(headers, cells), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- seed folders
def check_demo(demo: Path) -> dict[str, dict]:
    """The demo folder's finished stages, or a refusal saying why it cannot be reused."""
    state_file = demo / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{demo} is not a demo folder (no {STATE_FILE}): run `tinyllm demo --output {demo}`")
    stages = json.loads(state_file.read_text(encoding="utf-8")).get("stages", {})
    missing = [name for name in REUSED if name not in stages]
    if missing:
        raise UsageError(
            f"{demo}: the demo has not finished {', '.join(missing)}; these stages are reused, so finish them first "
            f"(`tinyllm demo --output {demo}`)"
        )
    for name in REUSED:
        folder = BY_NAME[name].folder
        if folder and not (demo / folder).is_dir():
            raise FileNotFoundError(f"{demo / folder} is missing, though {state_file} marks {name} finished")
    if not (demo / "pretrain" / "final" / "config.json").is_file():
        raise FileNotFoundError(f"{demo / 'pretrain' / 'final'} is not a saved model folder (no config.json)")
    return stages


def prepare(seed_dir: Path, demo: Path, demo_stages: dict[str, dict]) -> None:
    """A demo folder for one seed whose stages before SFT are the demo's (linked, never copied or retrained)."""
    state = seed_dir / STATE_FILE
    if state.is_file():  # started before: check it reuses this demo, then let the demo continue it
        linked = (seed_dir / "pretrain").resolve()
        if linked != (demo / "pretrain").resolve():
            raise FileExistsError(f"{seed_dir} reuses {linked}, not {demo / 'pretrain'}: choose another --output")
        return
    seed_dir.mkdir(parents=True, exist_ok=True)
    for name in REUSED:
        folder = BY_NAME[name].folder
        if folder and not (seed_dir / folder).exists():
            (seed_dir / folder).symlink_to((demo / folder).resolve(), target_is_directory=True)
    stages = {name: {**demo_stages[name], "reused_from": str(demo)} for name in REUSED}
    stages |= {name: {"seconds": 0.0, "skipped": SKIPPED_NOTE} for name in NOT_RERUN}
    DemoRun(seed_dir, {}, stages=stages).save()


def finished(seed_dir: Path) -> bool:
    state = seed_dir / STATE_FILE
    if not state.is_file() or not (seed_dir / "summary.json").is_file():
        return False
    return "report" in json.loads(state.read_text(encoding="utf-8")).get("stages", {})


# ------------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/post_training_seeds.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--demo", required=True, help="a demo folder whose pretraining and tasks are reused")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (default: 3)")
    parser.add_argument(
        "--first-seed", type=int, default=DEFAULT_SEED, help=f"the first seed (default: {DEFAULT_SEED}, the demo's)"
    )
    parser.add_argument("--output", default="runs/seeds", help="folder for seed-N/ and the table (default: runs/seeds)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="STAGE.KEY=VALUE",
        help=f"override a post-training stage as in `tinyllm demo` (stages: {', '.join(POST_TRAINING)})",
    )
    return parser


def run(args: argparse.Namespace, command: str) -> Path:
    demo, output = Path(args.demo), Path(args.output)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    demo_stages = check_demo(demo)
    reused = [o for o in args.overrides if o.partition(".")[0] not in POST_TRAINING]
    if reused:
        raise UsageError(
            f"{' '.join(reused)}: only the post-training stages ({', '.join(POST_TRAINING)}) are rerun here; the "
            f"others are {demo}'s"
        )
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for seed in seeds:  # every override checked before any folder is made
        checked_overrides(output / f"seed-{seed}", args.overrides, seed)
    for seed in seeds:
        seed_dir = output / f"seed-{seed}"
        if finished(seed_dir):
            print(f"[seeds] {seed_dir} has finished: skipped (remove it to run seed {seed} again)", flush=True)
            continue
        print(f"[seeds] seed {seed}: post-training into {seed_dir}", flush=True)
        prepare(seed_dir, demo, demo_stages)
        run_demo(seed_dir, args.overrides, seed=seed)

    rows = spread({seed: figures(output / f"seed-{seed}") for seed in seeds})
    pretrain_seed = demo_stages["pretrain"].get("seed", "not recorded")
    intro = (
        f"The corpus, tokenizer, token files, pretrained model (train.seed {pretrain_seed}) and tasks of `{demo}` are "
        f"reused unchanged; the post-training stages ({', '.join(POST_TRAINING)}) ran once per seed, with "
        f"`tinyllm demo --seed N`'s commands{' and ' + ' '.join(args.overrides) if args.overrides else ''}, into "
        f"`{output}/seed-N/`. Each row: a number of the seeds' summary.json (post-training stages) or eval/*.json, "
        "its mean, min and max over the seeds and each seed's value. Whole numbers equal in every seed (rows "
        "evaluated, pair counts) are left out."
    )
    goals = goals_over_seeds({seed: output / f"seed-{seed}" for seed in seeds})
    met = sum(goal["over_seeds"] is True for goal in goals)
    text = markdown(rows, seeds, command, intro)
    heading = f"# Post-training over {len(seeds)} seeds"
    text = text.replace(
        heading,
        f"{heading}\n\n## Goals: {met} of {len(goals)} met over the seeds (on every seed; SFT sentiment: the mean)"
        f"\n\n{seeds_goals_table(goals, seeds)}",
        1,
    )
    result = {
        "goals": goals,
        "command": command,
        "demo": str(demo),
        "pretrain_seed": pretrain_seed,
        "seeds": seeds,
        "overrides": args.overrides,
        "figures": rows,  # each with "values": {seed: value} (JSON writes the seeds as strings)
    }
    json_path, md_path = write_result(result, text, output, "seeds")
    print(text)
    print(f"wrote {md_path} and {json_path}")
    return md_path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        run(args, shlex.join(["python", "benchmarks/post_training_seeds.py", *argv]))
    except ERRORS as error:
        print(f"post_training_seeds.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
