"""The serving engine: one thread owns the model and decodes every running request as one batch.

Continuous batching (Yu et al. 2022, Orca; vLLM's scheduler): requests wait in a bounded queue; between two decode
steps the engine moves waiting requests into free rows of the `LeanDecoder` (one prefill each), then runs one
step for all running rows at once, samples each row's token with the request's own generator, turns tokens into
text a few at a time (`IncrementalDetokenizer`) and hands each request its new text. A request that finished (stop
token, stop string, max_tokens, full context) or was cancelled (its client went away) leaves the batch before the
next step, so its row is free for the next waiting request at once. Nothing here knows about HTTP: `server.py`
submits `GenerationRequest`s and receives their events through a callback, called on the engine thread.

Threads: `submit` and `stats` run on the server's threads, everything else on the engine thread. What both sides
touch (the waiting queue, the count of occupied rows, the step count, the stop flag) is read and written only
under one lock; the rows themselves (`_rows`) belong to the engine thread alone. A request counts against the
queue bound from `submit` until its row is freed, including while it is being prefilled.
"""

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from tiny_llama2_zh.infer.decode import LeanDecoder, greedy_tokens, sample_token

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every row is busy and the waiting queue is full: the server answers 429."""


@dataclass
class TextDelta:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" or "length" (OpenAI's finish_reason)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """The request failed on the server's side. `message` is safe to show a client: never an exception's text,
    which the engine logs with the request's id."""

    message: str


Event = TextDelta | Finished | Failed


