"""analyze/prune end to end on the real SmolLM2-135M (GQA 3:1), on a handful of short windows."""

import json
import math

import pytest
from typer.testing import CliRunner

from llmprune.cli.app import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_fast_removal_scores_equal_the_naive_ones(smollm2, wikitext_valid):
    from llmprune.engine.data import load_calibration_windows
    from llmprune.engine.pruning.scores.layer_importance import layer_importance, removal_importance_naive

    windows = load_calibration_windows(smollm2.tokenizer, str(wikitext_valid), 2, 32)
    fast = layer_importance(smollm2.model, windows, "removal")
    naive = removal_importance_naive(smollm2.model, windows)
    assert fast.scores == pytest.approx(naive.scores, abs=1e-4)
    assert fast.layer_passes < 0.55 * naive.layer_passes
    # the first layer of a trained model matters far more than a middle one
    assert fast.scores[0] > 5 * abs(fast.scores[15])


def test_prune_20_percent_keeps_3_to_1_and_the_saved_model_evaluates_the_same(
    smollm2, wikitext_valid, wikitext_test, tmp_path
):
    out = tmp_path / "pruned"
    args = [
        "prune",
        "smollm2-135m",
        "--ratio",
        "0.2",
        "--prune-mlp",
        "--importance-method",
        "block-influence",
        "--dataset",
        str(wikitext_valid),
        "--importance-samples",
        "4",
        "--seq-len",
        "64",
        "--test-after-prune",
        "--eval-dataset",
        str(wikitext_test),
        "--eval-seq-len",
        "128",
        "--max-windows",
        "4",
        "--out",
        str(out),
        "--log-dir",
        str(tmp_path / "logs"),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gqa"] == "all layers keep 3:1"
    assert 0.1 < report["removed_share"] < 0.25
    before, after = report["ppl_before"]["ppl"], report["ppl_after"]["ppl"]
    assert math.isfinite(after) and before < after < 20 * before
    evaluated = runner.invoke(
        app, ["eval", str(out), "--dataset", str(wikitext_test), "--seq-len", "128", "--max-windows", "4", "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ppl"] == pytest.approx(after, rel=1e-5)
