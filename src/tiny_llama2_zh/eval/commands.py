"""`tinyllm eval ppl` and `tinyllm report` (the other `eval` commands live in their own modules: eval/tasks.py,
eval/multiple_choice.py, eval/suite.py). Light at import.
"""

import argparse
import json
from pathlib import Path


def add_eval_ppl_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_eval_ppl(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from tiny_llama2_zh.eval.perplexity import evaluate_perplexity

    result = evaluate_perplexity(args.model, args.data, args.seq_len, args.batch_size, args.max_blocks)
    print(
        f"loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f} "
        f"({result.tokens:,} tokens in {result.blocks:,} blocks)"
    )
    if args.output:
        Path(args.output).write_text(json.dumps(asdict(result), indent=2) + "\n")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a demo folder or any stage's run folder")
    parser.add_argument("--output", help="the report file to write (default: FIRST_RUN_DIR/report.md)")


def run_report(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.eval.report import write_report

    print(f"wrote {write_report(args.run_dirs, args.output)}")
