"""`llmprune eval --tasks` through lm-evaluation-harness, checked against accuracy computed directly from the logits.

The task is a small local multiple-choice task shipped in tests/data/tasks (30
made-up questions read through lm-eval's json loader, no hub). Its data file
path is relative to the working directory, as lm-eval reads it, so the tests
run from that folder.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from single_thread import one_thread  # noqa: F401  (autouse fixture)
from typer.testing import CliRunner

from llmprune.cli.app import app
from llmprune.engine.io.checkpoint import save_model
from llmprune.engine.io.models import load_model
from llmprune.engine.pruning.cut.surgery import prune_kv_groups, prune_mlp_channels

pytest.importorskip("lm_eval")

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "tasks"
TASK = "llmprune_capitals"
runner = CliRunner()


@pytest.fixture()
def in_task_dir(monkeypatch):
    monkeypatch.chdir(TASK_DIR)


def _items() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "capitals.jsonl").read_text().splitlines()]


@torch.inference_mode()
def direct_scores(model, tokenizer) -> dict:
    """acc and acc_norm as lm-eval defines them, from the model's own logits.

    Each choice is scored by the summed log-probability of its tokens after the prompt
    "Question: ...\\nAnswer:" (the choice follows a space; the tokens of the choice are those
    of prompt + choice past the prompt's tokens). acc: the gold choice has the highest sum;
    acc_norm: the highest sum per character of the choice.
    """
    model.eval()
    hits = hits_norm = 0
    for item in _items():
        context = f"Question: {item['question']}\nAnswer:"
        context_ids = tokenizer(context).input_ids
        sums = []
        for choice in item["choices"]:
            whole = tokenizer(context + " " + choice).input_ids
            continuation = whole[len(context_ids) :]
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0], dim=-1)
            positions = range(len(whole) - 1 - len(continuation), len(whole) - 1)
            sums.append(sum(float(logprobs[p, token]) for p, token in zip(positions, continuation, strict=False)))
        hits += max(range(len(sums)), key=sums.__getitem__) == item["label"]
        per_char = [s / len(c) for s, c in zip(sums, item["choices"], strict=False)]
        hits_norm += max(range(len(sums)), key=per_char.__getitem__) == item["label"]
    return {"acc": hits / len(_items()), "acc_norm": hits_norm / len(_items())}


def _eval_tasks(model_spec: str, *extra: str) -> dict:
    result = runner.invoke(
        app, ["eval", model_spec, "--tasks", TASK, "--include-path", str(TASK_DIR), "--json", *extra]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    [score] = data["scores"]
    assert score["task"] == TASK and score["num_fewshot"] == 0
    return score


def test_lm_eval_accuracy_equals_the_direct_computation_on_a_tiny_model(tiny_model_dir, in_task_dir):
    score = _eval_tasks(str(tiny_model_dir))
    loaded = load_model(str(tiny_model_dir))
    assert score["samples"] == 30
    assert score["metrics"] == direct_scores(loaded.model, loaded.tokenizer)
    assert score["stderr"]["acc"] > 0


def test_batched_requests_and_limit(tiny_model_dir, in_task_dir):
    full = _eval_tasks(str(tiny_model_dir), "--batch-size", "8")
    loaded = load_model(str(tiny_model_dir))
    assert full["metrics"] == direct_scores(loaded.model, loaded.tokenizer)
    assert _eval_tasks(str(tiny_model_dir), "--limit", "10")["samples"] == 10


def test_a_pruned_model_with_non_uniform_layers(tiny_model_dir, tmp_path, in_task_dir):
    loaded = load_model(str(tiny_model_dir))
    layer = loaded.model.model.layers[1]
    prune_kv_groups(layer, [0])
    prune_mlp_channels(layer, list(range(64)))
    save_model(loaded.model, loaded.tokenizer, tmp_path / "pruned")
    score = _eval_tasks(str(tmp_path / "pruned"))
    assert score["metrics"] == direct_scores(loaded.model, loaded.tokenizer)


def test_table_output(tiny_model_dir, in_task_dir):
    result = runner.invoke(
        app, ["eval", str(tiny_model_dir), "--tasks", TASK, "--include-path", str(TASK_DIR), "--limit", "4"]
    )
    assert result.exit_code == 0, result.output
    assert TASK in result.stdout and "acc_norm" in result.stdout and "--limit 4" in result.stdout


def test_recipe_reports_task_accuracy_of_base_pruned_and_fine_tuned(
    tiny_model_dir, pydoc_text_file, tmp_path, in_task_dir
):
    budget = [
        "--seq-len",
        "32",
        "--calibration-samples",
        "4",
        "--eval-windows",
        "4",
        "--samples",
        "8",
        "--epochs",
        "1",
        "--warmup-steps",
        "0",
        "--batch-size",
        "4",
    ]
    result = runner.invoke(
        app,
        [
            "recipe",
            "safe",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(pydoc_text_file),
            "--eval-dataset",
            str(pydoc_text_file),
            "--out",
            str(tmp_path),
            "--ratio",
            "0.3",
            *budget,
            "--tasks",
            TASK,
            "--include-path",
            str(TASK_DIR),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    base, pruned, tuned = report["rows"]
    assert base["tasks"][TASK] == _eval_tasks(str(tiny_model_dir))["metrics"]
    for row in (pruned, tuned):
        loaded = load_model(row["path"])
        assert row["tasks"][TASK] == direct_scores(loaded.model, loaded.tokenizer)
    assert report["settings"]["tasks"]["tasks"] == [TASK]
    assert f"{TASK} acc" in (tmp_path / f"{tiny_model_dir.name}-safe-30" / "report.txt").read_text()


def test_recipe_checks_the_task_options_before_any_work(tiny_model_dir, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a)
    )
    result = runner.invoke(
        app, ["recipe", "safe", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--tasks", TASK]
    )
    _one_error_line(result, "llmprune[lm-eval]")
    assert not any(tmp_path.iterdir())


def _one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0]


def test_a_real_task_without_its_data_offline_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")  # never a cached copy
    loads = []
    from llmprune.engine import tasks

    load = tasks.TaskEvalConfig.load
    monkeypatch.setattr(tasks.TaskEvalConfig, "load", lambda self, *a: loads.append(1) or load(self, *a))
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--tasks", "arc_easy"])
    _one_error_line(result, "arc_easy", "offline", "--include-path")
    assert loads == []  # the task data is checked before the model is loaded


def test_missing_extra_is_one_line(tiny_model_dir, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a)
    )
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--tasks", TASK])
    _one_error_line(result, "lm-evaluation-harness", "llmprune[lm-eval]")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--tasks", ","], "--tasks"),
        (["--tasks", TASK, "--limit", "0"], "--limit"),
        (["--tasks", TASK, "--num-fewshot", "-1"], "--num-fewshot"),
        (["--tasks", TASK, "--include-path", "/no/such/folder"], "--include-path"),
    ],
)
def test_bad_task_options_are_one_line(tiny_model_dir, args, needle):
    _one_error_line(runner.invoke(app, ["eval", str(tiny_model_dir), *args]), needle)


@pytest.mark.slow
def test_smollm2_accuracy_equals_the_direct_computation(in_task_dir):
    score = _eval_tasks("smollm2-135m", "--batch-size", "4")
    loaded = load_model("smollm2-135m")
    assert score["metrics"] == direct_scores(loaded.model, loaded.tokenizer)
    assert score["metrics"]["acc"] >= 0.7  # it knows most capitals; a random model scores about 0.25
