"""`tinyllm quantize`: one model and method, or `--report` over every method. Light at import."""

import argparse
from pathlib import Path

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.quantize import METHODS


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
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
        choices=list(METHODS),
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
        "--tasks-model",
        action="append",
        metavar="DIR",
        help="with --report and --tasks: measure task accuracy for this --model only (repeatable; default: every "
        "model)",
    )
    parser.add_argument(
        "--decode-tokens", type=int, default=64, help="with --report: tokens per decode-speed run (default: 64)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="with --report: speed runs, best kept (default: 3)")
    parser.add_argument(
        "--shape",
        default="24m",
        help="with --report: also measure size and speed of this size preset with random weights (default: 24m; "
        "'none' to skip)",
    )


def run_quantize(args: argparse.Namespace) -> None:
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
            tasks_models=args.tasks_model,
            decode_tokens=args.decode_tokens,
            repeats=args.repeats,
            shape=None if args.shape == "none" else args.shape,
        )
        print(markdown_table(report))
        print(f"wrote {Path(args.output) / 'quantize_report.md'}")
        return
    if not args.method:
        raise UsageError("--method is required (or --report for every method)")
    if len(args.model) > 1:
        raise UsageError("quantise one --model at a time (several only with --report)")
    args.model = args.model[0]
    from tiny_llama2_zh.loading import load_model
    from tiny_llama2_zh.quantize.methods import apply_method, refuse_quantized, save_quantized

    refuse_quantized(args.model, "quantize")
    model, tokenizer = load_model(args.model, "cpu")
    quantized = apply_method(model, args.method, args.group_size)
    save_quantized(quantized, tokenizer, args.output, args.method, args.group_size, args.model)
    print(f"wrote the {args.method} model to {args.output}; it loads in tinyllm generate, chat, serve and eval")
