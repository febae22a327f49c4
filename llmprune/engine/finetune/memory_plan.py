"""The memory a fine-tune will hold, worked out before anything loads, and the cheapest changes that make it fit.

From the model's config alone (built on the meta device: no weight is read) and the run's options, each
term a training process holds at its peak:

- weights: fp32 master weights (the loop trains fp32 and lets bf16 autocast do the compute on a GPU),
  plus the bf16 copies autocast caches for the forward on a GPU;
- gradients and AdamW state (two fp32 moments) of the trainable parameters: all of them (full) or the
  adapters (LoRA); FSDP shards weights, gradients and state over the processes and gathers one layer at a time;
- activations kept for the backward pass: per layer and token about 16·h bytes of RMSNorm (fp32) and
  (3·q + 2·kv + 4·i) values of attention and MLP (q, kv, i: the layer's own widths, so a pruned layer
  costs less), plus the LoRA branches' dropout outputs; with gradient checkpointing only each layer's
  input, and one layer's activations while it is recomputed;
- the logits: batch x seq x vocab, kept, log-softmaxed and their gradient (12 bytes a value in fp32);
- a teacher for distillation: its weights (bf16 on a GPU, fp32 on the CPU) and logits;
- the runtime itself (torch, transformers, the tokenizer; the CUDA context on a GPU).

The coefficients are the tensors HF's Llama layer saves for backward; `benchmarks/finetune_memory.py`
checks the total against the measured peak RSS. Torch is imported lazily: the plan of a 6.5 B model is
built without allocating its weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

GIB = 2**30
# torch + transformers + tokenizer + data in one process, measured on the CPU (benchmarks/finetune_memory.py)
CPU_RUNTIME_BYTES = int(0.75 * GIB)
# the CUDA context, cuBLAS workspaces and the caching allocator's slack
GPU_RUNTIME_BYTES = int(1.5 * GIB)


@dataclass(frozen=True)
class LayerWidths:
    """What one decoder layer computes with: query width (heads x head_dim), key/value width, MLP width."""

    query: int
    key_value: int
    intermediate: int


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model, read from its config without loading weights."""

    parameters: int
    hidden: int
    vocab: int
    layers: tuple[LayerWidths, ...]
    linears: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features) of every nn.Linear
    supports_gradient_checkpointing: bool = True

    def lora_parameters(self, targets: tuple[str, ...], rank: int) -> int:
        """Adapter parameters: A (r x in) and B (out x r) on every Linear whose last name is a target."""
        return sum(rank * (n_in + n_out) for name, n_in, n_out in self.linears if name.rsplit(".", 1)[-1] in targets)

    def lora_inputs(self, targets: tuple[str, ...]) -> int:
        """Per token, the values of the adapters' dropout outputs in all layers (what LoRA adds to the activations)."""
        return sum(n_in for name, n_in, _ in self.linears if name.rsplit(".", 1)[-1] in targets)

    def largest_layer_parameters(self) -> int:
        per_layer: dict[str, int] = {}
        for name, n_in, n_out in self.linears:
            if ".layers." in name:
                key = name.split(".layers.")[0] + ".layers." + name.split(".layers.")[1].split(".")[0]
                per_layer[key] = per_layer.get(key, 0) + n_in * n_out
        return max(per_layer.values(), default=0)


def shape_from_config(config: Any) -> ModelShape:
    """Build the model on the meta device (no memory) from a transformers config and read its shape."""
    import torch

    from llmprune.engine.io.checkpoint import model_class_for

    model_class = model_class_for(config.to_dict())
    with torch.device("meta"):
        model = (
            model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
        )  # AutoModelForCausalLM builds from_config; the llmprune class takes the config directly
    linears = tuple(
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    layers = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        layers.append(
            LayerWidths(
                query=attention.q_proj.out_features,
                key_value=attention.k_proj.out_features,
                intermediate=mlp.gate_proj.out_features,
            )
        )
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        hidden=int(config.hidden_size),
        vocab=int(config.vocab_size),
        layers=tuple(layers),
        linears=linears,
        supports_gradient_checkpointing=bool(getattr(model, "supports_gradient_checkpointing", False)),
    )


