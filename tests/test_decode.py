"""The lean decode loop (infer/decode.py) and the serving engine: the same tokens and logits as the model itself."""

import threading

import pytest
import torch
from torch import nn

from conftest import tiny_config
from tiny_llama2_zh.infer.decode import LeanDecoder, greedy_generate, sample_token
from tiny_llama2_zh.infer.engine import Engine, Failed, Finished, GenerationRequest, QueueFull, TextDelta
from tiny_llama2_zh.model import TinyLlama2ForCausalLM
from tiny_llama2_zh.tokenizer import load_tokenizer

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


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_greedy_tokens_equal_model_generate_alone_and_batched(kv_heads):
    model = random_model(num_key_value_heads=kv_heads)
    expected = [reference(model, prompt, 30) for prompt in PROMPTS]
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS)  # the prompts lead to different replies
    decoder = LeanDecoder(model, max_batch=len(PROMPTS))
    alone = [greedy_generate(decoder, [prompt], 30, [EOS])[0] for prompt in PROMPTS]
    assert alone == expected
    # one batch of four prompts of different lengths: per-row positions and masks, rows leaving as they finish
    assert greedy_generate(decoder, PROMPTS, 30, [EOS]) == expected


def test_logits_match_the_model_forward_in_prefill_and_in_each_step():
    model = random_model()
    sequence = [1, *range(10, 40)]
    with torch.no_grad():
        full = model(torch.tensor([sequence])).logits[0]  # (T, vocab)
    decoder = LeanDecoder(model, max_batch=2)
    prefill = decoder.prefill(0, sequence[:12], all_logits=True)
    torch.testing.assert_close(prefill, full[:12], rtol=1e-4, atol=1e-5)
    decoder.prefill(1, sequence[:5])  # a second row at other positions, stepping alongside
    for position in range(12, len(sequence)):
        logits = decoder.step(torch.tensor([sequence[position], sequence[position - 7]]))
        torch.testing.assert_close(logits[0], full[position], rtol=1e-4, atol=1e-5)
    assert decoder.lengths[:2] == [len(sequence), 5 + len(sequence) - 12]


def test_a_sequence_joining_and_leaving_a_running_batch_keeps_every_row_exact():
    """Continuous batching: B joins while A is mid-reply, A leaves (its row is reused by C); all stay exact."""
    model = random_model()
    a, b, c = PROMPTS[0], PROMPTS[2], PROMPTS[3]
    expected = {name: reference(model, p, 12) for name, p in {"a": a, "b": b, "c": c}.items()}
    decoder = LeanDecoder(model, max_batch=2)
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
