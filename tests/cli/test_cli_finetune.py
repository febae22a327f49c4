"""`llmprune finetune` through the real Typer app: output, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from single_thread import one_thread  # noqa: F401  (autouse fixture)
from typer.testing import CliRunner

from llmprune.cli.app import app

runner = CliRunner()


def finetune(*args: str):
    return runner.invoke(app, ["finetune", *args])


def common(tiny_model_dir, pydoc_text_file, out: Path) -> list[str]:
    return [
        str(tiny_model_dir),
        "--dataset",
        str(pydoc_text_file),
        "--samples",
        "6",
        "--seq-len",
        "32",
        "--out",
        str(out),
    ]


def test_json_run_writes_the_run_directory(tiny_model_dir, pydoc_text_file, tmp_path):
    result = finetune(
        *common(tiny_model_dir, pydoc_text_file, tmp_path / "run"),
        "--lr",
        "1e-4",
        "--json",
        "--test-after",
        "--eval-dataset",
        str(pydoc_text_file),
        "--eval-windows",
        "2",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "completed" and data["steps"] == 6 and data["ppl_after"] > 1
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 7))
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_second", "alerts"} <= set(json.loads(lines[0]))
    assert (run / "training.log").read_text().count("step") >= 1
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert (run / "model" / "config.json").is_file()


def test_huge_lr_triggers_the_guard_and_exits_1_with_a_checkpoint(tiny_model_dir, pydoc_text_file, tmp_path):
    result = finetune(
        *common(tiny_model_dir, pydoc_text_file, tmp_path / "run"), "--lr", "1e3", "--max-rollbacks", "1", "--no-tui"
    )
    assert result.exit_code == 1
    assert "ALERT" in result.stderr and "stopped_by_guard" in result.stdout
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert Path(run_json["last_good_checkpoint"]).is_dir()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--on-nan", "explode"], "--on-nan"),
        (["--method", "qlora"], "--method"),
        (["--resume"], "--resume needs"),
        (["--samples", "0"], "--samples"),
        (["--teacher", "smollm2-135m", "--kd-weight", "2"], "--kd-weight"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(tiny_model_dir, args, message):
    result = finetune(str(tiny_model_dir), *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_missing_model_and_bad_watch_dir_are_user_errors(tmp_path):
    assert finetune().exit_code == 2
    result = finetune("--watch", str(tmp_path))
    assert result.exit_code == 2 and "not a fine-tuning run directory" in result.stderr


def test_teacher_run_shows_and_records_the_kd_and_lm_parts(tiny_model_dir, pydoc_text_file, tmp_path):
    result = finetune(
        *common(tiny_model_dir, pydoc_text_file, tmp_path / "run"),
        "--lr",
        "1e-4",
        "--no-tui",
        "--teacher",
        str(tiny_model_dir),
        "--kd-weight",
        "0.5",
        "--kd-temperature",
        "2",
        "--kd-top-k",
        "32",
    )
    assert result.exit_code == 0, result.output
    flat = result.stderr.replace("\n", "")  # Rich wraps long lines
    assert f"distilling from {tiny_model_dir} (T=2, KD weight 0.5, top 32 logits)" in flat
    assert "(KD " in flat and ", LM " in flat
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the student starts as the teacher itself: nothing to distil at step 1
    assert lines[0]["kd_loss"] == pytest.approx(0.0, abs=1e-5)
    assert all(line["loss"] == pytest.approx(0.5 * line["kd_loss"] + 0.5 * line["lm_loss"], rel=1e-5) for line in lines)
    config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert (config["teacher"], config["kd_weight"], config["kd_top_k"]) == (str(tiny_model_dir), 0.5, 32)
    provenance = json.loads((tmp_path / "run" / "model" / "llmprune.json").read_text())
    assert provenance["finetune"]["teacher"] == str(tiny_model_dir)


def test_a_teacher_that_cannot_be_loaded_is_one_line_and_exit_2(tiny_model_dir, pydoc_text_file, tmp_path):
    result = finetune(
        *common(tiny_model_dir, pydoc_text_file, tmp_path / "run"), "--teacher", str(tmp_path / "nowhere"), "--no-tui"
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "nowhere" in result.stderr


def test_dry_run_prints_the_plan_and_trains_nothing(tiny_model_dir, pydoc_text_file, tmp_path, monkeypatch):
    args = common(tiny_model_dir, pydoc_text_file, tmp_path / "run")
    result = finetune(*args, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "dry_run" and report["fits"] is True
    assert {"weights", "gradients", "optimizer (AdamW)", "activations"} <= set(report["memory_plan"]["terms"])
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained

    from llmprune.engine.core import device

    monkeypatch.setattr(device, "available_memory_bytes", lambda _device: 2**20)  # 1 MiB free
    result = finetune(*args, "--dry-run", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["fits"] is False
    assert not (tmp_path / "run").exists()


def test_a_plan_that_does_not_fit_stops_before_loading_with_one_line_and_force_trains(
    tiny_model_dir, pydoc_text_file, tmp_path, monkeypatch
):
    from llmprune.engine.core import device

    monkeypatch.setattr(device, "available_memory_bytes", lambda _device: 2**20)
    result = finetune(*common(tiny_model_dir, pydoc_text_file, tmp_path / "run"), "--no-tui")
    assert result.exit_code == 2
    assert "fine-tuning needs about" in result.output and "--force" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()

    forced = finetune(*common(tiny_model_dir, pydoc_text_file, tmp_path / "run"), "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["memory_plan"]["fits"] is False


def test_gradient_checkpointing_trains_to_the_same_losses(tiny_model_dir, pydoc_text_file, tmp_path):
    losses = []
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        result = finetune(*common(tiny_model_dir, pydoc_text_file, tmp_path / name), "--lr", "1e-4", "--json", *extra)
        assert result.exit_code == 0, result.output
        run_dir = Path(json.loads(result.stdout)["run_dir"])
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["loss"] for line in lines])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
