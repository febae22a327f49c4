"""The training loop under two CPU processes (DDP over gloo), as `accelerate launch`/torchrun run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

# --standalone: torchrun picks a free port for each run, so runs never meet on one another's port
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _two_processes(tmp_path, pydoc_text_file, *mode: str) -> tuple:
    """Run tests/ddp_finetune_script.py under torchrun with two CPU processes; its run folder and each rank's report."""
    run = tmp_path / "run"
    run.with_suffix(".txt").write_text(pydoc_text_file.read_text()[:60_000])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    script = str(REPO_ROOT / "tests" / "ddp_finetune_script.py")
    finished = subprocess.run(
        [*TORCHRUN, script, str(run), *mode], env=env, capture_output=True, text=True, timeout=240
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return run, [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_processes_share_the_steps_and_write_one_run(tmp_path, pydoc_text_file):
    run, ranks = _two_processes(tmp_path, pydoc_text_file)
    # 8 windows, batch 1 per process, 2 processes: 4 optimizer steps, the same on both ranks
    assert [(r["world"], r["steps"], r["status"]) for r in ranks] == [(2, 4, "completed")] * 2
    assert ranks[0]["best_loss"] == ranks[1]["best_loss"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (run / "checkpoints" / "step-000004").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_nan_on_one_process_is_a_nan_for_both(tmp_path, pydoc_text_file):
    """Process 1's third forward pass turns NaN: both processes refuse that step and roll back together, no hang."""
    run, ranks = _two_processes(tmp_path, pydoc_text_file, "nan-on-rank1")
    for report in ranks:
        assert (report["world"], report["status"], report["rollbacks"], report["steps"]) == (2, "completed", 1, 4)
    # the same decision at the same step on both, though process 0's own loss was finite
    assert [(a["step"], a["action"]) for a in ranks[0]["alerts"]] == [
        (a["step"], a["action"]) for a in ranks[1]["alerts"]
    ]
    assert [a["action"] for a in ranks[0]["alerts"]] == ["rollback"]
    assert ranks[0]["final_loss"] == ranks[1]["final_loss"]


@pytest.mark.slow
def test_a_save_or_a_stop_asked_of_one_process_is_done_by_both(tmp_path, pydoc_text_file):
    """Process 0 is asked to save (the dashboard's key), process 1 to stop (a signal): both save, both stop, no hang."""
    run, ranks = _two_processes(tmp_path, pydoc_text_file, "requests-on-one-rank")
    assert [(r["status"], r["steps"]) for r in ranks] == [("stopped_by_user", 1)] * 2
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_sharded_fsdp_checkpoint_consolidates_into_the_reloadable_model(tmp_path):
    """FSDP2 shards on two CPU processes; the merged checkpoint reloads with the pruned shapes and equal weights."""
    import torch

    from llmprune.engine.finetune.sharded import consolidate_checkpoint
    from llmprune.engine.io.models import load_model

    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    command = [*TORCHRUN, str(REPO_ROOT / "tests" / "fsdp_consolidate_script.py"), str(tmp_path)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    saved = consolidate_checkpoint(tmp_path / "checkpoint", tmp_path / "start", tmp_path / "model")
    reloaded = load_model(str(saved)).model
    full = torch.load(tmp_path / "full.pt")
    state = reloaded.state_dict()
    assert [layer.mlp.down_proj.in_features for layer in reloaded.model.layers] == [128, 96, 64, 128]
    started = load_model(str(tmp_path / "start")).model.state_dict()
    assert any(not torch.equal(started[name], full[name]) for name in full)  # the step changed the weights
    for name, tensor in full.items():
        assert torch.equal(state[name], tensor), name
