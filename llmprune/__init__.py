"""llmprune: structured pruning and recovery fine-tuning for Llama-style models.

The Python API mirrors the command line: every subcommand is one engine
function that takes a config dataclass and returns a result object.

    >>> from llmprune import load_model
    >>> loaded = load_model("smollm2-135m")

Importing the package is cheap: the public names below are looked up on first
use (module `__getattr__`), so `import llmprune` and `llmprune --help` never
load torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmprune._version import __version__

# public name -> module that defines it
_LAZY = {
    "LlmpruneError": "llmprune.engine.core.errors",
    "UserInputError": "llmprune.engine.core.errors",
    "LoadedModel": "llmprune.engine.io.models",
    "load_model": "llmprune.engine.io.models",
}

__all__ = ["__version__", "LlmpruneError", "UserInputError", "LoadedModel", "load_model"]

if TYPE_CHECKING:  # for type checkers and IDEs only; never executed
    from llmprune.engine.core.errors import LlmpruneError, UserInputError
    from llmprune.engine.io.models import LoadedModel, load_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
