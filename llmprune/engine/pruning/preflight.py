"""What `prune` and `analyze` check before they spend minutes on a model.

Before loading: every output location (see core.outputs). After loading,
before calibration: the model's weights are healthy (NaN/Inf/huge values,
GQA and shapes; `--force` goes on anyway), the windows fit its context, and
the depth-pruning request leaves layers to keep. Then, with the model's size
known, whether the output's disk has room for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.outputs import MODEL_MARKER, check_output_file, check_output_folder, check_writable_location
from llmprune.engine.data import check_seq_len_fits

# depth pruning never removes the first and the last layer (see depth.least_influential)
_PROTECTED_ENDS = 2


def check_prune_outputs(config: Any, needed_bytes: int | None = None) -> None:
    """--out (or --save-model's folder under --log-dir) and --log-dir, before anything is computed."""
    if config.out is not None:
        check_output_folder(
            config.out,
            option="--out",
            overwrite=getattr(config, "overwrite", False),
            needed_bytes=needed_bytes,
            kind=MODEL_MARKER,
        )
    anchor_bytes = needed_bytes if (config.save_model and config.out is None) else None
    check_writable_location(Path(config.log_dir), option="--log-dir", needed_bytes=anchor_bytes)


def check_analyze_output(output: str | Path, overwrite: bool = False) -> Path:
    """analyze's JSON config (and its chart beside it): a previous plan may be replaced, anything else is kept."""
    from llmprune.engine.pruning.analysis_file import is_importance_config

    path = Path(output)
    check_output_file(path, option="--output", ours=is_importance_config(path), overwrite=overwrite)
    chart = path.with_suffix(".png")
    check_output_file(chart, option="--output (its chart)", ours=is_importance_config(path), overwrite=overwrite)
    return path


def check_model_before_pruning(
    model: nn.Module, *, action: str, force: bool, seq_lens: dict[str, int], drop_layers: int = 0, round_to: int = 1
) -> Any:
    """Weight health (unless `force`), window lengths against the context, and the depth request; returns the health
    report.
    """
    from llmprune.engine.diagnose.health import require_healthy, weight_health

    for option, seq_len in seq_lens.items():
        check_seq_len_fits(seq_len, model, option)
    count = len(model.model.layers)
    if drop_layers > count - _PROTECTED_ENDS:
        raise UserInputError(
            f"--drop-layers {drop_layers} is more than this model allows: it has {count} layers and the first and last"
            " are kept",
            f"use --drop-layers {max(count - _PROTECTED_ENDS, 0)} or less",
        )
    narrowest = min(layer.mlp.gate_proj.out_features for layer in model.model.layers)
    if round_to > narrowest:
        raise UserInputError(
            f"--round-to {round_to} is larger than the model's MLP ({narrowest} channels): no width could be rounded"
            " to it",
            f"use a --round-to that divides the MLP width, e.g. 8 or 64 (at most {narrowest})",
        )
    return require_healthy(weight_health(model), action, force)


def check_weights_on_disk(spec: str, *, action: str, force: bool) -> Any:
    """The same health check for a model that is never loaded whole (streamed): doctor's tensor-by-tensor scan."""
    import json

    from llmprune.engine.diagnose.doctor import DoctorConfig, run_doctor
    from llmprune.engine.diagnose.health import require_healthy
    from llmprune.engine.io.consistency import check_config_matches_weights

    config_file = Path(spec) / "config.json"
    if config_file.is_file():  # a config that disagrees with the tensors is bad input (exit 2), not a weight fault
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserInputError(f"{config_file} is not valid JSON", "restore the file or re-save the model") from None
        check_config_matches_weights(spec, config if isinstance(config, dict) else {})
    return require_healthy(run_doctor(DoctorConfig(model=spec, device="cpu")), action, force)


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
