"""addition: two whole numbers -> their sum in digits, generated here with exact answers (issue 19: a task whose
answers GRPO can check exactly and where a small SFT model leaves headroom).

- examples: `ADDITION_PROMPT` with "a+b"; by default 4,000 distinct ordered pairs of 2-digit operands (so sums of
  2 to 3 digits), each operand's digit count and value drawn from a hash of the example's index (no global random
  state: the same examples on every machine and run).
- held out by value: the split key is the unordered pair (`a+b` with a <= b), so the test split never asks a
  question whose swapped twin b+a was trained on. The demo tokenizer spells numbers digit by digit
  (tokenizer.QWEN2_PATTERN), so a model sees the columns it has to add.
- wrong answers (the rejected side of preference pairs): near misses, never the sum -- the sum with one carry
  dropped (one per column that carries), or with one digit one off.
- metrics: `exact` (the headline) -- the reply, stripped of surrounding whitespace (NFKC, so full-width digits
  count), is the sum's digits and nothing else; `digit_accuracy` -- digits matching by place (units with units) over
  max(len(reference), len(reply)), summed over all rows, a reply that is no number matching none; `not_a_number` --
  replies that are not a plain number.
- reward: 1 for the exact sum, else 0 (pass or fail, as pass@k counts it); format: a plain number (digits, no
  leading zero).
- trivial baseline: column addition that never carries (each place's digit sum mod 10; 58+67 -> 15): right exactly
  when no column carries, so the gap between it and a model is how much carrying the model has learnt.
"""

import re
import unicodedata
from collections.abc import Iterator, Sequence

from tiny_llama2_zh.data.tasks.base import Example, Task, baseline_from_prompts, pick, share, whole_numbers
from tiny_llama2_zh.errors import UsageError

ADDITION_PROMPT = "计算下面的加法，只回答得数。\n算式：{expression}"
NUMBER = re.compile(r"0|[1-9][0-9]*")  # a whole number as the answers are written: ASCII digits, no leading zero
OPERANDS = re.compile(r"([0-9]+)\s*\+\s*([0-9]+)")
DEFAULT_COUNT = 4000  # about 3,800 train and 200 test examples at build_tasks' default 50 per mille
# operands of 2 digits (sums of 2 to 3): with 2-3-digit operands the demo's 1.3M-parameter model learned no sum at
# all in 600 SFT steps (0 % exact, pass@8 1.5 %), which leaves GRPO nothing to sharpen
DEFAULT_DIGITS = (2, 2)


def _operand(key: str, min_digits: int, max_digits: int) -> int:
    """A number of min_digits..max_digits digits (each count equally likely, then each value of that count)."""
    digits = pick(f"{key} digits", range(min_digits, max_digits + 1))
    return pick(f"{key} value", whole_numbers(digits, digits))


def _distinct_pairs(min_digits: int, max_digits: int) -> int:
    values = len(whole_numbers(min_digits, max_digits))
    return values * values


def near_misses(a: int, b: int) -> list[int]:
    """Wrong sums one slip away from a + b: the sum with the carry out of one column dropped (for every column that
    carries; dropping the carry out of the column of place p removes 10 p), and the sum with one digit one higher or
    lower (no leading zero). Never the sum itself, never negative."""
    right = a + b
    misses = []
    place, carry, x, y = 1, 0, a, b
    while x or y:
        carry = (x % 10 + y % 10 + carry) // 10
        if carry:
            misses.append(right - 10 * place)
        place, x, y = place * 10, x // 10, y // 10
    digits = str(right)
    for index, digit in enumerate(digits):
        for changed in (int(digit) - 1, int(digit) + 1):
            if 0 <= changed <= 9 and not (index == 0 and changed == 0 and len(digits) > 1):
                misses.append(int(digits[:index] + str(changed) + digits[index + 1 :]))
    return sorted({miss for miss in misses if miss >= 0 and miss != right})


def operand_pairs(name: str, count: int, min_digits: int, max_digits: int) -> Iterator[tuple[int, int]]:
    """`count` distinct ordered pairs (a, b) of min_digits..max_digits-digit numbers, in a fixed order (drawn from
    hashes of `name` and an index: the same pairs on every machine); refused when they would be most of the pairs."""
    if not 1 <= min_digits <= max_digits:
        raise UsageError(f"{name} operands need 1 <= min_digits <= max_digits, got {min_digits}..{max_digits}")
    if count > _distinct_pairs(min_digits, max_digits) // 2:
        raise UsageError(
            f"{count:,} {name} examples would be most of the {_distinct_pairs(min_digits, max_digits):,} pairs of "
            f"{min_digits}- to {max_digits}-digit numbers; ask for fewer or allow more digits"
        )
    seen: set[tuple[int, int]] = set()
    index = 0
    while len(seen) < count:
        pair = tuple(_operand(f"{name} {index} {side}", min_digits, max_digits) for side in "ab")
        index += 1
        if pair not in seen:
            seen.add(pair)
            yield pair


