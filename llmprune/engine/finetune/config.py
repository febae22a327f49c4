"""What `llmprune finetune` is asked to do (`FinetuneConfig`), how a run ended (`FinetuneResult`), and its controls.

Each fine-tuning setting is declared here once, as a field with its docstring: the options of
`llmprune finetune` and of `llmprune recipe NAME` are generated from these fields
(cli/settings_options.py), and a recipe overrides values of this class rather than declaring its own.
Torch-free, so that the command line can be built from it without importing torch.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from llmprune.engine.core.errors import LlmpruneError, require
from llmprune.engine.finetune.guards import ON_NAN_CHOICES
from llmprune.engine.io.load_options import LoadOptions

METHODS = ("full", "lora")
SCHEDULES = ("linear", "cosine", "constant")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# fields that fix which window each step reads: a resumed run must keep them
DATA_FIELDS = ("dataset", "samples", "seq_len", "batch_size", "grad_accum", "epochs", "seed")
# fields that fix what each step's loss is: a resumed run must keep them too
LOSS_FIELDS = ("teacher", "kd_temperature", "kd_weight", "kd_top_k")


@dataclass
class FinetuneConfig(LoadOptions):
    """What `llmprune finetune` does."""

    method: str = "full"
    """full: train every weight; lora: train low-rank adapters (peft)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Module names that get LoRA adapters (comma-separated on the command line)."""
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
    save_every_minutes: float = 10.0
    """Also checkpoint when this many minutes passed since the last save (0: by steps only)."""
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
    gradient_checkpointing: bool = False
    """Keep only each layer's input for the backward pass and recompute the rest (much less activation memory, about
    a third slower)."""
    force: bool = False
    """Train even if the health check finds the model unhealthy or the memory plan says it will not fit."""
    dry_run: bool = False
    """Run the checks that need no weights, print the memory plan, train nothing (exit 0: it fits, 1: it does not)."""
    teacher: str | None = None
    """Model spec of a teacher to distil from (usually the unpruned base model); None: LM loss only."""
    kd_temperature: float = 1.0
    """Softmax temperature of the distillation loss (the KL is scaled by T² so its gradients keep their size)."""
    kd_weight: float = 1.0
    """Weight of the distillation loss; the LM loss gets 1 - weight (1: distillation only)."""
    kd_top_k: int | None = None
    """Keep only the teacher's k largest logits per position (renormalised); None: the whole vocabulary."""
    save_dtype: str = "auto"
    """dtype of the saved model: auto (the source's stored dtype: bf16 in -> bf16 out) | float32 | bfloat16 | float16.
    """

    def validate_training(self, flags: dict[str, str] | None = None) -> None:
        """The training values on their own (a recipe checks its fine-tune with this before anything runs).

        `flags` names an option where the caller's differs from the field's (`recipe NAME --train-batch-size`).
        """

        def flag(name: str) -> str:
            return (flags or {}).get(name, "--" + name.replace("_", "-"))

        require(self.method in METHODS, f"unknown --method '{self.method}'", "use full or lora")
        require(
            self.schedule in SCHEDULES, f"unknown --schedule '{self.schedule}'", f"use one of {', '.join(SCHEDULES)}"
        )
        require(
            self.on_nan in ON_NAN_CHOICES,
            f"unknown --on-nan '{self.on_nan}'",
            f"use one of {', '.join(ON_NAN_CHOICES)}",
        )
        for name in ("samples", "seq_len", "epochs", "batch_size", "grad_accum", "save_every", "keep_checkpoints"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value >= 1,
                f"{flag(name)} must be an integer ≥ 1, got {value}",
                "use a positive value",
            )
        require(
            isinstance(self.lora_r, int) and self.lora_r >= 1,
            f"--lora-r must be an integer ≥ 1, got {self.lora_r}",
            "use a positive value",
        )
        require(self.seq_len >= 2, f"--seq-len must be ≥ 2, got {self.seq_len}", "use e.g. --seq-len 256")
        require(
            math.isfinite(self.lr) and self.lr > 0,
            f"--lr must be a positive number, got {self.lr}",
            "use e.g. --lr 1e-5",
        )
        require(
            self.warmup_steps >= 0, f"--warmup-steps must be ≥ 0, got {self.warmup_steps}", "use e.g. --warmup-steps 10"
        )
        require(
            self.max_grad_norm >= 0,
            f"--max-grad-norm must be ≥ 0, got {self.max_grad_norm}",
            "use e.g. 1.0 (0 disables clipping)",
        )
        require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"--weight-decay must be a finite number ≥ 0, got {self.weight_decay}",
            "use e.g. 0.01",
        )
        require(
            self.lora_alpha > 0,
            f"--lora-alpha must be > 0, got {self.lora_alpha}",
            "use e.g. --lora-alpha 32 (twice --lora-r)",
        )
        require(
            math.isfinite(self.save_every_minutes) and self.save_every_minutes >= 0,
            f"--save-every-minutes must be ≥ 0, got {self.save_every_minutes}",
            "use e.g. 10 (0 saves by --save-every steps only)",
        )
        require(self.loss_limit > 0, f"--loss-limit must be > 0, got {self.loss_limit}", "use e.g. 1e6")
        require(self.max_rollbacks >= 0, f"--max-rollbacks must be ≥ 0, got {self.max_rollbacks}", "use e.g. 3")

    def validate(self) -> None:
        """Every setting, and that the texts exist, before the model is loaded."""
        from llmprune.engine.finetune.distill import validate_kd_settings  # distill needs torch; this file does not

        self.validate_training()
        require(
            self.eval_windows is None or self.eval_windows >= 1,
            f"--eval-windows must be ≥ 1, got {self.eval_windows}",
            "leave it out for 64",
        )
        require(
            not (self.merge and self.method != "lora"),
            "--merge only applies to --method lora",
            "drop --merge or add --method lora",
        )
        require(
            not (self.resume and not self.out),
            "--resume needs the run directory",
            "pass --out DIR of the run to continue",
        )
        validate_kd_settings(self.kd_temperature, self.kd_weight, self.kd_top_k)
        from llmprune.engine.data import check_text_source

        check_text_source(self.dataset)
        if self.test_before or self.test_after:
            check_text_source(self.eval_dataset, "--eval-dataset")

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
    memory_plan: dict | None = None

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
