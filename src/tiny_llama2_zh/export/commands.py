"""`tinyllm export hf-llama|gguf|llama2c`. Light at import."""

import argparse


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder to export (e.g. RUN_DIR/final)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def add_hf_llama_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(parser)
    parser.add_argument("--output", required=True, help="folder to write the LlamaForCausalLM folder to")


def run_hf_llama(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.export.hf_llama import export_hf_llama

    folder = export_hf_llama(args.model, args.output, args.overwrite)
    print(f"wrote a plain LlamaForCausalLM folder (no remote code) to {folder}")


def add_gguf_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(parser)
    parser.add_argument("--output", required=True, help="GGUF file to write (e.g. model-f16.gguf)")
    parser.add_argument(
        "--type", default="f16", choices=["f32", "f16", "q8_0"], help="weight type of 2-D tensors (default: f16)"
    )


def run_gguf(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.export.gguf import export_gguf

    path = export_gguf(args.model, args.output, args.type, args.overwrite)
    print(f"wrote {path} ({args.type}, {path.stat().st_size / 2**20:.1f} MiB) for llama.cpp")


def add_llama2c_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(parser)
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


def run_llama2c(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.export.llama2c import export_llama2c

    model, tokenizer = export_llama2c(args.model, args.output, args.version, args.tokenizer_output, args.overwrite)
    print(f"wrote {model} (llama2.c version {args.version}) and {tokenizer}")


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder to export and check (e.g. RUN_DIR/final)")
    parser.add_argument("--output", required=True, help="folder for the exports and exports.md (files replaced)")
    parser.add_argument(
        "--prompts", required=True, help="chat JSONL ({'messages': [...]}) whose first user turns are the prompts"
    )
    parser.add_argument("--texts", required=True, help="JSONL with a 'text' field: texts whose token ids are compared")
    parser.add_argument("--prompt-count", type=int, default=8, help="prompts checked (default: 8)")
    parser.add_argument("--text-count", type=int, default=32, help="texts checked (default: 32)")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy reply length at most (default: 24)")


def run_check(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.export.check import check_exports

    print(
        check_exports(
            args.model, args.output, args.prompts, args.texts, args.prompt_count, args.text_count, args.new_tokens
        )
    )
