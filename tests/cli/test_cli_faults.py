"""Bad inputs and faults, as a careless or unlucky user meets them: nothing lost, nothing silently wrong.

Every case runs the real command (Typer's CliRunner, or a subprocess where a
process limit is needed) on tiny random models, and checks the exit code, the
one line the user reads, and what is (or is not) left on disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmprune.cli.app import app

runner = CliRunner()


def _calib(text: Path) -> list[str]:
    return ["--dataset", str(text), "--importance-samples", "4", "--seq-len", "16", "--batch-size", "2"]


def _train(text: Path) -> list[str]:
    return ["--dataset", str(text), "--seq-len", "16", "--samples", "4", "--no-tui"]


def _one_line(result, needle: str, code: int = 2) -> str:
    """The command failed with `code` and one line on stderr that contains `needle`, no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert needle in result.stderr, result.stderr
    return result.stderr


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture()
def inf_model_dir(tiny_model_dir, tmp_path) -> Path:
    """The tiny model with two Inf values in one layer's down_proj (what issue 15 found in layer 17)."""
    from safetensors.torch import load_file, save_file

    directory = _copy(tiny_model_dir, tmp_path / "inf-model")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"][0, :2] = float("inf")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


# ---------------------------------------------------------------- output locations (items 1, 8, 17)


def test_prune_out_refuses_a_folder_it_did_not_write_and_keeps_its_files(tiny_model_dir, pydoc_text_file, tmp_path):
    folder = tmp_path / "X"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    result = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            *_calib(pydoc_text_file),
            "--out",
            str(folder),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
    )
    _one_line(result, "holds files that llmprune did not write")
    assert (folder / "notes.txt").read_text() == "hi" and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "logs").exists()  # refused before any work


def test_prune_out_replaces_a_previous_output_only_with_overwrite(tiny_model_dir, pydoc_text_file, tmp_path):
    out, logs = tmp_path / "P", ["--log-dir", str(tmp_path / "logs")]
    first = runner.invoke(
        app, ["prune", str(tiny_model_dir), *_calib(pydoc_text_file), "--out", str(out), *logs, "--json"]
    )
    assert first.exit_code == 0, first.output
    stamp = (out / "llmprune.json").stat().st_mtime_ns
    again = runner.invoke(app, ["prune", str(tiny_model_dir), *_calib(pydoc_text_file), "--out", str(out), *logs])
    _one_line(again, "already holds an llmprune output")
    assert (out / "llmprune.json").stat().st_mtime_ns == stamp
    replaced = runner.invoke(
        app, ["prune", str(tiny_model_dir), *_calib(pydoc_text_file), "--out", str(out), *logs, "--overwrite", "--json"]
    )
    assert replaced.exit_code == 0, replaced.output
    assert (out / "llmprune.json").stat().st_mtime_ns != stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_out_dot_is_refused_before_any_work(tiny_model_dir, pydoc_text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    result = runner.invoke(app, ["prune", str(tiny_model_dir), *_calib(pydoc_text_file), "--out", "."])
    _one_line(result, "is the current folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux /sys")
def test_unwritable_outputs_are_refused_before_any_work(tiny_model_dir, pydoc_text_file, tmp_path):
    prune = runner.invoke(
        app,
        ["prune", str(tiny_model_dir), *_calib(pydoc_text_file), "--out", "/sys/x", "--log-dir", str(tmp_path / "l")],
    )
    _one_line(prune, "--out /sys/x is not writable")
    analyze = runner.invoke(app, ["analyze", str(tiny_model_dir), *_calib(pydoc_text_file), "-o", "/sys/x.json"])
    _one_line(analyze, "--output /sys/x.json is not writable")
    finetune = runner.invoke(app, ["finetune", str(tiny_model_dir), *_train(pydoc_text_file), "--out", "/sys/run"])
    _one_line(finetune, "--out /sys/run is not writable")
    recipe = runner.invoke(app, ["recipe", "safe", "--model", str(tiny_model_dir), "--out", "/sys/runs", "--no-tui"])
    _one_line(recipe, "--out /sys/runs is not writable")


def test_analyze_output_keeps_a_foreign_file_and_replaces_its_plan_only_with_overwrite(
    tiny_model_dir, pydoc_text_file, tmp_path
):
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    refused = runner.invoke(app, ["analyze", str(tiny_model_dir), *_calib(pydoc_text_file), "-o", str(foreign)])
    _one_line(refused, "already exists")
    assert foreign.read_text() == '{"mine": 1}'
    plan = tmp_path / "plan.json"
    assert (
        runner.invoke(
            app, ["analyze", str(tiny_model_dir), *_calib(pydoc_text_file), "-o", str(plan), "--json"]
        ).exit_code
        == 0
    )
    _one_line(
        runner.invoke(app, ["analyze", str(tiny_model_dir), *_calib(pydoc_text_file), "-o", str(plan)]),
        "pass --overwrite",
    )
    assert (
        runner.invoke(
            app, ["analyze", str(tiny_model_dir), *_calib(pydoc_text_file), "-o", str(plan), "--overwrite", "--json"]
        ).exit_code
        == 0
    )


def test_not_enough_free_space_is_refused_before_pruning(tiny_model_dir, pydoc_text_file, tmp_path, monkeypatch):
    import llmprune.engine.core.outputs as outputs

    real = shutil.disk_usage
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: real(path)._replace(free=10 * 2**20))
    result = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            *_calib(pydoc_text_file),
            "--out",
            str(tmp_path / "P"),
            "--log-dir",
            str(tmp_path / "l"),
        ],
    )
    _one_line(result, "not enough free space for --out")
    assert not (tmp_path / "P").exists()


