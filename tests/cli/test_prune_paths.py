"""Which path `llmprune prune` takes (global / plan / streamed), said and recorded; options a path ignores are
errors."""

import json

import pytest
from typer.testing import CliRunner

from llmprune.cli.app import app
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.pruning.config import PruneConfig
from llmprune.engine.pruning.route import choose_path

runner = CliRunner()


def _calib(text_file):
    return ["--dataset", str(text_file), "--importance-samples", "4", "--seq-len", "32", "--batch-size", "2"]


def _prune(model_dir, text_file, tmp_path, *extra):
    return runner.invoke(
        app, ["prune", str(model_dir), *extra, *_calib(text_file), "--log-dir", str(tmp_path / "logs"), "--json"]
    )


@pytest.mark.parametrize(
    ("values", "path", "because"),
    [
        ({}, "global", "default"),
        ({"alpha": 4.0}, "plan", "--alpha"),
        ({"importance_method": "removal"}, "plan", "--importance-method"),
        ({"strategy": "uniform", "layer_end": 3}, "plan", "--pruning-strategy, --layer-end"),
        ({"min_rate": 0.0}, "plan", "--min-pruning-rate"),
        ({"uniform": True}, "plan", "--uniform"),
        ({"attn_unit": "query"}, "plan", "--attn-unit query"),
        ({"allocation": "plan"}, "plan", "--allocation plan"),
        ({"drop_layers": 2}, "global", "default"),
    ],
)
def test_one_function_chooses_the_path_and_says_why(values, path, because):
    chosen = choose_path(PruneConfig(model="some/model", **values))
    assert chosen.name == path
    assert because in chosen.reason


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"alpha": 4.0, "drop_layers": 2}, "--drop-layers is not used by the plan path"),
        ({"alpha": 4.0, "allocation": "global"}, "--alpha belongs to the layer-importance plan"),
        ({"round_to": 8}, "--round-to is not used by the global path"),
        ({"alpha": 4.0, "stream": True}, "--stream is not used by the plan path"),
    ],
)
def test_an_option_the_path_does_not_use_is_an_error(values, needle):
    with pytest.raises(UserInputError) as error:
        choose_path(PruneConfig(model="some/model", **values))
    assert needle in error.value.problem and error.value.hint


def test_depth_only_prune_runs_and_removes_whole_layers(tiny_model_dir, pydoc_text_file, tmp_path):
    # the README's "depth only" form: everything the target leaves is taken by the dropped layers
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, "--drop-layers", "2", "--target-params", "1.0")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["layers"]) == 2 and report["options"]["dropped_layers"]
    assert report["params_after"] < report["params_before"]
    assert report["path"]["name"] == "global"


@pytest.mark.parametrize("extra", [[], ["--alpha", "1"]], ids=["global", "plan"])
def test_ratio_zero_changes_nothing(extra, tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, "--ratio", "0", "--compensation", "none", *extra)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["params_after"] == report["params_before"]
    assert all(layer["before"] == layer["after"] for layer in report["layers"])


def test_the_path_is_printed_and_recorded_in_report_and_provenance(tiny_model_dir, pydoc_text_file, tmp_path):
    out = tmp_path / "model"
    shown = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            "--alpha",
            "2",
            "--ratio",
            "0.3",
            *_calib(pydoc_text_file),
            "--log-dir",
            str(tmp_path / "logs"),
            "--out",
            str(out),
        ],
    )
    assert shown.exit_code == 0, shown.output
    assert "path" in shown.output and "--alpha selects the layer-importance plan" in " ".join(shown.output.split())
    saved = json.loads((out / "llmprune.json").read_text())
    assert saved["pruning"]["path"] == {"name": "plan", "reason": "--alpha selects the layer-importance plan"}
    report = json.loads(next((tmp_path / "logs").rglob("report.json")).read_text())
    assert report["path"]["name"] == "plan"


def test_round_to_on_the_global_path_is_one_line_exit_2(tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, "--round-to", "8")
    assert result.exit_code == 2
    assert "--round-to is not used by the global path" in result.output and "--allocation plan" in result.output
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "extra,score",
    [([], "obs"), (["--alpha", "1"], "fluctuation"), (["--alpha", "1", "--unit-importance", "magnitude"], "magnitude")],
    ids=["global default", "plan default", "asked"],
)
def test_each_path_records_the_unit_score_it_used(extra, score, tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, "--ratio", "0.25", *extra)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["options"]["unit_importance"] == score


def test_the_unit_score_default_depends_on_the_path():
    assert PruneConfig().unit_score_for("global") == "obs"
    assert PruneConfig().unit_score_for("plan") == "fluctuation"
    assert PruneConfig(unit_importance="activation").unit_score_for("plan") == "activation"
