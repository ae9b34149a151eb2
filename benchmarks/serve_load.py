"""Load test of `tinyllm serve`: N concurrent streaming clients x M requests each, against one client at a time.

    python benchmarks/serve_load.py --model runs/demo/sft/final --clients 8 --requests 4 --max-tokens 64

Starts `tinyllm serve` in a subprocess on a free loopback port (never another address), then runs the same
requests twice through the official `openai` client (AsyncOpenAI, streaming): first one request at a time, then
`--clients` clients at once, each sending `--requests` requests in a row. Each request asks for exactly
`--max-tokens` tokens (`ignore_eos`, vLLM's extension) so that both runs do the same work. Prints, for each run:
errors (must be 0), time to first token p50/p95, per-request decode pace, and aggregate completion tokens/s.
Bounded: at most 64 clients x 64 requests, and `--time-limit` seconds per run.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROMPTS = [
    "判断下面这条商品评论的情感倾向，只回答“正面”或“负面”。\n评论：质量很好，物流也快。",
    "请对下面的句子分词，词与词之间用一个空格隔开。\n句子：北京是中国的首都。",
    "写出下面词语的拼音，带声调，音节之间用空格隔开。\n词语：人民",
    "你好，请介绍一下你自己。",
    "今天天气怎么样？",
    "给我讲一个简短的故事。",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "tiny_llama2_zh.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
        "--port", str(port), "--max-batch", str(args.max_batch), "--queue-size", str(args.clients * 2),
        "--threads", str(args.threads),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if json.loads(response.read())["status"] == "ok":
                    return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start within 120 s")


async def one_request(client, index: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model="tinyllm",
        messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        max_tokens=max_tokens,
        temperature=0.7,
        seed=index,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "tokens": tokens, "seconds": end - start, "decode": end - first}


async def run(base_url: str, clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=time_limit)
    results: list[dict] = []
    errors: list[str] = []

    async def worker(worker_index: int) -> None:
        for request_index in range(requests):
            try:
                results.append(await one_request(client, worker_index * requests + request_index, max_tokens))
            except Exception as error:  # counted and reported: the figure that must be 0
                errors.append(f"{type(error).__name__}: {error}")

    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(clients))), time_limit)
    except TimeoutError:
        errors.append(f"time limit of {time_limit} s reached")
    wall = time.perf_counter() - start
    await client.close()
    ttfts = sorted(result["ttft"] for result in results)
    paces = [r["tokens"] / r["decode"] for r in results if r["decode"] > 0 and r["tokens"] > 1]

    def percentile(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "ttft_p50_ms": 1000 * percentile(ttfts, 0.5),
        "ttft_p95_ms": 1000 * percentile(ttfts, 0.95),
        "per_request_tok_s": statistics.median(paces) if paces else float("nan"),
        "aggregate_tok_s": sum(result["tokens"] for result in results) / wall,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="saved SFT model folder")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default: 8)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client, in a row (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply, exactly (default: 64)")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default: 8)")
    parser.add_argument("--threads", type=int, default=1, help="the server's --threads (default: 1; 0 = torch's)")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per run at most (default: 300)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 64):
        raise SystemExit("--clients and --requests must be between 1 and 64")

    port = free_port()
    server = start_server(args, port)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        asyncio.run(run(base_url, 1, 2, args.max_tokens, args.time_limit))  # warm-up
        total = args.clients * args.requests
        sequential = asyncio.run(run(base_url, 1, total, args.max_tokens, args.time_limit))
        concurrent = asyncio.run(run(base_url, args.clients, args.requests, args.max_tokens, args.time_limit))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(
        f"model {args.model}; {total} requests of {args.max_tokens} tokens; "
        f"server --max-batch {args.max_batch} --threads {args.threads}"
    )
    print(f"{'run':>24} {'errors':>6} {'TTFT p50':>9} {'TTFT p95':>9} {'tok/s/request':>13} {'aggregate tok/s':>15}")
    for name, result in (("one client at a time", sequential), (f"{args.clients} concurrent clients", concurrent)):
        print(
            f"{name:>24} {result['errors']:>6} {result['ttft_p50_ms']:>7.0f}ms {result['ttft_p95_ms']:>7.0f}ms "
            f"{result['per_request_tok_s']:>13.1f} {result['aggregate_tok_s']:>15.1f}"
        )
        for sample in result["error_samples"]:
            print(f"  error: {sample}")
    print(f"aggregate speed-up from batching: {concurrent['aggregate_tok_s'] / sequential['aggregate_tok_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"sequential": sequential, "concurrent": concurrent}, indent=2))


if __name__ == "__main__":
    main()
