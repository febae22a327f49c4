"""A run directory read as it grows, turned into the engine events a live run sends (`llmprune finetune --watch`)."""

from __future__ import annotations

import json
from pathlib import Path

from llmprune.engine.core.events import Event, RunFinished, RunStarted, step_events_from_record


class MetricsFollower:
    """Reads a run directory as it grows: run.json for the frame, metrics.jsonl for the steps."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._offset = 0
        self._started = False
        self._finished = False

    def poll(self) -> list[Event]:
        events: list[Event] = []
        run = _read_json(self.run_dir / "run.json")
        if run and not self._started:
            self._started = True
            config = run.get("config", {})
            events.append(
                RunStarted(
                    run_dir=str(self.run_dir),
                    method=config.get("method", "?"),
                    total_steps=int(run.get("total_steps", 0)),
                    start_step=0,
                    epochs=int(config.get("epochs", 1)),
                    tokens_per_step=int(config.get("batch_size", 1))
                    * int(config.get("grad_accum", 1))
                    * int(config.get("seq_len", 0)),
                    trainable_parameters=0,
                    total_parameters=0,
                    device="",
                    teacher=config.get("teacher"),
                )
            )
        events += self._new_steps()
        if run and not self._finished and run.get("status") not in (None, "running"):
            self._finished = True
            events.append(
                RunFinished(
                    status=run["status"],
                    steps=int(run.get("steps", 0)),
                    best_loss=run.get("best_loss"),
                    last_good_checkpoint=run.get("last_good_checkpoint"),
                    model_dir=run.get("model_dir") or run.get("adapter_dir"),
                    message=run.get("message", ""),
                )
            )
        return events

    def _new_steps(self) -> list[Event]:
        path = self.run_dir / "metrics.jsonl"
        try:
            with path.open(encoding="utf-8") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return []
        complete, _, _ = chunk.rpartition("\n")  # a line still being written waits for the next poll
        if not complete:
            return []
        self._offset += len((complete + "\n").encode("utf-8"))
        events: list[Event] = []
        for line in complete.splitlines():
            if line.strip():
                events += step_events_from_record(json.loads(line))
        return events


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
