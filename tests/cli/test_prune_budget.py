"""The size of a prune: one budget read from the options, two reported shares, one parameter-cost model.

Every path (global in memory, plan, streamed, depth) reports the share of the prunable parameters and the share of
all parameters it removed, under two names, in --json, report.json, llmprune.json and the table; the cost model's
count of the saved model's layers equals the parameters the saved model really has.
"""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from llmprune.cli.app import app
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.data import load_calibration_windows
from llmprune.engine.io.architecture import layer_shapes
from llmprune.engine.pruning.allocate.budget import Budget, resolve_budget
from llmprune.engine.pruning.allocate.cost import ParameterCost
from tests.conftest import make_tiny_model

runner = CliRunner()

PATHS = {
    "global": ["--ratio", "0.3"],
    "global-target": ["--target-params", "0.8"],
    "plan": ["--importance-method", "removal", "--pruning-strategy", "inverse", "--ratio", "0.3"],
    "uniform": ["--uniform", "--ratio", "0.3", "--prune-mlp"],
    "streamed": ["--stream", "--ratio", "0.3"],
    "depth": ["--drop-layers", "1", "--ratio", "0.3"],
}


def _prune(model_dir, text_file, tmp_path, *extra, as_json=True):
    calib = ["--dataset", str(text_file), "--importance-samples", "4", "--seq-len", "32", "--batch-size", "2"]
    args = ["prune", str(model_dir), *extra, *calib, "--log-dir", str(tmp_path / "logs"), "--out", str(tmp_path / "m")]
    return runner.invoke(app, [*args, "--json"] if as_json else args)


def _prunable(layer_shape: dict, hidden: int, mlp: bool = True) -> int:
    """KV groups + MLP channels of one layer, counted from the shape alone (no biases in the tiny model)."""
    attention = (
        hidden
        * layer_shape["head_dim"]
        * (2 * layer_shape["num_attention_heads"] + 2 * layer_shape["num_key_value_heads"])
    )
    return attention + (3 * hidden * layer_shape["intermediate_size"] if mlp else 0)


@pytest.mark.parametrize("path", list(PATHS))
def test_both_shares_are_reported_everywhere_and_mean_what_they_say(path, tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, *PATHS[path])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    assert report["removed_share"] == pytest.approx(1 - report["params_after"] / report["params_before"])
    # the prunable share, counted independently from the layers the report lists (a dropped layer: all removed)
    original = layer_shapes(make_tiny_model())
    after = {layer["index"]: layer["after"] for layer in report["layers"]}
    plan = path in ("plan", "uniform")
    layers = range(len(original)) if path != "plan" else range(1, len(original) - 1)  # the plan protects the ends
    mlp = path != "plan"  # the plan prunes MLP channels only with --prune-mlp
    before = sum(_prunable(original[i].to_dict(), hidden, mlp) for i in layers)
    now = sum(_prunable(after[i], hidden, mlp) for i in layers if i in after)
    assert report["removed_share_prunable"] == pytest.approx(1 - now / before)
    assert 0 < report["removed_share_prunable"] < 1 and 0 < report["removed_share"] < report["removed_share_prunable"]
    if path == "global-target":  # the budget as a share of the prunable parameters, like --ratio
        full = sum(_prunable(s.to_dict(), hidden) for s in original)
        assert report["ratio"] == pytest.approx((report["params_before"] - report["target_params"]) / full)
    elif not plan:
        assert report["ratio"] == 0.3
    for recorded in (
        json.loads(next((tmp_path / "logs").rglob("report.json")).read_text()),
        json.loads((tmp_path / "m" / "llmprune.json").read_text())["pruning"],
    ):
        assert recorded["removed_share_prunable"] == report["removed_share_prunable"]
        assert recorded["removed_share"] == report["removed_share"]
        assert recorded["ratio"] == report["ratio"]