def test_stale_staging_folders_of_a_killed_save_are_cleaned_on_the_next_run(tiny_model_dir, pydoc_text_file, tmp_path):
    dead_pid = 2**22 + 12345  # above pid_max: no such process
    stale = [tmp_path / f".P.{dead_pid}-abc123.partial", tmp_path / ".P.k2j3h4.partial"]  # the second: the older naming
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".P.{os.getpid()}-zzz.partial"  # a writer that is still running is left alone
    live.mkdir()
    result = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            *_calib(pydoc_text_file),
            "--out",
            str(tmp_path / "P"),
            "--log-dir",
            str(tmp_path / "l"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not any(folder.exists() for folder in stale) and live.is_dir()


def test_saved_outputs_are_readable_like_ordinary_files(tiny_model_dir, pydoc_text_file, tmp_path):
    out = tmp_path / "P"
    assert (
        runner.invoke(
            app,
            [
                "prune",
                str(tiny_model_dir),
                *_calib(pydoc_text_file),
                "--out",
                str(out),
                "--log-dir",
                str(tmp_path / "l"),
                "--json",
            ],
        ).exit_code
        == 0
    )
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "llmprune.json").stat().st_mode & 0o666 == 0o666 & ~umask


# ---------------------------------------------------------------- config vs tensors (item 2)


@pytest.mark.parametrize(("key", "value"), [("num_hidden_layers", 3), ("hidden_size", 80), ("vocab_size", 320)])
def test_a_config_that_disagrees_with_the_weights_is_refused_by_every_loader(
    tiny_model_dir, pydoc_text_file, tmp_path, key, value
):
    directory = _copy(tiny_model_dir, tmp_path / "bad")
    _edit_config(directory, **{key: value})
    evaluated = runner.invoke(
        app, ["eval", str(directory), "--dataset", str(pydoc_text_file), "--seq-len", "16", "--max-windows", "2"]
    )
    assert f"the config says {value}" in _one_line(evaluated, "does not match its weights")
    trained = runner.invoke(app, ["finetune", str(directory), *_train(pydoc_text_file), "--out", str(tmp_path / "run")])
    _one_line(trained, key)
    assert not (tmp_path / "run").exists()
    streamed = runner.invoke(
        app,
        [
            "prune",
            str(directory),
            *_calib(pydoc_text_file),
            "--stream",
            "--out",
            str(tmp_path / "S"),
            "--log-dir",
            str(tmp_path / "l"),
        ],
    )
    _one_line(streamed, "does not match its weights")


