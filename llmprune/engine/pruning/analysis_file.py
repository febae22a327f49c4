"""Names of the layer-importance config file that `analyze` writes and `prune` reads.

A module of its own, with no heavy imports, so that the CLI can show the default
file name in its help without loading torch, and so that the output checks can
recognise an earlier plan without importing the analysis.
"""

import json
from pathlib import Path

CONFIG_FORMAT = "llmprune.layer_importance/1"
DEFAULT_CONFIG_NAME = "layer_importance_config.json"


def is_importance_config(path: str | Path) -> bool:
    """Whether `path` is a layer_importance_config.json written by `llmprune analyze` (a small JSON file)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > 64 * 2**20:
            return False
        return json.loads(path.read_text(encoding="utf-8")).get("format") == CONFIG_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
