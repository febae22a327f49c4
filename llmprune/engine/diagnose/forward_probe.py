"""A short prompt through the model, watching every module's output for the first non-finite value."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

DEFAULT_PROMPT = "The capital of France is Paris. The capital of Italy is"


@dataclass
class ForwardResult:
    """What one forward pass produced."""

    prompt: str
    tokens: int
    output_shape: list[int]
    logits_min: float | None
    logits_max: float | None
    nan: int
    inf: int
    first_nonfinite_module: str | None = None  # the module the user must look at
    error: str | None = None  # the forward pass raised (shapes that do not fit, ...)

    @property
    def ok(self) -> bool:
        return self.error is None and self.nan == 0 and self.inf == 0 and self.first_nonfinite_module is None

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):  # ModelOutput is a dict too
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _prompt_ids(model: nn.Module, tokenizer: Any, prompt: str) -> torch.Tensor:
    if tokenizer is not None:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    # no tokenizer (a bare state dict): any in-vocabulary ids exercise every layer
    vocab = model.get_input_embeddings().num_embeddings
    return (torch.arange(16) * 7 + 1).remainder(vocab).unsqueeze(0)


@torch.inference_mode()
def forward_test(model: nn.Module, tokenizer: Any = None, prompt: str = DEFAULT_PROMPT) -> ForwardResult:
    """Run `prompt` through `model`; on non-finite output, name the first module that produced it.

    Forward hooks fire in execution order and a leaf fires before its parent,
    so the first hook that sees NaN/Inf is the module where it appears.
    """
    first: list[str] = []

    def watch(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not first and any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(output)):
                first.append(name)

        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules() if name]
    ids = _prompt_ids(model, tokenizer, prompt).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()
    except Exception as error:  # a model whose shapes do not fit fails here; that is a finding, not a crash
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ForwardResult(
            prompt,
            ids.shape[1],
            [],
            None,
            None,
            0,
            0,
            first[0] if first else None,
            f"{type(error).__name__}: {message}",
        )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    finite = logits[torch.isfinite(logits)]
    return ForwardResult(
        prompt=prompt,
        tokens=ids.shape[1],
        output_shape=list(logits.shape),
        logits_min=float(finite.min()) if finite.numel() else None,
        logits_max=float(finite.max()) if finite.numel() else None,
        nan=int(torch.isnan(logits).sum()),
        inf=int(torch.isinf(logits).sum()),
        first_nonfinite_module=first[0] if first else None,
    )


@torch.inference_mode()
def streamed_forward_test(store: Any, tokenizer: Any = None, prompt: str = DEFAULT_PROMPT) -> ForwardResult:
    """`forward_test` with the weights on disk (a walk.streaming.StreamedLayers): one layer in memory at a time.

    Every module of a layer is watched while the layer is loaded, so the first
    non-finite module is named as in the in-memory test; the LM head is applied a
    vocabulary slice at a time, as the streamed perplexity does.
    """
    ids = (
        _prompt_ids(store.skeleton, tokenizer, prompt)
        if tokenizer is not None
        else (torch.arange(16) * 7 + 1).unsqueeze(0)
    )
    first: list[str] = []
    try:
        hidden = store.embed(ids)
        if not bool(torch.isfinite(hidden).all()):
            first.append("model.embed_tokens")
        runner = store.runner(ids.shape[1], batch_size=1)
        for index in range(store.num_layers):
            layer = store.load(index)
            handles = [
                module.register_forward_hook(
                    _watch(f"model.layers.{index}.{name}" if name else f"model.layers.{index}", first)
                )
                for name, module in layer.named_modules()
            ]
            try:
                hidden = runner.layer(layer, hidden)
            finally:
                for handle in handles:
                    handle.remove()
                store.release(index, layer, changed=False)
        logits = _streamed_logits(store, hidden[0])[None]
    except Exception as error:  # shapes that do not fit: a finding, not a crash
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ForwardResult(
            prompt,
            ids.shape[1],
            [],
            None,
            None,
            0,
            0,
            first[0] if first else None,
            f"{type(error).__name__}: {message}",
        )
    if not first and not bool(torch.isfinite(logits).all()):
        first.append("lm_head")
    finite = logits[torch.isfinite(logits)]
    return ForwardResult(
        prompt,
        ids.shape[1],
        list(logits.shape),
        float(finite.min()) if finite.numel() else None,
        float(finite.max()) if finite.numel() else None,
        int(torch.isnan(logits).sum()),
        int(torch.isinf(logits).sum()),
        first[0] if first else None,
    )


def _watch(name: str, first: list[str]):
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        # a layer's submodules finish before the layer itself: the first hook to see NaN/Inf names where it appears
        if not first and any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(output)):
            first.append(name)

    return hook


def _streamed_logits(store: Any, hidden: torch.Tensor, rows: int = 16384) -> torch.Tensor:
    """norm + LM head on one sequence's hidden states, the head read in its stored dtype and used a slice at a time."""
    norm = store.skeleton.model.norm.to_empty(device=store.device)
    norm.load_state_dict({k: v.to(store.dtype) for k, v in store.read_tensors("model.norm.").items()})
    head = (store.read_tensors("lm_head.") or store.read_tensors("model.embed_tokens."))["weight"]
    normed = norm(hidden)
    return torch.cat(
        [
            torch.nn.functional.linear(normed, head[i : i + rows].to(store.device, store.dtype)).float()
            for i in range(0, head.shape[0], rows)
        ],
        dim=-1,
    )
