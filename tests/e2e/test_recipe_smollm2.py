"""`llmprune recipe attn-only` end to end on the real SmolLM2-135M, on a handful of short windows."""

import json

import pytest
from typer.testing import CliRunner

from llmprune.cli.app import app
from llmprune.engine.io.architecture import layer_shapes
from llmprune.engine.io.models import load_model

pytestmark = pytest.mark.slow


def test_attn_only_recipe_on_smollm2(wikitext_valid, wikitext_test, tmp_path):
    try:
        load_model("smollm2-135m")
    except Exception as error:  # the package is installed by `make install`
        pytest.skip(f"smollm2-135m unavailable: {error}")
    result = CliRunner().invoke(
        app,
        [
            "recipe",
            "attn-only",
            "--dataset",
            str(wikitext_valid),
            "--eval-dataset",
            str(wikitext_test),
            "--out",
            str(tmp_path),
            # one-pass importance and two windows everywhere keep this to seconds of compute
            "--importance",
            "block-influence",
            "--seq-len",
            "64",
            "--calibration-samples",
            "2",
            "--eval-windows",
            "2",
            "--batch-size",
            "2",
            "--samples",
            "2",
            "--epochs",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    base, pruned, tuned = report["rows"]
    assert report["status"] == "done" and 10 < base["ppl"] < 200
    assert 0.02 < pruned["share_removed"] < 0.2 and pruned["verdict"] in ("healthy", "acceptable")
    shapes = layer_shapes(load_model(tuned["path"]).model)
    assert {shape.intermediate_size for shape in shapes} == {1536}  # attention only: the MLP is untouched
    assert all(shape.num_attention_heads % shape.num_key_value_heads == 0 for shape in shapes)
    assert sum(shape.num_key_value_heads for shape in shapes) < 30 * 3
