"""`tinyllm serve`: the official `openai` client against a real uvicorn on a free loopback port.

The model is random (nothing is trained); what is checked is the protocol: OpenAI's shapes, streaming, the
sampling parameters, stop conditions, errors for every kind of bad input, the API key, the bounded queue (429),
a disconnected client freeing its row at once, and what a browser may do: only the server's own origin and host
names (cross-site requests and DNS rebinding refused), JSON bodies only, internal errors answered without their
text.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import lively_model
from tiny_llama2_zh.infer.generate import SamplingOptions, generate_reply, generate_text
from tiny_llama2_zh.infer.server import create_app, running_server
from tiny_llama2_zh.loading import load_model, save_model_folder
from tiny_llama2_zh.tokenizer import chat_ids, load_tokenizer

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -e '.[test]'")

MODEL = "tinyllm"
CONTEXT = 512
HELLO = [{"role": "user", "content": "你好，请介绍一下北京。"}]


@pytest.fixture(scope="module")
def serve_model_dir(small_tokenizer, tmp_path_factory) -> Path:
    tokenizer = load_tokenizer(small_tokenizer)
    model = lively_model(tokenizer, max_position_embeddings=CONTEXT)
    return save_model_folder(model, tokenizer, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def app(serve_model_dir):
    return create_app(serve_model_dir, model_name=MODEL, max_batch=4, queue_size=4)


@pytest.fixture(scope="module")
def server(app):
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(serve_model_dir):
    return load_model(serve_model_dir, "cpu")


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    """A raw POST (for bodies the openai client would never send): status, JSON body, headers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def assert_openai_error(body: dict, param: str | None = None, code: str | None = None) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


# ------------------------------------------------------------------------------------------ the protocol
def test_models_lists_the_served_model(client, server):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert get_json(f"{server}/health")["status"] == "ok"


def test_chat_completion_is_the_models_greedy_reply(client, reference):
    model, tokenizer = reference
    response = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=24)
    choice = response.choices[0]
    expected, _ = generate_reply(model, tokenizer, HELLO, SamplingOptions(max_new_tokens=24, temperature=0.0))
    assert choice.message.role == "assistant" and choice.message.content.strip() == expected and expected
    prompt_tokens = len(chat_ids(tokenizer, HELLO, generation_prompt=True))
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    assert (choice.finish_reason == "length") == (response.usage.completion_tokens == 24)
    assert response.object == "chat.completion" and response.model == MODEL and response.id.startswith("chatcmpl-")


def test_streamed_chunks_concatenate_to_the_non_streamed_reply(client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=40)
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_tokens=40, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert len([piece for piece in pieces if piece]) > 3  # streamed in pieces, not one block
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)


def test_the_sse_stream_ends_with_done(server):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True}
    request = urllib.request.Request(
        f"{server}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(event.startswith("data: ") for event in events)


def test_seed_reproduces_a_sampled_reply(client):
    def sample(seed: int) -> str:
        response = client.chat.completions.create(
            model=MODEL, messages=HELLO, temperature=1.0, top_p=0.9, seed=seed, max_tokens=16
        )
        return response.choices[0].message.content

    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) > 1


def test_stop_string_cuts_the_text_and_finishes_with_stop(client):
    base = client.completions.create(
        model=MODEL, prompt="人民日报", temperature=0, max_tokens=30, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and "\ufffd" not in stop, text
    cut = client.completions.create(model=MODEL, prompt="人民日报", temperature=0, max_tokens=30, stop=[stop, "never"])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt="人民日报", temperature=0, max_tokens=30, stop=stop, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == text[: text.index(stop)]


def test_text_content_parts_are_joined(client):
    parts = [{"type": "text", "text": "你好，"}, {"type": "text", "text": "请介绍一下北京。"}]
    joined = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=8
    )
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8)
    assert joined.choices[0].message.content == plain.choices[0].message.content


