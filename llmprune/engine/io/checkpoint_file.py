"""Reading .safetensors/.bin/.pt checkpoint files: state dicts, and whole pickled modules.

`.bin`/`.pt` files load with `weights_only=True`. A whole pickled module
(LLM-Pruner's torch.save({'model': model, 'tokenizer': tokenizer})) runs code
from the file when unpickled, so it needs an explicit trust_pickle; without it
the user gets a one-line refusal and the reason.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.engine.core.errors import UserInputError


def load_checkpoint(path: Path, trust_pickle: bool) -> Any:
    """The object in a .safetensors/.bin/.pt file; whole pickled modules only with trust_pickle."""
    if path.stat().st_size == 0:
        raise UserInputError(f"{path} is empty", "re-save or re-download the checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise UserInputError(
                f"{path} is not a readable safetensors file ({error})", "the file is truncated or corrupt: re-save it"
            ) from None
    try:
        with warnings.catch_warnings():  # torch warns about legacy/raw pickles before failing: our one line says it all
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error) and "Unsupported global" not in str(error):
            raise UserInputError(
                f"{path} is not a readable PyTorch checkpoint", "the file is truncated or corrupt"
            ) from None
        if not trust_pickle:
            raise UserInputError(
                f"{path} holds pickled Python objects (a whole module, as LLM-Pruner saves), and unpickling can run"
                " arbitrary code",
                "if you trust its origin, pass --trust-pickle",
            ) from None
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as error:  # a damaged pickle fails in many ways (IndexError, KeyError, EOFError, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(
            f"{path} is not a readable PyTorch checkpoint ({reason})", "the file is truncated or corrupt"
        ) from None


def whole_module(obj: Any) -> tuple[nn.Module, Any] | None:
    """(module, tokenizer-or-None) when the checkpoint is a pickled model (LLM-Pruner's {'model', 'tokenizer'})."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
        return obj["model"], obj.get("tokenizer")
    if isinstance(obj, nn.Module):
        return obj, None
    return None


def holds_whole_module(path: Path) -> bool:
    """Whether a .bin/.pt file is a pickled module rather than a state dict, without running its code.

    The weights-only reader stops at the first class it does not allow; mmap keeps
    a real state dict from being read into memory just to answer this.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        return "weights_only" in str(error) or "Unsupported global" in str(error)
    except Exception:  # not a zip checkpoint, damaged, ...: the regular reader says what is wrong
        return False
    return False


def state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    whole = whole_module(obj)
    if whole is not None:
        obj = whole[0].state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserInputError(
            f"{path} does not contain a state dict of tensors", "save the model with model.state_dict()"
        )
    return {normalise_key(k): v for k, v in obj.items()}


def read_state_dict(path: Path, trust_pickle: bool) -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors from a state-dict file; (state_dict, tokenizer-or-None)."""
    obj = load_checkpoint(path, trust_pickle)
    whole = whole_module(obj)
    return state_dict_of(obj, path), (whole[1] if whole else None)


def normalise_key(key: str) -> str:
    for prefix in ("module.", "base_model.model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key