def addition_examples(
    count: int = DEFAULT_COUNT, min_digits: int = DEFAULT_DIGITS[0], max_digits: int = DEFAULT_DIGITS[1]
) -> Iterator[Example]:
    """`count` distinct ordered pairs a+b, in a fixed order, each with its sum and one near miss (chosen by hash)."""
    for a, b in operand_pairs("addition", count, min_digits, max_digits):
        prompt = ADDITION_PROMPT.format(expression=f"{a}+{b}")
        wrong = pick(prompt, near_misses(a, b))
        yield Example(prompt, str(a + b), str(wrong), split_key=f"{min(a, b)}+{max(a, b)}")


def addition_reply(reply: str) -> str | None:
    """The number a reply gives, when the reply (NFKC, surrounding whitespace stripped) is a plain number; else None."""
    text = unicodedata.normalize("NFKC", reply).strip()
    return text if NUMBER.fullmatch(text) else None


def matching_places(reference: str, reply: str) -> tuple[int, int]:
    """(digits equal by place, counted from the units; max(len(reference), len(reply))), a non-number matching none."""
    number = addition_reply(reply)
    if number is None:
        return 0, len(reference)
    matched = sum(r == p for r, p in zip(reversed(reference), reversed(number)))
    return matched, max(len(reference), len(number))


def addition_metrics(references: Sequence[str], replies: Sequence[str]) -> dict[str, float | int]:
    places = [matching_places(ref, reply) for ref, reply in zip(references, replies)]
    return {
        "exact": share(sum(addition_reply(reply) == ref for ref, reply in zip(references, replies)), len(references)),
        "digit_accuracy": share(sum(m for m, _ in places), sum(t for _, t in places)),
        "not_a_number": sum(addition_reply(reply) is None for reply in replies),
    }


def addition_partial(reference: str, reply: str) -> float:
    """The share of the sum's digits the reply has right by place (`matching_places`): 58+67 answered 115 scores
    2/3. A dense reward for GRPO, where a group of wrong replies would otherwise all score 0 and teach nothing."""
    matched, total = matching_places(reference, reply)
    return matched / total


def addition_correct(reference: str, reply: str) -> float:
    return float(addition_reply(reply) == reference)


def addition_format(reference: str, reply: str) -> float:
    return float(addition_reply(reply) is not None)


def addition_answer_problem(answer: str) -> str | None:
    if not NUMBER.fullmatch(answer):
        return f"addition answer {answer!r} is not a whole number in digits"
    return None


def operands(prompt: str) -> tuple[int, int] | None:
    """The two numbers of a prompt's last a+b, or None."""
    found = OPERANDS.findall(prompt)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def sum_without_carries(a: int, b: int) -> int:
    """Column addition that drops every carry: each place's digit is (a's + b's) mod 10 (58+67 -> 15)."""
    total, place = 0, 1
    while a or b:
        total += (a % 10 + b % 10) % 10 * place
        place, a, b = place * 10, a // 10, b // 10
    return total


def _sum_without_carries_reply(prompt: str) -> str:
    pair = operands(prompt)
    return str(sum_without_carries(*pair)) if pair else ""


addition_baseline = baseline_from_prompts(
    _sum_without_carries_reply, "column addition without carries (each place's digit sum mod 10)"
)


TASK = Task(
    name="addition",
    prompt=ADDITION_PROMPT,
    examples=addition_examples,
    metrics=addition_metrics,
    columns=(("exact", "addition exact"), ("digit_accuracy", "addition digit acc")),
    metric_notes="exact: the reply (surrounding whitespace stripped) is the sum's digits; digit_accuracy: digits "
    "equal by place (units with units) over max(len(reference), len(reply)), summed over all rows; the trivial "
    "baseline adds column by column without carrying",
    correct=addition_correct,
    well_formed=addition_format,
    partial=addition_partial,
    baseline=addition_baseline,
    answer_problem=addition_answer_problem,
)
