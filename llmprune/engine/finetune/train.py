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
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.data import TokenWindows
from llmprune.engine.core.errors import LlmpruneError, UserInputError
from llmprune.engine.core.events import (
    CheckpointSaved,
    Event,
    GuardAlert,
    HealthChecked,
    Listener,
    PerplexityMeasured,
    RolledBack,
    RunFinished,
    RunStarted,
    StepMetrics,
)
from llmprune.engine.finetune.distill import Distiller, LossParts, check_teacher_matches, lm_only_loss, load_teacher, validate_kd_settings
from llmprune.engine.finetune.guards import ON_NAN_CHOICES, check_step, make_alert
from llmprune.engine.core.paths import atomic_write_json, atomic_write_text
from llmprune.engine.finetune.run_checkpoints import CheckpointStore, TrainingProgress, checkpoint_step, latest_checkpoint

log = logging.getLogger("llmprune.train")

METHODS = ("full", "lora")
SCHEDULES = ("linear", "cosine", "constant")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
LOG_FILE = "training.log"
# fields that fix which window each step reads: a resumed run must keep them
DATA_FIELDS = ("dataset", "samples", "seq_len", "batch_size", "grad_accum", "epochs", "seed")
# fields that fix what each step's loss is: a resumed run must keep them too
LOSS_FIELDS = ("teacher", "kd_temperature", "kd_weight", "kd_top_k")


@dataclass
class FinetuneConfig:
    """What `llmprune finetune` does."""

    model: str = "smollm2-135m"
    """Model spec (alias, folder, pruned folder, file or hub id)."""
    method: str = "full"
    """full: train every weight; lora: train low-rank adapters (peft)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Module names that get adapters."""
    merge: bool = False
    """LoRA only: merge the adapters into the weights and save a full model (else save the adapter)."""
    dataset: str = "wikitext2"
    """Training text; its training split is used (never the test split of named sources)."""
    samples: int = 256
    """Number of training windows (seeded random offsets)."""
    seq_len: int = 256
    """Tokens per training window."""
    epochs: int = 1
    """Passes over the training windows."""
    batch_size: int = 1
    """Windows per forward pass, per process."""
    grad_accum: int = 1
    """Forward passes accumulated into one optimizer step."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    schedule: str = "cosine"
    """LR schedule after warm-up: linear, cosine or constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold on the global norm (0: no clipping, the norm is still checked)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed for the data order, the windows and torch."""
    loss_limit: float = 1e6
    """A step whose loss is above this is treated like a NaN."""
    on_nan: str = "rollback"
    """What a refused step does: stop, skip, or rollback (to the last good checkpoint, with half the LR)."""
    max_rollbacks: int = 3
    """After this many rollbacks the next refused step stops the run."""
    save_every: int = 50
    """Checkpoint every N optimizer steps."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep on disk (the last good one is always kept)."""
    out: str | None = None
    """Run directory (default: llmprune-runs/finetune-<time> under $LLMPRUNE_RUNS or the current folder)."""
    resume: bool = False
    """Continue the run in `out` from its last good checkpoint."""
    test_before: bool = False
    """Measure PPL before training."""
    test_after: bool = False
    """Measure PPL after training."""
    eval_dataset: str = "wikitext2"
    """Text for --test-before/--test-after (its evaluation split)."""
    eval_windows: int | None = 64
    """Evaluation windows of seq_len tokens (None: all)."""
    force: bool = False
    """Train even if the health check finds the model unhealthy."""
    base_model: str | None = None
    """Architecture for weights-only files."""
    trust_pickle: bool = False
    """Allow whole pickled modules."""
    teacher: str | None = None
    """Model spec of a teacher to distil from (usually the unpruned base model); None: LM loss only."""
    kd_temperature: float = 1.0
    """Softmax temperature of the distillation loss (the KL is scaled by T² so its gradients keep their size)."""
    kd_weight: float = 1.0
    """Weight of the distillation loss; the LM loss gets 1 - weight (1: distillation only)."""
    kd_top_k: int | None = None
    """Keep only the teacher's k largest logits per position (renormalised); None: the whole vocabulary."""
    device: str = "auto"
    """auto|cpu|cuda|cuda:N|mps."""
    dtype: str = "auto"
    """Compute precision: auto (bf16 autocast on GPU, fp32 on CPU), float32, bfloat16, float16 (warned)."""

    def validate(self) -> None:
        def need(condition: bool, problem: str, hint: str) -> None:
            if not condition:
                raise UserInputError(problem, hint)

        need(self.method in METHODS, f"unknown --method '{self.method}'", "use full or lora")
        need(self.schedule in SCHEDULES, f"unknown --schedule '{self.schedule}'", f"use one of {', '.join(SCHEDULES)}")
        need(self.on_nan in ON_NAN_CHOICES, f"unknown --on-nan '{self.on_nan}'", f"use one of {', '.join(ON_NAN_CHOICES)}")
        for name in ("samples", "seq_len", "epochs", "batch_size", "grad_accum", "save_every", "keep_checkpoints", "lora_r"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"--{name.replace('_', '-')} must be an integer ≥ 1, got {value}", "use a positive value")
        need(self.seq_len >= 2, f"--seq-len must be ≥ 2, got {self.seq_len}", "use e.g. --seq-len 256")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}", "use e.g. --lr 1e-5")
        need(self.warmup_steps >= 0, f"--warmup-steps must be ≥ 0, got {self.warmup_steps}", "use e.g. --warmup-steps 10")
        need(self.max_grad_norm >= 0, f"--max-grad-norm must be ≥ 0, got {self.max_grad_norm}", "use e.g. 1.0 (0 disables clipping)")
        need(self.weight_decay >= 0, f"--weight-decay must be ≥ 0, got {self.weight_decay}", "use e.g. 0.01")
        need(self.loss_limit > 0, f"--loss-limit must be > 0, got {self.loss_limit}", "use e.g. 1e6")
        need(self.max_rollbacks >= 0, f"--max-rollbacks must be ≥ 0, got {self.max_rollbacks}", "use e.g. 3")
        need(self.eval_windows is None or self.eval_windows >= 1, f"--eval-windows must be ≥ 1, got {self.eval_windows}", "leave it out for 64")
        need(not (self.merge and self.method != "lora"), "--merge only applies to --method lora", "drop --merge or add --method lora")
        need(not (self.resume and not self.out), "--resume needs the run directory", "pass --out DIR of the run to continue")
        validate_kd_settings(self.kd_temperature, self.kd_weight, self.kd_top_k)

    def to_dict(self) -> dict:
        record = asdict(self)
        record["lora_targets"] = list(self.lora_targets)
        return record


