"""The recipe's steps as thin adapters over the engines that do the work.

Everything a recipe knows about analyze/prune, eval, doctor and finetune is
in this file: each adapter turns the recipe's settings into that engine's
config, calls it, and returns a small JSON-able dict for `state.json`. Tests
swap the whole object for a fake to plant a broken model or an interruption.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmprune.engine.core.progress import StageProgress

if TYPE_CHECKING:
    from llmprune.engine.recipes.config import PipelineSettings, RecipeConfig

# acceptable PPL verdicts: the gate lets these through to fine-tuning
PASSING_VERDICTS = ("healthy", "acceptable")
UNHEALTHY = "unhealthy"  # the verdict of a model whose weights fail doctor's check, whatever its PPL


def calibration_options(config: PipelineSettings) -> Any:
    """The calibration text of a recipe run or a sweep (pruning.config.CalibrationOptions)."""
    from llmprune.engine.pruning.config import CalibrationOptions

    return CalibrationOptions(
        dataset=config.dataset, samples=config.calibration_samples, seq_len=config.seq_len, batch_size=config.batch_size
    )


def recipe_prune_config(
    config: PipelineSettings, importance_config: str | Path, ratio: float, log_dir: Path, log_name: str
) -> Any:
    """The PruneConfig of a recipe's prune step at `ratio`: the one place the recipe, and the sweep, say how to prune.

    The recipe's pruning settings with the saved layer importance select the plan path of `run_prune`,
    with its defaults for everything a recipe does not set (unit scores, compensation); `--allocation global` or
    `search` prunes as `llmprune prune --allocation ...` does instead (the same choice, the same path).
    """
    from llmprune.engine.pruning.config import PruneConfig

    prune = config.recipe.prune
    if config.allocation != "plan":
        return PruneConfig(
            ratio=ratio,
            allocation=config.allocation,
            search_budget=config.search_budget,
            search_dataset=config.search_dataset,
            calibration=calibration_options(config),
            log_dir=log_dir,
            save_ckpt_log_name=log_name,
            save_dtype=config.save_dtype,
            **vars(config.load_options()),
            overwrite=True,
            force=True,
        )
    return PruneConfig(
        ratio=ratio,
        prune_mlp=prune.prune_mlp,
        importance_config=Path(importance_config),
        importance_method=prune.importance,
        calibration=calibration_options(config),
        strategy=prune.strategy,
        alpha=prune.alpha,
        layer_start=prune.layer_start,
        layer_end=prune.layer_end,
        log_dir=log_dir,
        save_ckpt_log_name=log_name,
        save_dtype=config.save_dtype,
        **vars(config.load_options()),
        # the run folder is the recipe's own (a retreat re-prunes into it); the base model's health was checked first
        overwrite=True,
        force=True,
    )


class StepAdapters:
    """The real steps. Each method loads what it needs, so any step can run in a fresh process."""

    def evaluate(
        self,
        model: str,
        config: RecipeConfig,
        base_ppl: float | None = None,
        health: bool = False,
        progress: StageProgress | None = None,
    ) -> dict:
        """PPL and size of `model`; with `health`, doctor's checks and the PPL verdict against `base_ppl`;
        with the config's `tasks`, lm-eval's metrics per task."""
        from dataclasses import replace

        from llmprune.engine.data import load_evaluation_windows
        from llmprune.engine.evaluate import perplexity

        start = time.perf_counter()
        base = config.load_options()
        # the base model loads as the user asked (--base-model, --trust-pickle); what the recipe saved is a plain folder
        loaded = (
            base if model == config.model else replace(base, model=model, base_model=None, trust_pickle=False)
        ).load()
        from llmprune.engine.data import check_seq_len_fits

        check_seq_len_fits(config.seq_len, loaded.model)
        windows = load_evaluation_windows(loaded.tokenizer, config.eval_dataset, config.seq_len, config.eval_windows)
        update = (lambda done, total: progress(f"PPL of {Path(model).name}", done, total)) if progress else None
        measured = perplexity(loaded.model, windows, config.batch_size, update)
        result: dict[str, Any] = {
            "model": model,
            "params": loaded.num_parameters,
            "ppl": measured.ppl,
            "windows": measured.windows,
        }
        if health:
            result.update(self._health(loaded.model, loaded.tokenizer, measured.ppl, base_ppl))
        if config.tasks is not None:
            from llmprune.engine.tasks import evaluate_tasks

            scores = evaluate_tasks(loaded.model, loaded.tokenizer, config.task_options())
            result["tasks"] = {score.task: score.metrics for score in scores}
        result["seconds"] = time.perf_counter() - start
        return result

    @staticmethod
    def _health(model: Any, tokenizer: Any, ppl: float, base_ppl: float | None) -> dict:
        from llmprune.engine.diagnose.health import ppl_verdict, preflight_check

        report = preflight_check(model, tokenizer, forward=True)
        verdict = ppl_verdict(ppl, base_ppl)
        errors = [finding.to_dict() for finding in report.findings if finding.severity == "error"]
        if report.ok:
            return {
                "verdict": verdict.label,
                "explanation": verdict.explanation,
                "advice": [str(item) for item in verdict.advice],
                "healthy_weights": True,
                "errors": errors,
            }
        # one verdict says one thing: weights that fail doctor's check make the model unhealthy whatever its PPL
        problem = errors[0]["message"] if errors else "the weights failed doctor's check"
        return {
            "verdict": UNHEALTHY,
            "explanation": (
                f"unhealthy weights: {problem}; the PPL ({ppl:.2f}, {verdict.label} by itself) does not count while"
                " the weights fail doctor's check"
            ),
            "advice": list(dict.fromkeys(str(item) for error in errors for item in error.get("advice", []))),
            "healthy_weights": False,
            "ppl_verdict": verdict.label,
            "errors": errors,
        }

    @staticmethod
    def _calibration(config: RecipeConfig) -> Any:
        return calibration_options(config)

    def analyze(self, config: RecipeConfig, out_dir: Path, progress: StageProgress | None = None) -> dict:
        """Layer importance on calibration samples, saved as a reusable JSON config in `out_dir`."""
        from llmprune.engine.pruning.allocate.plan import PlanOptions
        from llmprune.engine.pruning.analysis import DEFAULT_CONFIG_NAME, AnalyzeConfig, run_analyze

        prune = config.recipe.prune
        result = run_analyze(
            AnalyzeConfig(
                importance_method=prune.importance,
                calibration=self._calibration(config),
                plan=PlanOptions(
                    ratio=prune.ratio,
                    strategy=prune.strategy,
                    alpha=prune.alpha,
                    layer_start=prune.layer_start,
                    layer_end=prune.layer_end,
                ),
                prune_mlp=prune.prune_mlp,
                output=out_dir / DEFAULT_CONFIG_NAME,
                **vars(config.load_options()),
                overwrite=True,
                force=True,  # the recipe's own folder; the baseline step checked the base model's health
            ),
            progress=progress,
        )
        return {
            "importance_config": str(result.config_path),
            "method": result.importance.method,
            "scores": list(result.importance.scores),
        }

    def prune(
        self,
        config: RecipeConfig,
        importance_config: str,
        ratio: float,
        out_dir: Path,
        progress: StageProgress | None = None,
    ) -> dict:
        """Prune the base model at `ratio` with the saved importance scores; save it to `out_dir`."""
        from llmprune.engine.pruning.pipeline import run_prune

        prune_config = recipe_prune_config(
            config, importance_config, ratio, log_dir=out_dir.parent / "prune_log", log_name="pruned"
        )
        prune_config.out = out_dir
        result = run_prune(prune_config, progress=progress)
        return {
            "model_dir": str(out_dir),
            "params": result.params_after,
            "share_removed": result.removed_share,
            "gqa": result.gqa_summary(),
            "path": result.path,
        }

    def finetune(
        self,
        config: RecipeConfig,
        model_dir: str,
        out_dir: Path,
        resume: bool,
        listener: Callable[[Any], None] | None,
        host: Callable[..., Any] | None,
        teacher: str | None = None,
    ) -> dict:
        """Fine-tune the pruned model into `out_dir` (resuming its last checkpoint if `resume`), distilling from
        `teacher` if given.
        """
        from dataclasses import replace

        from llmprune.engine.finetune.train import UnhealthyModelError, run_finetune

        # the recipe's fine-tuning values, with what belongs to this run: the pruned model, the text, the folder
        finetune_config = replace(
            config.recipe.finetune,
            model=model_dir,
            dataset=config.dataset,
            seq_len=config.seq_len,
            merge=config.recipe.finetune.method == "lora",
            out=str(out_dir),
            resume=resume,
            device=config.device,
            dtype=config.dtype,
            teacher=teacher,
            save_dtype=config.save_dtype,
        )

        def run(listen: Callable[[Any], None] | None, control: Any = None) -> Any:
            return run_finetune(finetune_config, listen, control=control)

        try:  # the host runs the training (e.g. under the dashboard); by default it runs right here
            result = host(run) if host is not None else run(listener)
        except UnhealthyModelError:
            return {
                "status": "refused_unhealthy",
                "model_dir": None,
                "run_dir": str(out_dir),
                "steps": 0,
                "final_loss": None,
                "message": "finetune's pre-flight health check refused the pruned model",
            }
        return {
            "status": result.status,
            "model_dir": result.model_dir,
            "run_dir": result.run_dir,
            "steps": result.steps,
            "final_loss": result.final_loss,
            "message": result.message,
        }

    def finetune_memory_plan(self, config: RecipeConfig) -> dict | None:
        """The memory plan of the fine-tune step, made before pruning on the base model's shape (an upper bound:
        the pruned model is smaller) and without the teacher (chosen after pruning, when it fits)."""
        from dataclasses import replace

        from llmprune.engine.core.device import available_memory_bytes, resolve_device
        from llmprune.engine.finetune.memory_plan import PlanSettings, model_shape, plan_memory

        shape = model_shape(config.model)
        if shape is None:
            return None
        device = resolve_device(config.device)
        finetune = replace(config.recipe.finetune, seq_len=config.seq_len, dtype=config.dtype)
        settings = PlanSettings.of(finetune, "cuda" if device.type == "cuda" else "cpu")
        return plan_memory(shape, settings, available_memory_bytes(device)).to_dict()

    def export_gguf(self, model_dir: str, out: Path) -> dict:
        """The final model as one GGUF file (f16) for llama.cpp."""
        from llmprune.engine.io.gguf_export import ExportConfig, export_gguf

        result = export_gguf(ExportConfig(model=model_dir, out=str(out), outtype="f16"))
        return {
            "gguf": result.path,
            "architecture": result.architecture,
            "bytes": result.bytes,
            "outtype": result.outtype,
        }


def choose_teacher(
    config: RecipeConfig, base_parameters: int, student_parameters: int, run_dir: Path
) -> tuple[str | None, str]:
    """The base model as the teacher, when the recipe asks for one and it fits next to the student; and why."""
    import json

    from llmprune.engine.core.device import resolve_device
    from llmprune.engine.finetune.distill import teacher_fits

    if not config.teacher:
        return None, "no teacher (--no-teacher): fine-tuning on the LM loss only"
    if has_checkpoint(run_dir):  # a resumed fine-tune keeps the loss it started with
        try:
            teacher = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["config"].get("teacher")
        except (OSError, ValueError, KeyError):
            teacher = None
        return (
            teacher,
            (
                f"resuming the fine-tune {'distilling from ' + teacher if teacher else 'on the LM loss only'}, as it"
                " started"
            ),
        )
    fit = teacher_fits(
        base_parameters, student_parameters, resolve_device(config.device), config.recipe.finetune.method
    )
    if fit.fits:
        return config.model, f"distilling from the base model {config.model}: {fit.reason}"
    return None, f"no teacher: {fit.reason}; fine-tuning on the LM loss only (--no-teacher skips this check)"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a fine-tuning run directory holds a confirmed checkpoint to resume from (finetune's own test)."""
    from llmprune.engine.finetune.run_checkpoints import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoints") is not None


def finished_finetune(run_dir: Path) -> dict | None:
    """The result of a fine-tuning run in `run_dir` that completed all its steps and saved its model, else None."""
    from llmprune.engine.finetune.run_setup import read_run

    record = read_run(run_dir)
    model_dir = record.get("model_dir")
    if (
        record.get("status") != "completed"
        or not isinstance(record.get("steps"), int)
        or record["steps"] < record.get("total_steps", float("inf"))
        or not model_dir
        or not (Path(model_dir) / "config.json").is_file()
    ):
        return None
    return {
        "status": "completed",
        "model_dir": model_dir,
        "run_dir": str(run_dir),
        "steps": record["steps"],
        "final_loss": record.get("final_loss"),
        "message": record.get("message", ""),
    }
