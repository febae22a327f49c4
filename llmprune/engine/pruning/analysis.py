"""`llmprune analyze`: layer importance on calibration text -> a per-layer pruning plan.

The result is saved as `layer_importance_config.json` (plus a bar-chart image
next to it); `llmprune prune --importance-config FILE` reuses the scores without
recomputing them, and takes the file's plan options as its defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.paths import atomic_write_json
from llmprune.engine.core.progress import StageProgress, named_stage
from llmprune.engine.data import TokenWindows
from llmprune.engine.io.architecture import LayerShape, layer_shapes, require_llama_style
from llmprune.engine.io.load_options import LoadOptions
from llmprune.engine.pruning.allocate.plan import LayerUnits, PlanOptions, plan_units, unit_counts
from llmprune.engine.pruning.analysis_file import CONFIG_FORMAT, DEFAULT_CONFIG_NAME
from llmprune.engine.pruning.config import CalibrationOptions
from llmprune.engine.pruning.scores.layer_importance import LayerImportance, layer_importance
from llmprune.engine.pruning.scores.layers import DEFAULT_LAYER_SCORE, get_layer_score


@dataclass
class AnalyzeConfig(LoadOptions):
    """What `llmprune analyze` does."""

    importance_method: str = DEFAULT_LAYER_SCORE
    """removal | block-influence | taylor."""
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    """Calibration text and sizes."""
    plan: PlanOptions = field(default_factory=PlanOptions)
    """How scores become per-layer rates."""
    attn_unit: str = "group"
    """group (whole KV groups) | query (query heads, evenly in every group): for the planned attention rates."""
    prune_mlp: bool = True
    """Plan MLP channel rates too."""
    round_to: int = 1
    """MLP widths are multiples of this."""
    output: Path = Path(DEFAULT_CONFIG_NAME)
    """Where the JSON config goes (the CLI draws the chart image next to it)."""
    stream: bool = False
    """Read one decoder layer at a time from the safetensors files (removal, block-influence): memory of one layer, not
    the model.
    """
    overwrite: bool = False
    """Replace a previous plan at `output` (any other existing file is refused)."""
    force: bool = False
    """Analyse even if the weight health check fails (NaN/Inf/huge values, broken shapes)."""

    def validate(self) -> None:
        get_layer_score(self.importance_method, stream=self.stream)
        self.calibration.validate()
        if Path(self.output).is_dir():
            raise UserInputError(
                f"--output {self.output} is a folder", f"name a file, e.g. {Path(self.output) / DEFAULT_CONFIG_NAME}"
            )


@dataclass
class AnalyzeResult:
    """Layer importance and the plan made from it."""

    model: str
    num_parameters: int
    shapes: list[LayerShape]
    importance: LayerImportance
    calibration: CalibrationOptions
    plan: PlanOptions
    rates: list[float]
    units: list[LayerUnits]
    attn_unit: str
    prune_mlp: bool
    config_path: str | None = None
    chart_path: str | None = None  # set by whoever draws the chart (the CLI)

    def protected(self) -> list[int]:
        prunable = set(self.plan.prunable(len(self.shapes)))
        return [i for i in range(len(self.shapes)) if i not in prunable]

    def attention_rates(self) -> list[float]:
        return [1 - u.heads / s.num_attention_heads for s, u in zip(self.shapes, self.units, strict=False)]

    def mlp_rates(self) -> list[float]:
        return [1 - u.intermediate_size / s.intermediate_size for s, u in zip(self.shapes, self.units, strict=False)]

    def to_dict(self) -> dict:
        return {
            "format": CONFIG_FORMAT,
            "model": self.model,
            "architecture": {
                "num_layers": len(self.shapes),
                "num_parameters": self.num_parameters,
                "layer_shapes": [s.to_dict() for s in self.shapes],
            },
            "importance": {
                **self.importance.to_dict(),
                "dataset": self.calibration.dataset,
                "seed": self.calibration.seed,
            },
            "calibration": asdict(self.calibration),
            "plan": {
                **self.plan.to_dict(),
                "attn_unit": self.attn_unit,
                "prune_mlp": self.prune_mlp,
                "protected_layers": self.protected(),
                "rates": self.rates,
                "attention_rates": self.attention_rates(),
                "mlp_rates": self.mlp_rates(),
                "units": [u.to_dict() for u in self.units],
            },
            "config_path": self.config_path,
            "chart_path": self.chart_path,
        }


def measure_importance(
    model: nn.Module, windows: TokenWindows, method: str, batch_size: int = 8, progress: StageProgress | None = None
) -> LayerImportance:
    """Layer scores on calibration windows, reporting progress as a named stage."""
    return layer_importance(model, windows, method, batch_size, named_stage(progress, f"layer importance ({method})"))


def run_analyze(config: AnalyzeConfig, progress: StageProgress | None = None) -> AnalyzeResult:
    """Load the model, measure layer importance, make the plan, write the JSON config and the chart."""
    from llmprune.engine.data import load_calibration_windows
    from llmprune.engine.pruning.preflight import (
        check_analyze_output,
        check_model_before_pruning,
        check_weights_on_disk,
    )

    config.validate()
    check_analyze_output(config.output, config.overwrite)
    placement = config.placement()
    if config.stream:
        check_weights_on_disk(config.model, action="the analysis", force=config.force)
        shapes, num_parameters, importance = _measure_streamed(config, placement, progress)
    else:
        loaded = config.load(placement)
        require_llama_style(loaded.model)
        check_model_before_pruning(
            loaded.model, action="the analysis", force=config.force, seq_lens={"--seq-len": config.calibration.seq_len}
        )
        shapes, num_parameters = layer_shapes(loaded.model), loaded.num_parameters
    config.plan.validate(len(shapes))
    unit_counts(
        [0.0] * len(shapes), shapes, config.attn_unit, True, config.prune_mlp, config.round_to
    )  # validates the unit options
    if not config.stream:
        if loaded.tokenizer is None:
            raise UserInputError(
                f"{config.model} has no tokenizer", "save the tokenizer next to the weights or use --base-model"
            )
        calib = config.calibration
        windows = load_calibration_windows(loaded.tokenizer, calib.dataset, calib.samples, calib.seq_len, calib.seed)
        importance = measure_importance(loaded.model, windows, config.importance_method, calib.batch_size, progress)
    rates, units = plan_units(
        importance.scores, shapes, config.plan, config.attn_unit, config.prune_mlp, config.round_to
    )
    result = AnalyzeResult(
        model=config.model,
        num_parameters=num_parameters,
        shapes=shapes,
        importance=importance,
        calibration=config.calibration,
        plan=config.plan,
        rates=rates,
        units=units,
        attn_unit=config.attn_unit,
        prune_mlp=config.prune_mlp,
    )
    result.config_path = str(config.output)
    atomic_write_json(config.output, result.to_dict())
    return result


def _measure_streamed(
    config: AnalyzeConfig, placement, progress: StageProgress | None
) -> tuple[list[LayerShape], int, LayerImportance]:
    """Layer importance with the weights on disk (scores.layer_importance_streamed), for models that do not fit."""
    from transformers import AutoTokenizer

    from llmprune.engine.data import load_calibration_windows
    from llmprune.engine.io.architecture import layer_shape
    from llmprune.engine.pruning.scores.layer_importance_streamed import streamed_layer_importance
    from llmprune.engine.walk.streaming import StreamedLayers, parameter_count, stream_source

    source = stream_source(config.model)
    if source is None:
        raise UserInputError(
            f"--stream needs a model directory with safetensors weights (or a .gguf / alias), not {config.model}",
            "save the model with save_pretrained(..., safe_serialization=True) first",
        )
    store = StreamedLayers(source, placement.device, placement.dtype)
    calib = config.calibration
    windows = load_calibration_windows(
        AutoTokenizer.from_pretrained(str(source)), calib.dataset, calib.samples, calib.seq_len, calib.seed
    )
    callback = named_stage(progress, f"layer importance ({config.importance_method}, streamed)")
    importance = streamed_layer_importance(store, windows, config.importance_method, calib.batch_size, callback)
    return [layer_shape(layer) for layer in store.skeleton.model.layers], parameter_count(source), importance


# ---------------------------------------------------------------- reading a saved config


@dataclass
class ImportanceConfig:
    """A layer_importance_config.json, read back."""

    path: str
    model: str
    method: str
    scores: list[float]
    plan: dict
    layer_shapes: list[dict]
    raw: dict

    def plan_default(self, name: str, fallback: Any) -> Any:
        return self.plan.get(name, fallback)


def read_importance_config(path: str | Path) -> ImportanceConfig:
    """Parse and sanity-check the file (clear errors for anything else)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise UserInputError(
            f"importance config {path} not found",
            "run `llmprune analyze MODEL` first, or leave out --importance-config",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path} is not valid JSON ({error})", "re-create it with `llmprune analyze`") from None
    if not isinstance(raw, dict) or raw.get("format") != CONFIG_FORMAT:
        raise UserInputError(
            f"{path} is not an llmprune layer-importance config", "re-create it with `llmprune analyze`"
        )
    try:
        config = ImportanceConfig(
            path=str(path),
            model=str(raw["model"]),
            method=str(raw["importance"]["method"]),
            scores=[float(s) for s in raw["importance"]["scores"]],
            plan=dict(raw["plan"]),
            layer_shapes=list(raw["architecture"]["layer_shapes"]),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise UserInputError(
            f"{path} is incomplete ({error!r} missing or malformed)", "re-create it with `llmprune analyze`"
        ) from None
    # a NaN score would silently leave its layer unpruned (NaN compares false with every other score)
    broken = [index for index, score in enumerate(config.scores) if not math.isfinite(score)]
    if broken:
        raise UserInputError(
            f"{path} holds non-finite importance scores (layers {', '.join(map(str, broken[:8]))}): the plan would be"
            " wrong",
            "re-create it with `llmprune analyze` on a healthy model",
        )
    return config


def check_config_fits(config: ImportanceConfig, shapes: list[LayerShape], model_name: str) -> None:
    """Refuse a config measured on another architecture (layer count or shapes differ)."""
    ours = [s.to_dict() for s in shapes]
    if len(config.scores) != len(shapes) or config.layer_shapes != ours:
        raise UserInputError(
            f"importance config {config.path} was made for another model ({config.model}, {len(config.scores)} layers),"
            f" not {model_name} ({len(shapes)} layers)",
            f"run `llmprune analyze {model_name}` to make one for this model",
        )
