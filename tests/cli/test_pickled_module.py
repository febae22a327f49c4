"""A whole pickled module, as LLM-Pruner saves it, read as it is: config, tokenizer and per-layer shapes from the
object.

LLM-Pruner shrinks the layers of a LlamaForCausalLM in place (the config still
describes the original model) and saves torch.save({'model': model, 'tokenizer':
tokenizer}). The pickle here is written by the test only; llmprune never writes one.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from single_thread import one_thread  # noqa: F401  (autouse fixture)
from typer.testing import CliRunner

from llmprune.cli.app import app
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.architecture import layer_shapes
from llmprune.engine.io.models import load_model
from llmprune.engine.pruning.cut.surgery import prune_kv_groups, prune_mlp_channels

runner = CliRunner()
HEADS, KV_HEADS, WIDTHS = [8, 4, 8, 8], [2, 1, 2, 2], [128, 128, 96, 128]


def _shrunk_in_place():
    model = make_tiny_model()
    prune_kv_groups(model.model.layers[1], [0])
    prune_mlp_channels(model.model.layers[2], list(range(96)))
    assert (
        model.config.num_attention_heads == 8
    )  # the config still describes the unpruned model, as LLM-Pruner leaves it
    return model


@pytest.fixture()
def pickled(tmp_path, tiny_tokenizer):
    model = _shrunk_in_place()
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": model, "tokenizer": tiny_tokenizer}, path)
    return path, model


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(12).unsqueeze(0)).logits


def test_loads_with_its_own_config_tokenizer_and_shapes(pickled):
    path, original = pickled
    loaded = load_model(str(path), trust_pickle=True)
    assert loaded.kind == "pickle" and loaded.tokenizer is not None
    shapes = layer_shapes(loaded.model)
    assert [s.num_attention_heads for s in shapes] == HEADS and [s.intermediate_size for s in shapes] == WIDTHS
    assert torch.allclose(_logits(loaded.model), _logits(original), atol=1e-5)


def test_without_trust_pickle_the_one_line_refusal(pickled):
    with pytest.raises(UserInputError, match="--trust-pickle|arbitrary code"):
        load_model(str(pickled[0]))


def test_doctor_names_the_pickle_and_shows_every_layer_shape(pickled):
    result = runner.invoke(app, ["doctor", str(pickled[0]), "--trust-pickle", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "pickle"
    layers = report["structure"]["layers"]
    assert [layer["heads"] for layer in layers] == HEADS and [layer["kv_heads"] for layer in layers] == KV_HEADS
    assert [layer["mlp_width"] for layer in layers] == WIDTHS


def test_eval_finetune_prune_and_export_need_no_base_model(pickled, pydoc_text_file, tmp_path):
    path = str(pickled[0])
    evaluated = runner.invoke(
        app,
        [
            "eval",
            path,
            "--trust-pickle",
            "--dataset",
            str(pydoc_text_file),
            "--seq-len",
            "32",
            "--max-windows",
            "2",
            "--json",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ppl"] > 1
    tuned = runner.invoke(
        app,
        [
            "finetune",
            path,
            "--trust-pickle",
            "--dataset",
            str(pydoc_text_file),
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "run"),
            "--json",
        ],
    )
    assert tuned.exit_code == 0, tuned.output
    assert (
        json.loads((tmp_path / "run" / "model" / "config.json").read_text())["layer_shapes"][1]["num_attention_heads"]
        == 4
    )
    pruned = runner.invoke(
        app,
        [
            "prune",
            path,
            "--trust-pickle",
            "--ratio",
            "0.25",
            "--dataset",
            str(pydoc_text_file),
            "--seq-len",
            "32",
            "--importance-samples",
            "2",
            "--out",
            str(tmp_path / "pruned"),
            "--log-dir",
            str(tmp_path / "logs"),
            "--json",
        ],
    )
    assert pruned.exit_code == 0, pruned.output
    exported = runner.invoke(app, ["export", path, "--trust-pickle", "--gguf", str(tmp_path / "m.gguf"), "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["architecture"] == "deci"