def test_a_per_layer_width_that_disagrees_with_the_weights_is_named(tiny_model_dir, pydoc_text_file, tmp_path):
    directory = _copy(tiny_model_dir, tmp_path / "bad")
    _edit_config(directory, intermediate_size=96)
    result = runner.invoke(app, ["eval", str(directory), "--dataset", str(pydoc_text_file), "--seq-len", "16"])
    assert "mlp_width 128 vs 96" in _one_line(result, "layer 0 does not match config.json")


# ---------------------------------------------------------------- weight health before work (item 3)


def test_prune_and_analyze_refuse_a_model_with_inf_weights_unless_forced(inf_model_dir, pydoc_text_file, tmp_path):
    out = tmp_path / "P"
    pruned = runner.invoke(
        app,
        ["prune", str(inf_model_dir), *_calib(pydoc_text_file), "--out", str(out), "--log-dir", str(tmp_path / "l")],
    )
    assert "model.layers.2.mlp.down_proj.weight: 2 Inf" in _one_line(pruned, "failed the weight health check", code=1)
    assert not out.exists()
    analyzed = runner.invoke(
        app, ["analyze", str(inf_model_dir), *_calib(pydoc_text_file), "-o", str(tmp_path / "a.json")]
    )
    _one_line(analyzed, "failed the weight health check", code=1)
    streamed = runner.invoke(
        app,
        [
            "prune",
            str(inf_model_dir),
            *_calib(pydoc_text_file),
            "--stream",
            "--out",
            str(out),
            "--log-dir",
            str(tmp_path / "l"),
        ],
    )
    _one_line(streamed, "failed the weight health check", code=1)
    forced = runner.invoke(
        app,
        [
            "prune",
            str(inf_model_dir),
            *_calib(pydoc_text_file),
            "--out",
            str(out),
            "--log-dir",
            str(tmp_path / "l"),
            "--force",
            "--json",
        ],
    )
    assert forced.exit_code == 0, forced.output
    assert out.is_dir()


# ---------------------------------------------------------------- windows longer than the context (item 5)


def test_a_window_longer_than_the_context_is_refused_at_once(tiny_model_dir, pydoc_text_file, tmp_path):
    # the tiny model's max_position_embeddings is 512
    evaluated = runner.invoke(
        app, ["eval", str(tiny_model_dir), "--dataset", str(pydoc_text_file), "--seq-len", "100000"]
    )
    _one_line(evaluated, "--seq-len 100000 is longer than the model's context (512 tokens")
    pruned = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            "--dataset",
            str(pydoc_text_file),
            "--seq-len",
            "600",
            "--log-dir",
            str(tmp_path / "l"),
        ],
    )
    _one_line(pruned, "--seq-len 600 is longer")
    tested = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            *_calib(pydoc_text_file),
            "--test-after-prune",
            "--eval-seq-len",
            "9999",
            "--eval-dataset",
            str(pydoc_text_file),
            "--log-dir",
            str(tmp_path / "l"),
        ],
    )
    _one_line(tested, "--eval-seq-len 9999 is longer")
    trained = runner.invoke(
        app,
        [
            "finetune",
            str(tiny_model_dir),
            "--dataset",
            str(pydoc_text_file),
            "--seq-len",
            "1024",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    _one_line(trained, "--seq-len 1024 is longer")
    assert not (tmp_path / "r").exists()
    doctor = runner.invoke(
        app, ["doctor", str(tiny_model_dir), "--ppl", "--dataset", str(pydoc_text_file), "--seq-len", "2048"]
    )
    _one_line(doctor, "--seq-len 2048 is longer")


# ---------------------------------------------------------------- one line instead of a traceback (items 7-11)


def test_too_many_dropped_layers_is_one_line(tiny_model_dir, pydoc_text_file, tmp_path):
    result = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            *_calib(pydoc_text_file),
            "--drop-layers",
            "4",
            "--log-dir",
            str(tmp_path / "l"),
        ],
    )
    assert "use --drop-layers 2 or less" in _one_line(result, "--drop-layers 4 is more than this model allows")


def test_a_truncated_safetensors_file_is_one_line_for_eval_and_finetune(tiny_model_dir, pydoc_text_file, tmp_path):
    directory = _copy(tiny_model_dir, tmp_path / "cut")
    weights = directory / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    evaluated = runner.invoke(app, ["eval", str(directory), "--dataset", str(pydoc_text_file), "--seq-len", "16"])
    _one_line(evaluated, "is truncated")
    trained = runner.invoke(app, ["finetune", str(directory), *_train(pydoc_text_file), "--out", str(tmp_path / "run")])
    _one_line(trained, "is truncated")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b"garbage\n", b"PAR1" + b"\x00" * 64 + b"PAR1", b""])
