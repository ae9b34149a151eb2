"""Multiple-choice evaluation: the C-Eval / CMMLU readers on fixtures in the published formats (and malformed
copies), prompts and k-shot contexts, the log-likelihood scorer against direct forward passes and on a model
trained to know the answers, the idiom tasks' determinism and split, the demo tasks' questions from held-out
preference pairs (scored through the chat template on a model whose log-likelihoods are known by hand), the lm-eval
export and the CLI."""

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from bigram_model import BigramModel
from conftest import save_tiny_model
from tiny_llama2_zh.cli import main
from tiny_llama2_zh.data import idioms
from tiny_llama2_zh.data.tasks.segmentation import SEGMENTATION_PROMPT
from tiny_llama2_zh.data.tasks.sentiment import SENTIMENT_PROMPT
from tiny_llama2_zh.eval import multiple_choice as mc
from tiny_llama2_zh.eval.tasks import TaskRow, limit_rows, prompt_order
from tiny_llama2_zh.loading import load_model, save_model_folder
from tiny_llama2_zh.tokenizer import chat_ids, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
CEVAL, CMMLU = FIXTURES / "ceval", FIXTURES / "cmmlu"


# ------------------------------------------------------------------------------------------------ readers
def test_ceval_reader_reads_val_and_dev_and_ignores_test():
    tasks = mc.read_ceval(CEVAL)
    assert [t.subject for t in tasks] == ["computer_network", "high_school_geography"]
    network = tasks[0]
    assert (network.benchmark, network.split, network.name) == ("ceval", "val", "计算机网络")
    assert len(network.questions) == 4 and len(network.dev) == 5
    assert [q.answer for q in network.questions] == [1, 1, 2, 2]  # B B C C
    assert network.questions[0].prompt == (
        "DNS的主要作用是____。\nA. 分配IP地址\nB. 把域名解析为IP地址\nC. 加密数据\nD. 路由选择\n答案："
    )
    assert network.questions[0].choices == ("A", "B", "C", "D")
    assert network.questions[0].source.endswith("computer_network_val.csv:2")
    assert network.description == "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"


def test_ceval_reader_takes_a_flat_folder(tmp_path):
    for path in CEVAL.glob("*/*.csv"):
        shutil.copy(path, tmp_path / path.name)
    tasks = mc.read_ceval(tmp_path)
    assert [len(t.questions) for t in tasks] == [4, 5] and all(len(t.dev) == 5 for t in tasks)


def test_cmmlu_reader():
    tasks = mc.read_cmmlu(CMMLU)
    assert [t.subject for t in tasks] == ["agronomy", "chinese_history"]
    agronomy = tasks[0]
    assert (agronomy.split, agronomy.name, len(agronomy.questions), len(agronomy.dev)) == ("test", "农学", 3, 5)
    assert [q.answer for q in agronomy.questions] == [1, 0, 2]
    assert [q.id for q in agronomy.questions] == ["0", "1", "2"]
    assert agronomy.description == "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"


def _rewrite(path: Path, edit) -> None:
    with path.open(encoding="utf-8", newline="") as file:
        rows = list(csv.reader(file))
    edit(rows)
    with path.open("w", encoding="utf-8", newline="") as file:
        csv.writer(file, lineterminator="\n").writerows(rows)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: [row.pop(6) for row in rows], r"computer_network_val.csv:1: missing column\(s\) answer"),
        (lambda rows: rows[3].__setitem__(6, "E"), r"computer_network_val.csv:4: answer 'E' is not one of A, B, C, D"),
        (lambda rows: rows[2].__setitem__(6, ""), r"computer_network_val.csv:3: answer '' is not one of"),
        (lambda rows: rows[2].pop(), r"computer_network_val.csv:3: 6 fields, the header has 7"),
        (lambda rows: rows[1].__setitem__(1, "  "), r"computer_network_val.csv:2: empty question"),
    ],
)
def test_ceval_reader_names_file_and_line_of_a_problem(tmp_path, edit, message):
    shutil.copytree(CEVAL, tmp_path / "ceval")
    _rewrite(tmp_path / "ceval" / "val" / "computer_network_val.csv", edit)
    with pytest.raises(ValueError, match=message):
        mc.read_ceval(tmp_path / "ceval")


