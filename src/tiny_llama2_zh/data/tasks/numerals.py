"""numerals: a number in Arabic digits -> the same number in Chinese numerals (305 -> 三百零五, 20180305 ->
二千零一十八万零三百零五), generated here with exact answers, held out by value (`tinyllm data tasks --tasks numerals`).

A candidate GRPO task for issue 19, where addition's carrying is learnt all at once or not at all: numerals are
a lookup per place (digit, unit 千 百 十, the group unit 万) plus rules for zeros -- one 零 for a run of zeros before
a nonzero digit (1005 -> 一千零五), none at the end (1500 -> 一千五百), one between the groups when the lower group has
no thousands (100,500 -> 十万零五百). Tried in the demo in addition's place and not adopted
(docs/post_training_experiments.md): from the demo's pretrained model, 900 SFT steps with numerals once in the
mix left 52.2 %, 13.0 % and 53.3 % exact on seeds 1337-1339 (184 held-out numbers) -- as seed-dependent as
addition -- and 150 GRPO steps lifted seed 1337 to 64.1 % but seed 1338 only to 16.3 %; three times in the mix,
seed 1337 reached 96.2 %.

- examples: `NUMERALS_PROMPT` with the number; by default 4,000 distinct numbers of 3 to 8 digits, each digit count
  and digit drawn from a hash of the example's index (no global random state: the same examples on every machine and
  run), a digit after the first being 0 half the time, so that the zero rules are met often (70 % of the answers hold
  a 零). Held out by value: the split key is the number.
- the answer (`chinese_numeral`): the standard written form, one per number -- 二 (not 两) before every unit,
  一十 after a higher unit (110 -> 一百一十) but 十 alone at the front (10 -> 十, 15 -> 十五, 150,000 -> 十五万).
- wrong answers (the rejected side of preference pairs): the slips a learner makes, never the answer -- the 零
  dropped, every 零 doubled, one digit one off, the digits read out one by one.
- metrics: `exact` (the headline) -- the reply, stripped of surrounding whitespace, is the answer and nothing else;
  `char_similarity` -- difflib's ratio between reply and answer, averaged over rows; `not_a_numeral` -- replies
  with a character that is no Chinese numeral.
- reward: 1 for the exact answer, else 0; partial credit: `char_similarity`; format: only numeral characters.
- trivial baseline: every nonzero digit with its unit and no 零 at all (305 -> 三百五): right exactly when the number
  needs no 零, so the gap between it and a model is how much of the zero rules the model has learnt.
"""

import difflib
import re
from collections.abc import Iterator, Sequence

from tiny_llama2_zh.data.tasks.base import (
    Example,
    Task,
    baseline_from_prompts,
    exact_reply,
    pick,
    share,
    whole_numbers,
)
from tiny_llama2_zh.errors import UsageError

NUMERALS_PROMPT = "把下面的阿拉伯数字写成汉字，只回答汉字。\n数字：{number}"
DIGITS = "零一二三四五六七八九"
UNITS = ("", "十", "百", "千")  # by place: units, tens, hundreds, thousands
NUMERAL = re.compile(f"[{DIGITS}十百千万]+")
NUMBER_IN_PROMPT = re.compile(r"([0-9]+)\s*$")
LARGEST = 99_999_999  # two groups of four digits; 亿 (10^8) would be a third
TEN_THOUSAND = "万"
DEFAULT_COUNT = 4000  # about 3,800 train and 200 test examples at build_tasks' default 50 per mille
DEFAULT_DIGITS = (3, 8)
# A digit after the first is 0 with probability 1/2 (not 1/10): of uniformly drawn 3- to 8-digit numbers only a
# quarter need a 零, and a model that never writes one would score 75 %
PLACE_DIGIT = (0,) * 9 + tuple(range(1, 10))


def _check_range(number: int) -> None:
    if not 0 <= number <= LARGEST:
        raise UsageError(f"the numerals task writes whole numbers from 0 to {LARGEST}, got {number}")


def _group(number: int, at_front: bool) -> str:
    """The numeral of 1..9999 with units 千 百 十: one 零 for a run of zeros before a nonzero digit, none at the end;
    a leading 一十 is written 十 only at the front of the whole number (15 -> 十五, but 115 -> 一百一十五)."""
    digits = str(number)
    parts, pending_zero = [], False
    for index, digit in enumerate(digits):
        place = len(digits) - 1 - index
        if digit == "0":
            pending_zero = True  # written once, and only if a nonzero digit follows
            continue
        if pending_zero:
            parts.append(DIGITS[0])
            pending_zero = False
        leading_ten = at_front and index == 0 and place == 1 and digit == "1"
        parts.append(("" if leading_ten else DIGITS[int(digit)]) + UNITS[place])
    return "".join(parts)


def chinese_numeral(number: int) -> str:
    """The standard written Chinese numeral of 0..99,999,999: 305 -> 三百零五, 1050 -> 一千零五十, 1500 -> 一千五百,
    15 -> 十五, 115 -> 一百一十五, 0 -> 零; above 9,999 in groups of four digits, the upper one followed by 万, and a
    零 between the groups when the lower one has no thousands (100,500 -> 十万零五百, 10,001,000 -> 一千万一千)."""
    _check_range(number)
    if number == 0:
        return DIGITS[0]
    upper, lower = divmod(number, 10_000)
    if not upper:
        return _group(lower, at_front=True)
    text = _group(upper, at_front=True) + TEN_THOUSAND
    if lower:
        text += (DIGITS[0] if lower < 1000 else "") + _group(lower, at_front=False)
    return text


