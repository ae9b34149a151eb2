"""The lean decode loop (infer/decode.py) and the serving engine: the same tokens and logits as the model itself."""

import shutil
import threading

import pytest
import torch
from torch import nn

from conftest import tiny_config
from tiny_llama2_zh.infer.decode import LeanDecoder, greedy_generate, sample_token
from tiny_llama2_zh.infer.engine import (
    Engine,
    Failed,
    Finished,
    GenerationRequest,
    IncrementalDetokenizer,
    QueueFull,
    TextDelta,
)
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.tokenizer import convert_chatglm3, load_tokenizer

EOS = 2
PROMPTS = [
    [1, 5, 6, 7, 8, 9],
    [1, 30],
    [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52],
    [1, 77, 3, 3, 60],
]


def random_model(**overrides) -> TinyLlama2ForCausalLM:
    torch.manual_seed(0)
    # initializer_range 0.3: peaked logits, so greedy tokens vary (a plain init repeats one token)
    fields = {"initializer_range": 0.3, "max_position_embeddings": 128, **overrides}
    return TinyLlama2ForCausalLM(tiny_config(**fields)).eval()


def reference(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate: the tokens after the prompt, up to and including eos."""
    ids = torch.tensor([prompt])
    output = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    return output[0, len(prompt) :].tolist()


NATIVE = pytest.mark.parametrize("native", [True, False], ids=["C step", "PyTorch ops"])


def decoder_for(model, native: bool, **options) -> LeanDecoder:
    """A LeanDecoder with or without its C step; with it, the step must really run in C wherever a C compiler is
    installed (skipped, saying so, where none is)."""
    if native and not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler (cc, gcc) here: the decoder's C step cannot be built")
    decoder = LeanDecoder(model, native=native, **options)
    assert decoder.native == native, "the C decode step did not build: see the warning logged above"
    return decoder


@NATIVE
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_greedy_tokens_equal_model_generate_alone_and_batched(kv_heads, native):
    model = random_model(num_key_value_heads=kv_heads)
    expected = [reference(model, prompt, 30) for prompt in PROMPTS]
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS)  # the prompts lead to different replies
    decoder = decoder_for(model, native, max_batch=len(PROMPTS))
    alone = [greedy_generate(decoder, [prompt], 30, [EOS])[0] for prompt in PROMPTS]
    assert alone == expected
    # one batch of four prompts of different lengths: per-row positions and masks, rows leaving as they finish
    assert greedy_generate(decoder, PROMPTS, 30, [EOS]) == expected


@NATIVE
def test_logits_match_the_model_forward_in_prefill_and_in_each_step(native):
    model = random_model()
    sequence = [1, *range(10, 40)]
    with torch.no_grad():
        full = model(torch.tensor([sequence])).logits[0]  # (T, vocab)
    decoder = decoder_for(model, native, max_batch=2)
    prefill = decoder.prefill(0, sequence[:12], all_logits=True)
    torch.testing.assert_close(prefill, full[:12], rtol=1e-4, atol=1e-5)
    decoder.prefill(1, sequence[:5])  # a second row at other positions, stepping alongside
    for position in range(12, len(sequence)):
        logits = decoder.step(torch.tensor([sequence[position], sequence[position - 7]]))
        torch.testing.assert_close(logits[0], full[position], rtol=1e-4, atol=1e-5)
    assert decoder.lengths[:2] == [len(sequence), 5 + len(sequence) - 12]


@NATIVE
def test_a_sequence_joining_and_leaving_a_running_batch_keeps_every_row_exact(native):
    """Continuous batching: B joins while A is mid-reply, A leaves (its row is reused by C); all stay exact."""
    model = random_model()
    a, b, c = PROMPTS[0], PROMPTS[2], PROMPTS[3]
    expected = {name: reference(model, p, 12) for name, p in {"a": a, "b": b, "c": c}.items()}
    decoder = decoder_for(model, native, max_batch=2)
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    rows: list[str] = []  # the sequence in each decoder row

    def join(name: str, prompt: list[int]) -> None:
        got[name].append(int(decoder.prefill(len(rows), prompt).argmax()))
        rows.append(name)

    join("a", a)
    for _ in range(4):
        got["a"].append(int(decoder.step(torch.tensor([got["a"][-1]])).argmax()))
    join("b", b)
    while rows:
        next_tokens = decoder.step(torch.tensor([got[name][-1] for name in rows])).argmax(-1).tolist()
        for row in reversed(range(len(rows))):
            got[rows[row]].append(next_tokens[row])
            if len(got[rows[row]]) == len(expected[rows[row]]):
                decoder.release(row)  # the last row moves into this one
                rows[row] = rows[-1]
                rows.pop()
        if not got["c"] and len(rows) < 2:  # C takes the freed row
            join("c", c)
    assert got == expected


def test_without_a_working_c_compiler_the_decoder_warns_once_and_decodes_with_pytorch(monkeypatch, tmp_path, caplog):
    from tiny_llama2_zh.infer import native

    model = random_model()
    expected = [reference(model, prompt, 12) for prompt in PROMPTS[:2]]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built before
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    native.native_library.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            decoder = LeanDecoder(model, max_batch=2)
        assert not decoder.native
        assert "C decode step could not be built" in caplog.text
        assert greedy_generate(decoder, PROMPTS[:2], 12, [EOS]) == expected
        monkeypatch.setenv("CC", "cc")
        monkeypatch.setenv(native.SWITCH, "0")  # switched off: no build, no warning
        native.native_library.cache_clear()
        caplog.clear()
        assert not LeanDecoder(model, max_batch=2).native and not caplog.text
        assert not list(tmp_path.rglob("*.so"))
    finally:
        native.native_library.cache_clear()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to build the C step with")
def test_the_c_structures_match_their_ctypes_mirror_and_a_drifted_mirror_is_refused(monkeypatch, caplog):
    """native_step.c reports each structure's size and each field's offset as its compiler lays them out; they
    equal the ctypes mirror's, and a mirror that drifted (a field moved on one side only) is refused with a warning
    naming the field, the decoder falling back to PyTorch's step, instead of reading the wrong bytes."""
    from tiny_llama2_zh.infer import native

    native.native_library.cache_clear()
    try:
        library = native.native_library()
        assert library is not None and native.layout_mismatch(library) is None
        assert len(native.python_layout()) == 3 + sum(len(s._fields_) for s in native.STRUCTURES)
        offset = dict(native.python_layout())["Layer.keys"]
        drifted = [(what, value + 8 if what == "Layer.keys" else value) for what, value in native.python_layout()]
        monkeypatch.setattr(native, "python_layout", lambda: drifted)
        assert native.layout_mismatch(library) == f"Layer.keys: {offset} bytes in C, {offset + 8} in ctypes"
        native.native_library.cache_clear()
        with caplog.at_level("WARNING"):
            assert native.native_library() is None
            assert not LeanDecoder(random_model(), max_batch=2).native
        assert "structures do not match" in caplog.text and "Layer.keys" in caplog.text
    finally:
        native.native_library.cache_clear()


def test_sampling_is_reproducible_per_generator_and_top_p_narrows_it():
    torch.manual_seed(0)
    logits = torch.randn(50)
    draws = [[sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(seed)) for _ in range(1)] for seed in (7, 7)]
    assert draws[0] == draws[1]
    generator = torch.Generator().manual_seed(3)
    assert len({sample_token(logits, 1.0, 1.0, generator) for _ in range(200)}) > 10
    # top_p below the largest probability keeps only the argmax; temperature 0 is the argmax
    assert {sample_token(logits, 1.0, 1e-6, generator) for _ in range(20)} == {int(logits.argmax())}
    assert sample_token(logits, 0.0, 1.0, None) == int(logits.argmax())


