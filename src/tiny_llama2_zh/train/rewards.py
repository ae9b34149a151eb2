"""Verifiable rewards for GRPO: plain Python that checks a reply against a task's known answer.

The checkers are the tasks' own (`tiny_llama2_zh.data.tasks.TASKS`: each task's `correct` and `well_formed`, the
same scorers `tinyllm eval tasks` reports), so what GRPO optimises is what the evaluation measures; each task
module's docstring says what its reward and format checks pay. `correctness_reward` and `format_reward` are reward
functions in TRL's signature (`prompts, completions, task, answer, **columns` -> one float per completion),
dispatching on each row's task.

`guarded` wraps a reward function so that an exception on one completion is counted and reported with the prompt
it came from, and that completion gets no reward (None: TRL leaves it out of the sum) instead of the run dying
somewhere inside the trainer without saying where.
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tiny_llama2_zh.data.tasks import TASKS

# each task's correctness checker by name, (reference answer, reply) -> a number in [0, 1]: a view of the registry
CORRECTNESS = {name: task.correct for name, task in TASKS.items()}


def reply_text(completion: object) -> str:
    """A completion as TRL passes it: a string, or conversational ([{"role": "assistant", "content": ...}])."""
    if isinstance(completion, list):
        return "".join(message.get("content", "") for message in completion if isinstance(message, dict))
    return str(completion)


def answer_problem(task: str, answer: object) -> str | None:
    """Why a row's reference answer cannot be checked (so the row cannot be a GRPO prompt), or None."""
    if task not in TASKS:
        return f"no checker for task {task!r} (known: {', '.join(TASKS)})"
    if not isinstance(answer, str) or not answer.strip():
        return "no reference answer"
    return TASKS[task].answer_problem(answer)


def correctness_reward(prompts, completions, task, answer, **columns) -> list[float]:
    """TRL reward function: the task's checker on every completion."""
    return [TASKS[t].correct(a, reply_text(c)) for c, t, a in zip(completions, task, answer, strict=True)]


def format_reward(prompts, completions, task, answer, **columns) -> list[float]:
    """TRL reward function: the reply has the task's answer shape (see each task module's docstring)."""
    return [TASKS[t].well_formed(a, reply_text(c)) for c, t, a in zip(completions, task, answer, strict=True)]


def partial_credit_reward(prompts, completions, task, answer, **columns) -> list[float]:
    """TRL reward function: the task's partial credit (`Task.partial`, e.g. addition's digits right by place), or
    its correctness checker where it has none. Reward shaping for sparse tasks: when most groups sample no fully
    right reply, every advantage in them is 0 and GRPO learns nothing from them (DeepSeekMath's group baseline)."""
    return [
        (TASKS[t].partial or TASKS[t].correct)(a, reply_text(c))
        for c, t, a in zip(completions, task, answer, strict=True)
    ]


# the reward functions a GRPO recipe can name (`rewards:` in its YAML), in TRL's signature
REWARD_FUNCTIONS = {"correctness": correctness_reward, "format": format_reward, "partial_credit": partial_credit_reward}


@dataclass
class RewardErrors:
    """Exceptions raised by reward functions: counted per function, the first few kept with their prompt."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def record(self, name: str, prompt: object, error: Exception) -> None:
        self.counts[name] += 1
        if len(self.examples) < 10:
            text = reply_text(prompt)[-200:]
            self.examples.append(f"{name} raised {type(error).__name__}: {error} on prompt {text!r}")


def guarded(function: Callable, errors: RewardErrors) -> Callable:
    """`function` applied one completion at a time; one that raises is recorded (with its prompt) and gets None."""
    name = function.__name__

    def reward(prompts, completions, **columns) -> list[float | None]:
        rewards: list[float | None] = []
        for index, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            row = {key: [values[index]] for key, values in columns.items() if isinstance(values, list)}
            try:
                rewards.append(function([prompt], [completion], **row)[0])
            except Exception as error:  # any failure of user code is reported, never fatal
                print(f"reward function {name} raised {type(error).__name__}: {error} on prompt {reply_text(prompt)!r}")
                errors.record(name, prompt, error)
                rewards.append(None)
        return rewards

    reward.__name__ = name
    return reward