@dataclass
class FinetuneResult:
    """How the run ended and where its outputs are."""

    run_dir: str
    status: str  # completed | stopped_by_user | stopped_by_guard
    steps: int
    total_steps: int
    method: str
    best_loss: float | None
    final_loss: float | None
    ppl_before: float | None
    ppl_after: float | None
    last_good_checkpoint: str | None
    model_dir: str | None
    adapter_dir: str | None
    rollbacks: int
    alerts: list[dict] = field(default_factory=list)
    tokens_per_second: float = 0.0
    seconds: float = 0.0
    health: dict | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "stopped_by_guard"

    def to_dict(self) -> dict:
        return asdict(self)


class UnhealthyModelError(LlmpruneError):
    """The health check found the model unfit to train (and --force was not given)."""

    def __init__(self, report: Any):
        self.report = report
        super().__init__("the model failed the pre-flight health check")


class TrainingControl:
    """Requests from outside the loop (the dashboard's keys, a signal handler); thread-safe."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._save = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def request_save(self) -> None:
        self._save.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def take_save_request(self) -> bool:
        requested = self._save.is_set()
        self._save.clear()
        return requested


# ---------------------------------------------------------------- pieces


def default_run_dir() -> Path:
    root = Path(os.environ.get("LLMPRUNE_RUNS", "llmprune-runs"))
    return root / f"finetune-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def health_check(model: torch.nn.Module, tokenizer: Any) -> Any:
    """doctor's pre-flight check (NaN/Inf weights, forward test); one implementation, in health.py."""
    from llmprune.engine.diagnose.health import preflight_check

    return preflight_check(model, tokenizer, forward=True)


