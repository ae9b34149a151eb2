"""column_addition: a+b worked column by column, as a pupil writes it (竖式), then the sum -- addition with its working
shown, generated here with exact answers (issue 19: a checkable task that a small model learns by degrees).

    prompt  用竖式计算下面的加法：从个位起逐位相加，每一位写一行，最后写出得数。
            算式：358+467
    answer  8+7=15
            5+6+1=12
            3+4+1=8
            得数825

Why the working: without it a 4-layer model learns to carry in one jump, whose step depends on the data order (the
plain `addition` task: 4 % to 45 % exact on three seeds at one budget), so the headroom GRPO finds after SFT is
decided by the seed. Written out, each line is a one-digit sum plus the carry the previous line shows, and the sum
is the lines' units read back: scratchpads make arithmetic learnable by small transformers (Nye et al. 2021, "Show
Your Work: Scratchpads for Intermediate Computation with Language Models"; Lee et al. 2023, "Teaching Arithmetic to
Small Transformers"). Measured on the demo model (docs/post_training_experiments.md): it does make 3-digit sums
learnable (98.5 % exact after the demo's SFT with six shares), but the jump stays (two shares: 53, 69 and 4 % on
three seeds), and temperature-1 samples of a ~30-token working are right less often than the greedy one, so the
demo's GRPO stays on `addition`.

- examples: `COLUMN_ADDITION_PROMPT` with "a+b", 4,000 distinct ordered pairs of `DEFAULT_DIGITS`-digit operands
  (addition's generator: no global random state), held out by value (the unordered pair), as `addition` is.
- wrong answers (the rejected side of preference pairs): the working with one slip carried through -- a carry
  forgotten (the column after a carrying one adds without its +1), or where no column carries into another, the
  units' sum one too high -- so the wrong sum follows from the wrong working.
- metrics: `exact` (the headline) -- the reply's last line is 得数 and the sum's digits; `working_exact` -- the whole
  reply is the reference working, every line right; `no_sum` -- replies with no 得数 line holding a number.
- reward: 1 for the exact sum (the working is not graded: GRPO rewards the answer, as R1-style RL does); format: a
  last line 得数 + a number. Partial credit: the sum's digits right by place (`addition.addition_partial`).
- trivial baseline: column addition without carries (addition's), written as a sum.
"""

import re
import unicodedata
from collections.abc import Iterator, Sequence

from tiny_llama2_zh.data.tasks.addition import addition_partial, operand_pairs, operands, sum_without_carries
from tiny_llama2_zh.data.tasks.base import Example, Task, baseline_from_prompts, share

COLUMN_ADDITION_PROMPT = "用竖式计算下面的加法：从个位起逐位相加，每一位写一行，最后写出得数。\n算式：{expression}"
SUM_LINE = re.compile(r"得数\s*(0|[1-9][0-9]*)")
DEFAULT_COUNT = 4000
DEFAULT_DIGITS = 3  # every operand this many digits, so each column sits at a fixed place in the prompt


def working(a: int, b: int, forget_carry_into: int | None = None, one_too_high: int | None = None) -> str:
    """The column-by-column working of a + b and its sum. `forget_carry_into=k` drops the carry into column k (0 =
    units), `one_too_high=k` writes column k's sum one too high; every later line and the sum follow the slip."""
    lines, digits, carry, column = [], [], 0, 0
    while a or b or column == 0:
        x, y = a % 10, b % 10
        carry_in = 0 if column == forget_carry_into else carry
        total = x + y + carry_in + (column == one_too_high)
        lines.append(f"{x}+{y}" + ("+1" if carry_in else "") + f"={total}")
        digits.append(total % 10)
        carry, a, b, column = total // 10, a // 10, b // 10, column + 1
    number = ("1" if carry else "") + "".join(str(d) for d in reversed(digits))
    return "\n".join([*lines, f"得数{int(number)}"])


def slip(a: int, b: int) -> str:
    """A wrong working: the carry into the first column that gets one forgotten; where none does (at most the top
    column carries, into the sum's leading 1), the units one too high."""
    columns = max(len(str(a)), len(str(b)))
    carry = 0
    for column in range(columns - 1):
        carry = (a // 10**column % 10 + b // 10**column % 10 + carry) // 10
        if carry:
            return working(a, b, forget_carry_into=column + 1)
    return working(a, b, one_too_high=0)


def column_addition_examples(count: int = DEFAULT_COUNT, digits: int = DEFAULT_DIGITS) -> Iterator[Example]:
    """`count` distinct ordered pairs a+b of `digits`-digit numbers, in a fixed order, with their working and a slip."""
    for a, b in operand_pairs("column addition", count, digits, digits):
        prompt = COLUMN_ADDITION_PROMPT.format(expression=f"{a}+{b}")
        yield Example(prompt, working(a, b), slip(a, b), split_key=f"{min(a, b)}+{max(a, b)}")


def stated_sum(reply: str) -> str | None:
    """The number on a reply's last line when that line is 得数 + a number (NFKC, whitespace stripped); else None."""
    lines = unicodedata.normalize("NFKC", reply).strip().splitlines()
    found = SUM_LINE.fullmatch(lines[-1].strip()) if lines else None
    return found.group(1) if found else None


def column_addition_correct(reference: str, reply: str) -> float:
    return float(stated_sum(reply) == stated_sum(reference))


def column_addition_format(reference: str, reply: str) -> float:
    return float(stated_sum(reply) is not None)


def column_addition_partial(reference: str, reply: str) -> float:
    """The share of the sum's digits right by place (addition's measure), 0 with no stated sum."""
    stated = stated_sum(reply)
    return 0.0 if stated is None else addition_partial(stated_sum(reference) or "", stated)


def column_addition_metrics(references: Sequence[str], replies: Sequence[str]) -> dict[str, float | int]:
    normal = [unicodedata.normalize("NFKC", reply).strip() for reply in replies]
    return {
        "exact": share(sum(map(column_addition_correct, references, replies)), len(references)),
        "working_exact": share(sum(ref == reply for ref, reply in zip(references, normal)), len(references)),
        "no_sum": sum(stated_sum(reply) is None for reply in replies),
    }


def column_addition_answer_problem(answer: str) -> str | None:
    if stated_sum(answer) is None:
        return f"column-addition answer {answer!r} does not end in a line 得数<number>"
    return None


def _sum_without_carries_reply(prompt: str) -> str:
    pair = operands(prompt)
    return f"得数{sum_without_carries(*pair)}" if pair else ""


TASK = Task(
    name="column_addition",
    prompt=COLUMN_ADDITION_PROMPT,
    examples=column_addition_examples,
    metrics=column_addition_metrics,
    columns=(("exact", "column addition exact"), ("working_exact", "column addition working exact")),
    metric_notes="exact: the reply's last line is 得数 and the sum; working_exact: every line of the working right; "
    "the trivial baseline adds column by column without carrying",
    correct=column_addition_correct,
    well_formed=column_addition_format,
    partial=column_addition_partial,
    baseline=baseline_from_prompts(_sum_without_carries_reply, "column addition without carries, stated as the sum"),
    answer_problem=column_addition_answer_problem,
)
