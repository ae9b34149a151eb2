import json

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from tiny_llama2_zh.tokenizer import (
    CHATGLM3_SPECIAL_TOKENS,
    ROLE_TOKENS,
    chat_ids,
    convert_chatglm3,
    load_tokenizer,
    train_bpe_tokenizer,
)

EDGE_CASES = [
    "Hello  world\n\t x 😀",
    " leading space",
    "trailing spaces  ",
    "𠀀𪚥 rare characters",
    "ＡＢＣ１２３ full-width",
    "混合 English 和数字 2024 年",
]


def test_trained_tokenizer_round_trips_the_corpus_without_unk(small_tokenizer, corpus_texts):
    tokenizer = AutoTokenizer.from_pretrained(small_tokenizer)  # loads without remote code
    assert len(tokenizer) == 1024
    texts = corpus_texts + EDGE_CASES
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in ids for ids in encoded)
    decoded = tokenizer.batch_decode(encoded)
    assert [i for i, (a, b) in enumerate(zip(decoded, texts)) if a != b] == []
    utf8_bytes = sum(len(text.encode()) for text in texts)
    assert sum(map(len, encoded)) < utf8_bytes / 2  # merges learned: far fewer tokens than bytes


def test_trained_tokenizer_spells_numbers_digit_by_digit(small_tokenizer, tmp_path):
    """Qwen2's pre-tokenizer: every digit is a token of its own, even when the training text is full of the same
    numbers (a GPT-2 split learns "1998" as one token from it), and the ids decode back to the text."""
    numbers = tmp_path / "numbers.txt"
    lines = [f"{year}年{month}月共计1998元\n" for year in (1998, 2026) for month in range(1, 13)]
    numbers.write_text("".join(lines) * 20, encoding="utf-8")
    trained_on_numbers = train_bpe_tokenizer([numbers], vocab_size=300, output_dir=tmp_path / "tokenizer")
    for tokenizer in (load_tokenizer(small_tokenizer), trained_on_numbers):
        text = "2026年12月6日，共计1998元"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        digits = [piece for piece in (tokenizer.decode([token]) for token in ids) if any(c.isdigit() for c in piece)]
        assert digits == [*"2026", *"12", "6", *"1998"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
        joined = [piece for piece in tokenizer.get_vocab() if sum(char in "0123456789" for char in piece) > 1]
        assert joined == []  # no merge joins two digits


def test_trained_tokenizer_special_tokens(small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    ids = tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>", *ROLE_TOKENS])
    assert ids == list(range(8))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    assert tokenizer.encode("<|user|>你好", add_special_tokens=False)[0] == 5  # specials are never split


def test_chat_template_marks_the_assistant_reply(small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    messages = [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "一加一等于几？"},
        {"role": "assistant", "content": "二"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|system|>\n你是助手\n<|user|>\n一加一等于几？\n<|assistant|>\n二</s>\n"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\n一加一等于几？\n<|assistant|>\n")
    rendered = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    reply = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
    assert tokenizer.decode(reply) == "二</s>"
    assert tokenizer.decode(chat_ids(tokenizer, messages[:2], generation_prompt=True)) == prompt
    assert tokenizer.decode(chat_ids(tokenizer, messages)) == text
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "bot", "content": "x"}], tokenize=False)


@pytest.fixture(scope="module")
def chatglm3(chatglm3_model_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatglm3")
    convert_chatglm3(chatglm3_model_file, folder)
    return AutoTokenizer.from_pretrained(folder), spm.SentencePieceProcessor(model_file=str(chatglm3_model_file))


def test_chatglm3_reference_encoding(chatglm3):
    tokenizer, _ = chatglm3
    assert tokenizer.encode("床前明月光，疑是地上霜。", add_special_tokens=False) == [
        30910,
        55629,
        54624,
        54672,
        41623,
        31123,
        55507,
        54532,
        34245,
        57244,
        31155,
    ]


def test_chatglm3_special_token_ids(chatglm3):
    tokenizer, _ = chatglm3
    assert len(tokenizer) == 64798
    assert tokenizer.convert_tokens_to_ids(list(CHATGLM3_SPECIAL_TOKENS)) == list(range(64789, 64798))
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_chatglm3_ids_equal_sentencepiece_on_the_corpus(chatglm3, demo_corpus):
    tokenizer, processor = chatglm3
    with (demo_corpus / "train.jsonl").open(encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines]
    # every 10th document: People's Daily paragraphs and reviews, ~3,600 texts
    texts = [record["text"] for record in records[::10]] + EDGE_CASES
    assert len(texts) > 3000
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    reference = processor.encode(texts)
    mismatches = [texts[i][:40] for i in range(len(texts)) if ours[i] != reference[i]]
    assert mismatches == []
    assert tokenizer.batch_decode(ours[:500]) == processor.decode(reference[:500])


def check_bos_convention(tokenizer) -> None:
    """llama2.c's convention: every text starts with <s>, once (shards frame documents the same way: test_data)."""
    bos = tokenizer.bos_token_id
    plain = tokenizer("床前明月光")["input_ids"]
    assert plain[0] == bos and plain[1:] == tokenizer("床前明月光", add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "你好"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1


def test_one_bos_convention_for_prompts_and_chat(small_tokenizer):
    check_bos_convention(load_tokenizer(small_tokenizer))


def test_one_bos_convention_for_chatglm3(chatglm3):
    check_bos_convention(chatglm3[0])


def test_a_model_folders_tokenizer_loads_without_the_model_code(small_tokenizer, tmp_path):
    """A saved model folder holds a config.json of model type tiny_llama2; loading only its tokenizer, in a process
    that never imported the model's code, must not ask whether to run remote code (transformers' AutoTokenizer reads
    config.json and prompts on stdin when the model type is unknown to it)."""
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "model"
    shutil.copytree(small_tokenizer, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny_llama2"}), encoding="utf-8")
    script = "import sys; from tiny_llama2_zh.tokenizer import load_tokenizer; print(len(load_tokenizer(sys.argv[1])))"
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == len(load_tokenizer(small_tokenizer))
    assert "custom code" not in done.stdout + done.stderr and "model of type" not in done.stderr
    assert "tiny_llama2_zh.model" not in done.stderr