def model_shape(spec: str) -> ModelShape | None:
    """The shape of a model spec from its config (None for a weights-only file: its shape is known once loaded)."""
    from pathlib import Path

    from llmprune.engine.io.models import STATE_DICT_SUFFIXES, resolve_config

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix in STATE_DICT_SUFFIXES:
        return None
    config, _ = resolve_config(spec)
    try:
        return shape_from_config(config)
    except (AttributeError, KeyError, TypeError, ValueError):  # not a Llama-style layout: loading will say why
        return None


@dataclass(frozen=True)
class PlanSettings:
    """The options the plan depends on (a FinetuneConfig's, plus where and how many processes)."""

    method: str = "full"
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ()
    batch_size: int = 1
    grad_accum: int = 1  # no memory of its own: a smaller micro-batch keeps the step's batch through it
    seq_len: int = 256
    gradient_checkpointing: bool = False
    device: str = "cpu"  # "cpu" or "cuda"
    bf16: bool = False  # bf16 autocast (a GPU)
    processes: int = 1
    sharded: bool = False  # FSDP: weights, gradients and optimizer state split over the processes

    @classmethod
    def of(cls, config: Any, device: str, processes: int | None = None, sharded: bool | None = None) -> PlanSettings:
        """The settings of a FinetuneConfig on `device`; processes and sharding from `accelerate launch`'s env."""
        from llmprune.engine.finetune.sharded import fsdp_launched, launched_processes

        dtype = (config.dtype or "auto").lower()
        return cls(
            method=config.method,
            lora_r=config.lora_r,
            lora_targets=tuple(config.lora_targets),
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
            seq_len=config.seq_len,
            gradient_checkpointing=config.gradient_checkpointing,
            device=device,
            bf16=device == "cuda" and dtype not in ("float32", "fp32"),
            processes=launched_processes() if processes is None else processes,
            sharded=fsdp_launched() if sharded is None else sharded,
        )


@dataclass
class MemoryPlan:
    """What one process holds at its peak (terms in bytes), the device's free memory, and what would fit."""

    terms: dict[str, int]
    settings: PlanSettings
    available_bytes: int | None
    trainable_parameters: int
    total_parameters: int
    fixes: list[dict] = field(default_factory=list)

    @property
    def per_process_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def needed_bytes(self) -> int:
        """What must fit in the free memory: one GPU's share, or all processes together in the one RAM."""
        share = self.settings.processes if self.settings.device == "cpu" else 1
        return self.per_process_bytes * share

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes

    @property
    def biggest_term(self) -> str:
        return max(self.terms, key=self.terms.__getitem__)

    def where(self) -> str:
        return "GPU memory (per GPU)" if self.settings.device == "cuda" else "RAM"

    def to_dict(self) -> dict:
        return {
            "terms": dict(self.terms),
            "per_process_bytes": self.per_process_bytes,
            "needed_bytes": self.needed_bytes,
            "available_bytes": self.available_bytes,
            "fits": self.fits,
            "where": self.where(),
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "settings": {**asdict(self.settings), "lora_targets": list(self.settings.lora_targets)},
            "fixes": list(self.fixes),
        }


