"""Recovery fine-tuning (full or LoRA) that never loses a run to NaN.

Before step 1 the model gets doctor's health check. Every optimizer step is
judged from its loss and global gradient norm before it is applied (see
`guards.py`); a refused step is skipped, rolled back to the last good
checkpoint with half the learning rate, or ends the run, as `on_nan` says.
Checkpoints are atomic and confirmed only once the next step proved their
weights sane (see `run_checkpoints.py`). The loop runs through
`accelerate.Accelerator`, so `accelerate launch` gives DDP/FSDP unchanged.

The loop does not know who listens: it calls `listener(event)` with the typed
events of `events.py`, and a failing listener never stops training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.core.errors import LlmpruneError, UserInputError
from llmprune.engine.core.events import (
    CheckpointSaved,
    GuardAlert,
    HealthChecked,
    Listener,
    RunFinished,
    RunStarted,
    StepMetrics,
)
from llmprune.engine.core.outputs import is_disk_full
from llmprune.engine.core.paths import atomic_write_json
from llmprune.engine.core.stop import STOP
from llmprune.engine.data import TokenWindows
from llmprune.engine.finetune.boundary import any_process
from llmprune.engine.finetune.config import (  # noqa: F401  (FinetuneConfig and the rest are imported from here too)
    DATA_FIELDS,
    DEFAULT_LORA_TARGETS,
    LOSS_FIELDS,
    METHODS,
    SCHEDULES,
    FinetuneConfig,
    FinetuneResult,
    TrainingControl,
    UnhealthyModelError,
)
from llmprune.engine.finetune.distill import Distiller, check_teacher_matches, lm_only_loss, load_teacher
from llmprune.engine.finetune.guards import StepVerdict, check_step, make_alert
from llmprune.engine.finetune.memory_plan import MemoryPlan, describe_misfit, plan_finetune
from llmprune.engine.finetune.run_checkpoints import (
    CheckpointStore,
    TrainingProgress,
    checkpoint_step,
    latest_checkpoint,
    rollback_to_last_good,
    settle_final_state,
)
from llmprune.engine.finetune.run_lock import release as release_run_lock
from llmprune.engine.finetune.run_setup import (  # noqa: F401  (make_scheduler, check_run_dir and the file names are imported from here too)
    LOG_FILE,
    METRICS_FILE,
    RUN_FILE,
    apply_lora,
    attach_log_file,
    check_run_dir,
    default_run_dir,
    enable_gradient_checkpointing,
    epoch_order,
    health_check,
    intact_checkpoint,
    make_accelerator,
    make_scheduler,
    measure_ppl,
    prepare_run_dir,
    record_failure,
    safe_listener,
    save_outputs,
    trim_metrics,
)
from llmprune.engine.finetune.step import StepLoss, all_processes_agree, forward_backward

log = logging.getLogger("llmprune.train")

# ---------------------------------------------------------------- the entry point


def finetune_model(
    model: torch.nn.Module,
    tokenizer: Any,
    config: FinetuneConfig,
    listener: Listener | None = None,
    *,
    control: TrainingControl | None = None,
    train_windows: TokenWindows | None = None,
    provenance: dict | None = None,
    teacher: torch.nn.Module | None = None,
) -> FinetuneResult:
    """Fine-tune an already-loaded model; writes the run directory and returns how it ended.

    `train_windows` replaces the windows read from `config.dataset` (tests, recipes).
    `provenance` is the loaded model's llmprune.json, carried into the saved model.
    `teacher` is an already-loaded teacher (else `config.teacher` is loaded when set).
    """
    from llmprune.engine.data import check_seq_len_fits

    config.validate()
    check_seq_len_fits(config.seq_len, model)
    control = control or TrainingControl()
    emit = safe_listener(listener)
    # refuse an unhealthy model before anything is written (no run folder, no log file)
    report = None if config.resume else health_check(model, tokenizer)
    if report is not None and not report.ok and not config.force:
        raise UnhealthyModelError(report)
    # stopped while the model loaded (in a thread that no signal reaches): write nothing. Several processes instead
    # stop together after the first step (boundary.py), as one of them alone would leave the others waiting
    if control.stop_requested and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise KeyboardInterrupt
    # one checkpoint (fp32 weights and two Adam moments) and the final model, at least
    run_dir = prepare_run_dir(config, needed_bytes=4 * 4 * sum(p.numel() for p in model.parameters()))
    accelerator = make_accelerator(config, next(model.parameters()).device)
    main = accelerator.is_main_process
    handler = attach_log_file(run_dir) if main else None
    try:
        loss_fn = _loss_function(model, teacher, config, accelerator.device)
        # a signal or a lost terminal, in whatever thread this runs, asks the loop to stop at the next step boundary
        with STOP.cooperating_with(lambda reason: control.request_stop()):
            return _train(
                model,
                tokenizer,
                config,
                accelerator,
                run_dir,
                emit if main else (lambda event: None),
                control,
                train_windows,
                provenance or {},
                loss_fn,
                report,
            )
    except Exception as error:
        if main:
            record_failure(run_dir, config, error)
        if isinstance(error, LlmpruneError) or not is_disk_full(error):
            raise
        raise UserInputError(
            "no space left on the disk (or the file size limit was reached) while writing the run;"
            f" {intact_checkpoint(run_dir)}",
            (
                "free some space, then continue with --resume"
                if latest_checkpoint(run_dir / "checkpoints")
                else "free some space, then run the command again"
            ),
        ) from None
    finally:
        release_run_lock(run_dir)  # taken by prepare_run_dir
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


# ---------------------------------------------------------------- the loop


def _train(
    model, tokenizer, config, accelerator, run_dir, emit, control, train_windows, provenance, loss_fn, report=None
) -> FinetuneResult:
    """The training loop, top to bottom: set-up, then per optimizer step the gradients, the guard's verdict,
    the update, the events, the checkpoint; then the final weights and the saved model.
    """
    # ---- set-up: data, health report, PPL before, adapters, optimizer, schedule, first checkpoint (or resume)
    run, health, ppl_before = _set_up(
        model, tokenizer, config, accelerator, run_dir, emit, control, train_windows, provenance, loss_fn, report
    )
    started = time.perf_counter()
    metrics_file = (run.run_dir / METRICS_FILE).open("a", encoding="utf-8") if run.main else None
    try:
        while run.progress.step < run.total_steps:
            # ---- the step: one optimizer step's gradients, judged before they touch a weight
            epoch, position = divmod(run.progress.step, run.steps_per_epoch)
            lr = run.optimizer.param_groups[0]["lr"]
            tick = time.perf_counter()
            step_loss, grad_norm = _gradients(run, epoch, position)
            verdict = check_step(
                step_loss.loss, grad_norm, config.loss_limit, run.collapse_loss, step_loss.teacher_finite
            )
            verdict = all_processes_agree(verdict, run.accelerator)  # skip or roll back together, never a hang
            _update_if_sane(run, verdict)
            seconds = time.perf_counter() - tick
            # ---- the guard: a passed step proves the pending checkpoint; a refused one raises an alert
            alert = None
            if verdict.ok:
                _book_passed_step(run, step_loss.loss)
            else:
                alert = _refuse_step(run, verdict, lr)
            # ---- the events: metrics.jsonl, the listener, the log
            _record_step(run, metrics_file, epoch, step_loss, lr, grad_norm, verdict, alert, seconds)
            if alert is not None and alert.action == "stop":
                run.status, run.message = "stopped_by_guard", f"stopped at step {run.progress.step}: {verdict.message}"
                break
            if alert is not None and alert.action == "rollback":
                rollback_to_last_good(run.store, run.progress, run.scheduler, run.emit)
                continue
            # ---- the checkpoint: every save_every steps, or when asked (a passed step only)
            _checkpoint_if_due(run, verdict)
            if any_process(run.control.stop_requested, run.accelerator):  # all processes stop at the same step
                run.status, run.message = "stopped_by_user", f"stopped on request after step {run.progress.step}"
                break
    except KeyboardInterrupt:
        run.status, run.message = "stopped_by_user", f"interrupted after step {run.progress.step}"
        log.warning(run.message)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    # ---- the end: the last good weights, PPL after, the saved model and the run record
    return _finish(run, tokenizer, provenance, health, ppl_before, started)


@dataclass
class _Run:
    """One training run's moving parts: made by `_set_up`, driven by `_train`'s loop, closed by `_finish`."""

    model: Any
    config: FinetuneConfig
    accelerator: Any
    run_dir: Path
    emit: Listener
    control: TrainingControl
    windows: TokenWindows
    loss_fn: Any
    optimizer: Any
    scheduler: Any
    store: CheckpointStore
    progress: TrainingProgress
    trainable: list
    per_step: int  # windows per optimizer step, all processes together
    steps_per_epoch: int
    total_steps: int
    fp16: bool
    # how it is going
    status: str = "completed"
    message: str = ""
    last_loss: float | None = None
    alerts: list = field(default_factory=list)
    collapse_loss: float | None = None
    trained_tokens: int = 0
    last_save: float = field(default_factory=time.monotonic)  # for the save by time (save_every_minutes)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def tokens_per_step(self) -> int:
        return self.per_step * self.config.seq_len


# ---------------------------------------------------------------- the set-up


def _set_up(
    model, tokenizer, config, accelerator, run_dir, emit, control, train_windows, provenance, loss_fn, report
) -> tuple[_Run, dict | None, float | None]:
    """Everything before step 1; returns the run, the health report and the PPL before training."""
    from llmprune.engine.data import load_calibration_windows

    torch.manual_seed(config.seed)
    fp16 = accelerator.mixed_precision == "fp16"
    if fp16:
        warnings.warn(
            "fp16 training is the main cause of NaN loss after pruning; prefer bf16 (GPU) or fp32", stacklevel=2
        )
        log.warning("fp16 mixed precision was asked for: expect overflow; prefer bf16 or fp32")
    model.float()  # fp32 master weights; autocast (bf16 on GPU) does the low-precision compute

    windows = train_windows or load_calibration_windows(
        tokenizer, config.dataset, config.samples, config.seq_len, config.seed
    )
    per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    steps_per_epoch = len(windows) // per_step
    if steps_per_epoch == 0:
        raise UserInputError(
            f"{len(windows)} training windows are fewer than one optimizer step needs ({per_step})",
            "raise --samples or lower --batch-size/--grad-accum",
        )
    health = None if report is None else _report_health(report, config, emit)
    ppl_before = measure_ppl(model, tokenizer, config, "before", emit) if config.test_before else None

    total_steps = steps_per_epoch * config.epochs
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.method == "lora":
        model = apply_lora(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config, total_steps)
    # the scheduler is not prepared: accelerate would step it once per process, and our
    # step count is already global; it is checkpointed like the progress record
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, progress)
    store = CheckpointStore(run_dir / "checkpoints", accelerator, config.keep_checkpoints)
    run = _Run(
        model,
        config,
        accelerator,
        run_dir,
        emit,
        control,
        windows,
        loss_fn,
        optimizer,
        scheduler,
        store,
        progress,
        trainable,
        per_step,
        steps_per_epoch,
        total_steps,
        fp16,
    )
    _start_or_resume(run, provenance)
    return run, health, ppl_before


def _report_health(report, config: FinetuneConfig, emit: Listener) -> dict:
    """Report doctor's health check (made by finetune_model before the run folder: an unhealthy model is refused there
    unless --force).
    """
    health = report.to_dict()
    emit(HealthChecked(ok=bool(report.ok), forced=config.force, findings=list(health.get("findings", []))))
    if not report.ok:
        log.warning("health check failed; training anyway because of --force")
    return health


def _start_or_resume(run: _Run, provenance: dict) -> None:
    """Restore the last good checkpoint (--resume) or save the untouched model as step 0; write run.json; announce."""
    config, store, progress = run.config, run.store, run.progress
    metrics_path = run.run_dir / METRICS_FILE
    if config.resume:
        resumed_from = store.latest()
        store.restore(resumed_from)
        if run.main:
            trim_metrics(metrics_path, progress.step)
        log.info("resumed from %s at step %d", resumed_from, progress.step)
    else:
        if run.main:
            metrics_path.write_text("", encoding="utf-8")
        store.save(0)  # the untouched model: the first good state to come back to
        run.emit(CheckpointSaved(step=0, path=str(store.pending), reason="start"))
    if run.main:
        atomic_write_json(
            run.run_dir / RUN_FILE,
            {"config": config.to_dict(), "total_steps": run.total_steps, "status": "running", "provenance": provenance},
        )
    n_trainable = sum(p.numel() for p in run.trainable)
    run.emit(
        RunStarted(
            run_dir=str(run.run_dir),
            method=config.method,
            total_steps=run.total_steps,
            start_step=progress.step,
            epochs=config.epochs,
            tokens_per_step=run.tokens_per_step,
            trainable_parameters=n_trainable,
            total_parameters=sum(p.numel() for p in run.model.parameters()),
            device=str(run.accelerator.device),
            teacher=_teacher_label(config, run.loss_fn),
        )
    )
    log.info(
        "training %s: %d steps of %d tokens, %d trainable parameters",
        config.method,
        run.total_steps,
        run.tokens_per_step,
        n_trainable,
    )


def _loss_function(
    student: torch.nn.Module, teacher: torch.nn.Module | None, config: FinetuneConfig, device: torch.device
):
    """The step loss: the LM loss, or distillation from the teacher when there is one."""
    if teacher is None and not config.teacher:
        return lm_only_loss
    if teacher is None:
        log.info("loading the teacher %s", config.teacher)
        teacher = load_teacher(config.teacher, device, trust_pickle=config.trust_pickle)
    check_teacher_matches(student, teacher, config.teacher or "given")
    return Distiller(teacher.to(device), config.kd_temperature, config.kd_weight, config.kd_top_k).loss


def _teacher_label(config: FinetuneConfig, loss_fn) -> str | None:
    if loss_fn is lm_only_loss:
        return None
    top_k = f", top {config.kd_top_k} logits" if config.kd_top_k else ""
    return f"{config.teacher or 'given teacher'} (T={config.kd_temperature:g}, KD weight {config.kd_weight:g}{top_k})"


# ---------------------------------------------------------------- one step


def _gradients(run: _Run, epoch: int, position: int) -> tuple[StepLoss, float]:
    """Forward and backward over the step's micro-batches; the loss and the global gradient norm (after clipping)."""
    config = run.config
    order = epoch_order(len(run.windows), config.seed, epoch)
    step_loss = forward_backward(
        run.model, run.loss_fn, run.windows, order, position * run.per_step, config, run.accelerator
    )
    clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    return step_loss, float(run.accelerator.clip_grad_norm_(run.trainable, clip))