def test_a_damaged_parquet_file_is_one_line(tiny_model_dir, tmp_path, content):
    data = tmp_path / "text.parquet"
    data.write_bytes(content)
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--dataset", str(data), "--seq-len", "16"])
    _one_line(result, str(data))


def test_finetune_out_naming_an_existing_file_is_one_line(tiny_model_dir, pydoc_text_file, tmp_path):
    existing = tmp_path / "FILE"
    existing.write_text("mine")
    result = runner.invoke(app, ["finetune", str(tiny_model_dir), *_train(pydoc_text_file), "--out", str(existing)])
    _one_line(result, "is a file, not a folder")
    assert existing.read_text() == "mine"


def test_finetune_out_naming_a_foreign_folder_is_refused(tiny_model_dir, pydoc_text_file, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep")
    result = runner.invoke(app, ["finetune", str(tiny_model_dir), *_train(pydoc_text_file), "--out", str(folder)])
    _one_line(result, "holds files that llmprune did not write")
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


# ---------------------------------------------------------------- a full disk while saving (item 12)


def test_disk_full_while_saving_a_checkpoint_names_the_intact_one(
    tiny_model_dir, pydoc_text_file, tmp_path, monkeypatch
):
    import accelerate

    real, calls = accelerate.Accelerator.save_state, []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # step 0 is saved; the next checkpoint meets a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    run = tmp_path / "run"
    result = runner.invoke(
        app, ["finetune", str(tiny_model_dir), *_train(pydoc_text_file), "--save-every", "2", "--out", str(run)]
    )
    line = _one_line(result, "no space left on the disk")
    assert (
        "while saving the checkpoint of step 2" in line
        and "the checkpoint of step 0 is intact" in line
        and "--resume" in line
    )
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and "step 2" in record["message"]
    assert (run / "checkpoints" / "step-000000").is_dir()


def test_file_size_limit_while_saving_is_one_line_and_the_run_says_failed(tiny_model_dir, pydoc_text_file, tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "llmprune",
        "finetune",
        str(tiny_model_dir),
        *_train(pydoc_text_file),
        "--out",
        str(run),
    ]
    # ulimit -f counts 1024-byte blocks: 200 KiB lets the logs through but not a checkpoint of the tiny model
    shell = "ulimit -f 200; exec " + " ".join(f"'{part}'" for part in command)
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "no space left on the disk (or the file size limit was reached)" in done.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------- finetune messages and exit codes (items 13, 14, 17)


def test_finetune_refuses_an_unhealthy_model_before_making_its_run_folder(inf_model_dir, pydoc_text_file, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["finetune", str(inf_model_dir), *_train(pydoc_text_file), "--out", str(run)])
    assert result.exit_code == 1, result.output
    assert "training anyway" not in result.output and "training was not started" in result.stderr
    assert not run.exists()


def test_finetune_interrupted_by_ctrl_c_saves_and_exits_130(tiny_model_dir, pydoc_text_file, tmp_path, monkeypatch):
    from llmprune.engine.core.events import StepMetrics
    from llmprune.ui import train_lines

    real = train_lines.PlainTrainingLines.__call__

    def interrupted(self, event):
        real(self, event)
        if isinstance(event, StepMetrics) and event.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_lines.PlainTrainingLines, "__call__", interrupted)
    run = tmp_path / "run"
    result = runner.invoke(app, ["finetune", str(tiny_model_dir), *_train(pydoc_text_file), "--out", str(run)])
    assert result.exit_code == 130, result.output
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "stopped_by_user" and record["steps"] == 2
    assert (run / "model" / "llmprune.json").is_file()