def plan_memory(
    shape: ModelShape,
    settings: PlanSettings,
    available_bytes: int | None = None,
    teacher: ModelShape | None = None,
    *,
    with_fixes: bool = True,
) -> MemoryPlan:
    """The memory plan of one training process, and (when it does not fit) the cheapest changes that would."""
    s = settings
    lora = s.method == "lora"
    trainable = shape.lora_parameters(s.lora_targets, s.lora_r) if lora else shape.parameters
    shards = s.processes if s.sharded and s.processes > 1 else 1
    tokens = s.batch_size * s.seq_len
    half = 2 if s.bf16 else 4  # bytes of an autocast activation

    terms: dict[str, int] = {}
    terms["weights"] = 4 * (shape.parameters + (trainable if lora else 0)) // shards
    if s.bf16:  # autocast keeps a bf16 copy of each weight it used until the forward ends
        terms["weights (bf16 autocast copies)"] = 2 * sum(n_in * n_out for _, n_in, n_out in shape.linears) // shards
    if shards > 1:  # FSDP gathers a layer's full weights (and prefetches the next) around its compute
        terms["gathered layers (FSDP)"] = 2 * 4 * shape.largest_layer_parameters()
    terms["gradients"] = 4 * trainable // shards
    terms["optimizer (AdamW)"] = 8 * trainable // shards

    def layer_bytes(widths: LayerWidths) -> int:
        return 16 * shape.hidden + half * (3 * widths.query + 2 * widths.key_value + 4 * widths.intermediate)

    lora_extra = half * shape.lora_inputs(s.lora_targets) if lora else 0
    if s.gradient_checkpointing:
        kept = 4 * shape.hidden * len(shape.layers)  # each layer's input (the fp32 residual stream)
        recomputed = max(layer_bytes(w) for w in shape.layers) + lora_extra // max(1, len(shape.layers))
        terms["activations"] = tokens * (kept + recomputed)
    else:
        terms["activations"] = tokens * (sum(layer_bytes(w) for w in shape.layers) + lora_extra)
    terms["logits"] = tokens * shape.vocab * (14 if s.bf16 else 12)
    if teacher is not None:
        terms["teacher"] = teacher.parameters * (2 if s.bf16 else 4) + tokens * teacher.vocab * 12
    terms["runtime"] = GPU_RUNTIME_BYTES if s.device == "cuda" else CPU_RUNTIME_BYTES
    plan = MemoryPlan(terms, s, available_bytes, trainable, shape.parameters)
    if with_fixes and not plan.fits:
        plan.fixes = cheapest_fixes(shape, s, available_bytes, teacher)
    return plan


