"""`tinyllm generate`, `chat` and `serve`. Light at import: models load when a command runs."""

import argparse

from tiny_llama2_zh.errors import UsageError


def add_sampling_arguments(
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


def sampling_options(args: argparse.Namespace, max_new_tokens: int):
    from tiny_llama2_zh.infer.generate import SamplingOptions

    return SamplingOptions(max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder (with its tokenizer)")
    parser.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="answer --prompt as a single user message through the chat template (an SFT model) and print the "
        "reply, instead of continuing the text",
    )
    parser.add_argument("--system", help="system prompt for --chat")
    add_sampling_arguments(parser)


def run_generate(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.loading import load_model

    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    model, tokenizer = load_model(args.model)
    options = sampling_options(args, args.max_new_tokens)
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


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
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
    add_sampling_arguments(parser, max_new_tokens=None, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    parser.epilog = (
        "In the chat: /reset clears the history, /system TEXT sets the system prompt, /help, /exit. Ctrl-C stops a "
        "reply, Ctrl-D leaves. stdout holds only the replies (each after 'assistant> '); notices go to stderr."
    )


def run_chat(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.infer.chat import chat_main
    from tiny_llama2_zh.loading import load_model

    model, tokenizer = load_model(args.model)
    max_new_tokens = args.max_new_tokens or min(256, model.config.max_position_embeddings // 2)
    chat_main(model, tokenizer, sampling_options(args, max_new_tokens), args.system, args.plain)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_serve(args: argparse.Namespace) -> None:
    from tiny_llama2_zh.infer.server import serve
    from tiny_llama2_zh.loading import check_model_folder

    check_model_folder(args.model)
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.max_batch < 1 or args.queue_size < 0 or args.max_body_bytes < 1:
        raise UsageError("--max-batch must be >= 1, --queue-size >= 0 and --max-body-bytes >= 1")
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
