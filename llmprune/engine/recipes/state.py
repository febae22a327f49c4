"""The persistent state of a recipe run: `state.json` in the run directory.

Each finished step records its result here, in one atomic write, only after
its own outputs (a saved model, an analysis file) are complete on disk. A run
stopped anywhere (Ctrl-C, a crash, a full disk) therefore leaves a state that
names exactly the steps whose outputs can be trusted, and running the same
command again resumes at the first step that is not done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.paths import atomic_write_json

STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass
class RunState:
    """What a run has done so far; `settings` are the values that decide its outputs."""

    run_dir: Path
    settings: dict
    steps: dict[str, dict] = field(default_factory=dict)  # step name -> {"seconds": .., "result": {..}}
    ratio: float | None = None  # the ratio in force (lower than asked after an auto-retreat)
    attempts: list[dict] = field(default_factory=list)  # one per pruning ratio tried
    retreats: list[str] = field(default_factory=list)  # what the auto-retreat did, in words
    status: str = (
        "running"  # running | stopped_at_gate | interrupted | finetune_failed | base_unhealthy | failed | done
    )
    error: str | None = None  # why a failed run failed

    @property
    def path(self) -> Path:
        return self.run_dir / STATE_FILE

    def done(self, step: str) -> bool:
        return step in self.steps

    def result(self, step: str) -> dict:
        return self.steps.get(step, {}).get("result", {})

    def seconds(self, step: str) -> float:
        return float(self.steps.get(step, {}).get("seconds", 0.0))

    def finish(self, step: str, result: dict, seconds: float) -> None:
        # a retried step (auto-retreat) adds its time to the earlier attempts'
        self.steps[step] = {"seconds": self.seconds(step) + seconds, "result": result}
        self.save()

    def forget(self, *steps: str) -> None:
        """Mark steps as to be done again (their outputs will be overwritten)."""
        for step in steps:
            self.steps.pop(step, None)
        self.save()

    def save(self) -> None:
        atomic_write_json(
            self.path,
            {
                "version": STATE_VERSION,
                "settings": self.settings,
                "steps": self.steps,
                "ratio": self.ratio,
                "attempts": self.attempts,
                "retreats": self.retreats,
                "status": self.status,
                **({"error": self.error} if self.error else {}),
            },
        )


def changed_settings(previous: dict, current: dict) -> list[str]:
    """Names of the settings whose values differ (dotted for nested ones)."""
    changed = []
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}.{name}" for name in changed_settings(old, new)]
        elif old != new:
            changed.append(key)
    return changed


def open_run(run_dir: Path, settings: dict) -> RunState:
    """The saved state of `run_dir` when it was made with the same settings, else a fresh one.

    Settings are compared after a JSON round trip so that tuples and lists compare equal.
    """
    settings = json.loads(json.dumps(settings))
    path = run_dir / STATE_FILE
    if not path.is_file():
        return RunState(run_dir=run_dir, settings=settings)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("version") != STATE_VERSION:
            raise ValueError(f"state version {saved.get('version')}")
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"{path} is unreadable ({error})", "pass --restart to start this run again from the beginning"
        ) from None
    changed = changed_settings(saved.get("settings", {}), settings)
    if changed:
        raise UserInputError(
            f"{run_dir} holds a run made with other settings ({', '.join(changed)}), so it cannot be resumed",
            "pass --name to start a separate run, or --restart to replace this one",
        )
    return RunState(
        run_dir=run_dir,
        settings=settings,
        steps=saved.get("steps", {}),
        ratio=saved.get("ratio"),
        attempts=saved.get("attempts", []),
        retreats=saved.get("retreats", []),
        status=saved.get("status", "running"),
    )


def describe_resume(state: RunState, order: list[str]) -> str | None:
    """'resuming at <step>' when some steps are already done, else None."""
    done = [step for step in order if state.done(step)]
    if not done:
        return None
    pending = next((step for step in order if not state.done(step)), None)
    return f"resuming {state.run_dir}: {', '.join(done)} already done" + (
        f"; continuing with {pending}" if pending else ""
    )


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