def test_cmmlu_reader_errors(tmp_path):
    shutil.copytree(CMMLU, tmp_path / "cmmlu")
    _rewrite(tmp_path / "cmmlu" / "test" / "agronomy.csv", lambda rows: rows[0].__setitem__(1, "question"))
    with pytest.raises(ValueError, match=r"agronomy.csv:1: missing column\(s\) Question"):
        mc.read_cmmlu(tmp_path / "cmmlu")
    with pytest.raises(ValueError, match="holds no test/"):
        mc.read_cmmlu(tmp_path / "cmmlu" / "dev")
    with pytest.raises(ValueError, match=r"holds no .*_val\.csv"):
        mc.read_ceval(tmp_path / "cmmlu")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        mc.read_ceval(tmp_path / "missing")


def test_a_bom_and_crlf_line_ends_are_read(tmp_path):
    shutil.copytree(CMMLU, tmp_path / "cmmlu")
    path = tmp_path / "cmmlu" / "test" / "agronomy.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert [q.answer for q in mc.read_cmmlu(tmp_path / "cmmlu")[0].questions] == [1, 0, 2]


# ---------------------------------------------------------------------------------------------- contexts
def test_k_shot_context_is_lm_eval_s_first_n_dev_examples():
    task = mc.read_cmmlu(CMMLU)[0]
    context = mc.build_context(task, task.questions[0], shots=2)
    assert context == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "水稻属于____作物。\nA. 油料\nB. 粮食\nC. 纤维\nD. 糖料\n答案： B\n\n"
        "植物进行光合作用的主要器官是____。\nA. 根\nB. 茎\nC. 叶\nD. 花\n答案： C\n\n"
        "棉花是重要的____作物。\nA. 粮食\nB. 纤维\nC. 糖料\nD. 饮料\n答案："
    )
    assert mc.build_context(task, task.questions[0], 0) == task.description + task.questions[0].prompt
    with pytest.raises(ValueError, match="6-shot needs 6 dev questions"):
        mc.build_context(task, task.questions[0], 6)


def test_encode_pair_takes_the_continuation_from_the_whole_encoding(small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    context_ids, continuation_ids = mc.encode_pair(tokenizer, "答案：", " B")
    whole = tokenizer("答案： B")["input_ids"]
    assert context_ids[0] == tokenizer.bos_token_id  # the context starts with <s>, as lm-eval's HF default
    assert context_ids + continuation_ids == whole
    # trailing whitespace of the context moves to the continuation (lm-eval's _encode_pair)
    assert mc.encode_pair(tokenizer, "答案： ", "B") == (context_ids, continuation_ids)


# ------------------------------------------------------------------------------------------------- scorer
def test_loglikelihoods_equal_direct_forward_passes(small_tokenizer, tmp_path):
    folder = save_tiny_model(small_tokenizer, tmp_path / "model", max_position_embeddings=64)
    model, tokenizer = load_model(folder, "cpu")
    long_context = "以下是中国关于计算机网络的单项选择题。" * 8  # longer than the window: cut from the left
    requests = [
        ("以下是中国关于地理的单项选择题。\n答案：", " A"),
        ("以下是中国关于地理的单项选择题。\n答案：", " D"),
        ("解释：比喻美妙的言谈。\n成语：", "丽藻春葩"),
        ("成语：几次三番\n解释：", "一次又一次。形容次数之多。"),
        (long_context, " C"),
        (long_context, "计算机网络"),
    ]
    scores = mc.loglikelihoods(model, tokenizer, requests, batch_size=4)
    window = model.config.max_position_embeddings
    with torch.inference_mode():
        for (context, continuation), score in zip(requests, scores):
            whole = tokenizer(context + continuation)["input_ids"]
            n_context = len(tokenizer(context)["input_ids"])
            if len(whole) <= window:
                # independent of the scorer's indexing: log P(whole) - log P(context), from the model's own loss
                def total_log_prob(ids):
                    ids = torch.tensor([ids])
                    return -float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)

                expected = total_log_prob(whole) - total_log_prob(whole[:n_context])
            else:
                kept = whole[-(window + 1) :]
                log_probs = model(input_ids=torch.tensor([kept[:-1]])).logits[0].log_softmax(-1)
                targets = whole[n_context:]
                start = len(kept) - 1 - len(targets)
                expected = sum(float(log_probs[start + i, t]) for i, t in enumerate(targets))
            assert score == pytest.approx(expected, abs=1e-4)