def _update_if_sane(run: _Run, verdict: StepVerdict) -> None:
    """Apply the gradients only when the guard passed them; the schedule and the step count move on either way."""
    if verdict.ok:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped optimizer step makes torch warn about the order
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()  # the schedule follows the step count, skipped steps included
    run.progress.step += 1
    run.trained_tokens += run.tokens_per_step


def _book_passed_step(run: _Run, loss: float) -> None:
    """A passed step: its pending checkpoint is proven good; a loss well below chance arms the collapse guard."""
    progress = run.progress
    run.store.confirm()  # the weights of the pending checkpoint just gave a sane loss
    run.last_loss = loss
    # ln(vocab) is the loss of a uniform guess; once the model has done clearly better,
    # coming back near it means collapse (see guards.check_step)
    chance = math.log(run.accelerator.unwrap_model(run.model).config.vocab_size)
    if run.collapse_loss is None and loss < 0.8 * chance:
        run.collapse_loss = 0.95 * chance
    progress.best_loss = loss if progress.best_loss is None else min(progress.best_loss, loss)


def _refuse_step(run: _Run, verdict: StepVerdict, lr: float) -> GuardAlert:
    """A refused step: drop its pending checkpoint and raise the alert that says what happens next (on_nan)."""
    run.store.discard_pending()
    action = run.config.on_nan
    if action == "rollback" and (run.progress.rollbacks >= run.config.max_rollbacks or run.store.latest() is None):
        action = "stop"  # out of rollbacks, or no step has proved any state good yet
    alert = make_alert(run.progress.step, verdict, action, lr, run.fp16)
    run.alerts.append(alert)
    run.emit(alert)
    log.error(alert.message)
    return alert


