"""Everything a fine-tuning run needs around its loop: the run folder (checked, marked, resumable),
the accelerator and its precision, LoRA, the schedule, the window order, the log file, the PPL probes."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.events import Event, Listener, PerplexityMeasured
from llmprune.engine.core.outputs import RUN_MARKER, check_output_folder
from llmprune.engine.core.paths import atomic_write_json, atomic_write_text
from llmprune.engine.core.stop import STOP, is_terminal_error, mute_lost_terminal
from llmprune.engine.finetune import run_lock
from llmprune.engine.finetune.config import DATA_FIELDS, DEFAULT_LORA_TARGETS, LOSS_FIELDS, FinetuneConfig
from llmprune.engine.finetune.run_checkpoints import checkpoint_step, latest_checkpoint

log = logging.getLogger("llmprune.train")  # the training loop's logger: one log file for the whole run

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
LOG_FILE = "training.log"


def default_run_dir() -> Path:
    root = Path(os.environ.get("LLMPRUNE_RUNS", "llmprune-runs"))
    return root / f"finetune-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def health_check(model: torch.nn.Module, tokenizer: Any) -> Any:
    """doctor's pre-flight check (NaN/Inf weights, forward test); one implementation, in health.py."""
    from llmprune.engine.diagnose.health import preflight_check

    return preflight_check(model, tokenizer, forward=True)


def make_accelerator(config: FinetuneConfig, device: torch.device) -> Any:
    """bf16 autocast over fp32 master weights on GPU, plain fp32 on CPU; fp16 only when asked."""
    from accelerate.state import AcceleratorState

    from accelerate import Accelerator

    dtype = (config.dtype or "auto").lower()
    if device.type == "cpu" or dtype in ("float32", "fp32"):
        mixed = "no"
    elif dtype in ("float16", "fp16", "half"):
        mixed = "fp16"
    else:
        mixed = "bf16"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = AcceleratorState._shared_state
    if (
        not launched
        and state
        and (
            state.get("_mixed_precision") != mixed
            or (state.get("device") is not None and state["device"].type != device.type)
        )
    ):
        # a second in-process run (tests, recipes) with other settings: accelerate keeps a
        # process-wide singleton that refuses to change, so reset it when nothing is distributed
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)
    from llmprune.engine.finetune.sharded import check_sharding

    check_sharding(accelerator)  # an FSDP launch that accelerate would run unsharded (CPUs) is refused
    return accelerator


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Keep each decoder layer's input only and recompute the layer in the backward pass (transformers' own)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserInputError(
            f"{type(model).__name__} cannot do gradient checkpointing", "drop --gradient-checkpointing"
        )
    # non-reentrant: works when the inputs need no gradient (LoRA's frozen embeddings) and keeps the RNG state
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def apply_lora(model: torch.nn.Module, config: FinetuneConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in config.lora_targets if target not in present]
    if missing:
        raise UserInputError(
            f"LoRA target module(s) {', '.join(missing)} are not in this model",
            f"choose among {', '.join(DEFAULT_LORA_TARGETS)}",
        )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def make_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(config.schedule, config.schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The window order of one epoch: a fixed function of (seed, epoch), so resume needs only the step."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def safe_listener(listener: Listener | None) -> Listener:
    def emit(event: Event) -> None:
        if listener is None:
            return
        try:
            listener(event)
        except OSError as error:
            if not is_terminal_error(error):
                log.exception("listener failed on %s; training goes on", type(event).__name__)
            elif mute_lost_terminal():  # the terminal went away under the printer: that is a stop (core/stop.py)
                log.warning("the terminal went away: stopping after this step")
                STOP.request("the terminal went away")
        except Exception:  # the UI is a guest: its bugs must not cost the user the run
            log.exception("listener failed on %s; training goes on", type(event).__name__)

    return emit


def attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume, forget steps after the checkpoint: they will be trained again."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= last_step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_run(run_dir: Path) -> dict:
    try:
        record = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _first_process() -> bool:
    """The launch's first process (torchrun / accelerate launch set RANK; a single process has none)."""
    return os.environ.get("RANK", "0") == "0"


def prepare_run_dir(config: FinetuneConfig, needed_bytes: int | None = None) -> Path:
    run_dir = check_run_dir(config, needed_bytes)
    run_dir.mkdir(parents=True, exist_ok=True)
    if _first_process():
        run_lock.acquire(run_dir)  # one writer per run folder; finetune_model releases it
    if not (run_dir / RUN_FILE).is_file() and _first_process():
        # marks the folder as a run from the start, so that a run killed before its first checkpoint can be started
        # again there
        atomic_write_json(run_dir / RUN_FILE, {"config": config.to_dict(), "status": "starting"})
    return run_dir


def check_run_dir(config: FinetuneConfig, needed_bytes: int | None = None) -> Path:
    """Whether --out may receive this run (a new or empty folder, or the run to --resume); nothing is written."""
    run_dir = Path(config.out).expanduser() if config.out else default_run_dir()
    if not _first_process():
        # the first process checks and prepares the folder for all of a launch: another one checking it too would
        # race with it (and find the lock and run.json it has just written)
        return run_dir
    run_lock.check_unlocked(run_dir)  # a live trainer in this folder: say who, before anything else
    check_output_folder(run_dir, option="--out", resumable=True, needed_bytes=needed_bytes, kind=RUN_MARKER)
    checkpoints = run_dir / "checkpoints"
    if config.resume:
        if latest_checkpoint(checkpoints) is None:
            raise UserInputError(
                f"{run_dir} has no checkpoint to resume from", "check --out, or start a new run without --resume"
            )
        try:
            previous = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))["config"]
        except (OSError, json.JSONDecodeError, KeyError):
            raise UserInputError(
                f"{run_dir / RUN_FILE} is missing or unreadable", "resume only runs started by llmprune finetune"
            ) from None
        changed = [
            name
            for name in DATA_FIELDS + LOSS_FIELDS
            if previous.get(name, FinetuneConfig.__dataclass_fields__[name].default) != getattr(config, name)
        ]
        if changed:
            raise UserInputError(
                f"--resume with different data or loss settings ({', '.join(changed)}) would not continue the same run",
                "use the settings of the original run (see run.json) or start a new --out",
            )
        finished = read_run(run_dir)
        if (
            finished.get("status") == "completed"
            and finished.get("steps") is not None
            and finished.get("steps") >= finished.get("total_steps", 0)
        ):
            raise UserInputError(
                f"{run_dir} is a finished run ({finished['steps']} of {finished['total_steps']} steps): there is"
                " nothing to resume",
                f"its model is in {finished.get('model_dir') or run_dir}; to train more, start a new run on it with"
                " another --out",
            )
    elif latest_checkpoint(checkpoints) is not None:
        raise UserInputError(f"{run_dir} already holds a run", "pass --resume to continue it, or choose another --out")
    return run_dir


