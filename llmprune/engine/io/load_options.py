"""Where a model comes from and how it is placed: the options every command that loads a model shares.

Torch-free, so that configs can be built before the engine is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class LoadOptions:
    """The model to load and where to put it (the fields every model-loading config starts with)."""

    model: str = "smollm2-135m"
    """Model spec: an alias (smollm2-135m), a folder, a .gguf/.safetensors/.bin/.pt file, or a hub id."""
    base_model: str | None = None
    """Architecture of a weights-only file (.bin/.pt/.safetensors without config.json)."""
    trust_pickle: bool = False
    """Allow loading a whole pickled module (runs code from the file: only for files you trust)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps (auto: cuda > mps > cpu)."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU)."""

    def load_options(self) -> LoadOptions:
        """Just these five fields (of a config that extends LoadOptions)."""
        return LoadOptions(**{f.name: getattr(self, f.name) for f in fields(LoadOptions)})

    def placement(self) -> Any:
        """The device and dtype the model goes to (device.Placement)."""
        from llmprune.engine.core.device import choose_placement

        return choose_placement(self.device, self.dtype)

    def load(self, placement: Any = None) -> Any:
        """The model, loaded (models.LoadedModel)."""
        from llmprune.engine.io.models import load_model

        return load_model(
            self.model,
            base_model=self.base_model,
            trust_pickle=self.trust_pickle,
            placement=placement if placement is not None else self.placement(),
        )