def without_zeros(number: int) -> str:
    """Every nonzero digit with its unit and no 零 (305 -> 三百五, 1050 -> 一千五十): the trivial baseline."""
    return chinese_numeral(number).replace(DIGITS[0], "") or DIGITS[0]


def slips(number: int) -> list[str]:
    """Wrong numerals a learner writes for `number`: the 零 dropped; every 零 doubled (1005 -> 一千零零五, as if each
    zero were written); one digit one higher or lower (keeping the digit count); the digits read out one by one
    (305 -> 三零五). Never the right answer."""
    right = chinese_numeral(number)
    wrong = {without_zeros(number), right.replace(DIGITS[0], DIGITS[0] * 2)}
    digits = str(number)
    for index, digit in enumerate(digits):
        for changed in (int(digit) - 1, int(digit) + 1):
            if 0 <= changed <= 9 and not (index == 0 and changed == 0 and len(digits) > 1):
                wrong.add(chinese_numeral(int(digits[:index] + str(changed) + digits[index + 1 :])))
    wrong.add("".join(DIGITS[int(digit)] for digit in digits))
    return sorted(wrong - {right})


def numerals_examples(
    count: int = DEFAULT_COUNT, min_digits: int = DEFAULT_DIGITS[0], max_digits: int = DEFAULT_DIGITS[1]
) -> Iterator[Example]:
    """`count` distinct numbers of min_digits..max_digits digits, in a fixed order, each with its numeral and one
    slip (chosen by hash)."""
    if not 1 <= min_digits <= max_digits <= len(str(LARGEST)):
        raise UsageError(f"numerals need 1 <= min_digits <= max_digits <= 8, got {min_digits}..{max_digits}")
    available = len(whole_numbers(min_digits, max_digits))
    if count > available // 2:
        raise UsageError(
            f"{count:,} numerals examples would be most of the {available:,} numbers of {min_digits} to "
            f"{max_digits} digits; ask for fewer or allow more digits"
        )
    seen: set[int] = set()
    index = 0
    while len(seen) < count:
        digits = pick(f"numerals {index} digits", range(min_digits, max_digits + 1))
        number = int(
            "".join(
                str(pick(f"numerals {index} place {place}", range(1, 10) if place == 0 and digits > 1 else PLACE_DIGIT))
                for place in range(digits)
            )
        )
        index += 1
        if number in seen:
            continue
        seen.add(number)
        prompt = NUMERALS_PROMPT.format(number=number)
        yield Example(prompt, chinese_numeral(number), str(pick(prompt, slips(number))), split_key=str(number))


def numeral_reply(reply: str) -> str | None:
    """The reply stripped of surrounding whitespace, when it is only numeral characters; else None."""
    text = reply.strip()
    return text if NUMERAL.fullmatch(text) else None


def numerals_partial(reference: str, reply: str) -> float:
    """difflib's similarity ratio of reply and answer (2 x matching characters / both lengths): 一千五 for 一千零五
    scores 6/7. A dense reward for GRPO where a group's replies are all wrong."""
    return difflib.SequenceMatcher(None, reference, reply.strip(), autojunk=False).ratio()


def numerals_format(reference: str, reply: str) -> float:
    return float(numeral_reply(reply) is not None)


def numerals_metrics(references: Sequence[str], replies: Sequence[str]) -> dict[str, float | int]:
    pairs = list(zip(references, replies))
    return {
        "exact": share(sum(exact_reply(ref, reply) for ref, reply in pairs), len(pairs)),
        "char_similarity": share(sum(numerals_partial(ref, reply) for ref, reply in pairs), len(pairs)),
        "not_a_numeral": sum(numeral_reply(reply) is None for reply in replies),
    }


def numerals_answer_problem(answer: str) -> str | None:
    if not NUMERAL.fullmatch(answer):
        return f"numerals answer {answer!r} is not written in Chinese numerals ({DIGITS}十百千万)"
    return None


def _without_zeros_reply(prompt: str) -> str:
    found = NUMBER_IN_PROMPT.search(prompt)
    number = int(found.group(1)) if found else None
    return without_zeros(number) if number is not None and number <= LARGEST else ""


numerals_baseline = baseline_from_prompts(
    _without_zeros_reply, "each nonzero digit with its unit, no 零 (305 -> 三百五)"
)


TASK = Task(
    name="numerals",
    prompt=NUMERALS_PROMPT,
    examples=numerals_examples,
    metrics=numerals_metrics,
    columns=(("exact", "numerals exact"), ("char_similarity", "numerals char sim")),
    metric_notes="exact: the reply (surrounding whitespace stripped) is the standard numeral (305 -> 三百零五); "
    "char_similarity: difflib's ratio of reply and answer, averaged; the trivial baseline writes every nonzero digit "
    "with its unit and no 零",
    correct=exact_reply,
    well_formed=numerals_format,
    partial=numerals_partial,
    baseline=numerals_baseline,
    answer_problem=numerals_answer_problem,
)