def test_the_table_shows_both_shares(tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, "--ratio", "0.3", as_json=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "of the prunable parameters," in text and "of all parameters" in text


@pytest.mark.parametrize("path", ["global", "plan", "uniform", "streamed", "depth"])
def test_the_cost_model_counts_the_saved_model_exactly(path, tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, *PATHS[path])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    real = sum(p.numel() for p in saved.parameters())
    # the original model's cost model, told each original layer's new shape (None: dropped)
    cost = ParameterCost.of_model(make_tiny_model())
    first = saved.model.layers[0]
    if path == "uniform":  # a stock config: every projection saved with a (zero) bias
        assert first.self_attn.q_proj.bias is not None and first.mlp.gate_proj.bias is not None
        cost = cost.with_biases(qkv_bias=True, mlp_bias=True)
    after = [None] * cost.num_layers
    for change, shape in zip(report["layers"], layer_shapes(saved), strict=True):
        after[change["index"]] = shape
    assert cost.count_shapes(after) == real == report["params_after"]
    assert (None in after) == (path == "depth")


def test_the_cost_of_units_and_layers_adds_up_to_the_module():
    model = make_tiny_model(heads=9, kv_heads=3, hidden=72)
    cost = ParameterCost.of_model(model)
    layer = model.model.layers[1]
    assert cost.layer(1) == sum(p.numel() for p in layer.parameters())
    assert cost.layer(1, removed=True) == 0
    assert cost.layer(1) - cost.layer(1, kv_groups=2) == cost.kv_group(1)
    assert cost.layer(1) - cost.layer(1, mlp_channels=cost.shapes[1].intermediate_size - 5) == 5 * cost.mlp_channel(1)
    assert cost.layer(1, output_biases=True) - cost.layer(1) == cost.missing_output_biases(1) == 2 * 72
    assert cost.count([None] * cost.num_layers) == cost.total == sum(p.numel() for p in model.parameters())
    tied = make_tiny_model(tie_word_embeddings=True)
    assert ParameterCost.of_model(tied).outside_layers == tied.model.embed_tokens.weight.numel() + 64  # + final norm


@pytest.mark.parametrize(
    ("ratio", "target", "drop"),
    [
        (None, "0", 0),
        (None, "-5", 0),
        (None, "nan", 0),
        (None, "abc", 0),
        (None, "", 0),
        (float("nan"), None, 0),
        (-0.1, None, 0),
        (1.0, None, 0),
        (0.2, "0.8", 0),
        (None, None, -1),
    ],
)
def test_a_bad_budget_is_one_user_error(ratio, target, drop):
    with pytest.raises(UserInputError) as error:
        resolve_budget(ratio, target, drop)
    assert error.value.problem and error.value.hint


@pytest.mark.parametrize(
    "args",
    [
        ["--target-params", "0"],
        ["--target-params", "-5"],
        ["--target-params", "nan"],
        ["--target-params", "lots"],
        ["--ratio", "nan"],
        ["--ratio", "-0.5"],
        ["--drop-layers", "-1"],
    ],
)
def test_a_bad_budget_on_the_command_line_is_one_line_and_exit_2(args, tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, *args, as_json=False)
    assert result.exit_code == 2
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2
    assert not (tmp_path / "m").exists()


def test_the_budget_resolves_targets_and_ratios():
    assert resolve_budget(None, None) == Budget()
    assert resolve_budget(None, None).resolved_ratio == 0.2  # the default ratio
    assert resolve_budget(None, "110M").target(200_000_000) == 110_000_000
    assert resolve_budget(None, "0.8", 2) == Budget(keep_fraction=0.8, drop_layers=2)
    assert resolve_budget(None, "0.8").target(1000) == 800
    with pytest.raises(UserInputError):
        resolve_budget(None, "2B").target(1_000_000)  # larger than the model
    cost = ParameterCost.of_model(make_tiny_model())
    assert resolve_budget(0.5, None).params_to_remove(cost) == int(0.5 * cost.prunable())
    assert resolve_budget(None, "0.9").params_to_remove(cost) == cost.total - round(0.9 * cost.total)
    assert not math.isnan(resolve_budget(0.0, None).resolved_ratio)


def test_a_refit_held_to_few_windows_says_how_many_a_plain_refit_needs(tiny_model_dir, pydoc_text_file, tmp_path):
    # 4 windows x 32 tokens = 128 tokens for the tiny model's kept MLP channels (about 100): under 4 per input
    held = ("--ratio", "0.3", "--refit-samples", "4")
    report = json.loads(_prune(tiny_model_dir, pydoc_text_file, tmp_path, *held).output)
    short = report["refit_calibration"]
    widest = max(layer["after"]["intermediate_size"] for layer in report["layers"])
    assert report["options"]["refit_samples"] == 4
    assert short["tokens"] == 128 and short["widest_kept_inputs"] >= widest
    assert short["tokens_per_kept_input"] == pytest.approx(128 / short["widest_kept_inputs"])
    # that many windows of 32 tokens give the widest projection its 4 tokens per kept input, one fewer does not
    needed = short["samples_for_plain_refit"]
    assert needed * 32 >= 4 * short["widest_kept_inputs"] > (needed - 1) * 32
    table = _prune(tiny_model_dir, pydoc_text_file, tmp_path / "table", *held, as_json=False).output
    assert f"--refit-samples {needed}" in " ".join(table.split())


def test_by_default_the_refit_draws_the_windows_it_needs(tiny_model_dir, pydoc_text_file, tmp_path):
    # the same prune as above, --refit-samples left out: short of 4 tokens per kept input, the refit is fitted on
    # windows of its own, enough for 8 per kept input of its widest projection, while the units are still chosen
    # on the 4 windows
    report = json.loads(_prune(tiny_model_dir, pydoc_text_file, tmp_path, "--ratio", "0.3").output)
    refitted = [layer for layer in report["layers"] if layer["compensation"]]
    widths = {
        "down_proj": lambda a: a["intermediate_size"],
        "o_proj": lambda a: a["num_attention_heads"] * a["head_dim"],
    }
    widest = max(widths[name](layer["after"]) for layer in refitted for name in layer["compensation"])
    assert report["options"]["calibration"]["samples"] == 4
    assert report["options"]["refit_samples"] * 32 >= 8 * widest > (report["options"]["refit_samples"] - 1) * 32
    assert report["refit_calibration"] is None
    assert all(ran == "lstsq" for layer in refitted for ran in layer["compensation"].values())
    table = " ".join(
        _prune(tiny_model_dir, pydoc_text_file, tmp_path / "table", "--ratio", "0.3", as_json=False).output.split()
    )
    assert f"least squares on {report['options']['refit_samples']} calibration windows" in table


def test_a_refit_with_enough_calibration_reports_no_shortfall(tiny_model_dir, pydoc_text_file, tmp_path):
    calib = ["--dataset", str(pydoc_text_file), "--importance-samples", "40", "--seq-len", "32", "--batch-size", "8"]
    args = ["prune", str(tiny_model_dir), "--ratio", "0.3", *calib, "--out", str(tmp_path / "m"), "--json"]
    result = runner.invoke(app, [*args, "--log-dir", str(tmp_path / "logs")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["refit_calibration"] is None


def test_where_the_refit_windows_come_from(tiny_tokenizer, pydoc_text_file):
    from llmprune.engine.pruning.config import CalibrationOptions, PruneConfig
    from llmprune.engine.pruning.pipeline import refit_windows

    def config(refit=None):
        calibration = CalibrationOptions(dataset=str(pydoc_text_file), samples=4, refit_samples=refit, seq_len=32)
        return PruneConfig(calibration=calibration)

    cpu = torch.device("cpu")
    grows = refit_windows(config(), tiny_tokenizer, cpu, streamed=False)
    assert grows(4) is None  # the calibration is enough: the refit stays on it
    drawn = grows(10)
    assert drawn.shape == (10, 32)
    # the same seeded draw as the calibration: its first windows are the calibration's
    calibration = load_calibration_windows(tiny_tokenizer, str(pydoc_text_file), 4, 32, 0).ids
    assert torch.equal(drawn[:4], calibration)
    # streamed on the CPU the refit stays on the calibration windows unless asked
    assert refit_windows(config(), tiny_tokenizer, cpu, streamed=True) is None
    assert refit_windows(config(refit=4), tiny_tokenizer, cpu, streamed=False) is None
    held = refit_windows(config(refit=6), tiny_tokenizer, cpu, streamed=True)
    assert held(100).shape == (6, 32)


def test_a_bad_refit_calibration_is_one_line_and_exit_2(tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, "--refit-samples", "0", as_json=False)
    assert result.exit_code == 2
    assert "--refit-samples" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2


def test_the_plan_path_refit_draws_its_windows_too(tiny_model_dir, pydoc_text_file, tmp_path):
    args = ("--allocation", "plan", "--prune-mlp", "--compensation", "lstsq", "--ratio", "0.3")
    report = json.loads(_prune(tiny_model_dir, pydoc_text_file, tmp_path, *args).output)
    assert report["options"]["calibration"]["samples"] == 4 < report["options"]["refit_samples"]
    assert report["refit_calibration"] is None


@pytest.mark.parametrize(
    "path",
    [
        (),
        ("--allocation", "plan", "--prune-mlp", "--compensation", "lstsq"),
        ("--allocation", "search", "--search-windows", "16", "--search-budget", "2000"),
    ],
    ids=["global", "plan", "search"],
)
def test_residual_correction_runs_on_every_path_and_is_reported(path, tiny_model_dir, pydoc_text_file, tmp_path):
    args = ("--ratio", "0.3", *path, "--residual-correction", "0.5")
    report = json.loads(_prune(tiny_model_dir, pydoc_text_file, tmp_path, *args).output)
    assert report["options"]["residual_correction"] == 0.5
    assert all(ran == "lstsq" for layer in report["layers"] for ran in layer["compensation"].values())
    table = " ".join(_prune(tiny_model_dir, pydoc_text_file, tmp_path / "table", *args, as_json=False).output.split())
    assert "took away 50% of the pruned model's gap" in table


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--residual-correction", "1.5"], "between 0 and 1"),
        (["--residual-correction", "nan"], "between 0 and 1"),
        (["--residual-correction", "-0.1"], "between 0 and 1"),
        (["--residual-correction", "0.5", "--compensation", "bias"], "least-squares refit"),
    ],
)
def test_a_bad_residual_correction_is_one_line_and_exit_2(extra, needle, tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, *extra, as_json=False)
    assert result.exit_code == 2
    assert needle in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2
