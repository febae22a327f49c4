"""`llmprune analyze` / `llmprune prune` end to end on tiny models: outputs, reloading, bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import llmprune
from llmprune.cli.app import app
from llmprune.engine.data import load_calibration_windows
from llmprune.engine.io.architecture import layer_shapes
from llmprune.engine.io.checkpoint import save_model
from llmprune.engine.pruning.allocate.plan import PlanOptions, layer_rates, unit_counts
from llmprune.engine.pruning.analysis import CalibrationOptions
from llmprune.engine.pruning.cut.prune_model import prune_model
from llmprune.engine.pruning.pipeline import PruneConfig, run_prune
from tests.conftest import make_tiny_model

runner = CliRunner()
IDS = torch.tensor([[1, 5, 9, 33, 200, 17, 4, 8, 90, 12, 3, 250]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _calib(text_file):
    return ["--dataset", str(text_file), "--importance-samples", "6", "--seq-len", "32", "--batch-size", "3"]


def _eval(text_file):
    return ["--test-after-prune", "--eval-dataset", str(text_file), "--eval-seq-len", "32", "--max-windows", "4"]


@pytest.fixture(scope="module")
def tiny_3to1_dir(tmp_path_factory, tiny_tokenizer):
    directory = tmp_path_factory.mktemp("tiny-3to1")
    make_tiny_model(heads=9, kv_heads=3, hidden=72, layers=5).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def _fresh_process_logits(directories, tmp_path):
    """AutoModelForCausalLM.from_pretrained in one new interpreter that never imports llmprune.

    `directories`: (path, trust_remote_code) pairs; one process for all, because starting
    Python with torch and transformers costs seconds.
    """
    out = tmp_path / "fresh_logits.pt"
    script = (
        "import json, sys, torch; from transformers import AutoModelForCausalLM\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "logits = []\n"
        "for path, trust in json.loads(sys.argv[1]):\n"
        "    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust).eval()\n"
        "    logits.append(m(input_ids=ids, use_cache=False).logits.detach())\n"
        "torch.save(logits, sys.argv[2])\n"
    )
    pairs = json.dumps([[str(path), trust] for path, trust in directories])
    subprocess.run([sys.executable, "-c", script, pairs, str(out)], check=True, capture_output=True, cwd=tmp_path)
    return torch.load(out, weights_only=True)


def _prune_and_save(directory, tokenizer, text_file, out, uniform=False):
    model = llmprune.load_model(str(directory)).model
    windows = load_calibration_windows(tokenizer, str(text_file), 6, 32)
    count = len(model.model.layers)
    options = (
        PlanOptions(ratio=0.5, strategy="uniform", layer_start=0, layer_end=count)
        if uniform
        else PlanOptions(ratio=0.5)
    )
    rates = layer_rates([1.0, 0.3, 0.1, 0.2, 0.9][:count], options)
    prune_model(model, unit_counts(rates, layer_shapes(model), prune_mlp=True, same_in_every_layer=uniform), windows)
    save_model(model, tokenizer, out, provenance={"base_model": str(directory)})
    return _logits(model)


def test_saved_pruned_models_reload_with_identical_logits(
    tiny_model_dir, tiny_3to1_dir, tiny_tokenizer, pydoc_text_file, tmp_path
):
    cases = [  # (base, uniform): GQA 4:1 and 3:1, non-uniform (remote code) and uniform (stock Llama)
        (tiny_model_dir, False),
        (tiny_3to1_dir, False),
        (tiny_3to1_dir, True),
    ]
    saved, in_memory = [], []
    for number, (base, uniform) in enumerate(cases):
        out = tmp_path / f"pruned{number}"
        in_memory.append(_prune_and_save(base, tiny_tokenizer, pydoc_text_file, out, uniform))
        config = json.loads((out / "config.json").read_text())
        assert ("auto_map" in config) == (not uniform) and ("layer_shapes" in config) == (not uniform)
        assert (out / "modeling_llmprune.py").exists() == (not uniform)
        # (a) one call of the Python API
        assert torch.equal(_logits(llmprune.load_model(str(out)).model), in_memory[-1])
        # a stock config must load without remote code
        saved.append((out, not uniform))
    # (b) a fresh process, AutoModelForCausalLM only
    for fresh, expected in zip(_fresh_process_logits(saved, tmp_path), in_memory, strict=False):
        assert torch.equal(fresh, expected)


def test_prune_cli_report_log_and_eval_of_the_saved_model(tiny_model_dir, pydoc_text_file, tmp_path):
    out, logs = tmp_path / "model", tmp_path / "logs"
    args = [
        "prune",
        str(tiny_model_dir),
        "--ratio",
        "0.5",
        "--prune-mlp",
        "--allocation",
        "plan",
        *_calib(pydoc_text_file),
        *_eval(pydoc_text_file),
        "--out",
        str(out),
        "--log-dir",
        str(logs),
        "--save-ckpt-log-name",
        "run",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gqa_violations"] == [] and report["gqa"] == "all layers keep 4:1"
    assert report["params_after"] < report["params_before"]
    assert report["removed_share"] == pytest.approx(1 - report["params_after"] / report["params_before"])
    shapes_after = [layer["after"] for layer in report["layers"]]
    assert shapes_after[0]["num_key_value_heads"] == 2 and shapes_after[-1]["intermediate_size"] == 128  # protected

    # (c) llmprune eval DIR measures what the in-memory pruned model measured
    evaluated = runner.invoke(
        app, ["eval", str(out), "--dataset", str(pydoc_text_file), "--seq-len", "32", "--max-windows", "4", "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ppl"] == pytest.approx(report["ppl_after"]["ppl"], rel=1e-6)

    record = json.loads((out / "llmprune.json").read_text())
    assert record["base_model"] == str(tiny_model_dir)
    assert record["ppl_before"] == pytest.approx(report["ppl_before"]["ppl"]) and math.isfinite(record["ppl_after"])
    assert (record["dataset"], record["seq_len"], record["max_windows"]) == (str(pydoc_text_file), 32, 4)
    assert record["pruning"]["rates"] == report["rates"]
    (run_dir,) = list((logs / "run").iterdir())
    log_text = (run_dir / "training.log").read_text()
    assert "PPL before" in log_text and "PPL after" in log_text and "GQA: all layers keep 4:1" in log_text
    assert json.loads((run_dir / "report.json").read_text())["params_after"] == report["params_after"]


def test_uniform_cli_export_has_one_shape(tiny_model_dir, pydoc_text_file, tmp_path):
    out = tmp_path / "uniform"
    result = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            "--uniform",
            "--ratio",
            "0.5",
            "--prune-mlp",
            *_calib(pydoc_text_file),
            "--out",
            str(out),
            "--log-dir",
            str(tmp_path / "logs"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "layer_shapes" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 1, 64)
    # compensation biases make the stock config demand zero sibling biases: the report counts what transformers counts
    from transformers import AutoModelForCausalLM

    assert config["attention_bias"] and config["mlp_bias"]
    counted = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(out)).parameters())
    assert (
        json.loads(result.stdout)["params_after"]
        == counted
        == json.loads((out / "llmprune.json").read_text())["num_parameters"]
    )


def test_analyze_then_prune_reuses_the_scores(tiny_model_dir, pydoc_text_file, tmp_path):
    plan_file = tmp_path / "plan" / "layer_importance_config.json"
    analyzed = runner.invoke(
        app,
        ["analyze", str(tiny_model_dir), *_calib(pydoc_text_file), "--ratio", "0.4", "-o", str(plan_file), "--json"],
    )
    assert analyzed.exit_code == 0, analyzed.output
    data = json.loads(analyzed.stdout)
    assert plan_file.is_file() and plan_file.with_suffix(".png").stat().st_size > 1000
    assert data["plan"]["protected_layers"] == [0, 3] and data["plan"]["rates"][0] == 0
    assert json.loads(plan_file.read_text())["importance"]["scores"] == data["importance"]["scores"]

    result = run_prune(
        PruneConfig(
            model=str(tiny_model_dir),
            importance_config=plan_file,
            prune_mlp=True,
            calibration=CalibrationOptions(dataset=str(pydoc_text_file), samples=6, seq_len=32),
            log_dir=tmp_path / "logs",
        )
    )
    assert result.importance == data["importance"]["scores"] and result.importance_method == "removal"
    assert result.ratio == 0.4  # the plan options of the file are the defaults
    assert result.rates == pytest.approx(data["plan"]["rates"])


def test_analyze_table_and_bar_chart(tiny_model_dir, pydoc_text_file, tmp_path):
    result = runner.invoke(
        app,
        [
            "analyze",
            str(tiny_model_dir),
            *_calib(pydoc_text_file),
            "--importance-method",
            "block-influence",
            "-o",
            str(tmp_path / "c.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "protected" in result.output and "█" in result.output and "block-influence" in result.output


def test_target_params_lands_within_one_percent(tiny_3to1_dir, pydoc_text_file, tmp_path):
    result = runner.invoke(
        app,
        [
            "prune",
            str(tiny_3to1_dir),
            "--target-params",
            "0.85",
            "--prune-mlp",
            *_calib(pydoc_text_file),
            "--log-dir",
            str(tmp_path / "logs"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    target = 0.85 * report["params_before"]
    assert abs(report["params_after"] - target) <= 0.01 * target
    assert report["target_params"] == round(target) and 0 < report["ratio"] < 0.8


def test_query_unit_keeps_every_kv_head(tiny_3to1_dir, pydoc_text_file, tmp_path):
    result = runner.invoke(
        app,
        [
            "prune",
            str(tiny_3to1_dir),
            "--ratio",
            "0.34",
            "--attn-unit",
            "query",
            "--unit-importance",
            "magnitude",
            *_calib(pydoc_text_file),
            "--log-dir",
            str(tmp_path / "logs"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert all(layer["after"]["num_key_value_heads"] == 3 for layer in layers)
    assert any(layer["after"]["num_attention_heads"] == 6 for layer in layers)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=384)).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--ratio", "1.0"], "--ratio must lie in [0, 1)"),
        (["--ratio", "-0.2"], "--ratio must lie in [0, 1)"),
        (["--min-pruning-rate", "0.5", "--max-pruning-rate", "0.2"], "min-pruning-rate"),
        (["--layer-start", "3", "--layer-end", "2"], "layer range"),
        (["--layer-end", "9"], "layer range"),
        (["--ratio", "0.9"], "cannot be met"),
        (["--ratio", "0.2", "--target-params", "0.8"], "both given"),
        (["--target-params", "100"], "cannot be reached"),
        (["--attn-unit", "heads"], "--attn-unit"),
        (["--unit-importance", "random"], "--unit-importance"),
        (["--importance-config", "/no/such.json"], "not found"),
        (["--model-is-gpt2"], "not a Llama-style"),
        (["--other-model-config"], "another model"),
        (["--test-after-prune", "--eval-seq-len", "1"], "--eval-seq-len must be an integer ≥ 2"),
        (["--test-after-prune", "--max-windows", "0"], "--max-windows must be ≥ 1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    extra, needle, tiny_model_dir, tiny_3to1_dir, gpt2_dir, pydoc_text_file, tmp_path
):
    model = str(tiny_model_dir)
    if extra == ["--model-is-gpt2"]:
        model, extra = str(gpt2_dir), []
    if extra == ["--other-model-config"]:
        plan_file = tmp_path / "plans" / "other.json"
        made = runner.invoke(app, ["analyze", str(tiny_3to1_dir), *_calib(pydoc_text_file), "-o", str(plan_file)])
        assert made.exit_code == 0, made.output
        extra = ["--importance-config", str(plan_file)]
    logs, out = tmp_path / "logs", tmp_path / "out"
    result = runner.invoke(
        app,
        ["prune", model, *extra, "--prune-mlp", *_calib(pydoc_text_file), "--log-dir", str(logs), "--out", str(out)],
    )
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    assert not logs.exists() and not out.exists()


def test_analyze_bad_input_writes_nothing(tiny_model_dir, pydoc_text_file, tmp_path):
    target = tmp_path / "c.json"
    result = runner.invoke(
        app, ["analyze", str(tiny_model_dir), *_calib(pydoc_text_file), "--alpha", "-1", "-o", str(target)]
    )
    assert result.exit_code == 2 and "--alpha" in result.output
    assert not target.exists() and not target.with_suffix(".png").exists()


def test_streamed_prune_of_a_damaged_safetensors_is_one_line_exit_2(tiny_model_dir, pydoc_text_file, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    (damaged / "model.safetensors").write_bytes(b"\x05\x00garbage")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "prune",
            str(damaged),
            "--stream",
            *_calib(pydoc_text_file),
            "--out",
            str(out),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "not a readable safetensors file" in result.output and "Traceback" not in result.output
    assert not out.exists()