@dataclass
class GenerationRequest:
    """One completion to produce. `on_event` is called on the engine thread with TextDelta events as text becomes
    final, then exactly one Finished or Failed. `request_id` names the request in the engine's log lines."""

    prompt_ids: list[int]
    max_tokens: int
    on_event: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    request_id: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Leave the batch (or the queue) before the next step; no further events are sent."""
        self.cancelled.set()


class IncrementalDetokenizer:
    """Token ids to text one token at a time, decoding only a short window of recent tokens.

    Decoding the whole reply again for every new token costs time quadratic in its length. The standard way out
    (Hugging Face TGI's `decode_token`, vLLM's `detokenize_incrementally`, `tokenizers.decoders.DecodeStream`):
    decode the window `ids[prefix_offset:]` and emit what its text adds to that of `ids[prefix_offset:read_offset]`,
    which was emitted before. The window starts a few tokens back, so that a decoder that looks at a neighbour
    (SentencePiece's leading space) sees the context a decode of the whole reply would. A window whose text ends in
    U+FFFD ends in an incomplete UTF-8 character (a byte-level BPE token, or a `<0xE5>` byte-fallback piece, holds
    part of one): nothing is emitted until a later token completes it, and only then does the window move on. So
    every emitted piece is final, and the pieces of valid text concatenate to the decode of the whole reply.

    Special tokens (`special_ids`) decode to nothing with skip_special_tokens, so they never enter a window: a
    window of nothing but skipped tokens would make SentencePiece's decoder strip the next piece's leading space as
    if it began the text. One bound on top of the standard recipe keeps every decode short (at most 2 x
    MAX_PENDING ids): a window that has waited MAX_PENDING tokens moves on anyway and emits its text, replacement
    characters included. A UTF-8 character is at most 4 bytes, so valid text does not wait that long; a model
    writing invalid bytes does, and only there can a U+FFFD land elsewhere than in a one-shot decode."""

    MAX_PENDING = 8

    def __init__(self, decode: Callable[..., str], special_ids: frozenset[int] = frozenset()) -> None:
        self._decode = decode  # a tokenizer's decode(ids, skip_special_tokens=...)
        self._special_ids = special_ids
        self.ids: list[int] = []  # the reply's tokens, special ones left out
        self._prefix_offset = 0  # the window starts here
        self._read_offset = 0  # the text of the ids before this has been emitted
        self._prefix_text = ""  # the decode of ids[prefix_offset:read_offset]

    def _text(self, start: int) -> str:
        return self._decode(self.ids[start:], skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; returns the text that became final (often "", never part of a character)."""
        if token in self._special_ids:
            return ""
        self.ids.append(token)
        text = self._text(self._prefix_offset)
        complete = len(text) > len(self._prefix_text) and not text.endswith("\ufffd")
        if not complete and len(self.ids) - self._read_offset < self.MAX_PENDING:
            return ""
        new_text = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self._prefix_text = self._text(self._prefix_offset)
        return new_text

    def flush(self) -> str:
        """The rest of the text once the reply ends: a trailing incomplete character as U+FFFD, as a one-shot
        decode writes it."""
        new_text = self._text(self._prefix_offset)[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self.ids)
        self._prefix_text = ""
        return new_text


class _Running:
    """A request in a decoder row: its tokens, its sampler and the decoded text not yet sent."""

    def __init__(self, request: GenerationRequest, device: torch.device, detokenizer: IncrementalDetokenizer) -> None:
        self.request = request
        self.detokenizer = detokenizer
        self.generated = 0  # tokens in the reply so far
        self.unsent = ""  # decoded text held back: it may be the start of a stop string
        # The request's own generator, seeded from its seed or from fresh entropy (Generator.seed): sampling never
        # reads or reseeds the process-wide RNG, and a seed reproduces a reply whatever else runs in the batch.
        self.generator = None
        if request.temperature > 0:
            self.generator = torch.Generator(device=device)
            if request.seed is not None:
                self.generator.manual_seed(request.seed)
            else:
                self.generator.seed()
        self.next_token: int | None = None


def _stop_prefix_length(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters of `text` must not be sent yet: the beginning of a stop string that the next
    tokens may complete."""
    hold = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return hold


class Engine:
    """Owns the model on a background thread; `submit` requests from any thread.

    `max_batch` requests decode together; up to `queue_size` more wait for a row; beyond that `submit` raises
    QueueFull."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerFast,
        max_batch: int = 8,
        queue_size: int = 32,
    ) -> None:
        if queue_size < 0:
            raise ValueError(f"queue_size must be 0 or more, got {queue_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.context = model.config.max_position_embeddings
        self.decoder = LeanDecoder(model, max_batch=max_batch)
        self.max_batch = max_batch
        self.queue_size = queue_size
        self._lock = threading.Condition()  # guards the four fields below; the engine thread waits on it
        self._waiting: deque[GenerationRequest] = deque()
        self._occupied = 0  # decoder rows taken: requests being prefilled or decoding
        self._steps = 0  # decode steps run (for /health and tests)
        self._stopping = False
        self._rows: list[_Running] = []  # the engine thread's alone; index = decoder row
        self._thread: threading.Thread | None = None
        # the Rust tokenizer's own decode: the same text as tokenizer.decode, without transformers' per-call
        # special-token bookkeeping (a third of the engine's own time per token)
        backend = tokenizer.backend_tokenizer
        self._decode = backend.decode
        # what decode(skip_special_tokens=True) leaves out
        self._special_ids = frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)

    # -------------------------------------------------------------------------------------- public side
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tinyllm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, request: GenerationRequest) -> None:
        if not request.prompt_ids or len(request.prompt_ids) + request.max_tokens > self.context:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) must fit the "
                f"context of {self.context}"
            )
        with self._lock:
            if self._stopping:
                raise QueueFull("the engine is shutting down")
            # a request cancelled while it waited gives its place back at once
            self._waiting = deque(waiting for waiting in self._waiting if not waiting.cancelled.is_set())
            if self._occupied + len(self._waiting) >= self.max_batch + self.queue_size:
                raise QueueFull(
                    f"{self._occupied} requests running and {len(self._waiting)} waiting (queue size "
                    f"{self.queue_size}); try again shortly"
                )
            self._waiting.append(request)
            self._lock.notify()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "running": self._occupied,
                "waiting": len(self._waiting),
                "max_batch": self.max_batch,
                "queue_size": self.queue_size,
                "steps": self._steps,
            }

    # -------------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._rows:
                    self._lock.wait()
                if self._stopping:
                    abandoned = list(self._waiting)
                    self._waiting.clear()
                    break
                admitted = []
                while self._waiting and self._occupied < self.max_batch:
                    request = self._waiting.popleft()
                    if not request.cancelled.is_set():
                        admitted.append(request)
                        self._occupied += 1  # from now until its row is freed
            for request in admitted:
                try:
                    self._admit(request)
                except Exception:  # this request alone fails; the running batch is untouched
                    logger.exception("prefill failed for request %s", request.request_id)
                    self._send(request, Failed("generation failed"))
            stepped = 0
            try:
                self._drop_finished()
                if self._rows:
                    self._step()
                    stepped = 1
                    self._drop_finished()
            except Exception:  # the server must outlive a failed step: fail the batch, keep serving
                ids = ", ".join(running.request.request_id for running in self._rows)
                logger.exception("decode step failed for requests %s", ids)
                for running in self._rows:
                    self._send(running.request, Failed("generation failed"))
                self._rows.clear()
                self.decoder.reset()
            with self._lock:
                self._occupied = len(self._rows)
                self._steps += stepped
        for running in self._rows:
            self._send(running.request, Failed("the server is shutting down"))
        for request in abandoned:
            self._send(request, Failed("the server is shutting down"))
        self._rows.clear()
        with self._lock:
            self._occupied = 0

    def _admit(self, request: GenerationRequest) -> None:
        """Prefill the request into the next free row (the decoder counts the row only once prefill succeeded)."""
        running = _Running(request, self.decoder.device, IncrementalDetokenizer(self._decode, self._special_ids))
        logits = self.decoder.prefill(len(self._rows), request.prompt_ids)
        self._rows.append(running)
        self._accept(running, logits)

    def _step(self) -> None:
        tokens = torch.tensor([running.next_token for running in self._rows], device=self.decoder.device)
        logits = self.decoder.step(tokens)
        greedy = greedy_tokens(logits).tolist()
        for row, running in enumerate(self._rows):
            if running.next_token is not None:
                self._accept(running, logits[row], greedy[row])

    def _accept(self, running: _Running, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample the row's next token from its logits, send the text that became final, and decide whether the
        request is done (then `next_token` is None and `_drop_finished` frees its row)."""
        request = running.request
        if request.cancelled.is_set():
            running.next_token = None
            return
        if greedy is not None and request.temperature <= 0:
            token = greedy
        else:
            token = sample_token(logits, request.temperature, request.top_p, running.generator)
        detokenizer = running.detokenizer
        reason = None
        if token in request.stop_ids:  # not part of the reply, but counted in its usage
            reason, completion_tokens = "stop", running.generated + 1
            new_text = detokenizer.flush()
        else:
            running.generated += 1
            new_text = detokenizer.push(token)
            full = len(request.prompt_ids) + running.generated >= self.context
            if running.generated >= request.max_tokens or full:
                reason, completion_tokens = "length", running.generated
                new_text += detokenizer.flush()
        # only the held-back tail and the new text can hold a stop string: any earlier one would have ended the reply
        text = running.unsent + new_text
        cuts = [cut for cut in (text.find(stop) for stop in request.stop_strings) if cut >= 0]
        if cuts:  # the reply ends before the earliest stop string, which is not sent
            text = text[: min(cuts)]
            if reason != "stop":
                reason, completion_tokens = "stop", running.generated
        if reason is not None:
            self._send_text(running, text)
            running.next_token = None
            self._send(request, Finished(reason, len(request.prompt_ids), completion_tokens))
            return
        final = len(text) - _stop_prefix_length(text, request.stop_strings)
        self._send_text(running, text[:final])
        running.unsent = text[final:]
        running.next_token = token

    def _send_text(self, running: _Running, text: str) -> None:
        if text:
            self._send(running.request, TextDelta(text))

    def _send(self, request: GenerationRequest, event: Event) -> None:
        if request.cancelled.is_set():
            return
        try:
            request.on_event(event)
        except Exception:  # a receiver that cannot take events (its loop closed) is a gone client
            logger.debug("dropping an event for a request whose receiver failed", exc_info=True)
            request.cancel()

    def _drop_finished(self) -> None:
        """Free the rows of finished and cancelled requests (the decoder moves its last row into a freed one)."""
        for row in reversed(range(len(self._rows))):
            running = self._rows[row]
            if running.next_token is None or running.request.cancelled.is_set():
                self.decoder.release(row)
                self._rows[row] = self._rows[-1]
                self._rows.pop()
