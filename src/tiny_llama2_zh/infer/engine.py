"""The serving engine: one thread owns the model and decodes every running request as one batch.

Continuous batching (Yu et al. 2022, Orca; vLLM's scheduler): requests wait in a bounded queue; between two decode
steps the engine moves waiting requests into free rows of the `LeanDecoder` (one prefill each), then runs one
step for all running rows at once, samples each row's token with the request's own generator, turns tokens into
text and hands each request its new text. A request that finished (stop token, stop string, max_tokens, full
context) or was cancelled (its client went away) leaves the batch before the next step, so its row is free for
the next waiting request at once. Nothing here knows about HTTP: `server.py` submits `GenerationRequest`s and
receives their events through a callback, called on the engine thread.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from tiny_llama2_zh.infer.decode import LeanDecoder, sample_token

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
    message: str


Event = TextDelta | Finished | Failed


@dataclass
class GenerationRequest:
    """One completion to produce. `on_event` is called on the engine thread with TextDelta events as text becomes
    final, then exactly one Finished or Failed."""

    prompt_ids: list[int]
    max_tokens: int
    on_event: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Leave the batch (or the queue) before the next step; no further events are sent."""
        self.cancelled.set()


class _Running:
    """A request in a decoder row: its generated tokens and how much of their text has been sent."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.generated: list[int] = []
        self.sent = 0  # characters of the decoded text already sent
        self.generator = None
        if request.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        self.next_token: int | None = None


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters must not be sent yet: an incomplete UTF-8 character (the byte-level tokenizer
    decodes a partial one as U+FFFD) or the beginning of a stop string that the next tokens may complete."""
    hold = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
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
        self._waiting: deque[GenerationRequest] = deque()
        self._running: list[_Running] = []  # index = decoder row
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for /health and tests)
        # the Rust tokenizer's own decode: the same text as tokenizer.decode, without transformers' per-call
        # special-token bookkeeping (a third of the engine's own time per token)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = backend.decode if backend is not None else tokenizer.decode

    # -------------------------------------------------------------------------------------- public side
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tinyllm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, request: GenerationRequest) -> None:
        if not request.prompt_ids or len(request.prompt_ids) + request.max_tokens > self.context:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) must fit the "
                f"context of {self.context}"
            )
        with self._wake:
            if self._stopping:
                raise QueueFull("the engine is shutting down")
            # a request cancelled while it waited gives its place back at once
            self._waiting = deque(waiting for waiting in self._waiting if not waiting.cancelled.is_set())
            busy = len(self._running) + len(self._waiting)
            if busy >= self.max_batch + self.queue_size:
                raise QueueFull(
                    f"{len(self._running)} requests running and {len(self._waiting)} waiting (queue size "
                    f"{self.queue_size}); try again shortly"
                )
            self._waiting.append(request)
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        with self._wake:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "max_batch": self.max_batch,
                "queue_size": self.queue_size,
                "steps": self.steps,
            }

    # -------------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = []
                while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                    request = self._waiting.popleft()
                    if not request.cancelled.is_set():
                        admitted.append(request)
            for request in admitted:
                try:
                    self._admit(request)
                except Exception as error:  # this request alone fails; the running batch is untouched
                    logger.exception("prefill failed")
                    self._send(request, Failed(f"generation failed: {error}"))
            try:
                self._drop_finished()
                if self._running:
                    self._step()
                    self._drop_finished()
            except Exception as error:  # the server must outlive a failed step: fail the batch, keep serving
                logger.exception("decode step failed")
                for running in self._running:
                    self._send(running.request, Failed(f"generation failed: {error}"))
                self._running.clear()
                self.decoder.reset()
        for running in self._running:
            self._send(running.request, Failed("the server is shutting down"))

    def _admit(self, request: GenerationRequest) -> None:
        """Prefill the request into the next free row (the decoder counts the row only once prefill succeeded)."""
        running = _Running(request)
        logits = self.decoder.prefill(len(self._running), request.prompt_ids)
        self._running.append(running)
        self._accept(running, logits)

    def _step(self) -> None:
        tokens = torch.tensor([running.next_token for running in self._running], device=self.decoder.device)
        logits = self.decoder.step(tokens)
        self.steps += 1
        greedy = logits.argmax(-1).tolist()
        for row, running in enumerate(self._running):
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
        if token in request.stop_ids:
            self._finish(running, "stop", len(running.generated) + 1)
            return
        running.generated.append(token)
        text = self._decode(running.generated, skip_special_tokens=True)
        cuts = [cut for cut in (text.find(stop) for stop in request.stop_strings) if cut >= 0]
        if cuts:  # the text ends before the earliest stop string, which is not sent
            text = text[: min(cuts)]
            self._send_text(running, text, len(text))
            self._finish(running, "stop", len(running.generated))
            return
        full = len(request.prompt_ids) + len(running.generated) >= self.context
        if len(running.generated) >= request.max_tokens or full:
            self._send_text(running, text, len(text))
            self._finish(running, "length", len(running.generated))
            return
        self._send_text(running, text, len(text) - _held_back(text, request.stop_strings))
        running.next_token = token

    def _send_text(self, running: _Running, text: str, end: int) -> None:
        if end > running.sent:
            self._send(running.request, TextDelta(text[running.sent : end]))
            running.sent = end

    def _finish(self, running: _Running, reason: str, completion_tokens: int) -> None:
        running.next_token = None
        self._send(running.request, Finished(reason, len(running.request.prompt_ids), completion_tokens))

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
        for row in reversed(range(len(self._running))):
            running = self._running[row]
            if running.next_token is None or running.request.cancelled.is_set():
                self.decoder.release(row)
                self._running[row] = self._running[-1]
                self._running.pop()


def wait_idle(engine: Engine, timeout: float = 5.0) -> bool:
    """True once nothing runs or waits (tests and benchmarks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if not stats["running"] and not stats["waiting"]:
            return True
        time.sleep(0.01)
    return False