def make_accelerator(config: FinetuneConfig, device: torch.device) -> Any:
    """bf16 autocast over fp32 master weights on GPU, plain fp32 on CPU; fp16 only when asked."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    dtype = (config.dtype or "auto").lower()
    if device.type == "cpu" or dtype in ("float32", "fp32"):
        mixed = "no"
    elif dtype in ("float16", "fp16", "half"):
        mixed = "fp16"
    else:
        mixed = "bf16"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = AcceleratorState._shared_state
    if not launched and state and (state.get("_mixed_precision") != mixed or (state.get("device") is not None and state["device"].type != device.type)):
        # a second in-process run (tests, recipes) with other settings: accelerate keeps a
        # process-wide singleton that refuses to change, so reset it when nothing is distributed
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)


def apply_lora(model: torch.nn.Module, config: FinetuneConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in config.lora_targets if target not in present]
    if missing:
        raise UserInputError(f"LoRA target module(s) {', '.join(missing)} are not in this model", f"choose among {', '.join(DEFAULT_LORA_TARGETS)}")
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def make_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(config.schedule, config.schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The window order of one epoch: a fixed function of (seed, epoch), so resume needs only the step."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _safe_listener(listener: Listener | None) -> Listener:
    def emit(event: Event) -> None:
        if listener is None:
            return
        try:
            listener(event)
        except Exception:  # the UI is a guest: its bugs must not cost the user the run
            log.exception("listener failed on %s; training goes on", type(event).__name__)

    return emit


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, forget steps after the checkpoint: they will be trained again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _prepare_run_dir(config: FinetuneConfig) -> Path:
    run_dir = Path(config.out).expanduser() if config.out else default_run_dir()
    checkpoints = run_dir / "checkpoints"
    if config.resume:
        if latest_checkpoint(checkpoints) is None:
            raise UserInputError(f"{run_dir} has no checkpoint to resume from", "check --out, or start a new run without --resume")
        try:
            previous = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))["config"]
        except (OSError, json.JSONDecodeError, KeyError):
            raise UserInputError(f"{run_dir / RUN_FILE} is missing or unreadable", "resume only runs started by llmprune finetune") from None
        changed = [name for name in DATA_FIELDS + LOSS_FIELDS if previous.get(name, FinetuneConfig.__dataclass_fields__[name].default) != getattr(config, name)]
        if changed:
            raise UserInputError(
                f"--resume with different data or loss settings ({', '.join(changed)}) would not continue the same run",
                "use the settings of the original run (see run.json) or start a new --out",
            )
    elif latest_checkpoint(checkpoints) is not None:
        raise UserInputError(f"{run_dir} already holds a run", "pass --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _measure_ppl(model: torch.nn.Module, tokenizer: Any, config: FinetuneConfig, phase: str, emit: Listener) -> float:
    from llmprune.engine.data import load_evaluation_windows
    from llmprune.engine.evaluate import perplexity

    windows = load_evaluation_windows(tokenizer, config.eval_dataset, config.seq_len, config.eval_windows)
    result = perplexity(model, windows)
    emit(PerplexityMeasured(phase=phase, ppl=result.ppl, dataset=config.eval_dataset, windows=result.windows))
    log.info("PPL %s: %.3f", phase, result.ppl)
    return result.ppl


# ---------------------------------------------------------------- the loop


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
    config.validate()
    control = control or TrainingControl()
    emit = _safe_listener(listener)
    run_dir = _prepare_run_dir(config)
    accelerator = make_accelerator(config, next(model.parameters()).device)
    main = accelerator.is_main_process
    handler = _attach_log_file(run_dir) if main else None
    try:
        loss_fn = _loss_function(model, teacher, config, accelerator.device)
        return _train(model, tokenizer, config, accelerator, run_dir, emit if main else (lambda event: None), control, train_windows,
                      provenance or {}, loss_fn)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _loss_function(student: torch.nn.Module, teacher: torch.nn.Module | None, config: FinetuneConfig, device: torch.device):
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


def _train(model, tokenizer, config, accelerator, run_dir, emit, control, train_windows, provenance, loss_fn) -> FinetuneResult:
    from llmprune.engine.data import load_calibration_windows

    main = accelerator.is_main_process
    torch.manual_seed(config.seed)
    fp16 = accelerator.mixed_precision == "fp16"
    if fp16:
        warnings.warn("fp16 training is the main cause of NaN loss after pruning; prefer bf16 (GPU) or fp32", stacklevel=2)
        log.warning("fp16 mixed precision was asked for: expect overflow; prefer bf16 or fp32")
    model.float()  # fp32 master weights; autocast (bf16 on GPU) does the low-precision compute

    windows = train_windows or load_calibration_windows(tokenizer, config.dataset, config.samples, config.seq_len, config.seed)
    per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    steps_per_epoch = len(windows) // per_step
    if steps_per_epoch == 0:
        raise UserInputError(
            f"{len(windows)} training windows are fewer than one optimizer step needs ({per_step})",
            "raise --samples or lower --batch-size/--grad-accum",
        )
    total_steps = steps_per_epoch * config.epochs

    health = None
    if not config.resume:
        report = health_check(model, tokenizer)
        health = report.to_dict()
        emit(HealthChecked(ok=bool(report.ok), forced=config.force, findings=list(health.get("findings", []))))
        if not report.ok and not config.force:
            raise UnhealthyModelError(report)
        if not report.ok:
            log.warning("health check failed; training anyway because of --force")

    ppl_before = _measure_ppl(model, tokenizer, config, "before", emit) if config.test_before else None

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
    metrics_path = run_dir / METRICS_FILE

    if config.resume:
        resumed_from = store.latest()
        store.restore(resumed_from)
        if main:
            _trim_metrics(metrics_path, progress.step)
        log.info("resumed from %s at step %d", resumed_from, progress.step)
    else:
        if main:
            metrics_path.write_text("", encoding="utf-8")
        store.save(0)  # the untouched model: the first good state to come back to
        emit(CheckpointSaved(step=0, path=str(store.pending), reason="start"))
    if main:
        atomic_write_json(run_dir / RUN_FILE, {"config": config.to_dict(), "total_steps": total_steps, "status": "running", "provenance": provenance})

    n_trainable = sum(p.numel() for p in trainable)
    emit(RunStarted(
        run_dir=str(run_dir), method=config.method, total_steps=total_steps, start_step=progress.step,
        epochs=config.epochs, tokens_per_step=per_step * config.seq_len, trainable_parameters=n_trainable,
        total_parameters=sum(p.numel() for p in model.parameters()), device=str(accelerator.device),
        teacher=_teacher_label(config, loss_fn),
    ))
    log.info("training %s: %d steps of %d tokens, %d trainable parameters", config.method, total_steps, per_step * config.seq_len, n_trainable)

    status, message, last_loss = "completed", "", None
    all_alerts: list[GuardAlert] = []
    clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    # ln(vocab) is the loss of a uniform guess; once the model has done clearly better,
    # coming back near it means collapse (see guards.check_step)
    chance = math.log(accelerator.unwrap_model(model).config.vocab_size)
    collapse_loss = None
    started = time.perf_counter()
    trained_tokens = 0
    metrics_file = metrics_path.open("a", encoding="utf-8") if main else None
    try:
        while progress.step < total_steps:
            epoch, position = divmod(progress.step, steps_per_epoch)
            order = epoch_order(len(windows), config.seed, epoch)
            lr = optimizer.param_groups[0]["lr"]
            tick = time.perf_counter()
            step_loss = _forward_backward(model, loss_fn, windows, order, position * per_step, config, accelerator)
            loss_value = step_loss.loss
            grad_norm = float(accelerator.clip_grad_norm_(trainable, clip))
            verdict = check_step(loss_value, grad_norm, config.loss_limit, collapse_loss, step_loss.teacher_finite)
            if verdict.ok:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped optimizer step makes torch warn about the order
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()  # the schedule follows the step count, skipped steps included
            progress.step += 1
            step_tokens = per_step * config.seq_len
            trained_tokens += step_tokens
            seconds = time.perf_counter() - tick

            alert = None
            if verdict.ok:
                store.confirm()  # the weights of the pending checkpoint just gave a sane loss
                last_loss = loss_value
                if collapse_loss is None and loss_value < 0.8 * chance:
                    collapse_loss = 0.95 * chance
                progress.best_loss = loss_value if progress.best_loss is None else min(progress.best_loss, loss_value)
            else:
                store.discard_pending()
                action = config.on_nan
                if action == "rollback" and (progress.rollbacks >= config.max_rollbacks or store.latest() is None):
                    action = "stop"  # out of rollbacks, or no step has proved any state good yet
                alert = make_alert(progress.step, verdict, action, lr, fp16)
                all_alerts.append(alert)
                emit(alert)
                log.error(alert.message)
            record = StepMetrics(
                step=progress.step, epoch=epoch + 1, loss=loss_value, lr=lr, grad_norm=grad_norm,
                tokens_per_second=step_tokens / seconds if seconds > 0 else 0.0, applied=verdict.ok,
                alerts=(alert,) if alert else (), lm_loss=step_loss.lm, kd_loss=step_loss.kd,
            )
            if metrics_file is not None:
                metrics_file.write(json.dumps(record.to_dict()) + "\n")
                metrics_file.flush()
            emit(record)
            if progress.step % 10 == 0 or progress.step == 1:
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g", progress.step, total_steps, loss_value, lr, grad_norm)

            if alert is not None and alert.action == "stop":
                status = "stopped_by_guard"
                message = f"stopped at step {progress.step}: {verdict.message}"
                break
            if alert is not None and alert.action == "rollback":
                _rollback(store, progress, scheduler, optimizer, emit)
                continue
            requested = verdict.ok and control.take_save_request()
            if verdict.ok and (requested or progress.step % config.save_every == 0):
                emit(CheckpointSaved(step=progress.step, path=str(store.save(progress.step)), reason="request" if requested else "interval"))
            if control.stop_requested:
                status, message = "stopped_by_user", f"stopped on request after step {progress.step}"
                break
    except KeyboardInterrupt:
        status, message = "stopped_by_user", f"interrupted after step {progress.step}"
        log.warning(message)
    finally:
        if metrics_file is not None:
            metrics_file.close()

    last_good = _settle_final_state(model, windows, store, progress, status, accelerator, emit)
    if status == "stopped_by_guard" and last_good is not None:
        message += f"; weights restored to the last good checkpoint (step {checkpoint_step(last_good)})"
    elapsed = time.perf_counter() - started

    unwrapped = accelerator.unwrap_model(model)
    ppl_after = _measure_ppl(unwrapped, tokenizer, config, "after", emit) if config.test_after else None
    model_dir = adapter_dir = None
    if status == "stopped_by_guard" and last_good is None:
        message += "; no state was proved good, so no model was saved (the input model is unchanged on disk)"
    else:
        model_dir, adapter_dir = _save_outputs(unwrapped, tokenizer, config, run_dir, accelerator, provenance, {
            "status": status, "steps": progress.step, "ppl_before": ppl_before, "ppl_after": ppl_after,
        })
    result = FinetuneResult(
        run_dir=str(run_dir), status=status, steps=progress.step, total_steps=total_steps, method=config.method,
        best_loss=progress.best_loss, final_loss=last_loss, ppl_before=ppl_before, ppl_after=ppl_after,
        last_good_checkpoint=str(last_good) if last_good else None, model_dir=model_dir, adapter_dir=adapter_dir,
        rollbacks=progress.rollbacks, alerts=[a.to_dict() for a in all_alerts],
        tokens_per_second=trained_tokens / elapsed if elapsed > 0 else 0.0, seconds=elapsed, health=health, message=message,
    )
    if main:
        atomic_write_json(run_dir / RUN_FILE, {"config": config.to_dict(), "total_steps": total_steps, "provenance": provenance, **result.to_dict()})
        log.info("finished: %s %s", status, message)
    emit(RunFinished(status=status, steps=progress.step, best_loss=progress.best_loss,
                     last_good_checkpoint=result.last_good_checkpoint, model_dir=model_dir or adapter_dir, message=message))
    accelerator.free_memory()
    return result


@dataclass
class StepLoss:
    """One optimizer step's loss and its parts, averaged over micro-batches and processes."""

    loss: float
    lm: float
    kd: float | None = None
    teacher_finite: bool = True


