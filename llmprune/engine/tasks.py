"""Zero-shot (and few-shot) task accuracy through lm-evaluation-harness, on a model llmprune loaded.

lm-eval is an optional extra (`pip install 'llmprune[lm-eval]'`). The model is
never loaded by lm-eval: the one llmprune loaded (a pruned folder with
non-uniform layers, a state dict, an LLM-Pruner pickle, ...) is wrapped in
lm-eval's HFLM with its tokenizer, so any model spec llmprune reads works.

Offline, a task whose data is not in the local cache fails at once with one
line naming it (the same quick hub check as the model loader), instead of
lm-eval's minute of retries and a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.load_options import LoadOptions

LM_EVAL_INSTALL = "pip install 'llmprune[lm-eval]'"
LOCAL_TASK_HINT = (
    "define the task in a YAML file next to a local data file and pass --include-path DIR (see docs/commands/eval.md)"
)


def task_names(text: str) -> list[str]:
    """ "arc_easy, hellaswag" -> ["arc_easy", "hellaswag"] (the form of --tasks)."""
    return [name.strip() for name in text.split(",") if name.strip()]


@dataclass
class TaskOptions:
    """Which lm-eval tasks to run and how (the options lm-eval users know)."""

    tasks: list[str]
    """Task, group or tag names (lm-eval's names; globs allowed), e.g. ["arc_easy", "hellaswag"]."""
    include_path: str | None = None
    """A folder of local task YAML files, searched before lm-eval's own tasks."""
    limit: float | None = None
    """Only the first N examples of each task (a fraction when < 1): for quick checks, not for reported figures."""
    num_fewshot: int | None = None
    """Examples in the prompt (None: each task's default, usually 0)."""
    batch_size: int = 1
    """Requests per forward pass."""

    def validate(self) -> None:
        if not self.tasks or any(not name.strip() for name in self.tasks):
            raise UserInputError("--tasks needs at least one task name", "use e.g. --tasks arc_easy,hellaswag")
        if self.limit is not None and self.limit <= 0:
            raise UserInputError(
                f"--limit must be positive, got {self.limit:g}", "use e.g. --limit 100 (or 0.1 for 10 %)"
            )
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UserInputError(f"--num-fewshot must be ≥ 0, got {self.num_fewshot}", "use e.g. --num-fewshot 0")
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size must be ≥ 1, got {self.batch_size}", "use e.g. --batch-size 8")
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise UserInputError(
                f"--include-path {self.include_path} is not a folder", "pass the folder that holds the task YAML files"
            )
        require_lm_eval()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskScore:
    """lm-eval's figures for one task (or group): `acc` is the fraction of examples whose gold choice had the highest
    log-likelihood.
    """

    task: str
    metrics: dict[str, float]
    """Metric -> value, e.g. {"acc": 0.62, "acc_norm": 0.58}; a filter other than lm-eval's "none" is kept as
    "metric,filter".
    """
    stderr: dict[str, float] = field(default_factory=dict)
    samples: int | None = None
    num_fewshot: int | None = None

    @property
    def acc(self) -> float | None:
        return self.metrics.get("acc")

    def to_dict(self) -> dict:
        return asdict(self)


def require_lm_eval() -> None:
    """One clear line when the optional extra is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserInputError(
            "zero-shot tasks need lm-evaluation-harness, which is not installed", f"run: {LM_EVAL_INSTALL}"
        )


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs a warning for every pre-loaded model and every task default; keep them off the user's screen."""
    logger = logging.getLogger("lm_eval")
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _task_manager(names: list[str], include_path: str | None) -> tuple[Any, list[str]]:
    """lm-eval's TaskManager and the names it does not know.

    Indexing lm-eval's ~15 k built-in task files takes seconds, so when every
    name is found under `include_path` the built-in ones are not indexed.
    """
    from lm_eval.tasks import TaskManager

    def unknown(manager: Any) -> list[str]:
        matched = set(manager.match_tasks(names))
        return [name for name in names if name not in matched and "*" not in name]

    if include_path is not None:
        local = TaskManager(include_path=str(Path(include_path).expanduser()), include_defaults=False)
        if not unknown(local):
            return local, []
    manager = TaskManager(include_path=str(Path(include_path).expanduser()) if include_path else None)
    return manager, unknown(manager)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_tasks(options: TaskOptions, offline: bool) -> Any:
    """Check every task name and load each task's data now, so a missing one is one line naming it.

    Returns the TaskManager to evaluate with (the data is then in the local cache).
    """
    manager, unknown = _task_manager(options.tasks, options.include_path)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        maybe = f"did you mean {', '.join(close)}? or " if close else ""
        raise UserInputError(
            f"unknown task '{unknown[0]}' (not in lm-eval's tasks nor in --include-path)", maybe + LOCAL_TASK_HINT
        )
    for name in options.tasks:
        try:
            manager.load([name])
        except Exception as error:  # noqa: BLE001 - any failure to build a task's dataset is the user's to fix
            where = "cannot be reached offline" if offline else "could not be loaded"
            raise UserInputError(
                f"the data of task '{name}' {where} ({_first_line(error)})", LOCAL_TASK_HINT
            ) from error
    return manager


def _scores(results: dict) -> list[TaskScore]:
    """lm-eval's results dict ("acc,none": 0.62, "acc_stderr,none": 0.01, ...) as TaskScores, in lm-eval's order."""
    scores = []
    for task, figures in results["results"].items():
        metrics, stderr = {}, {}
        for key, value in figures.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len, and "N/A" stderr
            metric, filter_name = key.split(",", 1)
            target, metric = (
                (stderr, metric.removesuffix("_stderr")) if metric.endswith("_stderr") else (metrics, metric)
            )
            target[metric if filter_name == "none" else key.replace("_stderr,", ",")] = float(value)
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        shots = results.get("n-shot", {}).get(task)
        scores.append(TaskScore(task=task, metrics=metrics, stderr=stderr, samples=samples, num_fewshot=shots))
    return scores


def prepare_tasks(options: TaskOptions) -> tuple[Any, bool]:
    """Check the options and load every task's data, before any model is loaded: a task that
    cannot be reached costs seconds, not a model load. Returns (task manager, offline)."""
    from llmprune.engine.core.hub import cache_only, hub_reachable

    options.validate()
    offline = not hub_reachable()
    with _quiet_lm_eval(), cache_only(offline):
        return load_tasks(options, offline), offline


def evaluate_tasks(
    model: Any, tokenizer: Any, options: TaskOptions, prepared: tuple[Any, bool] | None = None
) -> list[TaskScore]:
    """Run lm-eval's `simple_evaluate` on an already-loaded model; one TaskScore per task and group.

    `prepared` is what `prepare_tasks` returned, when the caller checked the tasks before loading.
    """
    from llmprune.engine.core.hub import cache_only

    if tokenizer is None:
        raise UserInputError(
            "this model has no tokenizer, so lm-eval cannot run tasks on it",
            "save the tokenizer with the model or use --base-model",
        )
    manager, offline = prepared if prepared is not None else prepare_tasks(options)
    with _quiet_lm_eval(), cache_only(offline):
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        was_training = model.training
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
        try:
            results = simple_evaluate(
                model=lm,
                tasks=list(options.tasks),
                num_fewshot=options.num_fewshot,
                limit=options.limit,
                task_manager=manager,
                log_samples=False,
            )
        finally:
            model.train(was_training)
    return _scores(results)


# ---------------------------------------------------------------- the eval command's engine (with --tasks)


@dataclass(kw_only=True)
class TaskEvalConfig(LoadOptions):
    """What `llmprune eval MODEL --tasks ...` does: the model (loaded the llmprune way) and the tasks."""

    options: TaskOptions


@dataclass
class TaskEvalResult:
    model: str
    params: int
    device: str
    scores: list[TaskScore]
    seconds: float
    lm_eval_version: str
    options: dict

    def to_dict(self) -> dict:
        return {**asdict(self), "scores": [score.to_dict() for score in self.scores]}


def run_task_evaluation(config: TaskEvalConfig) -> TaskEvalResult:
    """Load the model the llmprune way, then score it on the tasks with lm-eval."""
    import importlib.metadata

    # before the model load: a missing extra, a bad option or unreachable task data costs seconds
    prepared = prepare_tasks(config.options)
    placement = config.placement()
    loaded = config.load(placement)
    start = time.perf_counter()
    scores = evaluate_tasks(loaded.model, loaded.tokenizer, config.options, prepared)
    return TaskEvalResult(
        model=config.model,
        params=loaded.num_parameters,
        device=placement.describe(),
        scores=scores,
        seconds=time.perf_counter() - start,
        lm_eval_version=importlib.metadata.version("lm_eval"),
        options=config.options.to_dict(),
    )