def test_completion_continues_the_prompt_and_max_tokens_gives_length(client, reference):
    model, tokenizer = reference
    response = client.completions.create(model=MODEL, prompt="北京是", temperature=0, max_tokens=12)
    expected = generate_text(model, tokenizer, "北京是", SamplingOptions(max_new_tokens=12, temperature=0.0))
    assert response.choices[0].text == expected
    assert response.object == "text_completion" and response.usage.prompt_tokens == len(
        tokenizer("北京是")["input_ids"]
    )
    forced = client.completions.create(
        model=MODEL, prompt="北京是", temperature=0, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 3


# ------------------------------------------------------------------------------------------- bad input
def chat(**fields) -> dict:
    return {"model": MODEL, "messages": HELLO, **fields}


BAD_CHAT_BODIES = {
    "missing messages": ({"model": MODEL}, "messages"),
    "empty messages": (chat(messages=[]), "messages"),
    "unknown role": (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    "message without content": (chat(messages=[{"role": "user"}]), "messages[0].content"),
    "content of the wrong type": (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    "messages not a list": (chat(messages="hi"), "messages"),
    "max_tokens 0": (chat(max_tokens=0), "max_tokens"),
    "max_tokens negative": (chat(max_tokens=-5), "max_tokens"),
    "max_tokens beyond the context": (chat(max_tokens=CONTEXT), "max_tokens"),
    "max_tokens as a string": (chat(max_tokens="5"), "max_tokens"),
    "temperature as a string": (chat(temperature="hot"), "temperature"),
    "temperature out of range": (chat(temperature=2.5), "temperature"),
    "top_p zero": (chat(top_p=0), "top_p"),
    "n above one": (chat(n=2), "n"),
    "stream not a boolean": (chat(stream="yes"), "stream"),
    "stop not a string": (chat(stop=5), "stop"),
    "too many stop strings": (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    "missing model": ({"messages": HELLO}, "model"),
    "empty stop string": (chat(stop=""), "stop"),
    "seed out of range": (chat(seed=2**70), "seed"),
    "an image content part": (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        "messages[0].content",
    ),
    "null message": (chat(messages=[None]), "messages[0]"),
}


@pytest.mark.parametrize("name", list(BAD_CHAT_BODIES))
def test_bad_chat_requests_get_an_openai_shaped_400(server, name):
    body, param = BAD_CHAT_BODIES[name]
    status, answer, _ = post(f"{server}/v1/chat/completions", body)
    assert status == 400, answer
    assert_openai_error(answer, param=param)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
        (b'{"model": "tinyllm", "messages": [{"role": "user", "content": "' + b"x" * (1 << 20) + b'"}]}', 413, None),
    ],
    ids=["invalid JSON", "not an object", "not UTF-8", "empty body", "deeply nested", "over the size limit"],
)
def test_unparseable_and_oversized_bodies(server, body, status, code):
    got, answer, _ = post(f"{server}/v1/chat/completions", body)
    assert got == status
    assert_openai_error(answer, code=code)


def test_bad_input_through_the_openai_client_raises_its_exceptions(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert error.value.status_code == 404 and error.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[])
    assert error.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as error:  # a prompt longer than the context
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "北京" * 2000}])
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="北京是", max_tokens=CONTEXT)
    assert error.value.code == "context_length_exceeded" and error.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # and the server is still serving
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices[0].message


def test_unknown_paths_and_methods_answer_in_openai_shape(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        request = urllib.request.Request(f"{server}{path}", method=method)
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=10)
        assert error.value.code == status
        assert_openai_error(json.loads(error.value.read()))


def test_the_chat_page_is_served(server):
    with urllib.request.urlopen(f"{server}/", timeout=10) as response:
        page = response.read().decode("utf-8")
    assert response.headers["Content-Type"].startswith("text/html")
    assert "/v1/chat/completions" in page and "http://" not in page.replace("http://HOST", "")  # nothing remote


# ------------------------------------------------------------------------- what a browser may send
def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_declared_json_gets_415(server, content_type):
    """The three types a cross-site form or "simple" fetch may send without a CORS preflight."""
    status, answer, _ = post(f"{server}/v1/chat/completions", chat(max_tokens=1), {"Content-Type": content_type})
    assert status == 415, answer
    assert_openai_error(answer, code="unsupported_media_type")
    assert "application/json" in answer["error"]["message"]
    status, answer, _ = post(
        f"{server}/v1/chat/completions", chat(max_tokens=1), {"Content-Type": "application/json; charset=utf-8"}
    )
    assert status == 200, answer