def _train_to_know_the_answers(folder: Path, tasks: list[mc.MCTask], max_steps: int = 1000) -> None:
    """Adam steps on the answer token of `context + " " + right letter` for every question until its mean loss is
    under 0.02 (every right letter then has probability > 0.8), so that the right option is far more likely than
    the others; saved back into `folder`. The loss sits near 0.54 (the letters' prior) for a while before it falls,
    and how long depends on the CPU's float rounding: about 340 steps on an AMD EPYC (2026-12-07), under 300 on the
    machines this test ran on before."""
    model, tokenizer = load_model(folder, "cpu")
    rows = []
    for task in tasks:
        for q in task.questions:
            context_ids, answer_ids = mc.encode_pair(
                tokenizer, mc.build_context(task, q, 0), task.target_delimiter + q.choices[q.answer]
            )
            rows.append((context_ids + answer_ids, len(context_ids)))
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id)
    labels = torch.full((len(rows), longest), -100)
    for row, (ids, start) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start : len(ids)] = torch.tensor(ids[start:])  # only the answer is learnt
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(max_steps):
        loss = model(input_ids=input_ids, labels=labels).loss
        if loss < 0.02:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < 0.02, f"the model did not learn the answers in {max_steps} steps (loss {float(loss):.3f})"
    save_model_folder(model.eval(), tokenizer, folder)


def test_scorer_picks_the_answer_a_model_was_trained_to_give(small_tokenizer, tmp_path):
    tasks = mc.load_tasks(CEVAL, CMMLU)
    folder = save_tiny_model(small_tokenizer, tmp_path / "model", max_position_embeddings=256)
    before = mc.evaluate_mc([folder], tasks, show_progress=False)["models"][0]
    _train_to_know_the_answers(folder, tasks)
    after = mc.evaluate_mc([folder], tasks, show_progress=False)["models"][0]
    assert all(s["acc"] == 1.0 for s in after["subjects"]), [s["predictions"] for s in after["subjects"]]
    assert after["averages"]["ceval"]["acc"] == 1.0 and after["averages"]["cmmlu"]["acc_pooled"] == 1.0
    assert before["averages"]["ceval"]["acc"] < 1.0  # the random model did not know them
    subject = after["subjects"][0]
    assert (subject["questions"], subject["correct"], subject["chance"]) == (4, 4, 0.25)
    assert subject["acc_norm"] == subject["acc"]  # one-character letter choices


def test_argmax_takes_the_first_of_equal_scores():
    assert mc.argmax([-1.0, -0.5, -0.5, -2.0]) == 1


# --------------------------------------------------------------------------------------------------- idioms
@pytest.fixture(scope="module")
def idiom_split():
    return idioms.split_idioms(idioms.read_idioms())


def test_idiom_package_is_read_and_split_by_hash(idiom_split):
    dev, test = idiom_split
    assert len(dev) + len(test) > 30_000
    assert 0.08 < len(test) / (len(dev) + len(test)) < 0.12  # 100 per mille
    assert not {i.word for i in dev} & {i.word for i in test}
    assert all(i.word not in i.explanation and i.explanation not in ("", "无") for i in dev[:2000])


def test_idiom_questions_are_deterministic_and_do_not_leak(idiom_split):
    dev, test = idiom_split
    first = idioms.build_questions(test, 300)
    assert first == idioms.build_questions(list(test), 300)  # same questions, same option order
    test_words = {i.word for i in test}
    for q in first:
        words = [o.word for o in q.options]
        assert q.options[q.answer] == q.idiom and len(set(words)) == 4
        assert len({o.explanation for o in q.options}) == 4
        assert set(words) <= test_words  # distractors from the test split only
        if sum(len(i.word) == len(q.idiom.word) for i in test) >= 4:
            assert {len(w) for w in words} == {len(q.idiom.word)}  # same length where there are enough
    positions = Counter(q.answer for q in first)
    assert set(positions) == {0, 1, 2, 3} and max(positions.values()) < 110  # about uniform (75 expected)
    dev_questions = idioms.build_questions(dev, 200)
    assert not {o.word for q in dev_questions for o in q.options} & test_words