def _forward_backward(model, loss_fn, windows: TokenWindows, order: torch.Tensor, first: int, config: FinetuneConfig, accelerator) -> StepLoss:
    """Accumulate the gradients of one optimizer step; `first` is the step's first window in `order`."""
    parts: list[LossParts] = []
    for micro in range(config.grad_accum):
        # each process reads its own slice of the global batch
        start = first + (micro * accelerator.num_processes + accelerator.process_index) * config.batch_size
        ids = windows.ids[order[start : start + config.batch_size]].to(accelerator.device)
        last_micro = micro == config.grad_accum - 1
        # gradients are synchronised across processes once, on the last micro-batch
        with nullcontext() if last_micro else accelerator.no_sync(model):
            loss = loss_fn(model, ids)
            accelerator.backward(loss.total / config.grad_accum)
        parts.append(loss)

    def mean(values: list[torch.Tensor]) -> float:
        return float(accelerator.reduce(torch.stack([v.detach().float() for v in values]).mean(), reduction="mean"))

    distilled = parts[0].kd is not None
    teacher_finite = True
    if distilled:
        flags = torch.stack([p.teacher_finite for p in parts]).all().float()
        teacher_finite = bool(accelerator.reduce(flags, reduction="mean") == 1.0)  # every process's teacher was finite
    return StepLoss(
        loss=mean([p.total for p in parts]), lm=mean([p.lm for p in parts]),
        kd=mean([p.kd for p in parts]) if distilled else None, teacher_finite=teacher_finite,
    )