def test_resume_of_a_finished_run_is_refused_and_leaves_it_as_it_was(tiny_model_dir, pydoc_text_file, tmp_path):
    run = tmp_path / "run"
    assert (
        runner.invoke(
            app, ["finetune", str(tiny_model_dir), *_train(pydoc_text_file), "--out", str(run), "--json"]
        ).exit_code
        == 0
    )
    before = (run / "run.json").read_text()
    result = runner.invoke(
        app, ["finetune", str(tiny_model_dir), *_train(pydoc_text_file), "--out", str(run), "--resume"]
    )
    _one_line(result, "is a finished run (4 of 4 steps)")
    assert (run / "run.json").read_text() == before


# ---------------------------------------------------------------- recipe (items 15, 17)


def _recipe(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [
        "recipe",
        "safe",
        "--model",
        str(model),
        "--dataset",
        str(text),
        "--eval-dataset",
        str(text),
        "--seq-len",
        "16",
        "--calibration-samples",
        "4",
        "--eval-windows",
        "2",
        "--batch-size",
        "2",
        "--samples",
        "4",
        "--out",
        str(out),
        "--name",
        "run",
        "--no-tui",
        *extra,
    ]


def test_recipe_stops_on_an_unhealthy_base_model_before_pruning(inf_model_dir, pydoc_text_file, tmp_path):
    result = runner.invoke(app, _recipe(inf_model_dir, pydoc_text_file, tmp_path, "--skip-finetune"))
    assert result.exit_code == 1, result.output
    assert "the base model" in result.output and "is not healthy" in result.output
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["status"] == "base_unhealthy" and "analyze" not in state["steps"]
    assert not (tmp_path / "run" / "pruned").exists()
    assert "reference" not in result.stdout  # an unusable base is no reference


def test_recipe_that_fails_at_start_up_leaves_its_state_failed(tiny_model_dir, pydoc_text_file, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path / "broken")
    _edit_config(broken, num_hidden_layers=3)  # found when the baseline step loads it
    result = runner.invoke(app, _recipe(broken, pydoc_text_file, tmp_path))
    _one_line(result, "does not match its weights")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["status"] == "failed" and "num_hidden_layers" in state["error"]


def test_recipe_with_a_missing_text_is_refused_before_it_writes_anything(tiny_model_dir, tmp_path):
    result = runner.invoke(app, _recipe(tiny_model_dir, tmp_path / "missing.txt", tmp_path))
    _one_line(result, "missing.txt")
    assert not (tmp_path / "run").exists()


def test_recipe_ratio_above_what_a_recipe_prunes_names_its_own_options(tiny_model_dir, pydoc_text_file, tmp_path):
    result = runner.invoke(app, _recipe(tiny_model_dir, pydoc_text_file, tmp_path, "--ratio", "0.95"))
    line = _one_line(result, "--ratio 0.95 is more than a recipe prunes")
    assert "pruning-rate" not in line
    assert not (tmp_path / "run").exists()


def test_recipe_out_naming_a_foreign_folder_is_refused(tiny_model_dir, pydoc_text_file, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pruned").mkdir()  # a name --restart would delete
    (tmp_path / "run" / "pruned" / "mine.txt").write_text("keep")
    result = runner.invoke(app, _recipe(tiny_model_dir, pydoc_text_file, tmp_path, "--restart"))
    _one_line(result, "holds files that llmprune did not write")
    assert (tmp_path / "run" / "pruned" / "mine.txt").read_text() == "keep"


# ---------------------------------------------------------------- doctor (items 16, 17)


def test_doctor_on_a_file_that_is_not_a_model_exits_2(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "random.safetensors"
    save_file({"w": torch.randn(10, 10)}, path)
    result = runner.invoke(app, ["doctor", str(path)])
    _one_line(result, "is not a model")
    assert "healthy" not in result.output


def test_doctor_on_a_raw_pickle_prints_one_line_and_no_warning(tmp_path):
    import pickle

    path = tmp_path / "model.bin"
    with path.open("wb") as handle:
        pickle.dump({"weight": [1.0, 2.0]}, handle)
    done = subprocess.run(
        [sys.executable, "-m", "llmprune", "doctor", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr


# ---------------------------------------------------------------- the error boundary


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tiny_model_dir, monkeypatch):
    import llmprune.cli.eval as eval_cli

    def broken(*args, **kwargs):
        raise RuntimeError("something deep broke")

    monkeypatch.setattr(eval_cli, "run_evaluation", broken, raising=False)
    monkeypatch.setattr("llmprune.engine.evaluate.run_evaluation", broken)
    result = runner.invoke(app, ["eval", str(tiny_model_dir)])
    _one_line(result, "unexpected error: RuntimeError: something deep broke", code=1)
    assert "--debug" in result.stderr
    debug = runner.invoke(app, ["--debug", "eval", str(tiny_model_dir)])
    assert isinstance(debug.exception, RuntimeError)


def test_json_errors_are_one_json_object_on_stdout(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "nothing-here"), "--json"])
    assert result.exit_code == 2
    record = json.loads(result.stdout)
    assert record["status"] == "error" and record["exit_code"] == 2 and "does not exist" in record["error"]


def test_an_error_message_with_brackets_is_printed_as_text(tmp_path):
    missing = tmp_path / "[bold]model[/bold]"
    result = runner.invoke(app, ["eval", str(missing)])
    _one_line(result, "[bold]model[/bold]")


# ---------------------------------------------------------------- beyond the list


@pytest.mark.parametrize(
    "args",
    [
        ["finetune", "{model}", "--weight-decay", "inf"],
        ["finetune", "{model}", "--method", "lora", "--lora-alpha", "-3"],
        ["doctor", "{model}", "--base-ppl", "inf"],
        ["recipe", "safe", "--model", "{model}", "--alpha", "nan", "--no-tui"],
        ["recipe", "safe", "--model", "{model}", "--max-grad-norm", "nan", "--no-tui"],
        ["recipe", "sweep", "{model}", "--ratio", "0.9"],
    ],
)
def test_more_out_of_range_numbers_are_refused(args, tiny_model_dir, pydoc_text_file, tmp_path):
    args = [a.replace("{model}", str(tiny_model_dir)) for a in args]
    if args[0] == "finetune":
        args += ["--dataset", str(pydoc_text_file), "--seq-len", "16", "--out", str(tmp_path / "run")]
    if args[0] == "recipe":
        args += [
            "--dataset",
            str(pydoc_text_file),
            "--eval-dataset",
            str(pydoc_text_file),
            "--out",
            str(tmp_path / "runs"),
        ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.count("error:") == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_export_never_replaces_a_foreign_file_and_replaces_a_gguf_only_with_overwrite(tiny_model_dir, tmp_path):
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("my notes")
    refused = runner.invoke(app, ["export", str(tiny_model_dir), "--gguf", str(foreign)])
    _one_line(refused, "is not an llmprune output")
    assert foreign.read_text() == "my notes"
    out = tmp_path / "m.gguf"
    stale = tmp_path / ".m.gguf.k2j3h4.partial"  # an export killed half-way
    stale.write_bytes(b"GGUF half")
    assert runner.invoke(app, ["export", str(tiny_model_dir), "--gguf", str(out), "--json"]).exit_code == 0
    assert not stale.exists()
    _one_line(runner.invoke(app, ["export", str(tiny_model_dir), "--gguf", str(out)]), "pass --overwrite")
    assert (
        runner.invoke(app, ["export", str(tiny_model_dir), "--gguf", str(out), "--overwrite", "--json"]).exit_code == 0
    )


def test_sweep_refuses_a_foreign_folder_and_an_unhealthy_base(tiny_model_dir, inf_model_dir, pydoc_text_file, tmp_path):
    common = [
        "--ratio",
        "0.2",
        "--dataset",
        str(pydoc_text_file),
        "--eval-dataset",
        str(pydoc_text_file),
        "--seq-len",
        "16",
        "--calibration-samples",
        "4",
        "--eval-windows",
        "2",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path),
    ]
    foreign = tmp_path / f"{tiny_model_dir.name}-sweep"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    _one_line(
        runner.invoke(app, ["recipe", "sweep", str(tiny_model_dir), *common]), "holds files that llmprune did not write"
    )
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]
    unhealthy = runner.invoke(app, ["recipe", "sweep", str(inf_model_dir), *common])
    _one_line(unhealthy, "failed the weight health check", code=1)


def test_sigterm_stops_finetune_like_ctrl_c(tiny_model_dir, pydoc_text_file, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "llmprune",
        "finetune",
        str(tiny_model_dir),
        "--dataset",
        str(pydoc_text_file),
        "--seq-len",
        "16",
        "--samples",
        "4000",
        "--no-tui",
        "--out",
        str(run),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "stopped_by_user" and 2 <= record["steps"] < 4000
    assert (run / "model" / "llmprune.json").is_file()


def test_a_generation_longer_than_the_context_is_refused_at_once(tiny_model_dir, pydoc_text_file):
    result = runner.invoke(
        app,
        [
            "eval",
            str(tiny_model_dir),
            "--dataset",
            str(pydoc_text_file),
            "--seq-len",
            "16",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "100000",
        ],
    )
    _one_line(result, "do not fit the model's context (512 tokens)")


def test_completion_has_json_and_refuses_a_file_as_its_folder(tmp_path):
    printed = runner.invoke(app, ["completion", "bash", "--json"])
    assert printed.exit_code == 0 and json.loads(printed.stdout)["script"].startswith("# generated by")
    written = runner.invoke(app, ["completion", "--write", str(tmp_path / "c"), "--json"])
    assert written.exit_code == 0 and len(json.loads(written.stdout)["written"]) == 3
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line(runner.invoke(app, ["completion", "--write", str(blocker)]), "is a file, not a folder")


def test_a_command_replaces_only_its_own_kind_of_output(tiny_model_dir, pydoc_text_file, tmp_path):
    run = tmp_path / "finetune-run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "notes.txt").write_text("keep")
    pruned = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            *_calib(pydoc_text_file),
            "--out",
            str(run),
            "--overwrite",
            "--log-dir",
            str(tmp_path / "l"),
        ],
    )
    _one_line(pruned, "holds another kind of llmprune output (it has run.json, not llmprune.json)")
    assert (run / "notes.txt").is_file()
    model = tmp_path / "pruned-model"
    model.mkdir()
    (model / "llmprune.json").write_text("{}")
    trained = runner.invoke(app, ["finetune", str(tiny_model_dir), *_train(pydoc_text_file), "--out", str(model)])
    _one_line(trained, "holds another kind of llmprune output (it has llmprune.json, not run.json)")
    assert sorted(p.name for p in model.iterdir()) == ["llmprune.json"]