def test_idiom_tasks_are_cloze_tasks():
    word, meaning = mc.idiom_tasks(limit=5)
    assert (word.subject, meaning.subject) == ("chengyu_word", "chengyu_meaning")
    assert len(word.questions) == 5 and len(word.dev) == idioms.DEV_QUESTIONS
    q, m = word.questions[0], meaning.questions[0]
    assert q.prompt.startswith("解释：") and q.prompt.endswith("\n成语：") and q.choices[q.answer] == q.id
    assert m.prompt == f"成语：{q.id}\n解释：" and m.answer == q.answer
    assert word.target_delimiter == ""
    assert mc.idiom_tasks(limit=5)[0].questions == word.questions


def test_idiom_reader_refuses_a_csv_without_its_columns(tmp_path):
    path = tmp_path / "idiom.csv"
    path.write_text("word,pinyin\n一心一意,yī xīn yī yì\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"idiom.csv:1: missing column\(s\) explanation"):
        idioms.read_idioms(path)


# ------------------------------------------------------------------------------------------ export and CLI
def test_export_writes_lm_eval_tasks(tmp_path):
    tasks = mc.load_tasks(CEVAL, CMMLU, limit=3)
    written = mc.export_lm_eval(tasks, tmp_path, shots=2)
    names = sorted(p.name for p in written)
    assert "_tinyllm_ceval.yaml" in names and "tinyllm_cmmlu_agronomy.yaml" in names
    yaml_text = (tmp_path / "tinyllm_ceval_computer_network.yaml").read_text(encoding="utf-8")
    assert "num_fewshot: 2" in yaml_text and 'target_delimiter: " "' in yaml_text
    docs = [json.loads(line) for line in (tmp_path / "data" / "tinyllm_ceval_computer_network.test.jsonl").open()]
    assert len(docs) == 3 and docs[0]["answer"] == 1 and docs[0]["choices"] == ["A", "B", "C", "D"]


def test_cli_mc_export_needs_no_model_and_mc_refuses_nothing_to_do(tmp_path, capsys):
    assert main(["eval", "mc", "--cmmlu-dir", str(CMMLU), "--export-lm-eval", str(tmp_path / "lm")]) == 0
    assert (tmp_path / "lm" / "_tinyllm_cmmlu.yaml").is_file()
    assert main(["eval", "mc", "--cmmlu-dir", str(CMMLU)]) == 2
    assert "no model to evaluate" in capsys.readouterr().err
    assert main(["eval", "mc", "--model", str(tmp_path), "--cmmlu-dir", str(CMMLU)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["eval", "mc", "--export-lm-eval", str(tmp_path / "x")]) == 2
    assert "no benchmark chosen" in capsys.readouterr().err


def test_cli_mc_and_all_write_their_reports(tiny_model_dir, token_files, tmp_path):
    assert main(["eval", "mc", "--model", str(tiny_model_dir), "--ceval-dir", str(CEVAL), "--shots", "1",
                 "--output", str(tmp_path / "mc")]) == 0  # fmt: skip
    result = json.loads((tmp_path / "mc" / "mc.json").read_text(encoding="utf-8"))
    assert result["shots"] == 1 and len(result["models"][0]["subjects"]) == 2
    assert "chance" in (tmp_path / "mc" / "mc.md").read_text(encoding="utf-8")

    assert main(["eval", "all", "--model", str(tiny_model_dir), "--data", str(token_files["validation"]),
                 "--max-blocks", "2", "--cmmlu-dir", str(CMMLU), "--output", str(tmp_path / "all")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "all" / "eval.json").read_text(encoding="utf-8"))
    assert [c["key"] for c in report["columns"]] == ["ppl", "mc.cmmlu.average"]
    row = report["models"][0]["row"]
    assert row["ppl"] == pytest.approx(report["models"][0]["perplexity"]["perplexity"]) and row["ppl"] > 1
    assert 0 <= row["mc.cmmlu.average"] <= 1 and report["baseline"]["row"]["mc.cmmlu.average"] == 0.25
    assert report["models"][0]["tasks"] is None
    assert "baseline / chance" in (tmp_path / "all" / "eval.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------- demo tasks
def _pairs(path: Path, pairs: list[tuple[str, str, str]], extra: list[str] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) for p, c, r in pairs]
    path.write_text("\n".join([*lines, *extra]) + "\n", encoding="utf-8")


SENTIMENT_PAIRS = [
    (SENTIMENT_PROMPT.format(review=review), label, "负面" if label == "正面" else "正面")
    for review, label in (("物流很快", "正面"), ("质量太差了", "负面"), ("非常满意", "正面"),
                          ("用了两天就坏了", "负面"), ("客服态度很差", "负面"), ("孩子很喜欢", "正面"))
]  # fmt: skip
SEGMENTATION_PAIRS = [
    (SEGMENTATION_PROMPT.format(sentence="".join(s.split())), s, wrong)
    for s, wrong in (("要 尊重 群众 的 意愿", "要 尊重群众 的 意愿"), ("关心 群众 生活", "关心群众 生活"))
]
PINYIN_REPLIES = ("dì qū", "fú wù", "rén mín")  # three labels: every question gets all three as choices
PINYIN_PAIRS = [(f"问题{i}", PINYIN_REPLIES[i % 3], PINYIN_REPLIES[(i + 1) % 3]) for i in range(6)]


def write_demo_tasks(folder: Path) -> Path:
    _pairs(folder / "sentiment" / mc.PAIRS_FILE, SENTIMENT_PAIRS, ["{broken", json.dumps({"prompt": ["x"]})])
    _pairs(folder / "segmentation" / mc.PAIRS_FILE, SEGMENTATION_PAIRS)
    _pairs(folder / "pinyin" / mc.PAIRS_FILE, PINYIN_PAIRS)
    (folder / "unknown_task").mkdir()  # not in the registry: ignored
    return folder


def test_demo_task_questions_come_from_the_held_out_pairs(tmp_path):
    warnings = []
    tasks = mc.demo_task_questions(write_demo_tasks(tmp_path / "tasks"), warn=warnings.append)
    assert [(t.benchmark, t.subject, t.chat) for t in tasks] == [
        ("tasks", "sentiment", True), ("tasks", "segmentation", True), ("tasks", "pinyin", True)
    ]  # fmt: skip
    assert len(warnings) == 1 and "skipped 2 malformed lines" in warnings[0] and "sentiment" in warnings[0]
    sentiment, segmentation, pinyin = tasks
    assert [q.prompt for q in sentiment.questions] == sorted((p for p, _, _ in SENTIMENT_PAIRS), key=prompt_order)
    chosen = {prompt: answer for prompt, answer, _ in SENTIMENT_PAIRS}
    for task in tasks:
        for q in task.questions:
            assert len(set(q.choices)) == len(q.choices)
    for q in sentiment.questions:
        assert set(q.choices) == {"正面", "负面"} and q.choices[q.answer] == chosen[q.prompt]
    assert {q.choices[0] for q in sentiment.questions} == {"正面", "负面"}  # the right one is not always first
    for q in segmentation.questions:
        right, wrong = next((c, r) for p, c, r in SEGMENTATION_PAIRS if p == q.prompt)
        assert set(q.choices) == {right, wrong} and q.choices[q.answer] == right
    assert all(set(q.choices) == set(PINYIN_REPLIES) for q in pinyin.questions)  # the labels beyond the pair
    assert "labels dì qū/fú wù/rén mín" in pinyin.name and "labels" not in segmentation.name
    assert sentiment.questions[0].source.startswith(str(tmp_path / "tasks" / "sentiment" / mc.PAIRS_FILE))

    # --limit keeps the prompts `eval tasks --limit` keeps (the same hash order over the same held-out prompts)
    limited = mc.load_tasks(tasks_dir=tmp_path / "tasks", limit=2)
    rows = [TaskRow([{"role": "user", "content": p}], c, i) for i, (p, c, _) in enumerate(SENTIMENT_PAIRS)]
    assert [q.prompt for q in limited[0].questions] == [row.prompt for row in sorted(
        limit_rows(rows, 2), key=lambda row: prompt_order(row.prompt))]  # fmt: skip

    with pytest.raises(FileNotFoundError, match="missing is not a folder"):
        mc.demo_task_questions(tmp_path / "missing")
    (tmp_path / "empty" / "sentiment").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds no <task>/preference-test\.jsonl"):
        mc.demo_task_questions(tmp_path / "empty")


def test_chat_pair_is_the_chat_template_s_reply_and_eos(small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    context, continuation = mc.chat_pair(tokenizer, "评论：很好", "正面")
    user = [{"role": "user", "content": "评论：很好"}]
    assert context == chat_ids(tokenizer, user, generation_prompt=True)
    whole = chat_ids(tokenizer, [*user, {"role": "assistant", "content": "正面"}])
    assert continuation[-1] == tokenizer.eos_token_id and context + continuation == whole[: len(context + continuation)]
    assert tokenizer.decode(continuation, skip_special_tokens=True) == "正面"  # the reply, then eos; no newline after


def test_demo_task_choices_are_the_argmax_of_hand_computed_log_likelihoods(small_tokenizer, tmp_path):
    """A bigram model (tests/bigram_model.py) prefers 负面 to 正面 after any prompt: every sentiment question goes to
    负面, and every score is the log-likelihood computed by hand from its logit table."""
    bigram = BigramModel(small_tokenizer, {"负面": 1.0, "正面": 0.0})
    folder = bigram.save(tmp_path / "model")
    tasks = mc.load_tasks(tasks_dir=write_demo_tasks(tmp_path / "tasks"))
    result = mc.evaluate_mc([folder], tasks, show_progress=False)["models"][0]
    model, tokenizer = load_model(folder, "cpu")
    for task, subject in zip(tasks, result["subjects"]):
        correct = 0
        for question, prediction in zip(task.questions, subject["predictions"]):
            pairs = [mc.chat_pair(tokenizer, question.prompt, choice) for choice in question.choices]
            by_hand = [bigram.log_likelihood(context, continuation) for context, continuation in pairs]
            scored = mc.encoded_loglikelihoods(model, tokenizer, pairs)
            assert scored == pytest.approx(by_hand, abs=1e-3)
            assert prediction["pred"] == mc.argmax(by_hand)
            correct += mc.argmax(by_hand) == question.answer
        assert subject["correct"] == correct and subject["chance"] == pytest.approx(1 / len(task.questions[0].choices))
    sentiment = result["subjects"][0]
    assert all(q.choices[p["pred"]] == "负面" for q, p in zip(tasks[0].questions, sentiment["predictions"]))
    negative = sum(c == "负面" for _, c, _ in SENTIMENT_PAIRS) / len(SENTIMENT_PAIRS)
    assert sentiment["acc"] == pytest.approx(negative) and result["averages"]["tasks"]["subjects"] == 3


def test_cli_mc_demo_tasks(tiny_model_dir, tmp_path, capsys):
    tasks_dir = write_demo_tasks(tmp_path / "tasks")
    argv = ["eval", "mc", "--model", str(tiny_model_dir), "--tasks-dir", str(tasks_dir), "--limit", "3"]
    assert main([*argv, "--output", str(tmp_path / "mc")]) == 0
    result = json.loads((tmp_path / "mc" / "mc.json").read_text(encoding="utf-8"))
    assert result["tasks_dir"] == str(tasks_dir) and [t["subject"] for t in result["tasks"]] == [
        "sentiment", "segmentation", "pinyin"
    ]  # fmt: skip
    assert [s["questions"] for s in result["models"][0]["subjects"]] == [3, 2, 3]
    assert "| tasks " in (tmp_path / "mc" / "mc.md").read_text(encoding="utf-8")
    capsys.readouterr()
    assert main([*argv, "--shots", "1"]) == 2
    assert "asked as a chat, zero-shot" in capsys.readouterr().err
    assert main(["eval", "mc", "--tasks-dir", str(tasks_dir), "--cmmlu-dir", str(CMMLU), "--export-lm-eval",
                 str(tmp_path / "lm")]) == 0  # fmt: skip
    assert "leaves out the demo tasks" in capsys.readouterr().err
    assert not list((tmp_path / "lm").glob("tinyllm_tasks_*")) and (tmp_path / "lm" / "_tinyllm_cmmlu.yaml").is_file()