def _record_step(
    run: _Run,
    metrics_file,
    epoch: int,
    step_loss: StepLoss,
    lr: float,
    grad_norm: float,
    verdict: StepVerdict,
    alert: GuardAlert | None,
    seconds: float,
) -> None:
    """The step's line in metrics.jsonl, its event for the listener, and a log line every 10 steps."""
    step = run.progress.step
    record = StepMetrics(
        step=step,
        epoch=epoch + 1,
        loss=step_loss.loss,
        lr=lr,
        grad_norm=grad_norm,
        tokens_per_second=run.tokens_per_step / seconds if seconds > 0 else 0.0,
        applied=verdict.ok,
        alerts=(alert,) if alert else (),
        lm_loss=step_loss.lm,
        kd_loss=step_loss.kd,
    )
    if metrics_file is not None:
        metrics_file.write(json.dumps(record.to_dict()) + "\n")
        metrics_file.flush()
    run.emit(record)
    if step % 10 == 0 or step == 1:
        log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g", step, run.total_steps, step_loss.loss, lr, grad_norm)


def _checkpoint_if_due(run: _Run, verdict: StepVerdict) -> None:
    """Save after a passed step every `save_every` steps or `save_every_minutes`, or when the dashboard asked for it."""
    requested = verdict.ok and run.control.take_save_request()
    minutes = run.config.save_every_minutes
    by_time = minutes > 0 and time.monotonic() - run.last_save >= 60 * minutes
    # the dashboard's key reaches the first process only, and the clocks differ: saving is decided together
    if verdict.ok and (
        any_process(requested or by_time, run.accelerator) or run.progress.step % run.config.save_every == 0
    ):
        path = run.store.save(run.progress.step)
        run.last_save = time.monotonic()
        run.emit(CheckpointSaved(step=run.progress.step, path=str(path), reason="request" if requested else "interval"))


