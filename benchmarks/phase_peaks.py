"""What holds the memory, phase by phase: `core.process_memory.PhasePeaks`, checked and measured.

    python benchmarks/phase_peaks.py                   # the allocation exercise and a streamed SmolLM2 prune
    python benchmarks/phase_peaks.py --no-prune        # the allocation exercise only (seconds)

1. The exercise: three phases in this process, the middle one holding a touched
   256 MiB block. PhasePeaks must give the middle phase at least the block more
   than the first, the last phase at least half the block less than the middle,
   and no phase above the process's own high-water mark (VmHWM).
2. A streamed prune (`llmprune prune smollm2-135m --stream --json`) in its own
   process: the per-phase peaks it reports (load, measure, prune, save, ...) and
   the whole run's peak, which must be the highest of them.

Memory figures depend on the machine and on what else runs, so they are measured
here, not asserted in the test suite (which checks that the phases are reported).
Exit 1 when an expectation does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_file import table, write_results  # noqa: E402
from shared_data import CALIBRATION_TEXT, EVALUATION_TEXT  # noqa: E402

MIB = 2**20
BLOCK = 256 * MIB


def exercise() -> tuple[dict[str, int], int, list[str]]:
    """Peaks of three phases around a 256 MiB block; the process's high-water mark; the expectations that failed."""
    import torch

    from llmprune.engine.core.process_memory import PhasePeaks, peak_rss

    with PhasePeaks() as phases:
        phases.enter("small")
        time.sleep(0.05)
        phases.enter("big")
        block = torch.ones(BLOCK // 4)  # touched, so resident
        time.sleep(0.05)
        del block
        phases.enter("after")
        time.sleep(0.05)
    peaks, mark = phases.peaks, peak_rss()
    failed = []
    if list(peaks) != ["small", "big", "after"]:
        failed.append(f"phases {list(peaks)}")
    if peaks["big"] < peaks["small"] + 0.9 * BLOCK:
        failed.append("the big phase does not show the block")
    if peaks["after"] >= peaks["big"] - 0.5 * BLOCK:
        failed.append("the phase after the block still shows it")
    if max(peaks.values()) > mark:
        failed.append("a phase above the process's high-water mark")
    return peaks, mark, failed


def streamed_prune(seq_len: int, samples: int) -> tuple[dict[str, int], int, list[str]]:
    """The per-phase peaks a streamed prune reports, its whole-run peak, and the expectations that failed."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "llmprune", "prune", "smollm2-135m", "--stream", "--ratio", "0.2",
            "--dataset", str(CALIBRATION_TEXT), "--eval-dataset", str(EVALUATION_TEXT),
            "--seq-len", str(seq_len), "--importance-samples", str(samples), "--max-windows", "4",
            "--out", str(Path(out) / "pruned"), "--json",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the streamed prune failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        result = json.loads(done.stdout)
    peaks, whole = result["peak_rss_by_phase"], result["peak_memory_bytes"]
    failed = []
    if not {"load", "measure", "prune", "save"} <= set(peaks):
        failed.append(f"phases {sorted(peaks)}")
    if max(peaks.values()) > whole:
        failed.append("a phase above the whole run's peak")
    return peaks, whole, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-prune", action="store_true", help="the allocation exercise only")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4, help="calibration windows of the streamed prune")
    args = parser.parse_args()

    peaks, mark, failed = exercise()
    rows = [[f"exercise: {name}", round(peak / MIB)] for name, peak in peaks.items()]
    rows.append(["exercise: the process's high-water mark", round(mark / MIB)])
    if not args.no_prune:
        prune_peaks, whole, prune_failed = streamed_prune(args.seq_len, args.samples)
        rows += [[f"streamed prune: {name}", round(peak / MIB)] for name, peak in prune_peaks.items()]
        rows.append(["streamed prune: the whole run", round(whole / MIB)])
        failed += prune_failed
    verdict = "every expectation holds" if not failed else "FAILED: " + "; ".join(failed)
    write_results(
        "phase_peaks",
        title="Peak RSS by phase (what holds the memory)",
        notes=(
            "The allocation exercise holds a touched 256 MiB block in its middle phase only; the streamed prune is"
            f" SmolLM2-135M at 20 %, {args.samples} calibration windows of {args.seq_len} tokens. {verdict}."
        ),
        tables=[table("Peak RSS per phase (MiB)", ["phase", "peak RSS (MiB)"], rows)],
        failed=failed,
    )
    print(json.dumps({"rows": rows, "failed": failed}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
