"""`tinyllm chat` and `tinyllm generate --chat`: piped and pseudo-terminal sessions, history cutting, Ctrl-C/Ctrl-D."""

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import lively_model
from tiny_llama2_zh.cli import main
from tiny_llama2_zh.infer import chat
from tiny_llama2_zh.infer.chat import REPLY_MARKER, USER_PROMPT, ChatSession, chat_main, run_chat
from tiny_llama2_zh.infer.generate import SamplingOptions, chat_prompt_ids, generate_reply, generate_text, turn_end_ids
from tiny_llama2_zh.loading import load_model, save_model_folder
from tiny_llama2_zh.tokenizer import load_tokenizer

GREEDY = ["--temperature", "0", "--top-p", "1", "--repetition-penalty", "1"]
# one thread per subprocess: the model is tiny, and the machine's cores are shared
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TERM": "dumb"}


@pytest.fixture(scope="module")
def chat_model_dir(small_tokenizer, tmp_path_factory) -> Path:
    tokenizer = load_tokenizer(small_tokenizer)
    return save_model_folder(
        lively_model(tokenizer, max_position_embeddings=256), tokenizer, tmp_path_factory.mktemp("chat")
    )


@pytest.fixture(scope="module")
def endless_model_dir(small_tokenizer, tmp_path_factory) -> Path:
    """A model that never ends a reply (its generation config suppresses every turn-ending id): a reply is still
    streaming, for many seconds, when the Ctrl-C test interrupts it."""
    tokenizer = load_tokenizer(small_tokenizer)
    model = lively_model(tokenizer, max_position_embeddings=4096)
    model.generation_config.suppress_tokens = turn_end_ids(tokenizer)
    return save_model_folder(model, tokenizer, tmp_path_factory.mktemp("endless"))