def _rollback(store: CheckpointStore, progress: TrainingProgress, scheduler: Any, optimizer: Any, emit: Listener) -> None:
    """Back to the last good weights/optimizer with half the LR; the data position moves on past the bad batch."""
    at_step, rollbacks, best = progress.step, progress.rollbacks + 1, progress.best_loss
    good = store.latest()
    store.restore(good)  # also reloads `progress` and the scheduler as they were then
    restored_step = progress.step
    progress.step, progress.rollbacks, progress.best_loss = at_step, rollbacks, best
    progress.lr_scale *= 0.5
    scheduler.base_lrs = [base * 0.5 for base in scheduler.base_lrs]
    # put the schedule at the current step with the new base LR
    scheduler.last_epoch = at_step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    event = RolledBack(at_step=at_step, restored_step=restored_step, lr_scale=progress.lr_scale, rollbacks=rollbacks)
    log.warning("rolled back to step %d (LR x%.3g, rollback %d)", restored_step, progress.lr_scale, rollbacks)
    emit(event)


@torch.no_grad()
def _settle_final_state(model, windows, store, progress, status, accelerator, emit) -> Path | None:
    """Make the weights in memory trustworthy before they are saved, and return the last good checkpoint.

    After a guard stop the weights go back to the last good checkpoint. Otherwise the
    last update has not been judged yet: one forward pass does it, and the final
    state becomes a confirmed checkpoint (or, if that loss is bad, the last good one is restored).
    """
    if status != "stopped_by_guard":
        ids = windows.ids[: 1].to(accelerator.device)
        model.eval()
        loss = float(accelerator.reduce(model(input_ids=ids, labels=ids, use_cache=False).loss.detach().float(), reduction="mean"))
        model.train()
        if math.isfinite(loss):
            if store.pending is None or checkpoint_step(store.pending) != progress.step:
                store.save(progress.step)
                emit(CheckpointSaved(step=progress.step, path=str(store.pending), reason="final"))
            store.confirm()
            return store.latest()
        log.error("the final weights give a non-finite loss; restoring the last good checkpoint")
    store.discard_pending()
    good = store.latest()
    if good is not None:
        counters = (progress.step, progress.rollbacks, progress.best_loss)
        store.restore(good)
        progress.step, progress.rollbacks, progress.best_loss = counters
    return good


