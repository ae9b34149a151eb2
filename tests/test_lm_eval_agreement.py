"""Our multiple-choice scorer and EleutherAI's lm-evaluation-harness agree: the same small model, the same questions
(exported by `export_lm_eval`, loaded by lm-eval from JSON through `--include_path`), the same prompts, the same
log-likelihood of every choice and so the same answer to every question.

Covered: C-Eval letters 2-shot (long enough that lm-eval and we both cut the context from the left in the
model's 128-token window), CMMLU letters 0-shot, and the idiom cloze tasks 1-shot (multi-token continuations with
no delimiter)."""

from pathlib import Path

import pytest

from tiny_llama2_zh.eval import multiple_choice as mc
from tiny_llama2_zh.loading import load_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")

FIXTURES = Path(__file__).parent / "fixtures"


def test_our_scorer_and_lm_eval_agree_on_every_choice(tiny_model_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    shots = {"ceval": 2, "cmmlu": 0, "idioms": 1}
    tasks = [
        *mc.load_tasks(ceval_dir=FIXTURES / "ceval"),
        *mc.load_tasks(cmmlu_dir=FIXTURES / "cmmlu"),
        *mc.load_tasks(idioms=True, limit=6),
    ]
    for benchmark, k in shots.items():
        mc.export_lm_eval([t for t in tasks if t.benchmark == benchmark], tmp_path / "lm_eval", shots=k)

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_model_dir), "dtype": "float32"},
        tasks=[f"tinyllm_{benchmark}" for benchmark in shots],
        task_manager=TaskManager(include_path=str(tmp_path / "lm_eval")),
        batch_size=8,
        device="cpu",
        log_samples=True,
    )

    model, tokenizer = load_model(tiny_model_dir, "cpu")
    assert model.config.max_position_embeddings == 128
    truncated = 0
    for task in tasks:
        k = shots[task.benchmark]
        samples = {sample["doc"]["id"]: sample for sample in results["samples"][task.task_name]}
        assert len(samples) == len(task.questions)
        ours = mc.score_task(model, tokenizer, task, shots=k)
        for question, prediction in zip(task.questions, ours["predictions"]):
            sample = samples[question.id]
            context = mc.build_context(task, question, k)
            # the same requests: context and continuation strings, choice by choice
            assert [tuple(argument) for argument in sample["arguments"]] == [
                (context, task.target_delimiter + choice) for choice in question.choices
            ]
            theirs = [float(response[0]) for response in sample["filtered_resps"]]
            our_scores = mc.loglikelihoods(
                model, tokenizer, [(context, task.target_delimiter + c) for c in question.choices]
            )
            assert our_scores == pytest.approx(theirs, abs=1e-4)
            assert prediction["pred"] == mc.argmax(theirs)
            truncated += len(tokenizer(context)["input_ids"]) > 128
        accuracy = results["results"][task.task_name]["acc,none"]
        assert ours["acc"] == pytest.approx(accuracy)
        assert ours["acc_norm"] == pytest.approx(results["results"][task.task_name]["acc_norm,none"])
    assert truncated > 0  # the left-truncation path was compared too
