"""The chat page at `/` in a real headless Chromium (Debian's package, driven by Playwright; no browser download).

Two Chinese turns through the page: each reply streams into the page, the second request carries the whole
conversation, and the screenshot shows the Chinese text. Skips, with the reason, where chromium or the Python
`playwright` package is missing (.ci/run installs chromium and fonts-wqy-microhei with apt-get).
"""

import json
from pathlib import Path

import pytest

from conftest import lively_model
from tiny_llama2_zh.infer.server import create_app, running_server
from tiny_llama2_zh.loading import save_model_folder
from tiny_llama2_zh.tokenizer import load_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
# Chromium as root needs --no-sandbox; the rest keep it from reaching a network that this machine does not have.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CONTEXT = 16384  # a reply to the whole context streams for many seconds: the stop test never races its end
FIRST, SECOND = "你好，请介绍一下北京。", "谢谢！再说说上海吧。"


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def full_length_replies(page) -> None:
    """A random model may end its reply at any token, even the first. The test adds vLLM's `ignore_eos` to the
    page's requests on their way out (Playwright routing), so that every reply runs to its max_tokens: never
    empty, and still streaming when the stop button is pressed. The page and the server are unchanged."""

    def add_ignore_eos(route) -> None:
        route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), "ignore_eos": True}))

    page.route("**/v1/chat/completions", add_ignore_eos)


@pytest.fixture(scope="module")
def sync_playwright():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium fonts-wqy-microhei (.ci/run does it)")
    module = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is missing: pip install -e '.[test]'"
    )
    return module.sync_playwright


@pytest.fixture(scope="module")
def page_model_dir(small_tokenizer, tmp_path_factory) -> Path:
    tokenizer = load_tokenizer(small_tokenizer)
    model = lively_model(tokenizer, max_position_embeddings=CONTEXT)
    return save_model_folder(model, tokenizer, tmp_path_factory.mktemp("page"))


def test_two_chinese_turns_stream_into_the_page(sync_playwright, page_model_dir, tmp_path):
    with running_server(create_app(page_model_dir)) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            full_length_replies(page)
            requests: list[dict] = []
            page.on(
                "request",
                lambda request: (
                    requests.append(json.loads(request.post_data))
                    if request.url.endswith("/v1/chat/completions")
                    else None
                ),
            )
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.startsWith('tinyllm')")
            page.fill("#system", "你是一个乐于助人的助手。")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "24")

            page.fill("#input", FIRST)
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-state='done']", timeout=30_000)
            page.fill("#input", SECOND)
            page.click("#send")
            page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-state='done']", timeout=30_000)
            page.screenshot(path=str(tmp_path / "chat_page.png"), full_page=True)

            bubbles = page.locator(".msg").all_inner_texts()
            assert bubbles[0] == FIRST and bubbles[2] == SECOND
            replies = [bubbles[1], bubbles[3]]
            assert all(reply.strip() for reply in replies), bubbles
            assert page.inner_text("#error") == ""
            # the second request carries the conversation: system prompt, both user turns and the first reply
            assert [m["role"] for m in requests[1]["messages"]] == ["system", "user", "assistant", "user"]
            assert requests[1]["messages"][2]["content"] == replies[0]
            assert requests[1]["messages"][3]["content"] == SECOND
            assert requests[1]["stream"] is True and requests[1]["temperature"] == 0
            assert (tmp_path / "chat_page.png").stat().st_size > 10_000
        finally:
            browser.close()


def test_stop_button_and_server_errors_reach_the_person(sync_playwright, page_model_dir, tmp_path):
    app = create_app(page_model_dir, max_batch=1)
    with running_server(app) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page()
            full_length_replies(page)
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.startsWith('tinyllm')")
            # an error from the server (max_tokens beyond the context) is shown, in the server's words
            page.fill("#max-tokens", "100000")
            page.fill("#input", FIRST)
            page.press("#input", "Enter")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert f"maximum context length is {CONTEXT}" in page.inner_text("#error")
            # stop: a long reply (the rest of the 16,384-token context) is cut off by the button, and the engine frees
            # its row at once
            page.fill("#max-tokens", "")
            page.fill("#temperature", "0")
            page.fill("#input", SECOND)
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelector('.msg.assistant')?.textContent.length > 0")
            page.click("#stop")
            page.wait_for_selector(".msg.assistant[data-state='stopped']", timeout=10_000)
            assert "(stopped)" in page.inner_text(".msg.assistant")
            assert page.is_enabled("#send") and not page.is_enabled("#stop")
            engine = app.state.engine
            deadline = 50
            while engine.stats()["running"] and deadline:
                page.wait_for_timeout(100)
                deadline -= 1
            assert engine.stats()["running"] == 0
        finally:
            browser.close()
