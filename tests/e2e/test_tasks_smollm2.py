"""lm-eval task accuracy on the real SmolLM2-135M equals the direct log-likelihood computation."""

import pytest

from llmprune.engine.io.models import load_model
from tests.unit.test_tasks import TASK_DIR, _eval_tasks, direct_scores

pytest.importorskip("lm_eval")


@pytest.mark.slow
def test_smollm2_accuracy_equals_the_direct_computation(monkeypatch):
    monkeypatch.chdir(TASK_DIR)  # lm-eval reads the task's data path relative to the working directory
    score = _eval_tasks("smollm2-135m", "--batch-size", "4")
    loaded = load_model("smollm2-135m")
    assert score["metrics"] == direct_scores(loaded.model, loaded.tokenizer)
    assert score["metrics"]["acc"] >= 0.7  # it knows most capitals; a random model scores about 0.25
