"""Tokenizers: train our own byte-level BPE, or convert ChatGLM3's SentencePiece model.

Both produce the same kind of folder: a transformers fast tokenizer (`tokenizer.json` + config) that
`AutoTokenizer.from_pretrained(folder)` loads with no remote code (`load_tokenizer` from a model folder too), with
bos `<s>`, eos `</s>`, a pad token, the chat-role tokens `<|system|>`, `<|user|>`, `<|assistant|>`,
`<|observation|>` (ChatGLM3's names) and one chat template shared by every later stage (SFT, reward model, PPO,
DPO, chat, serve).

One BOS convention everywhere (llama2.c's): every document starts with `<s>`. Pretraining shards hold
`<s> document </s>`; `tokenizer(text)` prepends `<s>` (as Llama's tokenizer does; `add_special_tokens=False`
leaves it out), so a prompt to continue starts like a document; the chat template starts with `<s>` too.
"""

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SentencePieceExtractor
from transformers.tokenization_utils_base import generate_merges

from tiny_llama2_zh.errors import UsageError

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
CHAT_ROLES = ("system", "user", "assistant", "observation")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in CHAT_ROLES)

# ChatGLM3 appends these after its 64,789 SentencePiece pieces, in this order (ids 64789..64797).
CHATGLM3_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", *ROLE_TOKENS)

# Qwen2's pre-tokenizer split (its tokenizer.json; transformers' Qwen2Tokenizer PRETOKENIZE_REGEX), which llama.cpp
# implements as pre-tokenizer "qwen2" (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_QWEN2, where this string is quoted
# as the original). Unlike GPT-2's `\p{N}+`, `\p{N}` makes every digit a pre-token of its own, so no merge can
# glue digits ("1998" is always 1 9 9 8): numbers are spelled digit by digit, as by Llama's SentencePiece
# (split_digits) and Qwen2's tokenizer, so that a small model can learn addition column by column (issue 19).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# One template for every stage, in ChatGLM3's role-token style:
#   <s><|system|>\n...\n<|user|>\n...\n<|assistant|>\n...</s>\n
# The assistant's reply sits in {% generation %} so that TRL can train on assistant tokens only
# (`assistant_only_loss`); the reply ends with eos, which is what generation stops on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'observation'] %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ "
    "'; expected system, user, assistant or observation') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def chat_ids(
    tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]], generation_prompt: bool = False
) -> list[int]:
    """The chat template's token ids for `messages`: with `generation_prompt`, followed by the assistant's opening
    (a prompt to answer); without, as written (a conversation whose last reply is closed by eos). The one place a
    conversation becomes ids, for every stage that feeds a model a chat (SFT data, rewards, PPO, DPO, chat, serve)."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=True)
    return list(encoded["input_ids"])


def iter_texts(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Texts from .jsonl files (one JSON object per line, `text_field` read) or plain text files (one per line)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training input {path} does not exist")
        with path.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    try:
                        yield json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError) as error:
                        raise UsageError(
                            f"{path}:{line_number}: expected a JSON object with a {text_field!r} field ({error})"
                        ) from error
                else:
                    yield line.rstrip("\n")


def _wrap(tokenizer: Tokenizer, pad_token: str) -> PreTrainedTokenizerFast:
    # `tokenizer(text)` starts every text with <s>, like every pretraining document (see the module docstring)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=pad_token,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=1_000_000,  # the model's context, not the tokenizer, limits lengths
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Qwen2's pre-tokenizer, exactly as in its tokenizer.json: the QWEN2_PATTERN split (each match its own
    pre-token), then bytes mapped to GPT-2's printable byte alphabet without a second regex or a prefix space.
    The GGUF export recognises this pipeline and names it "qwen2" for llama.cpp (export/common.py)."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def train_bpe_tokenizer(
    inputs: Iterable[str | Path], vocab_size: int, output_dir: str | Path, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style, Radford et al. 2019) with the `tokenizers` library.

    Byte-level means every UTF-8 byte is in the base alphabet, so no Chinese character (or emoji) is ever
    `<unk>`; frequent characters and words become single tokens through merges. Text is first split as Qwen2's
    tokenizer.json splits it (`qwen2_pre_tokenizer`): every digit on its own, so numbers are spelled digit by digit.
    """
    special_tokens = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]  # ids 0..7
    if vocab_size < len(special_tokens) + 256:
        raise UsageError(f"vocab_size {vocab_size} is too small: need 256 bytes + {len(special_tokens)} special tokens")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = qwen2_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(iter_texts(inputs), trainer=trainer)
    wrapped = _wrap(tokenizer, pad_token=PAD)
    wrapped.save_pretrained(str(output_dir))
    return wrapped


def convert_chatglm3(model_file: str | Path, output_dir: str | Path) -> PreTrainedTokenizerFast:
    """Convert ChatGLM2/3's SentencePiece BPE model into a fast tokenizer with identical ids.

    The pipeline mirrors SentencePiece's for this model (identity normalizer, add_dummy_prefix, spaces kept,
    byte fallback): prepend '▁', spaces -> '▁', BPE over the whole string with merges ranked by piece score,
    unknown characters as <0xNN> byte pieces. transformers' Llama converter builds the same pipeline, but from a
    slow tokenizer class; ChatGLM's ships only as remote code, so we assemble it from the model file directly.
    The 9 ChatGLM3 special tokens are appended after the pieces, keeping ids 64789..64797.
    """
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"SentencePiece model {model_file} does not exist")
    proto = SentencePieceExtractor(str(model_file)).proto
    if proto.trainer_spec.model_type != 2:  # sentencepiece_model.proto: UNIGRAM=1, BPE=2
        raise UsageError(f"{model_file} is not a SentencePiece BPE model (model_type={proto.trainer_spec.model_type})")
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    scores = {piece.piece: piece.score for piece in proto.pieces}
    merges = generate_merges(vocab, vocab_scores=scores)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in (UNK, BOS, EOS)])
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in CHATGLM3_SPECIAL_TOKENS]
    )
    for offset, token in enumerate(CHATGLM3_SPECIAL_TOKENS):
        actual = tokenizer.token_to_id(token)
        if actual != len(proto.pieces) + offset:
            raise UsageError(f"{token} got id {actual}, expected {len(proto.pieces) + offset}")
    # No pad piece exists; <unk> never appears in encodings (byte fallback), so it pads safely.
    wrapped = _wrap(tokenizer, pad_token=UNK)
    wrapped.save_pretrained(str(output_dir))
    # Kept beside tokenizer.json (the usual name in transformers folders): the data pipeline encodes with
    # SentencePiece itself, which gives the same ids several times faster.
    shutil.copyfile(model_file, Path(output_dir) / "tokenizer.model")
    return wrapped


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder written by this module (or any transformers fast tokenizer folder)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no tokenizer.json; make one with `tinyllm tokenizer train` "
            "or `tinyllm tokenizer convert-chatglm3`"
        )
    # The fast-tokenizer class itself, not AutoTokenizer: in a model folder AutoTokenizer reads config.json, and in a
    # process that has not imported model.py (which registers model type tiny_llama2) it asks on stdin whether to run
    # remote code. tokenizer.json holds the whole pipeline, so nothing is lost.
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short hash of the vocabulary and pipeline: data prepared with one tokenizer is refused by another."""
    canonical = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
