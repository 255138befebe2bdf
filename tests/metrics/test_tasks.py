"""Task accuracy through lm-eval: memtool's loaded model scored, checked against a plain
log-likelihood argmax computed here; task files validated; lm-eval missing said clearly."""

import json
import sys

import pytest
import torch

from memtool.errors import MemtoolError
from memtool.metrics.tasks import resolve_tasks, task_scores
from memtool.models import load_model

QUERIES = ["The city river", "Memory weights layer", "The first war was", "A model of the"]
CHOICES = ["music", "token", "people", "school"]  # joined to the query by one space


def _choice_logliks(loaded, query: str) -> list[float]:
    """Sum of log p(" " + choice tokens | query): tokenized whole, then split at the query."""
    tokenizer, scores = loaded.tokenizer, []
    context = tokenizer(query, add_special_tokens=False).input_ids
    for choice in CHOICES:
        whole = tokenizer(query + " " + choice, add_special_tokens=False).input_ids
        continuation = whole[len(context) :]
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = loaded.model(ids[:, :-1]).logits.log_softmax(-1)[0]
        picked = logprobs[-len(continuation) :].gather(1, torch.tensor(continuation)[:, None])
        scores.append(picked.sum().item())
    return scores


def _write(path, answers):
    path.write_text(
        "".join(
            json.dumps({"query": q, "choices": CHOICES, "answer": a}) + "\n"
            for q, a in zip(QUERIES, answers, strict=True)
        )
    )
    return path


def test_lm_eval_scores_the_loaded_model_like_a_plain_argmax(tiny_llama_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="the optional lm-eval install ('memtool[eval]')")
    loaded = load_model(str(tiny_llama_dir))
    best, worst = [], []
    for query in QUERIES:
        scores = _choice_logliks(loaded, query)
        best.append(max(range(len(scores)), key=scores.__getitem__))
        worst.append(min(range(len(scores)), key=scores.__getitem__))
    # The answers are the model's own favourites (acc 1) or least favourites (acc 0): any other
    # scoring than the plain log-likelihood of each choice would land in between.
    right = _write(tmp_path / "right.jsonl", best)
    wrong = _write(tmp_path / "wrong.jsonl", worst)
    scores = task_scores(loaded, [str(right), str(wrong)])
    assert scores["right"]["acc"] == 1.0 and scores["wrong"]["acc"] == 0.0
    assert scores["right"]["samples"] == len(QUERIES)
    assert "acc_norm" in scores["right"] and "acc_stderr" in scores["right"]
    limited = task_scores(loaded, [str(right)], limit=2)
    assert limited["right"]["samples"] == 2


def test_task_files_are_checked_before_any_work(tmp_path):
    bad_lines = {
        "not json": "not JSON",
        json.dumps({"choices": ["a", "b"], "answer": 0}): '"query"',
        json.dumps({"query": "q", "choices": ["a"], "answer": 0}): "two or more",
        json.dumps({"query": "q", "choices": ["a", "b"], "answer": 2}): "not a choice index",
        json.dumps({"query": "q", "choices": ["a", "b"], "answer": "a"}): "index",
    }
    for line, words in bad_lines.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(MemtoolError, match=words):
            resolve_tasks([str(path)])
    with pytest.raises(MemtoolError, match="does not exist"):
        resolve_tasks([str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MemtoolError, match="no items"):
        resolve_tasks([str(tmp_path / "empty.jsonl")])
    (tmp_path / "task.yaml").write_text("dataset_path: json\nprocess_docs: !function u.f\n")
    with pytest.raises(MemtoolError, match="names no task"):
        resolve_tasks([str(tmp_path / "task.yaml")])
    (tmp_path / "task.yaml").write_text("task: mine\nprocess_docs: !function u.f\n")
    tasks, include, local = resolve_tasks([str(tmp_path / "task.yaml"), "hellaswag"])
    assert tasks == ["mine", "hellaswag"] and include == [str(tmp_path)] and not local


def test_missing_lm_eval_is_one_clear_error(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    path = _write(tmp_path / "t.jsonl", [0, 0, 0, 0])
    with pytest.raises(MemtoolError, match=r"memtool\[eval\]"):
        task_scores(load_model(str(tiny_llama_dir)), [str(path)])


def test_measure_and_compare_report_task_scores(tiny_llama_dir, text_file, tmp_path):
    pytest.importorskip("lm_eval", reason="the optional lm-eval install ('memtool[eval]')")
    from typer.testing import CliRunner

    from memtool.cli.app import app

    task = _write(tmp_path / "mini.jsonl", [0, 1, 2, 3])
    common = ["--data", str(text_file), "--seq-len", "32", "--max-windows", "2"]
    runner = CliRunner()
    one = runner.invoke(app, ["measure", str(tiny_llama_dir), *common, "--tasks", str(task),
                              "--json"])  # fmt: skip
    assert one.exit_code == 0, one.stderr
    scores = json.loads(one.stdout)["task_scores"]["mini"]
    assert 0.0 <= scores["acc"] <= 1.0 and scores["samples"] == len(QUERIES)
    summary = tmp_path / "s.md"
    pair = runner.invoke(app, ["measure", str(tiny_llama_dir), str(tiny_llama_dir), *common,
                               "--tasks", str(task), "--task-limit", "2",
                               "--summary", str(summary), "--json"])  # fmt: skip
    assert pair.exit_code == 0, pair.stderr
    rows = json.loads(pair.stdout)["rows"]
    assert [r["task_scores"]["mini"]["samples"] for r in rows] == [2, 2]
    assert "mini acc" in summary.read_text()
    bad = runner.invoke(app, ["measure", str(tiny_llama_dir), *common, "--tasks",
                              str(tmp_path / "none.jsonl")])  # fmt: skip
    assert bad.exit_code == 2 and "does not exist" in bad.stderr


def test_a_bitstack_stack_at_a_budget_is_scored(tiny_llama_dir, text_file, tmp_path):
    """lm-eval re-ties weights by name when it wraps a model; a stack's embeddings are not
    parameters, so memtool keeps that call from failing (and restores it after)."""
    pytest.importorskip("lm_eval", reason="the optional lm-eval install ('memtool[eval]')")
    from memtool.compress import BitStackConfig, CalibrationConfig, compress
    from memtool.formats.bitstack_stack import StackFile

    calibration = CalibrationConfig(data=str(text_file), n_samples=4, seq_len=32)
    compress(tiny_llama_dir, BitStackConfig(niter=3, score_samples=2), calibration,
             output=tmp_path / "stack", show_progress=False)  # fmt: skip
    stack = StackFile(tmp_path / "stack")
    loaded = load_model(str(tmp_path / "stack"), budget=(stack.min_bytes + stack.max_bytes) // 2)
    task = _write(tmp_path / "mini.jsonl", [0, 1, 2, 3])
    scores = task_scores(loaded, [str(task)])
    assert scores["mini"]["samples"] == len(QUERIES)
    assert "tie_weights" not in vars(loaded.model)  # the model's own method again
