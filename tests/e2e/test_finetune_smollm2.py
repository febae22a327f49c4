"""End to end on the real SmolLM2-135M: a short guarded run from the command line, reloadable output."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llmprune.cli.app import app
from llmprune.engine.io.models import load_model


@pytest.mark.slow
def test_short_run_on_smollm2_saves_a_model_that_reloads(tmp_path, wikitext_valid):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            "smollm2-135m",
            "--dataset",
            str(wikitext_valid),
            "--samples",
            "3",
            "--seq-len",
            "64",
            "--lr",
            "1e-5",
            "--out",
            str(out),
            "--no-tui",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "completed" and data["steps"] == 3 and data["health"]["ok"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(
        1.0 < loss < 8.0 for loss in losses
    )  # a trained LM on English text, not a random one
    reloaded = load_model(data["model_dir"])
    assert reloaded.num_parameters == 134_515_008
    assert reloaded.provenance["finetune"]["steps"] == 3
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    assert torch.isfinite(reloaded.model(input_ids=ids).logits).all()


@pytest.mark.slow
def test_lora_distillation_from_smollm2_itself_starts_at_zero_kd(tmp_path, wikitext_valid):
    """The whole teacher path on the real model: loaded from its spec, same vocabulary, KL 0 while the student is the
    teacher.
    """
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            "smollm2-135m",
            "--teacher",
            "smollm2-135m",
            "--method",
            "lora",
            "--kd-weight",
            "0.5",
            "--kd-top-k",
            "64",
            "--dataset",
            str(wikitext_valid),
            "--samples",
            "2",
            "--seq-len",
            "32",
            "--lr",
            "1e-4",
            "--out",
            str(out),
            "--no-tui",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["applied"] for line in lines)
    # LoRA's B starts at zero: at step 1 the student is exactly the teacher
    assert lines[0]["kd_loss"] == pytest.approx(0.0, abs=1e-4) and 1.0 < lines[0]["lm_loss"] < 8.0
    assert lines[0]["loss"] == pytest.approx(0.5 * lines[0]["lm_loss"], rel=1e-4)
