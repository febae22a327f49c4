"""llmprune: structured pruning and recovery fine-tuning for Llama-style models.

The Python API mirrors the command line: every subcommand is one engine
function that takes a config dataclass and returns a result object.

    >>> from llmprune import load_model
    >>> loaded = load_model("smollm2-135m")
"""

__version__ = "0.1.0"

from llmprune.engine.core.errors import LlmpruneError, UserInputError  # noqa: E402
from llmprune.engine.io.models import LoadedModel, load_model  # noqa: E402

__all__ = ["__version__", "LlmpruneError", "UserInputError", "LoadedModel", "load_model"]