def _save_outputs(model, tokenizer, config, run_dir: Path, accelerator, provenance: dict, summary: dict) -> tuple[str | None, str | None]:
    """The final model in prune's reloadable format (or the LoRA adapter), written by the main process."""
    from llmprune.engine.io.checkpoint import save_model

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None, None
    carried = {k: v for k, v in provenance.items() if k not in ("llmprune_version", "uniform", "layer_shapes", "num_parameters")}
    record = {**carried, "finetune": {**summary, **{k: getattr(config, k) for k in ("method", "lr", "dataset", "samples", "seq_len", "epochs", "seed") + LOSS_FIELDS}}}
    if config.method == "lora" and not config.merge:
        adapter_dir = run_dir / "adapter"
        from llmprune.engine.core.paths import atomic_directory

        with atomic_directory(adapter_dir) as staging:
            model.save_pretrained(staging)
        return None, str(adapter_dir)
    if config.method == "lora":
        model = model.merge_and_unload()
    return str(save_model(model, tokenizer, run_dir / "model", provenance=record)), None


# ---------------------------------------------------------------- from a model spec


def run_finetune(config: FinetuneConfig, listener: Listener | None = None, *, control: TrainingControl | None = None) -> FinetuneResult:
    """Load `config.model` and fine-tune it (the `llmprune finetune` engine)."""
    from llmprune.engine.core.device import choose_placement
    from llmprune.engine.io.models import load_model

    config.validate()
    placement = choose_placement(config.device, "float32")  # fp32 master weights whatever the compute dtype
    loaded = load_model(config.model, base_model=config.base_model, trust_pickle=config.trust_pickle, placement=placement)
    if loaded.tokenizer is None:
        raise UserInputError(f"{config.model} has no tokenizer", "save the tokenizer next to the weights or use --base-model")
    provenance = {**loaded.provenance, "base_model": loaded.provenance.get("base_model", config.model)}
    return finetune_model(loaded.model, loaded.tokenizer, config, listener, control=control, provenance=provenance)