# ---------------------------------------------------------------- pruning options (items 4, 6)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--alpha", "nan"], "--alpha must be ≥ 0, got nan"),
        (["--alpha", "inf"], "--alpha must be ≥ 0, got inf"),
        (
            ["--allocation", "plan", "--prune-mlp", "--round-to", "10000"],
            "--round-to 10000 is larger than the model's MLP (128 channels)",
        ),
        (["--round-to", "64"], "--round-to"),  # the global path does not round: asking it to is an error, not ignored
    ],
)
def test_pruning_options_that_would_be_ignored_or_wrong_are_refused(
    extra, needle, tiny_model_dir, pydoc_text_file, tmp_path
):
    result = runner.invoke(
        app, ["prune", str(tiny_model_dir), *_calib(pydoc_text_file), *extra, "--log-dir", str(tmp_path / "l")]
    )
    _one_line(result, needle)
    assert not (tmp_path / "l").exists()


def test_a_nan_score_in_the_importance_config_is_refused(tiny_model_dir, pydoc_text_file, tmp_path):
    plan = tmp_path / "plan.json"
    assert (
        runner.invoke(
            app, ["analyze", str(tiny_model_dir), *_calib(pydoc_text_file), "-o", str(plan), "--json"]
        ).exit_code
        == 0
    )
    data = json.loads(plan.read_text())
    data["importance"]["scores"][2] = float("nan")
    plan.write_text(json.dumps(data))
    result = runner.invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            *_calib(pydoc_text_file),
            "--importance-config",
            str(plan),
            "--log-dir",
            str(tmp_path / "l"),
        ],
    )
    _one_line(result, "non-finite importance scores (layers 2)")


@pytest.mark.parametrize("extra", [["--ratio", "0"], ["--target-params", "1.0"]])
def test_a_prune_that_removes_nothing_runs_and_says_so(extra, tiny_model_dir, pydoc_text_file, tmp_path):
    result = runner.invoke(
        app,
        ["prune", str(tiny_model_dir), *_calib(pydoc_text_file), *extra, "--log-dir", str(tmp_path / "l"), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params_after"] == report["params_before"]