def test_a_wrapped_linear_layer_is_refused():
    model = random_model()

    class Adapter(nn.Linear):  # what PEFT's LoRA does: another class in place of nn.Linear
        pass

    old = model.model.layers[1].mlp.up_proj
    model.model.layers[1].mlp.up_proj = Adapter(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj is a Adapter.*lora merge"):
        LeanDecoder(model)


# ------------------------------------------------------------------------------------------------- engine
class Collector:
    def __init__(self) -> None:
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    def text(self) -> str:
        return "".join(event.text for event in self.events if isinstance(event, TextDelta))


def test_engine_decodes_concurrent_requests_as_model_generate_does(small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    model = random_model(vocab_size=len(tokenizer), max_position_embeddings=96)
    prompts = [tokenizer(text)["input_ids"] for text in ("北京是", "今天天气很好，我们", "一", "人民日报报道")]
    engine = Engine(model, tokenizer, max_batch=3, queue_size=1).start()  # four requests: one waits for a row
    try:
        collectors = [Collector() for _ in prompts]
        for prompt, collector in zip(prompts, collectors):
            engine.submit(GenerationRequest(prompt, 24, collector, stop_ids=frozenset({EOS})))
        with pytest.raises(QueueFull):
            engine.submit(GenerationRequest(prompts[0], 4, Collector()))
        for prompt, collector in zip(prompts, collectors):
            assert collector.done.wait(30)
            expected = reference(model, prompt, 24)
            finished = collector.events[-1]
            assert isinstance(finished, Finished)
            assert finished.reason == ("stop" if expected[-1] == EOS else "length")
            assert finished.completion_tokens == len(expected) and finished.prompt_tokens == len(prompt)
            assert collector.text() == tokenizer.decode(expected, skip_special_tokens=True)
            assert "\ufffd" not in collector.text() or "\ufffd" in tokenizer.decode(expected)
    finally:
        engine.stop()


def test_a_request_that_fails_alone_leaves_the_batch_running(small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    model = random_model(vocab_size=len(tokenizer), max_position_embeddings=96)
    engine = Engine(model, tokenizer, max_batch=2, queue_size=0).start()
    try:
        good, bad, after = Collector(), Collector(), Collector()
        prompt = tokenizer("北京是")["input_ids"]
        engine.submit(GenerationRequest(prompt, 40, good, stop_ids=frozenset({EOS})))
        engine.submit(GenerationRequest([1, len(tokenizer) + 5], 4, bad))  # an id beyond the embedding
        assert bad.done.wait(30) and good.done.wait(30)
        assert isinstance(bad.events[-1], Failed) and "generation failed" in bad.events[-1].message
        assert isinstance(good.events[-1], Finished)
        assert good.text() == tokenizer.decode(reference(model, prompt, 40), skip_special_tokens=True)
        engine.submit(GenerationRequest(prompt, 3, after))  # and the engine still serves
        assert after.done.wait(30) and isinstance(after.events[-1], Finished)
    finally:
        engine.stop()


def test_sampled_requests_never_touch_the_global_rng_and_a_seed_reproduces_a_reply_in_any_batch(small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    model = random_model(vocab_size=len(tokenizer), max_position_embeddings=96)
    prompt = tokenizer("北京是")["input_ids"]
    engine = Engine(model, tokenizer, max_batch=3, queue_size=3).start()

    def run(*seeds: int | None) -> list[str]:
        collectors = [Collector() for _ in seeds]
        for seed, collector in zip(seeds, collectors):
            engine.submit(GenerationRequest(prompt, 16, collector, temperature=1.0, top_p=0.95, seed=seed))
        assert all(collector.done.wait(30) for collector in collectors)
        return [collector.text() for collector in collectors]

    try:
        global_state = torch.get_rng_state()
        unseeded = run(None, None, None)
        assert torch.equal(torch.get_rng_state(), global_state)  # was reseeded by torch.seed() per request
        assert len(set(unseeded)) > 1  # unseeded requests still differ: each has its own fresh generator
        alone = run(5)[0]
        assert run(5)[0] == alone
        assert run(None, 5, None)[1] == alone  # batched with other sampled rows, the seeded reply is the same
        assert run(6)[0] != alone
    finally:
        engine.stop()


def test_the_queue_bound_counts_a_request_while_the_engine_prefills_it(small_tokenizer, monkeypatch):
    """max_batch 1 + queue_size 1: while the first request is being prefilled (taken from the queue, not yet in
    the batch) one more may wait and a third is refused. Deterministic: the prefill waits for an Event."""
    tokenizer = load_tokenizer(small_tokenizer)
    model = random_model(vocab_size=len(tokenizer), max_position_embeddings=96)
    prompt = tokenizer("北京是")["input_ids"]
    engine = Engine(model, tokenizer, max_batch=1, queue_size=1)
    prefilling, release = threading.Event(), threading.Event()
    real_prefill = engine.decoder.prefill

    def held_prefill(*args, **kwargs):
        prefilling.set()
        assert release.wait(30)
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(engine.decoder, "prefill", held_prefill)
    engine.start()
    try:
        first, second = Collector(), Collector()
        engine.submit(GenerationRequest(prompt, 3, first))
        assert prefilling.wait(30)  # the engine thread holds the first request in prefill now
        assert (engine.stats()["running"], engine.stats()["waiting"]) == (1, 0)
        engine.submit(GenerationRequest(prompt, 3, second))  # 1 running + 1 waiting: the bound is reached
        with pytest.raises(QueueFull, match="1 requests running and 1 waiting"):
            engine.submit(GenerationRequest(prompt, 3, Collector()))
        release.set()
        assert first.done.wait(30) and second.done.wait(30)
        assert isinstance(first.events[-1], Finished) and isinstance(second.events[-1], Finished)
    finally:
        release.set()
        engine.stop()


class RecordingDecode:
    """The tokenizer's real decode, recording how many ids each call is given."""

    def __init__(self, decode) -> None:
        self.decode = decode
        self.lengths: list[int] = []

    def __call__(self, ids, *args, **kwargs) -> str:
        self.lengths.append(len(ids))
        return self.decode(ids, *args, **kwargs)


def test_the_engine_decodes_a_streamed_reply_from_a_short_window_of_tokens(small_tokenizer):
    """Decoding the whole reply again for every token is quadratic in its length: each decode call must see a
    bounded window of recent ids (at most 2 x 8 + 1), and the streamed text is still the whole reply's decode."""
    tokenizer = load_tokenizer(small_tokenizer)
    model = random_model(vocab_size=len(tokenizer), max_position_embeddings=128)
    prompt = tokenizer("人民日报报道")["input_ids"]
    expected = greedy_generate(LeanDecoder(model, max_batch=1), [prompt], 100)[0]
    engine = Engine(model, tokenizer, max_batch=1, queue_size=0)
    engine._decode = recorder = RecordingDecode(engine._decode)
    engine.start()
    try:
        collector = Collector()
        engine.submit(GenerationRequest(prompt, 100, collector))  # no stop ids: exactly 100 tokens
        assert collector.done.wait(30)
    finally:
        engine.stop()
    assert collector.events[-1].completion_tokens == 100
    assert collector.text() == tokenizer.decode(expected, skip_special_tokens=True)
    assert max(recorder.lengths) <= 17, recorder.lengths
    assert len(recorder.lengths) <= 2 * 100 + 1  # at most two decodes per token (the window and its new prefix)


# ------------------------------------------------------------------------------------------ detokenizer
# 𠮷, 龘, 靐, 齉, 爩 and 鱻 are not in ChatGLM3's vocabulary: they become <0xNN> byte-fallback pieces, 3 or 4 each
BYTE_FALLBACK_TEXT = "今天𠮷野家的饭很好吃😀，龘靐齉爩！Hello world 鱻\n第二行：　全角空格。"


@pytest.fixture(scope="module")
def chatglm3_tokenizer(chatglm3_model_file, tmp_path_factory):
    return convert_chatglm3(chatglm3_model_file, tmp_path_factory.mktemp("chatglm3"))


def streamed(tokenizer, ids: list[int]) -> tuple[list[str], RecordingDecode]:
    """Each token's piece of text (and the final flush), with the lengths every decode call was given."""
    backend = tokenizer.backend_tokenizer
    recorder = RecordingDecode(backend.decode)
    special_ids = frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)
    detokenizer = IncrementalDetokenizer(recorder, special_ids)
    return [*(detokenizer.push(token) for token in ids), detokenizer.flush()], recorder


@pytest.mark.parametrize("name", ["chatglm3", "byte-level BPE"])
def test_streamed_pieces_are_whole_characters_that_concatenate_to_the_full_decode(
    name, request, corpus_texts, small_tokenizer
):
    tokenizer = request.getfixturevalue("chatglm3_tokenizer") if name == "chatglm3" else load_tokenizer(small_tokenizer)
    bound = 2 * IncrementalDetokenizer.MAX_PENDING
    partial_tokens = 0  # tokens that hold part of a character (decoded alone: U+FFFD)
    for text in [BYTE_FALLBACK_TEXT, *corpus_texts[:40]]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces, recorder = streamed(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in piece for piece in pieces), pieces  # never half a character
        assert max(recorder.lengths) <= bound and len(recorder.lengths) <= 2 * len(ids) + 1
        partial_tokens += sum("\ufffd" in tokenizer.decode([token]) for token in ids)
    assert partial_tokens >= 16  # the texts did exercise multi-byte characters split across tokens
    if name == "chatglm3":
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(BYTE_FALLBACK_TEXT, add_special_tokens=False)["input_ids"])
        assert sum(piece.startswith("<0x") for piece in pieces) >= 16


def test_invalid_bytes_and_special_tokens_still_decode_in_a_bounded_window(chatglm3_tokenizer):
    """A model may write bytes that never become valid UTF-8: the window still moves on after MAX_PENDING tokens.
    Special tokens (decoded as nothing) stay out of the window: after a run of them, "▁好" keeps its space."""
    tokenizer = chatglm3_tokenizer
    lead_byte = tokenizer.convert_tokens_to_ids("<0xE5>")
    good = tokenizer("好", add_special_tokens=False)["input_ids"]  # "▁好": a space unless it begins the text
    ids = good + [tokenizer.eos_token_id] * 20 + good + [lead_byte] * 40 + good
    pieces, recorder = streamed(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == "好 好" + "\ufffd" * 40 + " 好"
    assert max(recorder.lengths) <= 2 * IncrementalDetokenizer.MAX_PENDING


def test_text_held_back_for_a_stop_string_is_sent_when_a_stop_token_ends_the_reply(small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    model = random_model(vocab_size=len(tokenizer), max_position_embeddings=96)
    prompt = tokenizer("北京是")["input_ids"]
    reply = greedy_generate(LeanDecoder(model, max_batch=1), [prompt], 40)[0]

    def decoded(end: int) -> str:
        return tokenizer.decode(reply[:end], skip_special_tokens=True)

    # a token of the reply that ends it when made a stop id: its first occurrence, after whole characters
    end = next(i for i in range(3, len(reply)) if reply[i] not in reply[:i] and decoded(i)[-1:] not in ("", "\ufffd"))
    text = decoded(end)
    stop = text[-1] + "〇never"  # the reply's last character may begin this stop string: it is held back
    engine = Engine(model, tokenizer, max_batch=1, queue_size=0).start()
    try:
        collector = Collector()
        engine.submit(GenerationRequest(prompt, 40, collector, stop_ids=frozenset({reply[end]}), stop_strings=(stop,)))
        assert collector.done.wait(30)
    finally:
        engine.stop()
    assert collector.events[-1].reason == "stop" and collector.events[-1].completion_tokens == end + 1
    assert collector.text() == text  # the stop token ends the reply, and the held-back character is sent with it


# ------------------------------------------------------------------------------------------------- quantised
def quantized_copy(model: TinyLlama2ForCausalLM, method: str) -> TinyLlama2ForCausalLM:
    from tiny_llama2_zh.quantize.methods import apply_method

    copy = TinyLlama2ForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return apply_method(copy, method, 16)


@NATIVE
@pytest.mark.parametrize("method", ["int8-weight", "int4-weight"])
def test_a_weight_only_quantised_model_decodes_from_its_integers_as_its_own_forward(method, native):
    """`tinyllm serve` refused quantised folders; the decoder now reads their integers and scales (no float copy)
    and computes what the quantised model's own forward computes (weight-only: float activations)."""
    model = quantized_copy(random_model(hidden_size=64), method)
    decoder = decoder_for(model, native, max_batch=len(PROMPTS))
    assert decoder.head.qdata.dtype == torch.int8  # the integers themselves, not a dequantised float copy
    sequence = [1, *range(10, 40)]
    with torch.no_grad():
        full = model(torch.tensor([sequence])).logits[0]
    torch.testing.assert_close(decoder.prefill(0, sequence[:12], all_logits=True), full[:12], rtol=1e-4, atol=1e-4)
    for position in range(12, 20):  # batch-1 steps: the C step's int8 products, or the compiled int8 kernel
        torch.testing.assert_close(
            decoder.step(torch.tensor([sequence[position]]))[0], full[position], rtol=1e-4, atol=1e-4
        )
    decoder.reset()
    expected = [reference(model, prompt, 20) for prompt in PROMPTS]
    assert greedy_generate(decoder, PROMPTS, 20, [EOS]) == expected


@NATIVE
def test_an_int8_dynamic_model_decodes_from_its_int8_weights_with_float_activations(native):
    model = random_model(hidden_size=64)
    quantized = quantized_copy(model, "int8-dynamic")
    decoder = decoder_for(quantized, native, max_batch=2)
    head = quantized.lm_head.weight()
    assert torch.equal(decoder.head.qdata, head.int_repr())
    # float activations against the dequantised weights: the float model with the int8 values put in
    reference_model = random_model(hidden_size=64)
    with torch.no_grad():
        reference_model.lm_head.weight.copy_(head.dequantize())
        for index, layer in enumerate(quantized.model.layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                target = getattr(reference_model.model.layers[index].self_attn, name)
                target.weight.copy_(getattr(layer.self_attn, name).weight().dequantize())
            for name in ("gate_proj", "up_proj", "down_proj"):
                target = getattr(reference_model.model.layers[index].mlp, name)
                target.weight.copy_(getattr(layer.mlp, name).weight().dequantize())
    assert greedy_generate(decoder, PROMPTS[:2], 20, [EOS]) == [reference(reference_model, p, 20) for p in PROMPTS[:2]]


def test_the_float_matrix_gives_the_float_product_at_every_batch_size_from_its_batched_layout():
    """One row runs a bmm over the transposed weight's blocks of output columns (the last padded when the blocks
    do not divide the outputs); several rows run oneDNN on its packed copy (where torch has oneDNN), which must
    give the same product to float32 rounding."""
    from tiny_llama2_zh.infer.decode import FloatMatrix, _onednn_available

    torch.manual_seed(0)
    weight = torch.randn(40, 64)
    for blocks in (1, 2, 3):
        matrix = FloatMatrix(weight, blocks=blocks)
        assert matrix.weight_blocks.shape == (blocks, 64, -(-40 // blocks))
        torch.testing.assert_close(matrix.weight(), weight, rtol=0, atol=0)
        for rows in (1, 3, FloatMatrix.PACKING_BATCH, 33):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(matrix(x), x @ weight.T, rtol=1e-5, atol=1e-5)
        assert (matrix._packed is not None) == _onednn_available()
    half = FloatMatrix(weight.bfloat16())  # other dtypes run the blocks at every row count: no packed copy
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(half(x), x @ weight.bfloat16().T)
    assert half._packed is None


def test_greedy_tokens_are_torch_argmax_s_first_maximum_with_ties_nan_and_a_ragged_last_chunk():
    from tiny_llama2_zh.infer.decode import greedy_tokens

    torch.manual_seed(0)
    for width in (5, 128, 300, 1000):
        for trial in range(40):
            logits = torch.randn(3, width)
            if trial % 3 == 0:  # ties: the first maximum wins, also across chunks and in the last, short one
                logits[:, [1, width // 2, width - 1]] = 100.0
            if trial % 4 == 0:
                logits[:, -2:] = 1000.0
            if trial % 5 == 0:
                logits[1, width // 3] = float("nan")
            assert torch.equal(greedy_tokens(logits), logits.argmax(-1)), (width, trial)
            assert torch.equal(greedy_tokens(logits, chunk=7), logits.argmax(-1)), (width, trial)


def test_the_int8_kernel_equals_the_dequantised_product_at_every_batch_size():
    from tiny_llama2_zh.infer.decode import Int8Matrix

    torch.manual_seed(0)
    for groups in (1, 4):
        matrix = Int8Matrix(torch.randint(-127, 128, (40, 64), dtype=torch.int8), torch.rand(40, groups) / 100)
        for rows in (1, 3, Int8Matrix.SMALL_BATCH + 1):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(matrix(x), x @ matrix.dequantized().T, rtol=1e-5, atol=1e-5)


def test_int8_decoding_keeps_perplexity_within_one_percent_and_agrees_with_float32(
    small_tokenizer, token_files, tmp_path
):
    """The issue's bar for int8 weights: perplexity within +1 % of float32 on held-out text, and the greedy choice
    (argmax) equal to float32's at most positions of held-out text, teacher-forced as tests/test_export.py checks
    llama.cpp's q8_0 (measured: perplexity -0.11 %, agreement 0.944; free-running greedy text diverges for good
    at the first near-tie of this random model)."""
    from conftest import save_tiny_model
    from tiny_llama2_zh.data.pretokenized import PretrainDataset
    from tiny_llama2_zh.loading import load_model

    folder = save_tiny_model(small_tokenizer, tmp_path / "float", hidden_size=128, initializer_range=0.1)
    float_model, _ = load_model(folder, "cpu")
    int8_model = quantized_copy(float_model, "int8-weight")
    blocks = [PretrainDataset(token_files["validation"], 64)[i]["input_ids"].tolist() for i in range(8)]

    def held_out_logits(model) -> list[torch.Tensor]:
        decoder = LeanDecoder(model, max_batch=1)
        logits = []
        for block in blocks:
            logits.append(decoder.prefill(0, block, all_logits=True)[:-1])
            decoder.reset()
        return logits

    def perplexity(logits: list[torch.Tensor]) -> float:
        targets = torch.tensor([token for block in blocks for token in block[1:]])
        return float(torch.nn.functional.cross_entropy(torch.cat(logits), targets).exp())

    float_logits, int8_logits = held_out_logits(float_model), held_out_logits(int8_model)
    change = perplexity(int8_logits) / perplexity(float_logits) - 1
    agreement = (torch.cat(float_logits).argmax(-1) == torch.cat(int8_logits).argmax(-1)).float().mean().item()
    print(f"int8: perplexity {change:+.3%} against float32, greedy agreement {agreement:.3f}")
    assert change <= 0.01
    assert agreement >= 0.9


# ------------------------------------------------------------------------------------------------- every user path
def test_generate_chat_and_evaluation_decode_with_the_lean_decoder_and_give_generate_s_tokens(small_tokenizer):
    """`tinyllm generate` (generate_text), `chat` (generate_reply) and evaluation (greedy_replies) run the lean
    decoder, not model.generate, and give model.generate's greedy tokens."""
    from conftest import lively_model
    from tiny_llama2_zh.infer.generate import (
        SamplingOptions,
        chat_prompt_ids,
        generate_reply,
        generate_text,
        greedy_replies,
        turn_end_ids,
    )

    tokenizer = load_tokenizer(small_tokenizer)
    model = lively_model(tokenizer, max_position_embeddings=128)
    options = SamplingOptions(max_new_tokens=20)
    prompt_ids = tokenizer("今天天气", return_tensors="pt").input_ids
    with torch.inference_mode():
        output = model.generate(prompt_ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    conversations = [[{"role": "user", "content": text}] for text in ("你好", "北京是中国的首都吗？", "讲个故事")]
    expected_replies = []
    for conversation in conversations:
        ids = torch.tensor([chat_prompt_ids(tokenizer, conversation, 100)[0]])
        with torch.inference_mode():
            output = model.generate(
                ids, max_new_tokens=16, do_sample=False, eos_token_id=turn_end_ids(tokenizer), pad_token_id=0
            )
        expected_replies.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip())

    def refuse(*args, **kwargs):
        raise AssertionError("model.generate was called")

    model.generate = refuse
    assert generate_text(model, tokenizer, "今天天气", options) == expected
    assert greedy_replies(model, tokenizer, conversations, 16, batch_size=2) == expected_replies
    del model.generate  # generate_reply against model.generate through the chat template
    reply, _ = generate_reply(model, tokenizer, conversations[1], options)
    model.generate = refuse
    assert greedy_replies(model, tokenizer, conversations[1:2], 20)[0] == reply


def test_sampled_generation_is_reproducible_from_its_seed_and_leaves_the_global_rng_alone(small_tokenizer):
    from conftest import lively_model
    from tiny_llama2_zh.infer.generate import SamplingOptions, generate_text

    tokenizer = load_tokenizer(small_tokenizer)
    model = lively_model(tokenizer, max_position_embeddings=128)
    options = SamplingOptions(max_new_tokens=24, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.3)
    state = torch.get_rng_state()
    first = generate_text(model, tokenizer, "今天", options)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate_text(model, tokenizer, "今天", options) == first
    assert generate_text(model, tokenizer, "今天", SamplingOptions(24, 0.8, 0.9, 20, 1.3, seed=2)) != first


# ------------------------------------------------------------------------------------------------- reuse and compile
def test_generate_and_chat_reuse_one_decoder_per_model_until_its_weights_change(small_tokenizer):
    """`chat` built a new decoder (a transposed copy of every matrix and a new cache) for every message; now one
    is kept per model, and an in-place change of the weights (an optimizer step between two evaluation samples)
    makes the next call read the new weights, as model.generate does."""
    from conftest import lively_model
    from tiny_llama2_zh.infer.generate import SamplingOptions, generate_reply, generate_text, shared_decoder

    tokenizer = load_tokenizer(small_tokenizer)
    model = lively_model(tokenizer, max_position_embeddings=128)
    options = SamplingOptions(max_new_tokens=16)
    conversation = [{"role": "user", "content": "你好"}]
    decoder = shared_decoder(model)
    assert decoder is not None and decoder.max_len == 128
    generate_text(model, tokenizer, "今天天气", options)
    generate_reply(model, tokenizer, conversation, options)
    assert shared_decoder(model) is decoder  # both calls ran on the kept decoder
    with torch.no_grad():
        for parameter in model.parameters():  # what an optimizer step does: in place
            parameter.add_(torch.randn_like(parameter) * 0.05)
    assert shared_decoder(model) is not decoder
    prompt_ids = tokenizer("今天天气", return_tensors="pt").input_ids
    with torch.inference_mode():
        output = model.generate(prompt_ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    expected = tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    assert generate_text(model, tokenizer, "今天天气", options) == expected


@pytest.mark.parametrize("method", [None, "int8-weight", "int4-weight"], ids=["float32", "int8", "int4"])
def test_the_c_step_gives_the_pytorch_step_s_logits_for_rows_at_different_positions(method):
    """The C step (infer/native_step.c) against the PyTorch operations it replaces, on the same weights: four rows
    at four positions (grouped-query attention over each row's own prefix), a row leaving and one joining, float32
    and integer weights (int4 in groups of 16 inputs)."""
    model = random_model(num_key_value_heads=2, hidden_size=64)
    if method:
        model = quantized_copy(model, method)
    in_c, in_torch = (decoder_for(model, native, max_batch=len(PROMPTS)) for native in (True, False))
    for decoder in (in_c, in_torch):
        for row, prompt in enumerate(PROMPTS):
            decoder.prefill(row, prompt)
    for step in range(12):
        if step == 6:  # row 1 leaves (the last row moves into it), a new one joins at the end
            for decoder in (in_c, in_torch):
                decoder.release(1)
                decoder.prefill(3, PROMPTS[1][:3])
        tokens = torch.tensor([10 + step, 20 + step, 30 + step, 40 + step])
        torch.testing.assert_close(in_c.step(tokens), in_torch.step(tokens), rtol=1e-4, atol=1e-4)
    assert in_c.lengths == in_torch.lengths