def default_sigint() -> None:
    """In the child before it starts: SIGINT back to its default. A test run started in the background by a shell
    inherits SIGINT *ignored*, and Python then keeps ignoring it, so Ctrl-C would never reach the chat."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def chat_command(model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tiny_llama2_zh.cli", "chat", "--model", str(model_dir), *extra]


def test_piped_chat_answers_every_message_and_obeys_the_commands(chat_model_dir):
    lines = ["你好", "/system 你是助手", "今天天气怎么样？", "/reset", "/help", "再见", "/exit", "never read"]
    result = subprocess.run(
        chat_command(chat_model_dir, "--max-new-tokens", "8", *GREEDY),
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=CHILD_ENV,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # stdout holds the replies only: no prompt decoration when stdin is not a terminal
    assert result.stdout.count(REPLY_MARKER) == 3 and USER_PROMPT not in result.stdout
    assert result.stdout.startswith(REPLY_MARKER) and result.stdout.endswith("\n")
    assert "[system prompt set; conversation cleared]" in result.stderr
    assert "[conversation cleared]" in result.stderr and "/system TEXT" in result.stderr  # /reset, /help


def test_terminal_session_ctrl_c_stops_a_reply_and_ctrl_d_leaves(endless_model_dir):
    """In a pseudo-terminal (prompt and line editing on): a message, Ctrl-C while its reply streams (the reply of
    this model would take minutes), the prompt again, then Ctrl-D: exit status 0 and no traceback. One process
    covers both keys: starting Python with torch costs seconds to tens of seconds on the shared CI cores."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        chat_command(endless_model_dir, "--max-new-tokens", "3000", *GREEDY),
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=CHILD_ENV,
        preexec_fn=default_sigint,
    )
    os.close(secondary)
    transcript = bytearray()

    def read_until(needle: str, count: int = 1, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while transcript.count(needle.encode()) < count:
            assert time.monotonic() < deadline, f"no {needle!r} in {bytes(transcript).decode(errors='replace')!r}"
            if select.select([primary], [], [], 0.2)[0]:
                try:
                    transcript.extend(os.read(primary, 4096))
                except OSError:  # EIO: the child closed the terminal
                    return

    try:
        read_until(USER_PROMPT)  # a terminal gets the banner and the input prompt
        os.write(primary, "给我讲一个很长的故事\n".encode())
        read_until(REPLY_MARKER)
        time.sleep(1.0)  # let some tokens stream; the whole reply would take far longer
        process.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
        read_until("[interrupted")
        read_until(USER_PROMPT, 2)  # back at the prompt: the chat goes on
        os.write(primary, b"\x04")  # Ctrl-D at an empty prompt: end of input
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(primary)
    text = transcript.decode("utf-8", errors="replace")
    assert "/help" in text and "Traceback" not in text


@pytest.mark.slow  # the terminal test above covers Ctrl-C; this is the same through pipes, one more process start
def test_piped_ctrl_c_stops_a_reply_and_exit_still_works(endless_model_dir):
    process = subprocess.Popen(
        chat_command(endless_model_dir, "--max-new-tokens", "3000", *GREEDY),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=CHILD_ENV,
        preexec_fn=default_sigint,
    )
    try:
        process.stdin.write("给我讲一个很长的故事\n/exit\n".encode())
        process.stdin.flush()  # communicate() closes it below
        seen = bytearray()
        deadline = time.monotonic() + 120
        while REPLY_MARKER.encode() not in seen:
            assert time.monotonic() < deadline and process.poll() is None, bytes(seen)
            if select.select([process.stdout], [], [], 0.2)[0]:
                seen.extend(os.read(process.stdout.fileno(), 4096))
        time.sleep(1.0)  # let some tokens stream
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    stderr_text = stderr.decode("utf-8", errors="replace")
    assert process.returncode == 0, stderr_text
    assert "[interrupted; that message is forgotten]" in stderr_text
    assert "Traceback" not in stderr_text + (seen + stdout).decode("utf-8", errors="replace")


def test_history_is_cut_from_the_oldest_whole_turns(small_tokenizer, monkeypatch):
    tokenizer = load_tokenizer(small_tokenizer)
    model = lively_model(tokenizer, max_position_embeddings=64)
    options = SamplingOptions(max_new_tokens=8)
    limit = 64 - options.max_new_tokens
    assistant_prompt = tokenizer.encode("<|assistant|>\n", add_special_tokens=False)
    system_id = tokenizer.convert_tokens_to_ids("<|system|>")
    prompts: list[list[int]] = []

    def recording_generate_reply(model, tokenizer, messages, options, streamer=None):
        prompts.append(chat_prompt_ids(tokenizer, messages, limit)[0])
        return generate_reply(model, tokenizer, messages, options, streamer)

    monkeypatch.setattr(chat, "generate_reply", recording_generate_reply)
    session = ChatSession(model, tokenizer, options, system="你是助手")
    drops = [session.reply(f"第{turn}个问题：请讲一个小猫的故事")[1] for turn in range(6)]
    assert sum(drops) > 0 and drops[0] == 0  # the long conversation outgrew the context...
    for ids in prompts:  # ...and every prompt is still whole: <s>, the system prompt, ..., the assistant prompt
        assert len(ids) <= limit and ids[0] == tokenizer.bos_token_id and ids[1] == system_id
        assert ids[-len(assistant_prompt) :] == assistant_prompt
    assert "第5个问题" in tokenizer.decode(prompts[-1]) and "第0个问题" not in tokenizer.decode(prompts[-1])
    # the dropped turns left the history for good, which still starts with a user turn and alternates
    assert [turn["role"] for turn in session.turns] == ["user", "assistant"] * (len(session.turns) // 2)
    assert len(session.turns) < 12
    before = list(session.turns)
    with pytest.raises(ValueError, match="context"):  # one message longer than the context is refused, not cut
        session.reply("很长的消息" * 100)
    assert session.turns == before


def test_generate_chat_is_deterministic_and_equals_generate_reply(chat_model_dir, capsys):
    argv = ["generate", "--model", str(chat_model_dir), "--prompt", "你好", "--chat", "--max-new-tokens", "12"]
    outputs = []
    for extra in ([], [], ["--system", "你是助手"]):
        assert main([*argv, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].endswith("\n")
    model, tokenizer = load_model(chat_model_dir)
    options = SamplingOptions(max_new_tokens=12)
    reply, _ = generate_reply(model, tokenizer, [{"role": "user", "content": "你好"}], options)
    assert outputs[0].strip() == reply
    system = [{"role": "system", "content": "你是助手"}]
    assert (
        outputs[2].strip()
        == generate_reply(model, tokenizer, [*system, {"role": "user", "content": "你好"}], options)[0]
    )
    assert main([*argv[:-3], "--system", "x"]) == 2  # --system without --chat is an error, not ignored
    assert "--system needs --chat" in capsys.readouterr().err


def scripted(lines: list[str | type[BaseException]]):
    """An `input` replacement: returns the lines in order, raising the exception classes among them."""
    queue = list(lines)

    def read(prompt: str) -> str:
        item = queue.pop(0) if queue else EOFError
        if isinstance(item, type):
            raise item
        return item

    return read


def test_ctrl_c_during_a_reply_forgets_the_message_and_ctrl_c_at_the_prompt_leaves(chat_model_dir, monkeypatch, capsys):
    model, tokenizer = load_model(chat_model_dir)
    session = ChatSession(model, tokenizer, SamplingOptions(max_new_tokens=4))
    real_generate_reply = chat.generate_reply
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_generate_reply(*args, **kwargs)

    monkeypatch.setattr(chat, "generate_reply", interrupted_once)
    run_chat(
        session, read=scripted(["first", "second", "", "/nonsense", KeyboardInterrupt, "never"]), interactive=False
    )
    assert [turn["content"] for turn in session.turns if turn["role"] == "user"] == ["second"]
    captured = capsys.readouterr()
    assert (
        captured.out.count(REPLY_MARKER) == 2 and "[interrupted" in captured.err and "unknown command" in captured.err
    )


def test_plain_mode_continues_text_without_the_template(chat_model_dir, monkeypatch, capsys):
    model, tokenizer = load_model(chat_model_dir)
    options = SamplingOptions(max_new_tokens=6)
    tokenizer.chat_template = None  # a tokenizer without a template switches to plain mode by itself
    lines = scripted(["中国经济", "/reset", "/exit"])
    monkeypatch.setattr(
        chat, "run_chat", lambda session, plain: run_chat(session, plain, interactive=False, read=lines)
    )
    chat_main(model, tokenizer, options, system="ignored")
    captured = capsys.readouterr()
    expected = generate_text(model, tokenizer, "中国经济", options)
    assert captured.out == REPLY_MARKER + expected + "\n"
    assert "no chat template" in captured.err and "plain mode keeps no conversation" in captured.err
