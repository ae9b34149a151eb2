"""A terminal chat with a saved model: multi-turn history through the chat template, streamed replies.

The prompt building, context cutting and stopping live in `infer.generate` (`chat_prompt_ids`, `generate_reply`);
this module only keeps the conversation and talks to the terminal. Two output rules make it usable both by a
person and by a script that pipes lines in:

* stdout carries the replies only, each one after the marker `assistant> ` and ended by a newline (and, when stdin
  is a terminal, the `you> ` input prompt);
* everything else (banner, notices such as dropped turns, errors, /help) goes to stderr.
"""

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from transformers import PreTrainedModel, PreTrainedTokenizerFast, TextStreamer

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.infer.generate import Message, SamplingOptions, generate_reply, generate_text

USER_PROMPT = "you> "
REPLY_MARKER = "assistant> "
HELP = """commands:
  /reset        forget the conversation (the system prompt stays)
  /system TEXT  set the system prompt and start a new conversation (/system alone removes it)
  /help         this text
  /exit         leave (as do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while a reply is streaming stops that reply; the unanswered message is forgotten.
Old turns are dropped, whole, when the conversation outgrows the model's context."""
PLAIN_HELP = """plain mode (no chat template): every line you type is continued as text, with no history.
  /help  this text
  /exit  leave (as do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while text is streaming stops it."""


def notice(text: str) -> None:
    """Anything that is not a reply goes to stderr, so that stdout stays parseable when piped."""
    print(text, file=sys.stderr, flush=True)


def has_chat_template(tokenizer: PreTrainedTokenizerFast) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_room(model: PreTrainedModel, options: SamplingOptions) -> None:
    """The reply must leave room for a prompt in the model's context; say so plainly instead of failing later."""
    context = model.config.max_position_embeddings
    if not 0 < options.max_new_tokens < context:
        raise UsageError(
            f"--max-new-tokens must be between 1 and {context - 1}: the model's context is {context} tokens and "
            "the prompt needs room too"
        )


class ReplyStreamer(TextStreamer):
    """`TextStreamer` (prompt and special tokens skipped) that drops the reply's leading whitespace, as
    `generate_reply` strips it from the text it returns, so the printed reply equals the returned one."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.started = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        super().on_finalized_text(text, stream_end)


@dataclass
class ChatSession:
    """A conversation: the system prompt, the turns that still fit the context, and the sampling options."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    options: SamplingOptions
    system: str | None = None
    turns: list[Message] = field(default_factory=list)
    replies: int = 0

    def messages(self) -> list[Message]:
        return [*([{"role": "system", "content": self.system}] if self.system else []), *self.turns]

    def reset(self) -> None:
        self.turns.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()

    def reply(self, text: str, streamer=None) -> tuple[str, int]:
        """Answer `text`; returns (reply, old messages dropped to fit the context). The dropped turns leave the
        history for good, so the next turn does not drop (and report) them again. If the answer fails or is
        interrupted, the message is taken back: the history never ends with an unanswered user turn."""
        self.turns.append({"role": "user", "content": text})
        # a new seed per reply: with sampling, the same question asked twice need not get the same answer, and the
        # conversation as a whole is still reproducible from --seed
        options = replace(self.options, seed=self.options.seed + self.replies)
        try:
            reply, dropped = generate_reply(self.model, self.tokenizer, self.messages(), options, streamer)
        except BaseException:  # KeyboardInterrupt included
            self.turns.pop()
            raise
        del self.turns[:dropped]  # chat_prompt_ids counts dropped messages after the system prompt
        self.turns.append({"role": "assistant", "content": reply})
        self.replies += 1
        return reply, dropped


def continue_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, text: str, options: SamplingOptions):
    """Plain mode: continue `text` (streamed), after checking that it fits the context with the new tokens."""
    room = model.config.max_position_embeddings - options.max_new_tokens
    length = len(tokenizer(text)["input_ids"])
    if length > room:
        raise UsageError(f"the text is {length} tokens, more than the {room} the model's context leaves for it")
    return generate_text(model, tokenizer, text, options, stream=True)


def run_chat(
    session: ChatSession,
    plain: bool = False,
    interactive: bool | None = None,
    read: Callable[[str], str] = input,
) -> None:
    """The read-answer loop. Returns on /exit, end of input (Ctrl-D) or Ctrl-C at the prompt; Ctrl-C during a
    reply only stops that reply. `interactive` (default: stdin is a terminal) turns on the banner, the input
    prompt and line editing."""
    if interactive is None:
        interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # readline is absent on some platforms; input() works without it
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        mode = "plain text continuation" if plain else "chat"
        notice(f"{mode}; /help lists the commands, Ctrl-D or /exit leaves")
    prompt = USER_PROMPT if interactive else ""
    while True:
        try:
            line = read(prompt)
        except (EOFError, KeyboardInterrupt):
            if interactive:
                notice("")  # end the prompt's line
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(session, text, plain):
                return
            continue
        _answer(session, text, plain)


def _command(session: ChatSession, text: str, plain: bool) -> bool:
    """Run a /command; True means leave."""
    name, _, argument = text.partition(" ")
    if name in ("/exit", "/quit"):
        return True
    if name == "/help":
        notice(PLAIN_HELP if plain else HELP)
    elif plain:
        notice(f"{name} needs the chat template; plain mode keeps no conversation (/help)")
    elif name == "/reset":
        session.reset()
        notice("[conversation cleared]")
    elif name == "/system":
        session.set_system(argument.strip())
        notice(f"[system prompt {'set' if session.system else 'removed'}; conversation cleared]")
    else:
        notice(f"unknown command {name}; /help lists the commands")
    return False


def _answer(session: ChatSession, text: str, plain: bool) -> None:
    try:
        # the marker goes out inside the try: a Ctrl-C at any moment after it is this reply's interruption
        print(REPLY_MARKER, end="", flush=True)
        if plain:
            options = replace(session.options, seed=session.options.seed + session.replies)
            continue_text(session.model, session.tokenizer, text, options)
            session.replies += 1
            return
        _, dropped = session.reply(text, ReplyStreamer(session.tokenizer))
    except KeyboardInterrupt:
        print(flush=True)  # the streamer's closing newline never came
        notice("[interrupted; that message is forgotten]" if not plain else "[interrupted]")
        return
    except ValueError as error:  # a message too long for the context: the conversation goes on without it
        print(flush=True)
        notice(f"[error: {error}]")
        return
    if dropped:
        notice(f"[dropped the {dropped} oldest message(s) to fit the model's context]")


def chat_main(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    options: SamplingOptions,
    system: str | None = None,
    plain: bool = False,
) -> None:
    """`tinyllm chat`: pick the mode (plain when asked, or when the tokenizer has no chat template) and chat."""
    check_room(model, options)
    if not plain and not has_chat_template(tokenizer):
        notice("[the tokenizer has no chat template: continuing text instead (--plain)]")
        plain = True
    if plain and system:
        notice("[--system is ignored in plain mode]")
    run_chat(ChatSession(model, tokenizer, options, None if plain else system), plain)
