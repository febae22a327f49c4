"""Layer-streamed pruning gives the same model as the in-memory path, one layer in memory at a time."""

from __future__ import annotations

import json

import torch
from conftest import make_tiny_model

from llmprune.engine.io.architecture import layer_shapes
from llmprune.engine.io.models import load_model
from llmprune.engine.pruning.global_path import CalibratedPruneOptions, InMemoryLayers, LayerRunner, prune_to_target
from llmprune.engine.walk.streaming import StreamedLayers

SEQ = 32


def _ids() -> torch.Tensor:
    return torch.randint(0, 384, (12, SEQ), generator=torch.Generator().manual_seed(0))


def _in_memory(options: CalibratedPruneOptions, share: float):
    model = make_tiny_model()  # the same weights as tiny_model_dir
    runner = LayerRunner(model.config, model.model.rotary_emb, SEQ, torch.device("cpu"), torch.float32)
    target = int(share * sum(p.numel() for p in model.parameters()))
    _, plans, reports, _ = prune_to_target(InMemoryLayers(model), _ids(), runner, target, options)
    return model, plans, reports, target


def _streamed(directory, out, options, target, tokenizer):
    store = StreamedLayers(directory, output=out)
    _, plans, reports, _ = prune_to_target(store, _ids(), store.runner(SEQ), target, options)
    # every layer went back to `meta` after being written: nothing of the model stays in memory
    assert all(p.device.type == "meta" for p in store.skeleton.model.layers.parameters())
    store.finish_output(tokenizer, {"pruned": "streamed"})
    return plans, reports


def test_streamed_prune_equals_in_memory_prune(tiny_model_dir, tiny_tokenizer, tmp_path):
    options = CalibratedPruneOptions()
    model, plans, reports, target = _in_memory(options, 0.25)
    streamed_plans, streamed_reports = _streamed(tiny_model_dir, tmp_path / "streamed", options, target, tiny_tokenizer)
    assert streamed_plans == plans
    assert [r.kept_groups for r in streamed_reports] == [r.kept_groups for r in reports]

    reloaded = load_model(str(tmp_path / "streamed"))
    assert reloaded.kind == "llmprune" and reloaded.provenance["pruned"] == "streamed"
    assert layer_shapes(reloaded.model) == layer_shapes(model)
    ids = _ids()[:4]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_streamed_uniform_export_is_a_stock_llama(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    options = CalibratedPruneOptions(compensation="bias", allocation="even-mlp", attention=False)
    model, _, _, target = _in_memory(options, 0.15)
    _streamed(tiny_model_dir, tmp_path / "stock", options, target, tiny_tokenizer)
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert "layer_shapes" not in config and config["mlp_bias"] is True
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock")
    ids = _ids()[:4]
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_a_failed_stream_leaves_no_output(tiny_model_dir, tmp_path):
    store = StreamedLayers(tiny_model_dir, output=tmp_path / "never")
    store.begin_pruning()
    store.release(0, store.load(0), changed=False)
    store.abort_output(RuntimeError("stopped"))
    assert not (tmp_path / "never").exists()


def test_prune_cli_streams_and_matches_the_in_memory_default(tiny_model_dir, pydoc_text_file, tmp_path):
    from typer.testing import CliRunner

    from llmprune.cli.app import app

    common = [
        "--target-params",
        "0.8",
        "--dataset",
        str(pydoc_text_file),
        "--importance-samples",
        "8",
        "--refit-samples",  # the refit's own windows walk through the streamed layers too
        "12",
        "--seq-len",
        "32",
        "--log-dir",
        str(tmp_path / "logs"),
        "--json",
    ]
    runner = CliRunner()
    streamed = runner.invoke(app, ["prune", str(tiny_model_dir), "--stream", "--out", str(tmp_path / "s"), *common])
    assert streamed.exit_code == 0, streamed.output
    in_memory = runner.invoke(app, ["prune", str(tiny_model_dir), "--no-stream", "--out", str(tmp_path / "m"), *common])
    assert in_memory.exit_code == 0, in_memory.output
    report_s, report_m = json.loads(streamed.stdout), json.loads(in_memory.stdout)
    assert report_s["params_after"] == report_m["params_after"] <= 0.8 * report_m["params_before"]
    assert report_s["options"]["refit_samples"] == report_m["options"]["refit_samples"] == 12
    assert [layer["after"] for layer in report_s["layers"]] == [layer["after"] for layer in report_m["layers"]]
    a, b = load_model(str(tmp_path / "s")).model, load_model(str(tmp_path / "m")).model
    assert sum(p.numel() for p in a.parameters()) == report_s["params_after"]
    ids = _ids()[:2]
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=1e-5)


def test_stream_refuses_what_needs_the_model_in_memory(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from llmprune.cli.app import app

    result = CliRunner().invoke(
        app, ["prune", str(tiny_model_dir), "--stream", "--test-after-prune", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "--stream" in result.output
    assert not (tmp_path / "x").exists()


def test_streamed_layer_importance_equals_the_in_memory_scores(tiny_model_dir):
    import pytest

    from llmprune.engine.data import TokenWindows
    from llmprune.engine.pruning.scores.layer_importance import layer_importance
    from llmprune.engine.pruning.scores.layer_importance_streamed import streamed_layer_importance

    windows = TokenWindows(_ids()[:6], "random", 6 * SEQ)
    model = make_tiny_model()
    for method in ("removal", "block-influence"):
        expected = layer_importance(model, windows, method, batch_size=3)
        got = streamed_layer_importance(StreamedLayers(tiny_model_dir), windows, method, batch_size=3)
        assert got.scores == pytest.approx(expected.scores, rel=1e-4, abs=1e-6)
        assert got.base_loss == pytest.approx(expected.base_loss, rel=1e-6)


def test_analyze_cli_streams_to_the_same_scores(tiny_model_dir, pydoc_text_file, tmp_path):
    import pytest
    from typer.testing import CliRunner

    from llmprune.cli.app import app

    common = [
        str(tiny_model_dir),
        "--dataset",
        str(pydoc_text_file),
        "--importance-samples",
        "4",
        "--seq-len",
        "32",
        "--json",
    ]
    runner = CliRunner()
    streamed = runner.invoke(app, ["analyze", *common, "--stream", "-o", str(tmp_path / "s.json")])
    in_memory = runner.invoke(app, ["analyze", *common, "-o", str(tmp_path / "m.json")])
    assert streamed.exit_code == 0 and in_memory.exit_code == 0, streamed.output + in_memory.output
    s, m = json.loads((tmp_path / "s.json").read_text()), json.loads((tmp_path / "m.json").read_text())
    assert s["importance"]["scores"] == pytest.approx(m["importance"]["scores"], rel=1e-4, abs=1e-6)
    assert s["architecture"] == m["architecture"]
    refused = runner.invoke(
        app, ["analyze", *common, "--stream", "--importance-method", "taylor", "-o", str(tmp_path / "t.json")]
    )
    assert refused.exit_code == 2 and not (tmp_path / "t.json").exists()
