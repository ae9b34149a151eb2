"""Exports, each checked by the runtime that reads it: transformers' LlamaForCausalLM, real llama.cpp (the prebuilt
libllama of the npm package node-llama-cpp, installed by .ci/run) and karpathy/llama2.c's own run.c and runq.c
(compiled here from ../shared/clients/llama2c).

Models: small random ones with both vocabularies: our byte-level BPE (the `small_tokenizer` fixture, Qwen2's digit-by-
digit pre-tokenizer; also the same vocabulary with GPT-2's pre-tokenizer, which older tokenizer folders have) and
ChatGLM3's SentencePiece (64,798 ids). They are made with a large init spread (std 0.3): that makes logits large and far
apart, so the greedy comparisons compare decisions, not float noise between runtimes. PyTorch's greedy path is
compared up to its first near-tie (top-1/top-2 logit gap <= MIN_GAP), which must come after 8 tokens or never.
"""

import copy
import json
import os
import shutil
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from conftest import SHARED_DIR, save_tiny_model
from tiny_llama2_zh.cli import main
from tiny_llama2_zh.export.common import atomic_path, interleave_rotary_rows
from tiny_llama2_zh.export.llama2c import group_size_for, quantize_q80
from tiny_llama2_zh.export.llamacpp import llamacpp_missing, run_gguf
from tiny_llama2_zh.infer.generate import turn_end_ids
from tiny_llama2_zh.loading import load_model
from tiny_llama2_zh.tokenizer import convert_chatglm3
from tiny_llama2_zh.train.pretrain import SEED_PROMPTS

DECISIVE = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3
)
NEW_TOKENS = 32
MIN_GAP = 1e-3  # float32 runtimes differ by ~1e-5 in these logits; a smaller top-2 gap is a coin toss
# llama.cpp's CPU float32 path strays further on these random models' large activations: teacher-forced along
# validation text (~2,100 positions) it chose PyTorch's second token 4 times, at gaps up to 0.015 (measured when the
# tokenizer began splitting digits), and a greedy run left PyTorch's path at a gap of 0.009
LLAMACPP_MIN_GAP = 0.02
Q8_0_AGREEMENT = 0.75
LLAMA2C_DIR = SHARED_DIR / "clients" / "llama2c"
CHAT = [{"role": "user", "content": "你好，请介绍一下你自己。"}]
CONVERSATION = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？"},
    {"role": "user", "content": "中国的首都是哪里？"},
]


