"""`tinyllm` commands of the data floor: `tokenizer train|convert-chatglm3`,
`data demo|download|tokenize|prepare|tasks`.
Light at import: the work is imported when a command runs.
"""

import argparse
from pathlib import Path

from tiny_llama2_zh.data.sources import CORPORA, SOURCES  # light: the adapters read their files when called
from tiny_llama2_zh.errors import UsageError


def add_tokenizer_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", nargs="+", required=True, help=".jsonl files (a 'text' field per line) or .txt files"
    )
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including special tokens")
    parser.add_argument("--output", required=True, help="folder to write the tokenizer to (AutoTokenizer-loadable)")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum count for a merge (default: 2)")


def run_tokenizer_train(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(args.input, args.vocab_size, args.output, args.min_frequency)
    print(f"wrote a {len(tokenizer):,}-token byte-level BPE tokenizer to {args.output}")


def add_tokenizer_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_file", help="ChatGLM2/3 SentencePiece tokenizer.model")
    parser.add_argument("--output", required=True, help="folder to write the converted tokenizer to")


def run_tokenizer_convert(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.tokenizer import convert_chatglm3

    tokenizer = convert_chatglm3(args.model_file, args.output)
    print(f"wrote the ChatGLM3 tokenizer ({len(tokenizer):,} ids) to {args.output}")


def add_data_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder for train.jsonl, validation.jsonl and stats.json")
    parser.add_argument(
        "--validation-per-mille",
        type=int,
        default=20,
        help="documents per thousand held out for validation, chosen by text hash (default: 20)",
    )


def run_data_demo(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.data.demo_corpus import build_demo_corpus

    print(build_demo_corpus(args.output, args.validation_per_mille).summary())


def add_data_download_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"corpora to fetch from the hub: {', '.join(CORPORA)}")
    parser.add_argument("--output", default="data/raw", help="folder for NAME/ of each corpus (default: data/raw)")
    parser.add_argument(
        "--list", action="store_true", help="list every corpus: hub id, licence, size, and what is on disk"
    )


def run_data_download(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.data.download import download_all, hub_endpoint, list_corpora, reading_lines
    from tiny_llama2_zh.data.sources import get_corpus

    if args.list:
        print(list_corpora(args.output))
        if not args.names:
            return
    if not args.names:
        raise UsageError(f"name the corpora to download (or --list); known corpora: {', '.join(CORPORA)}")
    for name in args.names:
        get_corpus(name)  # every name checked before anything is fetched
    print(f"hub: {hub_endpoint()} (HF_ENDPOINT names another)")
    results = download_all(args.names, args.output)
    for result in results:
        fetched = f"{result.fetched} file(s), {result.bytes_fetched / 1e6:,.1f} MB fetched" if result.fetched else ""
        print(f"{result.corpus.name}: {result.folder} ({result.corpus.licence}; {fetched or 'already verified'})")
    print("read them with:")
    for line in reading_lines(results):
        print(line)


def add_data_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder")
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl (with --text-field) or .txt files")
    parser.add_argument("--output", required=True, help="the .bin to write; its manifest goes to OUTPUT.json")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text (default: text)")


def run_data_tokenize(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.data.pretokenized import write_token_file
    from tiny_llama2_zh.tokenizer import iter_texts, load_tokenizer

    manifest = write_token_file(
        iter_texts(args.input, args.text_field), load_tokenizer(args.tokenizer), args.output, sources=args.input
    )
    print(
        f"wrote {manifest.num_tokens:,} tokens from {manifest.num_documents:,} documents ({manifest.dtype}) "
        f"to {args.output}"
    )


def add_data_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "PATH"),  # `--source demo` takes no path
        help="a source adapter and its files; repeat for several sources of one kind. Names: " + ", ".join(SOURCES),
    )
    parser.add_argument("--output", required=True, help="output folder (shards, cleaned text, reports)")
    parser.add_argument("--tokenizer", help="tokenizer folder (required for pretraining sources)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="tokenizer workers (default: 2): SentencePiece threads if the folder has tokenizer.model, else processes",
    )
    parser.add_argument("--docs-per-shard", type=int, default=100_000, help="documents per .bin shard")
    parser.add_argument("--batch-size", type=int, default=4096, help="documents per tokenizer batch (default: 4096)")
    parser.add_argument("--validation-per-mille", type=int, default=5, help="held out per thousand (default: 5)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--min-chars", type=int, default=20, help="drop documents shorter than this (default: 20)")
    parser.add_argument("--min-chinese-ratio", type=float, default=0.3, help="drop documents with less Chinese")
    parser.add_argument("--ad-patterns", help="file of extra advertisement-line regular expressions, one per line")
    parser.add_argument("--no-near-dedup", action="store_true", help="skip MinHash near-duplicate removal")
    parser.add_argument("--text-field", default="text", help="the field the generic jsonl source reads")


def run_data_prepare(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.data.cleaning import CleaningOptions
    from tiny_llama2_zh.data.prepare import PrepareOptions, prepare

    sources = []
    for name, *paths in args.source:
        if not paths and name != "demo":
            raise UsageError(f"--source {name} names no files")
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
    for repair, count in result.repaired.items():
        print(f"  {repair}: {count:,} records (kept)")
    if result.bad_records:
        print(f"skipped bad records {result.bad_records}; first ones:")
        for example in result.bad_examples:
            print(f"  {example}")
    print(f"report: {Path(args.output) / 'prepare_report.json'}")


def add_data_tasks_arguments(parser: argparse.ArgumentParser) -> None:
    from tiny_llama2_zh.data.tasks import DEFAULT_TASKS, TASKS  # light: the tasks read their data when built

    parser.add_argument("--output", required=True, help="folder for <task>/{sft,preference}-{train,test}.jsonl")
    parser.add_argument("--test-per-mille", type=int, default=50, help="held out per thousand (default: 50)")
    parser.add_argument(
        "--tasks",
        type=lambda value: [name.strip() for name in value.split(",") if name.strip()],
        default=list(DEFAULT_TASKS),
        metavar="NAME[,NAME...]",
        help=f"tasks to build, of {', '.join(TASKS)} (default: the demo's, {','.join(DEFAULT_TASKS)})",
    )


def run_data_tasks(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.data.tasks import build_tasks

    for task, counts in build_tasks(args.output, args.test_per_mille, args.tasks).items():
        pairs = counts["preference"]
        dropped = sum(n for labels in counts.get("dropped_for_balance", {}).values() for n in labels.values())
        balance = f", {dropped:,} dropped to balance the labels" if dropped else ""
        print(
            f"{task}: {counts['train']:,} train / {counts['test']:,} test examples; preference pairs "
            f"{pairs['train']:,} / {pairs['test']:,}{balance}"
        )