def measure_ppl(model: torch.nn.Module, tokenizer: Any, config: FinetuneConfig, phase: str, emit: Listener) -> float:
    from llmprune.engine.data import load_evaluation_windows
    from llmprune.engine.evaluate import perplexity

    windows = load_evaluation_windows(tokenizer, config.eval_dataset, config.seq_len, config.eval_windows)
    result = perplexity(model, windows)
    emit(PerplexityMeasured(phase=phase, ppl=result.ppl, dataset=config.eval_dataset, windows=result.windows))
    log.info("PPL %s: %.3f", phase, result.ppl)
    return result.ppl


def intact_checkpoint(run_dir: Path) -> str:
    good = latest_checkpoint(run_dir / "checkpoints")
    return (
        f"the checkpoint of step {checkpoint_step(good)} is intact ({good})"
        if good
        else "no checkpoint was written yet"
    )


def record_failure(run_dir: Path, config: FinetuneConfig, error: BaseException) -> None:
    """run.json says the run failed (and why), so that nobody takes it for one still running."""
    record = read_run(run_dir) or {"config": config.to_dict()}
    problem = getattr(error, "problem", None) or f"{type(error).__name__}: {str(error).strip()[:300]}"
    record.update(
        {
            "status": "failed",
            "message": problem,
            "last_good_checkpoint": str(latest_checkpoint(run_dir / "checkpoints") or "") or None,
        }
    )
    try:
        atomic_write_json(run_dir / RUN_FILE, record)
    except OSError:  # the disk may be full: the error itself is what the user needs to see
        log.error("could not record the failure in %s", run_dir / RUN_FILE)


def save_outputs(
    model, tokenizer, config, run_dir: Path, accelerator, provenance: dict, summary: dict
) -> tuple[str | None, str | None]:
    """The final model in prune's reloadable format (or the LoRA adapter), written by the main process."""
    from llmprune.engine.finetune.sharded import gathered_model
    from llmprune.engine.io.checkpoint import save_model

    accelerator.wait_for_everyone()
    model = gathered_model(model, accelerator)  # FSDP: the shards gathered into one model on the main process
    if not accelerator.is_main_process:
        return None, None
    carried = {
        k: v
        for k, v in provenance.items()
        if k not in ("llmprune_version", "uniform", "layer_shapes", "num_parameters")
    }
    record = {
        **carried,
        "finetune": {
            **summary,
            **{
                k: getattr(config, k)
                for k in ("method", "lr", "dataset", "samples", "seq_len", "epochs", "seed") + LOSS_FIELDS
            },
        },
    }
    if config.method == "lora" and not config.merge:
        adapter_dir = run_dir / "adapter"
        from llmprune.engine.core.paths import atomic_directory

        with atomic_directory(adapter_dir) as staging:
            model.save_pretrained(staging)
        return None, str(adapter_dir)
    if config.method == "lora":
        model = model.merge_and_unload()
    from llmprune.engine.io.checkpoint import resolve_save_dtype

    dtype = resolve_save_dtype(config.save_dtype, None, next(model.parameters()).dtype)
    return str(save_model(model, tokenizer, run_dir / "model", provenance=record, dtype=dtype)), None
