"""FSDP (sharded training) around the loop: refuse what would not shard, gather the final model, merge a checkpoint.

accelerate runs FSDP (`accelerate launch --config_file accelerate/fsdp.yaml`) with the model, its gradients
and the AdamW state split over the processes. Checkpoints are accelerate's own `save_state`, so with the
config's SHARDED_STATE_DICT every process writes its shard into the same hidden `.step-N.partial` folder
that is renamed into place only when all are done (run_checkpoints.py): a sharded checkpoint is never
half-written either. The final model is gathered into one state dict and saved in the same reloadable
format as a single-process run (safetensors, per-layer shapes, llmprune.json); a sharded checkpoint on
disk is merged into that format by `consolidate_checkpoint` (accelerate's `merge_fsdp_weights`).

On the CPU, accelerate (1.16) does not shard: it enables FSDP only for GPU-family devices and runs
MULTI_CPU (DDP) instead, so an FSDP launch on CPUs is refused with that reason rather than silently
training unsharded (torch's `fully_shard` itself runs on CPU with gloo: see the tests).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.core.errors import UserInputError

FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # where accelerate's save_state puts the first model's shards


def launched_processes() -> int:
    """How many processes `accelerate launch` / torchrun started (1 when run plainly)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def fsdp_launched() -> bool:
    """`accelerate launch` with an FSDP config sets this for every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def is_sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_sharding(accelerator: Any) -> None:
    """An FSDP launch must give an FSDP run: accelerate falls back to DDP on CPUs without a word."""
    if fsdp_launched() and not is_sharded(accelerator):
        raise UserInputError(
            f"FSDP was asked for, but accelerate runs it on GPUs only (here: {accelerator.distributed_type}, which"
            " would train unsharded)",
            "launch on GPUs, or without the FSDP config (accelerate launch --num_processes N runs DDP)",
        )


def gathered_model(model: Any, accelerator: Any) -> Any:
    """The trained model as one plain module on the main process (FSDP: every process joins the gather).

    Without sharding this is the unwrapped model itself; with FSDP a twin is built from the config on the
    meta device and given the full state dict (on the CPU), so nothing is held twice at full size on a GPU.
    """
    unwrapped = accelerator.unwrap_model(model)
    if not is_sharded(accelerator):
        return unwrapped
    state = accelerator.get_state_dict(model)  # a collective: every process must call it
    if not accelerator.is_main_process:
        return None
    return model_from_state_dict(unwrapped.config, type(unwrapped), state)


def model_from_state_dict(config: Any, model_class: type, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A model of `model_class` built from `config` holding `state` (tied weights re-tied)."""
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict({name: tensor.cpu() for name, tensor in state.items()}, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise ValueError(f"the state dict lacks {len(missing)} weights, e.g. {missing[0]}")
    return model.eval()


def consolidate_checkpoint(
    checkpoint_dir: str | Path, like: str | Path, out_dir: str | Path, provenance: dict | None = None
) -> Path:
    """Merge the sharded model of an FSDP checkpoint into a reloadable model folder.

    `like` is the model the run started from (its config gives the architecture and the per-layer shapes,
    its tokenizer is carried over). Written atomically by `save_model`.
    """
    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from llmprune.engine.io.checkpoint import model_class_for, save_model
    from llmprune.engine.io.models import load_model

    shards = Path(checkpoint_dir) / FSDP_MODEL_DIR
    if not shards.is_dir():
        raise UserInputError(f"{checkpoint_dir} holds no sharded model ({FSDP_MODEL_DIR}/)", "pass an FSDP checkpoint")
    config = AutoConfig.from_pretrained(str(like))
    with tempfile.TemporaryDirectory(prefix="llmprune-merge-") as tmp:
        merge_fsdp_weights(str(shards), tmp, safe_serialization=True)
        state = load_file(str(Path(tmp) / "model.safetensors"))
    model = model_from_state_dict(config, model_class_for(config.to_dict()), state)
    tokenizer = load_model(str(like)).tokenizer
    return Path(save_model(model, tokenizer, out_dir, provenance=provenance))
