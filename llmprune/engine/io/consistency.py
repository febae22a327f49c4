"""Does a model directory's config.json describe the tensors stored next to it?

Every loader asks before it builds a model: a config that disagrees with its
weights (a layer count, a hidden size, a vocabulary or a layer's width) either
fails deep inside transformers with a traceback or, worse, loads and silently
uses the wrong model (28 of 30 layers). The check reads only the safetensors
headers (no tensor data), and uses doctor's structure reading
(io.structure), so every command names a mismatch the same way.
A file shorter than its header says (a truncated download or copy) is refused
here too.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.safetensors_copy import read_header

INDEX_FILE = "model.safetensors.index.json"


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserInputError(
                f"{index} is not a readable safetensors index", "re-save or download the model again"
            ) from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [path for path in files if not path.is_file()]
        if missing:
            raise UserInputError(
                f"{directory} lacks {missing[0].name}, which its safetensors index names",
                "download or copy every shard",
            )
        return files
    return sorted(directory.glob("*.safetensors"))


def stored_shapes(directory: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape of every safetensors tensor in `directory` ({} when it holds none)."""
    shapes: dict[str, list[int]] = {}
    for path in _safetensors_files(Path(directory)):
        header, data_start = read_header(path)
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                shapes[name] = [int(size) for size in entry["shape"]]
                end = max(end, int(entry["data_offsets"][1]))
            except (KeyError, TypeError, ValueError, IndexError):
                raise UserInputError(
                    f"{path} is not a readable safetensors file (damaged header)", "re-save or download the model again"
                ) from None
        if path.stat().st_size < data_start + end:
            raise UserInputError(
                f"{path} is truncated: {path.stat().st_size:,} bytes, its header promises {data_start + end:,}",
                "the file was cut short (download or copy): copy or download it again",
            )
    return shapes


def config_mismatches(shapes: dict[str, list[int]], config: dict) -> list[str]:
    """What the config gets wrong about these tensors, one line each (empty: they agree)."""
    from llmprune.engine.io.structure import read_structure, structure_shapes

    _, findings = read_structure(structure_shapes(shapes), config, config_role="weights")
    return [
        finding.message for finding in findings if finding.severity == "error" and finding.check in ("shape", "fit")
    ]


def check_config_matches_weights(directory: str | Path, config: dict) -> None:
    """Refuse a directory whose config.json disagrees with its safetensors weights, naming the first mismatch."""
    shapes = stored_shapes(directory)
    if not shapes:
        return  # .bin weights: transformers compares them itself when it loads them
    problems = config_mismatches(shapes, config)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserInputError(
            f"config.json in {directory} does not match its weights: {problems[0]}{more}",
            f"fix config.json or re-save the model; `llmprune doctor {directory}` lists every mismatch",
        )