# ---------------------------------------------------------------- the end


def _finish(
    run: _Run, tokenizer, provenance: dict, health: dict | None, ppl_before: float | None, started: float
) -> FinetuneResult:
    """Settle the final weights, measure, save the model and the run record."""
    config, progress, accelerator = run.config, run.progress, run.accelerator
    last_good = settle_final_state(run.model, run.windows, run.store, progress, run.status, accelerator, run.emit)
    if run.status == "stopped_by_guard" and last_good is not None:
        run.message += f"; weights restored to the last good checkpoint (step {checkpoint_step(last_good)})"
    elapsed = time.perf_counter() - started

    unwrapped = accelerator.unwrap_model(run.model)
    # a stopped run must exit promptly (a scheduler's grace period): its PPL can be measured later with eval
    measure = config.test_after and run.status != "stopped_by_user"
    ppl_after = measure_ppl(unwrapped, tokenizer, config, "after", run.emit) if measure else None
    model_dir = adapter_dir = None
    if run.status == "stopped_by_guard" and last_good is None:
        run.message += "; no state was proved good, so no model was saved (the input model is unchanged on disk)"
    else:
        model_dir, adapter_dir = save_outputs(
            unwrapped,
            tokenizer,
            config,
            run.run_dir,
            accelerator,
            provenance,
            {
                "status": run.status,
                "steps": progress.step,
                "ppl_before": ppl_before,
                "ppl_after": ppl_after,
            },
        )
    result = FinetuneResult(
        run_dir=str(run.run_dir),
        status=run.status,
        steps=progress.step,
        total_steps=run.total_steps,
        method=config.method,
        best_loss=progress.best_loss,
        final_loss=run.last_loss,
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        last_good_checkpoint=str(last_good) if last_good else None,
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        rollbacks=progress.rollbacks,
        alerts=[a.to_dict() for a in run.alerts],
        tokens_per_second=run.trained_tokens / elapsed if elapsed > 0 else 0.0,
        seconds=elapsed,
        health=health,
        message=run.message,
    )
    if run.main:
        record = {
            "config": config.to_dict(),
            "total_steps": run.total_steps,
            "provenance": provenance,
            **result.to_dict(),
        }
        atomic_write_json(run.run_dir / RUN_FILE, record)
        log.info("finished: %s %s", run.status, run.message)
    run.emit(
        RunFinished(
            status=run.status,
            steps=progress.step,
            best_loss=progress.best_loss,
            last_good_checkpoint=result.last_good_checkpoint,
            model_dir=model_dir or adapter_dir,
            message=run.message,
        )
    )
    accelerator.free_memory()
    return result