@pytest.mark.parametrize(
    ("headers", "refused", "option"),
    [
        ({"Origin": "http://evil.example"}, "Origin", "--allow-origin http://evil.example"),
        ({"Origin": "null"}, "Origin", "--allow-origin null"),
        ({"Host": "evil.example:{port}"}, "Host", "--allow-host evil.example"),  # DNS rebinding
        ({"Host": "evil.example:{port}", "Origin": "http://evil.example:{port}"}, "Host", "--allow-host"),
        ({"Host": "127.0.0.1:1"}, "Host", "--allow-host"),  # a loopback name, but not this server's port
        ({"Origin": "http://127.0.0.1:1"}, "Origin", "--allow-origin"),
    ],
    ids=["foreign origin", "null origin", "foreign host", "rebound page", "other port", "origin of other port"],
)
def test_cross_site_requests_and_foreign_host_names_are_refused_with_403(server, headers, refused, option):
    port = port_of(server)
    headers = {name: value.format(port=port) for name, value in headers.items()}
    for method, path, body in (("POST", "/v1/chat/completions", chat(max_tokens=1)), ("GET", "/v1/models", None)):
        request = urllib.request.Request(
            f"{server}{path}",
            data=json.dumps(body).encode() if body else None,
            headers={"Content-Type": "application/json", **headers},
            method=method,
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        assert error.value.code == 403
        answer = json.loads(error.value.read())
        assert_openai_error(answer)
        message = answer["error"]["message"]
        assert f"{refused} header" in message and option in message, message


def test_the_pages_own_requests_are_accepted_from_every_loopback_name(server):
    """What the chat page's fetch() sends (same origin, JSON), whichever loopback name the browser used."""
    port = port_of(server)
    for host in ("127.0.0.1", "localhost", "[::1]"):
        same_origin = {"Host": f"{host}:{port}", "Origin": f"http://{host}:{port}"}
        status, answer, _ = post(f"{server}/v1/chat/completions", chat(max_tokens=2), same_origin)
        assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant", (host, answer)
        request = urllib.request.Request(f"{server}/", headers={"Host": f"{host}:{port}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    stream = urllib.request.Request(
        f"{server}/v1/chat/completions",
        json.dumps(chat(max_tokens=3, stream=True)).encode(),
        {"Content-Type": "application/json", "Origin": server},
    )
    with urllib.request.urlopen(stream, timeout=30) as response:
        assert response.read().decode().endswith("data: [DONE]\n\n")


def test_an_internal_error_is_logged_with_a_request_id_and_answered_without_its_text(app, server, monkeypatch, caplog):
    secret = "secret internal detail 7f3a"

    def broken(*args, **kwargs):
        raise RuntimeError(secret)

    caplog.set_level(logging.ERROR)
    # inside the engine (a decode step fails: the batch fails, the engine goes on) and inside a route handler
    for target in ("decoder.step", "submit"):
        owner, name = (app.state.engine.decoder, "step") if target == "decoder.step" else (app.state.engine, "submit")
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, broken)
            caplog.clear()
            status, answer, headers = post(f"{server}/v1/chat/completions", chat(max_tokens=4, ignore_eos=True))
        assert status == 500, (target, answer)
        assert_openai_error(answer)
        message = answer["error"]["message"]
        assert secret not in message and answer["error"]["type"] == "server_error"
        request_id = headers["x-request-id"]
        assert request_id in message
        logged = [record for record in caplog.records if request_id in record.getMessage()]
        assert logged and secret in caplog.text, (target, caplog.text)
    status, _, _ = post(f"{server}/v1/chat/completions", chat(max_tokens=2))  # and the server still serves
    assert status == 200


# ----------------------------------------------------------------------------------- key and capacity
def test_api_key_is_required_when_set(serve_model_dir):
    with running_server(create_app(serve_model_dir, model_name=MODEL, api_key="sekret")) as url:
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        assert [model.id for model in good.models.list()] == [MODEL]
        assert good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as error:
            wrong.chat.completions.create(model=MODEL, messages=HELLO)
        assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        status, body, _ = post(f"{url}/v1/chat/completions", chat())  # no Authorization header at all
        assert status == 401
        assert_openai_error(body, code="invalid_api_key")
        assert get_json(f"{url}/health")["status"] == "ok"  # health needs no key


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_full_queue_gets_429_and_a_disconnected_stream_frees_its_row(serve_model_dir):
    app = create_app(serve_model_dir, model_name=MODEL, max_batch=1, queue_size=1)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

        def endless():  # streams until closed: ignore_eos and the whole context to fill
            return client.completions.create(
                model=MODEL, prompt="北京", max_tokens=CONTEXT - 10, stream=True, extra_body={"ignore_eos": True}
            )

        def health() -> dict:
            return get_json(f"{url}/health")

        first = endless()
        assert next(iter(first)).choices[0].text is not None  # decoding: it holds the only row
        second = endless()  # waits in the queue
        assert wait_for(lambda: health()["waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as error:
            client.chat.completions.create(model=MODEL, messages=HELLO)
        assert error.value.status_code == 429 and error.value.response.headers["retry-after"] == "1"
        assert_openai_error(error.value.body if "error" in error.value.body else {"error": error.value.body})

        steps_before = health()["steps"]
        first.close()  # the client goes away mid-stream
        assert wait_for(lambda: health()["running"] == 1 and health()["waiting"] == 0), health()
        assert next(iter(second)).choices  # the waiting request got the freed row and streams
        assert health()["steps"] < steps_before + CONTEXT  # the first one did not run to its end
        second.close()
        assert wait_for(lambda: health()["running"] == 0 and health()["waiting"] == 0), health()
        ok = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
        assert ok.usage.completion_tokens <= 3


def test_tinyllm_serve_runs_the_server_on_loopback(serve_model_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "tiny_llama2_zh.cli",
        "serve",
        "--model",
        str(serve_model_dir),
        "--port",
        str(port),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    allowed = ["--allow-host", "mybox.lan", "--allow-origin", "http://app.example:3000"]
    server = subprocess.Popen(
        [*command, "--threads", "1", *allowed], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _health_ok(url) or server.poll() is not None, timeout=60)
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3).usage.completion_tokens
        # --allow-host: that name at any port (a reverse proxy's); --allow-origin: that page's JSON POSTs get CORS
        status, _, _ = post(f"{url}/v1/chat/completions", chat(max_tokens=1), {"Host": "mybox.lan"})
        assert status == 200
        status, _, headers = post(
            f"{url}/v1/chat/completions", chat(max_tokens=1), {"Origin": "http://app.example:3000"}
        )
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example:3000"
        preflight = urllib.request.Request(
            f"{url}/v1/chat/completions",
            method="OPTIONS",
            headers={
                "Origin": "http://app.example:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,authorization",
            },
        )
        with urllib.request.urlopen(preflight, timeout=10) as response:
            assert response.headers["access-control-allow-origin"] == "http://app.example:3000"
        status, answer, _ = post(f"{url}/v1/chat/completions", chat(max_tokens=1), {"Origin": "http://app.example"})
        assert status == 403 and "--allow-origin http://app.example" in answer["error"]["message"]
        status, _, _ = post(f"{url}/v1/chat/completions", chat(max_tokens=1), {"Host": "otherbox.lan"})
        assert status == 403
    finally:
        server.terminate()
        stdout, _ = server.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}" in stdout.decode()  # the default bind address is loopback


@pytest.mark.parametrize(
    ("option", "value"),
    [("allow_origins", "http://app.example/chat"), ("allow_origins", "app.example"), ("allow_hosts", "http://mybox")],
)
def test_malformed_allow_lists_are_refused_before_the_model_loads(option, value):
    flag = option.replace("_", "-")[:-1]
    with pytest.raises(ValueError, match=f"--{flag} expects"):
        create_app("/nonexistent/model", **{option: [value]})


def _health_ok(url: str) -> bool:
    try:
        return get_json(f"{url}/health")["status"] == "ok"
    except OSError:
        return False
