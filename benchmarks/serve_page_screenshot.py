"""Screenshot of the chat page talking to a model (docs/serve_page.png in the README), run by hand.

    python benchmarks/serve_page_screenshot.py --model runs/demo/sft/final --output docs/serve_page.png

Starts the server on a free loopback port, opens the page in headless Chromium (Debian's /usr/bin/chromium
through Playwright), sends two Chinese turns at temperature 0 (two of the demo's sentiment prompts, the task it
learned best) and saves the page once both replies have streamed in. The demo model was fine-tuned on
single-turn tasks only: in a longer conversation it tends to repeat its previous answer, so both reviews here
are negative ones.
"""

import argparse
from pathlib import Path

from tiny_llama2_zh.infer.server import create_app, running_server

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TURNS = [
    "判断下面这条商品评论的情感倾向，只回答“正面”或“负面”。\n评论：质量太差了，用了两天就坏了，退货！",
    "判断下面这条商品评论的情感倾向，只回答“正面”或“负面”。\n评论：屏幕有坏点，客服一直不理人，太失望了。",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="saved SFT model folder")
    parser.add_argument("--output", default="docs/serve_page.png", help="PNG to write (default: docs/serve_page.png)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    parser.add_argument("--system", default="你是一个乐于助人的中文助手。", help="system prompt typed into the page")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with running_server(create_app(args.model)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 640}, device_scale_factor=1)
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.startsWith('tinyllm')")
        page.fill("#system", args.system)
        page.fill("#temperature", "0")
        for turn, text in enumerate(TURNS, start=1):
            page.fill("#input", text)
            page.press("#input", "Enter")
            page.wait_for_selector(f".msg.assistant:nth-of-type({2 * turn})[data-state='done']", timeout=60_000)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.output)
        print("\n".join(page.locator(".msg").all_inner_texts()))
        print(f"wrote {args.output}")
        browser.close()


if __name__ == "__main__":
    main()