def _candidates(s: PlanSettings, teacher: bool) -> list[tuple[str, PlanSettings, bool]]:
    """Changes that lower the memory, cheapest first (what they cost in speed or quality): (advice, settings, no
    teacher)."""
    out: list[tuple[str, PlanSettings, bool]] = []
    if not s.gradient_checkpointing:
        out.append(("--gradient-checkpointing (about a third slower)", replace(s, gradient_checkpointing=True), False))
    if s.batch_size > 1:
        smaller = replace(s, batch_size=1, grad_accum=s.grad_accum * s.batch_size)
        advice = f"--batch-size 1 --grad-accum {smaller.grad_accum} (the same windows per optimizer step)"
        out.append((advice, smaller, False))
        if not s.gradient_checkpointing:
            out.append((f"{advice} and --gradient-checkpointing", replace(smaller, gradient_checkpointing=True), False))
    if s.device == "cuda" and s.method == "full":
        for gpus in (2, 4, 8):
            if gpus > s.processes or not s.sharded:
                launch = (
                    f"accelerate launch --config_file accelerate/fsdp.yaml --num_processes {gpus} -m llmprune finetune"
                )
                out.append((f"FSDP over {gpus} GPUs: {launch} ...", replace(s, processes=gpus, sharded=True), False))
                out.append(
                    (
                        f"FSDP over {gpus} GPUs with --gradient-checkpointing: {launch} ... --gradient-checkpointing",
                        replace(s, processes=gpus, sharded=True, gradient_checkpointing=True),
                        False,
                    )
                )
    if s.method == "full":
        out.append(("--method lora (adapters only: a gentler recovery)", replace(s, method="lora"), False))
        out.append(
            (
                "--method lora --gradient-checkpointing",
                replace(s, method="lora", gradient_checkpointing=True),
                False,
            )
        )
    if teacher:
        out.append(("no --teacher (LM loss only)", s, True))
    if s.seq_len > 128:
        out.append((f"--seq-len {s.seq_len // 2}", replace(s, seq_len=s.seq_len // 2), False))
    return out


def cheapest_fixes(
    shape: ModelShape, settings: PlanSettings, available: int | None, teacher: ModelShape | None, limit: int = 3
) -> list[dict]:
    """Up to `limit` single changes, cheapest first, that make the same plan fit."""
    fixes, fsdp_given = [], False
    for advice, changed, drop_teacher in _candidates(settings, teacher is not None):
        if changed.sharded and fsdp_given:
            continue  # the fewest GPUs that fit is the one FSDP answer worth giving; LoRA may follow
        plan = plan_memory(shape, changed, available, None if drop_teacher else teacher, with_fixes=False)
        if plan.fits:
            fsdp_given = fsdp_given or changed.sharded
            fixes.append({"change": advice, "needed_bytes": plan.needed_bytes})
            if len(fixes) == limit:
                break
    return fixes


def describe_misfit(plan: MemoryPlan) -> tuple[str, str]:
    """The one line of a plan that does not fit: the need, the biggest term, and the cheapest fix."""
    gib = GIB
    biggest = plan.biggest_term
    problem = (
        f"fine-tuning needs about {plan.needed_bytes / gib:.1f} GiB of {plan.where()} but"
        f" {plan.available_bytes / gib:.1f} GiB is free; the biggest term is {biggest}"
        f" ({plan.terms[biggest] / gib:.1f} GiB)"
    )
    if plan.fixes:
        hint = f"use {plan.fixes[0]['change']} ({plan.fixes[0]['needed_bytes'] / gib:.1f} GiB)"
        if len(plan.fixes) > 1:
            hint += "; or " + "; or ".join(fix["change"] for fix in plan.fixes[1:])
        hint += "; --force trains anyway"
    else:
        hint = "no single change fits: use a device with more memory, or --force to try anyway"
    return problem, hint


def plan_finetune(config: Any, device: Any = None) -> MemoryPlan | None:
    """The plan of a FinetuneConfig on its device, before the model loads (None: a weights-only file, whose shape
    is known only once loaded). Checks the settings and the run folder first, as the run would."""
    from llmprune.engine.core.device import available_memory_bytes, resolve_device
    from llmprune.engine.finetune.run_setup import check_run_dir

    config.validate()
    if config.out:
        check_run_dir(config)
    device = device if device is not None else resolve_device(config.device)
    settings = PlanSettings.of(config, "cuda" if device.type == "cuda" else "cpu")
    if settings.sharded and settings.processes == 1:
        from llmprune.engine.core.errors import UserInputError

        raise UserInputError(
            "FSDP was asked for, but this is a single process: it shards the model over several",
            "launch it with accelerate launch --config_file accelerate/fsdp.yaml --num_processes N"
            " -m llmprune finetune ...",
        )
    if settings.sharded and settings.device != "cuda":
        from llmprune.engine.core.errors import UserInputError

        raise UserInputError(  # accelerate would fall back to DDP on CPUs and train unsharded (see sharded.py)
            "FSDP was asked for, but accelerate runs it on GPUs only (on CPUs it would train unsharded)",
            "launch on GPUs, or without the FSDP config (accelerate launch --num_processes N runs DDP)",
        )
    shape = model_shape(config.model)
    if shape is None:
        return None
    if config.gradient_checkpointing and not shape.supports_gradient_checkpointing:
        from llmprune.engine.core.errors import UserInputError

        raise UserInputError(
            f"{config.model} cannot do gradient checkpointing (its model class does not support it)",
            "drop --gradient-checkpointing",
        )
    teacher = model_shape(config.teacher) if config.teacher else None
    return plan_memory(shape, settings, available_memory_bytes(device), teacher)