@pytest.fixture(scope="module")
def bpe_model_dir(small_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_model(small_tokenizer, tmp_path_factory.mktemp("bpe_model"), **DECISIVE)


def with_pre_tokenizer(tokenizer_dir: Path, folder: Path, pre_tokenizer: dict) -> Path:
    """A copy of a tokenizer folder whose tokenizer.json splits text with `pre_tokenizer` (same vocabulary, merges)."""
    shutil.copytree(tokenizer_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = pre_tokenizer
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return folder


GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


@pytest.fixture(scope="module")
def gpt2_bpe_model_dir(small_tokenizer, tmp_path_factory) -> Path:
    """A model whose tokenizer folder was written before digits were split: GPT-2's ByteLevel pre-tokenizer."""
    tokenizer_dir = with_pre_tokenizer(small_tokenizer, tmp_path_factory.mktemp("gpt2") / "tok", GPT2_PRE_TOKENIZER)
    return save_tiny_model(tokenizer_dir, tmp_path_factory.mktemp("gpt2_bpe_model"), **DECISIVE)


@pytest.fixture(scope="module")
def glm_model_dir(chatglm3_model_file, tmp_path_factory) -> Path:
    tokenizer_dir = tmp_path_factory.mktemp("glm_tokenizer")
    convert_chatglm3(chatglm3_model_file, tokenizer_dir)
    # a model folder as training writes it: tokenizer.json and config, no tokenizer.model. Untied (the bpe model is
    # tied), so the separate output head of every format is exercised too: GGUF's output.weight, llama2.c v0's
    # negative vocab_size + trailing classifier, v2's shared_classifier = 0 + quantized classifier.
    folder = tmp_path_factory.mktemp("glm_model")
    return save_tiny_model(tokenizer_dir, folder, tie_word_embeddings=False, **DECISIVE)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """`gguf_file(model_dir, type)`: the model's GGUF export through the CLI, made once per module."""
    folder, made = tmp_path_factory.mktemp("gguf"), {}

    def export(model_dir: Path, out_type: str) -> Path:
        if (model_dir, out_type) not in made:
            path = folder / f"{model_dir.name}-{out_type}.gguf"
            assert main(["export", "gguf", "--model", str(model_dir), "--output", str(path), "--type", out_type]) == 0
            made[model_dir, out_type] = path
        return made[model_dir, out_type]

    return export


def torch_greedy(
    model, ids: list[int], new_tokens: int, stop: tuple[int, ...] = (), min_gap: float = MIN_GAP
) -> tuple[list[int], int]:
    """PyTorch's greedy continuation (KV cache) and how many of its first tokens were decisive: chosen with a
    top-1/top-2 logit gap above `min_gap`. Runtimes are compared on those; past a near-tie either token is right."""
    out, gaps = [], []
    with torch.inference_mode():
        step = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(new_tokens):
            top = step.logits[0, -1].float().topk(2)
            gaps.append((top.values[0] - top.values[1]).item())
            token = int(top.indices[0])
            out.append(token)
            if token in stop:
                break
            step = model(input_ids=torch.tensor([[token]]), past_key_values=step.past_key_values, use_cache=True)
    decisive = next((i for i, gap in enumerate(gaps) if gap <= min_gap), len(gaps))
    assert decisive >= min(8, len(out)), f"a near-tie at token {decisive}: the comparison would test little"
    return out, decisive


# Numbers in every form the pre-tokenizers treat differently: digit runs (GPT-2 keeps a run whole, Qwen2 splits it),
# digits beside letters, punctuation and spaces, full-width digits and other Unicode numbers (\p{N}: ①, Ⅻ, ½)
DIGIT_TEXTS = [
    "2026年12月6日，共计1998元",
    "计算下面的加法，只回答得数。\n算式：58+967",
    "电话010-12345678，价格￥3,999.00元（约12.5%）",
    "第Ⅻ章①节：１２３件，½杯 v2.0 x86_64 COVID-19 2024年",
    " 007  42\n\n3.14159 1e-5 0x1F",
]


def held_out_texts(corpus_texts: list[str]) -> list[str]:
    """Validation documents (never seen by the tokenizer's training sample), cut short, plus mixed text and numbers."""
    texts = [text[:200] for text in corpus_texts[:16]]
    with_digits = [text[:200] for text in corpus_texts if any(char.isdigit() for char in text)][:8]
    return [*texts, *with_digits, *SEED_PROMPTS, "今天天气很好 Hello world  123\n新的一行：  两个空格", *DIGIT_TEXTS]


# --------------------------------------------------------------------------------------------- hf-llama
def test_hf_llama_folder_is_plain_llama_with_equal_greedy_tokens(bpe_model_dir, tmp_path):
    output = tmp_path / "llama"
    assert main(["export", "hf-llama", "--model", str(bpe_model_dir), "--output", str(output)]) == 0
    assert not list(output.glob("*.py")), "the folder must load without remote code"
    config_text = (output / "config.json").read_text(encoding="utf-8")
    assert '"model_type": "llama"' in config_text and "auto_map" not in config_text
    assert (output / "chat_template.jinja").is_file()
    llama = AutoModelForCausalLM.from_pretrained(str(output)).eval()  # trust_remote_code stays False
    assert type(llama) is LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    ours, our_tokenizer = load_model(bpe_model_dir, "cpu")
    assert tokenizer.apply_chat_template(CHAT, add_generation_prompt=True) == our_tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True
    )
    for prompt in SEED_PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        expected, decisive = torch_greedy(ours, ids, NEW_TOKENS)
        got = llama.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        assert got[0, len(ids) : len(ids) + decisive].tolist() == expected[:decisive]


# ------------------------------------------------------------------------------------------------- gguf
def test_gguf_metadata_and_tensors(glm_model_dir, bpe_model_dir, gguf_file):
    import gguf

    ours, _ = load_model(glm_model_dir, "cpu")
    reader = gguf.GGUFReader(gguf_file(glm_model_dir, "f32"))

    def field(name):
        return reader.fields[name].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.add_space_prefix") is True
    types = field("tokenizer.ggml.token_type")
    assert [types[i] for i in range(64789, 64798)] == [gguf.TokenType.CONTROL] * 9  # [MASK] ... <|observation|>
    assert types[3] == types[258] == gguf.TokenType.BYTE and types[0] == gguf.TokenType.UNKNOWN
    assert "{% generation %}" not in field("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors  # untied head
    q = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data)).reshape(64, 64)
    k = torch.from_numpy(np.array(tensors["blk.0.attn_k.weight"].data)).reshape(32, 64)
    layer = ours.model.layers[0].self_attn
    torch.testing.assert_close(q, interleave_rotary_rows(layer.q_proj.weight.detach(), 4))
    torch.testing.assert_close(k, interleave_rotary_rows(layer.k_proj.weight.detach(), 2))  # per kv head

    bpe = gguf.GGUFReader(gguf_file(bpe_model_dir, "q8_0"))
    assert bpe.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert bpe.fields["tokenizer.ggml.pre"].contents() == "qwen2"  # digit by digit: llama.cpp's Qwen2 split
    assert len(bpe.fields["tokenizer.ggml.merges"].contents()) > 500
    q8 = {t.name: t.tensor_type for t in bpe.tensors}
    assert "output.weight" not in q8  # tied head: llama.cpp reuses token_embd
    assert q8["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert q8["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_interleave_rotary_rows_matches_llama2c_pairing():
    """Rotating the interleaved rows in neighbouring pairs equals rotate-half on the original rows."""
    head_dim, heads = 8, 2
    weight = torch.randn(head_dim * heads, 5)
    x = torch.randn(5)
    angle = torch.rand(head_dim // 2)
    half = (weight @ x).reshape(heads, 2, head_dim // 2)  # rotate-half: pairs (i, i + head_dim/2)
    rotated_half = torch.stack(
        [half[:, 0] * angle.cos() - half[:, 1] * angle.sin(), half[:, 1] * angle.cos() + half[:, 0] * angle.sin()], 1
    )
    pairs = (interleave_rotary_rows(weight, heads) @ x).reshape(heads, head_dim // 2, 2)  # pairs (2i, 2i + 1)
    rotated_pairs = torch.stack(
        [
            pairs[..., 0] * angle.cos() - pairs[..., 1] * angle.sin(),
            pairs[..., 1] * angle.cos() + pairs[..., 0] * angle.sin(),
        ],
        -1,
    )
    torch.testing.assert_close(rotated_pairs.transpose(1, 2), rotated_half)


def test_gguf_names_each_byte_level_pre_tokenizer_for_llamacpp(gpt2_bpe_model_dir, small_tokenizer, tmp_path, capsys):
    """An older folder (GPT-2's split) still exports as "gpt-2"; a split llama.cpp has no name for is refused."""
    import gguf

    old = tmp_path / "gpt2.gguf"
    assert main(["export", "gguf", "--model", str(gpt2_bpe_model_dir), "--output", str(old), "--type", "f32"]) == 0
    assert gguf.GGUFReader(old).fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    digits_in_threes = {"type": "Digits", "individual_digits": False}
    odd_pre = {"type": "Sequence", "pretokenizers": [digits_in_threes, GPT2_PRE_TOKENIZER]}
    odd = save_tiny_model(with_pre_tokenizer(small_tokenizer, tmp_path / "odd_tok", odd_pre), tmp_path / "odd")
    assert main(["export", "gguf", "--model", str(odd), "--output", str(tmp_path / "odd.gguf")]) == 2
    assert "unknown byte-level pre-tokenizer" in capsys.readouterr().err and not (tmp_path / "odd.gguf").exists()


@pytest.mark.parametrize("vocab", ["bpe", "gpt2_bpe", "glm"])
def test_gguf_runs_in_llamacpp(vocab, request, corpus_texts, gguf_file):
    missing = llamacpp_missing()
    if missing:
        pytest.skip(missing)
    model_dir = request.getfixturevalue(f"{vocab}_model_dir")
    ours, tokenizer = load_model(model_dir, "cpu")
    texts = held_out_texts(corpus_texts)
    assert all(unicodedata.is_normalized("NFC", t) for t in texts)  # llama.cpp does not apply our NFC step
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    chat_text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    stop = tuple(turn_end_ids(tokenizer))
    prompts = [tokenizer(p)["input_ids"] for p in SEED_PROMPTS] + [chat_ids]
    expected = [torch_greedy(ours, ids, NEW_TOKENS, stop, LLAMACPP_MIN_GAP) for ids in prompts]
    jobs = [{"tokens": ids, "maxTokens": NEW_TOKENS, "stop": list(stop)} for ids in prompts]

    paths = {out_type: gguf_file(model_dir, out_type) for out_type in ("f32", "q8_0")}

    request = {"model": str(paths["f32"]), "tokenize": [*texts, chat_text], "generate": jobs, "chats": [CONVERSATION]}
    f32 = run_gguf(request)
    # the chat template inside the GGUF renders a multi-turn conversation as ours does
    assert f32["rendered"] == [tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)]
    # (a) llama.cpp's tokenizer gives our ids: texts start with <s> (and for ChatGLM3 the dummy-prefix '▁'); the
    # chat prompt's role tokens are parsed as special tokens in both
    assert f32["tokens"] == [tokenizer(t)["input_ids"] for t in texts] + [chat_ids]
    # (b) greedy continuations equal PyTorch's token for token (up to a near-tie, if PyTorch meets one)
    for got, (want, decisive) in zip(f32["generated"], expected):
        assert got["tokens"][:decisive] == want[:decisive]
        assert len(got["tokens"]) >= decisive

    # q8_0 rounds every weight to 8 bits per block of 32 (and llama.cpp its activations too), which flips some
    # greedy choices of a random model: held to Q8_0_AGREEMENT of teacher-forced top-1 choices along PyTorch's
    # greedy paths (each position gets PyTorch's own prefix, so one flip does not derail the rest)
    forced = [{"tokens": ids + want, "from": len(ids)} for ids, (want, _) in zip(prompts, expected)]
    q8 = run_gguf({"model": str(paths["q8_0"]), "forced": forced})
    pairs = [(a, b) for got, (want, _) in zip(q8["forced"], expected) for a, b in zip(got, want)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    print(f"{vocab} q8_0: teacher-forced top-1 agreement with PyTorch float32 {agreement:.3f} over {len(pairs)} tokens")
    assert agreement >= Q8_0_AGREEMENT


# ---------------------------------------------------------------------------------------------- llama2c
def build_llama2c(tmp_path: Path) -> dict[str, Path]:
    if not (LLAMA2C_DIR / "run.c").is_file():
        pytest.skip(f"llama2.c's run.c not found in {LLAMA2C_DIR} (set TINYLLM_SHARED_DIR to the shared/ folder)")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (needed to compile llama2.c's run.c)")
    programs = {}
    for name in ("run", "runq"):
        programs[name] = tmp_path / name
        subprocess.run(["gcc", "-O2", "-o", str(programs[name]), str(LLAMA2C_DIR / f"{name}.c"), "-lm"], check=True)
    return programs


def run_c_pieces(tokenizer, ids: list[int]) -> list[bytes]:
    """What run.c prints for each token: tokenizer.bin's string ('▁' as space, byte pieces as their byte), a
    leading space dropped after BOS, single unprintable bytes skipped (llama2.c's decode and safe_printf)."""
    pieces, previous = [], tokenizer.bos_token_id
    for token in ids:
        piece = tokenizer.convert_ids_to_tokens(token)
        if token == tokenizer.eos_token_id:
            text = b"\n</s>\n"
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            text = bytes([int(piece[3:5], 16)])
        else:
            text = piece.replace("▁", " ").encode("utf-8")
        if previous == tokenizer.bos_token_id and text.startswith(b" "):
            text = text[1:]
        if len(text) == 1 and not (chr(text[0]).isprintable() or chr(text[0]).isspace()):
            text = b""
        pieces.append(text)
        previous = token
    return pieces


def test_llama2c_run_c_and_runq_c(glm_model_dir, tmp_path):
    build_llama2c(tmp_path)
    ours, tokenizer = load_model(glm_model_dir, "cpu")
    files = {}
    for version in (0, 2):
        files[version] = tmp_path / f"model-v{version}.bin"
        argv = ["export", "llama2c", "--model", str(glm_model_dir), "--output", str(files[version])]
        assert main([*argv, "--version", str(version)]) == 0
    tokenizer_bin = tmp_path / "tokenizer.bin"
    assert tokenizer_bin.is_file()
    # runq.c's reference: PyTorch with the weights it reads, int8 x scale per group (float32 PyTorch differs by the
    # weight rounding itself, which flips choices of this random model; runq.c also rounds activations to int8)
    dequantized = copy.deepcopy(ours)
    group = group_size_for(ours.config)
    with torch.no_grad():
        for weight in dequantized.parameters():
            if weight.ndim == 2:
                values, scales = quantize_q80(weight.detach(), group)
                groups = torch.from_numpy(values).float().reshape(-1, group) * torch.from_numpy(scales)[:, None]
                weight.copy_(groups.reshape(weight.shape))
    agreement = []
    for prompt in SEED_PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        for version, program, reference in ((0, "run", ours), (2, "runq", dequantized)):
            expected, decisive = torch_greedy(reference, ids, NEW_TOKENS)
            assert tokenizer.bos_token_id not in expected  # run.c would stop at a BOS
            pieces = run_c_pieces(tokenizer, ids + expected)[1:]  # run.c prints from the token after BOS
            assert b"".join(pieces[: len(ids) - 1]) == prompt.encode("utf-8")
            command = [str(tmp_path / program), str(files[version]), "-z", str(tokenizer_bin), "-t", "0"]
            # -n counts positions; run.c prints the token after each, the last prompt position's included
            command += ["-n", str(len(ids) + NEW_TOKENS - 1), "-i", prompt]
            printed = subprocess.run(command, capture_output=True, check=True, timeout=60).stdout
            matched = max(k for k in range(NEW_TOKENS + 1) if printed.startswith(b"".join(pieces[: len(ids) - 1 + k])))
            if version == 0:  # float32: all 32 greedy tokens equal PyTorch's (run.c encoded the prompt as we do)
                assert matched >= decisive, printed.decode("utf-8", "replace")
                if decisive == NEW_TOKENS:
                    assert printed.rstrip(b"\n") == b"".join(pieces).rstrip(b"\n")
            else:  # int8 activations too: held to the first 8 tokens, the agreement length reported
                assert matched >= min(8, decisive), printed.decode("utf-8", "replace")
                agreement.append(matched)
    print(f"runq.c (v2) greedy tokens equal to dequantized PyTorch's before a difference: {agreement} of {NEW_TOKENS}")


# ------------------------------------------------------------------------------------------- refusals
def test_llama2c_refuses_byte_level_vocabulary(bpe_model_dir, tmp_path, capsys):
    output = tmp_path / "model.bin"
    assert main(["export", "llama2c", "--model", str(bpe_model_dir), "--output", str(output)]) == 2
    assert "byte-level BPE" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "a refused export writes nothing"


def test_llama2c_refuses_what_run_c_hard_codes(chatglm3_model_file, tmp_path, capsys):
    tokenizer_dir = tmp_path / "tokenizer"
    convert_chatglm3(chatglm3_model_file, tokenizer_dir)
    model_dir = save_tiny_model(
        tokenizer_dir, tmp_path / "model", hidden_size=32, rope_theta=500000.0, rms_norm_eps=1e-6
    )
    argv = ["export", "llama2c", "--model", str(model_dir), "--output", str(tmp_path / "out" / "model.bin")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "rope_theta is 500000.0; run.c uses 10000" in err and "rms_norm_eps is 1e-06" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_gguf_refuses_q8_0_widths_and_existing_output(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "model.gguf"
    output.write_bytes(b"keep me")
    argv = ["export", "gguf", "--model", str(tiny_model_dir), "--output", str(output), "--type", "f32"]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err and output.read_bytes() == b"keep me"
    assert main([*argv, "--overwrite"]) == 0 and output.read_bytes()[:4] == b"GGUF"
    odd = save_tiny_model(tiny_model_dir, tmp_path / "odd", hidden_size=48, num_attention_heads=4)
    assert main(["export", "gguf", "--model", str(odd), "--output", str(tmp_path / "q.gguf"), "--type", "q8_0"]) == 2
    assert "multiple of it" in capsys.readouterr().err and not (tmp_path / "q.gguf").exists()


def test_atomic_path_leaves_nothing_on_a_crash(tmp_path):
    target = tmp_path / "model.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []
    with atomic_path(target) as temp:
        temp.write_bytes(b"whole")
        assert not target.exists()  # the final name appears only at the end
    assert target.read_bytes() == b"whole" and os.listdir(tmp_path) == ["model.bin"]
