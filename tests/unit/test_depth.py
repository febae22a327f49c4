"""Depth pruning: dropping whole decoder layers."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from llmprune.engine.io.checkpoint import save_model
from llmprune.engine.io.models import load_model
from llmprune.engine.pruning.allocate.ranking import least_influential
from llmprune.engine.pruning.cut.depth import drop_layers


def test_least_influential_never_picks_the_first_or_last_layer():
    influence = [0.0, 0.5, 0.1, 0.3, 0.0]
    assert least_influential(influence, 2) == [2, 3]
    with pytest.raises(ValueError):
        least_influential(influence, 4)


def test_dropped_layers_are_skipped_exactly_and_the_model_reloads(tmp_path, tiny_tokenizer):
    model = make_tiny_model(layers=4)
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    kept = [model.model.layers[i] for i in (0, 3)]
    drop_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2 and [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert list(model.model.layers) == kept
    with torch.no_grad():
        logits = model(ids).logits
        hidden = model.model.embed_tokens(ids)
        reference = make_tiny_model(layers=4)
        reference.model.layers[1] = _Identity()
        reference.model.layers[2] = _Identity()
        torch.testing.assert_close(logits, reference(ids).logits, rtol=0, atol=1e-6)
        assert hidden.shape[-1] == 64
    save_model(model, tiny_tokenizer, tmp_path / "shallow")
    reloaded = load_model(str(tmp_path / "shallow")).model
    assert len(reloaded.model.layers) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=1e-6)


class _Identity(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_prune_cli_drops_layers_then_cuts_units_to_the_target(tiny_model_dir, pydoc_text_file, tmp_path):
    import json

    from typer.testing import CliRunner

    from llmprune.cli.app import app

    result = CliRunner().invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            "--drop-layers",
            "1",
            "--target-params",
            "0.7",
            "--dataset",
            str(pydoc_text_file),
            "--importance-samples",
            "8",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "m"),
            "--log-dir",
            str(tmp_path / "logs"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    dropped = report["options"]["dropped_layers"]
    assert len(dropped) == 1 and dropped[0] not in (0, 3)
    assert len(report["layers"]) == 3 and report["params_after"] <= 0.7 * report["params_before"]
    reloaded = load_model(str(tmp_path / "m")).model
    assert len(reloaded.model.layers) == 3 and sum(p.numel() for p in reloaded.parameters()) == report["params_after"]