# ---------------------------------------------------------------- from a model spec


def run_finetune(
    config: FinetuneConfig,
    listener: Listener | None = None,
    *,
    control: TrainingControl | None = None,
    memory_plan: MemoryPlan | None = None,
) -> FinetuneResult:
    """Load `config.model` and fine-tune it (the `llmprune finetune` engine).

    Before the model loads, the memory plan (`memory_plan`, else made here) must fit, or --force be given.
    """
    from llmprune.engine.core.device import choose_placement
    from llmprune.engine.io.models import load_model

    placement = choose_placement(config.device, "float32")  # fp32 master weights whatever the compute dtype
    # the settings, the run folder and the memory, before the model is loaded
    plan = memory_plan if memory_plan is not None else plan_finetune(config, placement.device)
    if plan is not None and not plan.fits and not config.force:
        raise UserInputError(*describe_misfit(plan))
    loaded = load_model(
        config.model, base_model=config.base_model, trust_pickle=config.trust_pickle, placement=placement
    )
    if loaded.tokenizer is None:
        raise UserInputError(
            f"{config.model} has no tokenizer", "save the tokenizer next to the weights or use --base-model"
        )
    provenance = {**loaded.provenance, "base_model": loaded.provenance.get("base_model", config.model)}
    if config.save_dtype == "auto" and loaded.source_dtype is not None:  # bf16 in -> bf16 out
        config = replace(config, save_dtype=str(loaded.source_dtype).removeprefix("torch."))
    result = finetune_model(loaded.model, loaded.tokenizer, config, listener, control=control, provenance=provenance)
    result.memory_plan = plan.to_dict() if plan is not None else None
    return result
