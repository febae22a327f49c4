"""Perplexity and a generation smoke test.

`perplexity` runs a model in memory; `streamed_perplexity` gives the same
figure with the weights on disk (walk.streaming.StreamedLayers): all
windows go through one decoder layer, then the next, and the LM head is
applied a slice of the vocabulary at a time, so memory holds one layer, the
windows' hidden states and the head in its stored dtype, never the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.progress import CountProgress
from llmprune.engine.data import TokenWindows, check_seq_len_fits, check_text_source, check_window_options
from llmprune.engine.io.load_options import LoadOptions


@dataclass
class PerplexityResult:
    """PPL = exp(mean NLL over every predicted token of every window)."""

    dataset: str
    seq_len: int
    windows: int
    tokens: int  # predicted tokens (seq_len - 1 per window)
    nll: float
    ppl: float
    seconds: float
    tokens_per_second: float
    nonfinite_windows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    windows: TokenWindows,
    batch_size: int = 1,
    progress: CountProgress | None = None,
) -> PerplexityResult:
    """Evaluate `model` on the windows; NLL is summed in fp32 whatever the model dtype."""
    if batch_size < 1:
        raise UserInputError(f"--batch-size must be ≥ 1, got {batch_size}", "use e.g. --batch-size 4")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    nonfinite = 0
    count = len(windows)
    start = time.perf_counter()
    for first in range(0, count, batch_size):
        batch = windows.ids[first : first + batch_size].to(device)
        # logits_to_keep=0 keeps all positions; use_cache=False skips building a KV cache.
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)
        per_window = nll.sum(dim=1).double().cpu()
        nonfinite += int((~torch.isfinite(per_window)).sum())
        total_nll += per_window.sum()
        if progress:
            progress(min(first + batch_size, count), count)
    model.train(was_training)
    return _perplexity_result(windows, total_nll, nonfinite, time.perf_counter() - start)


def _perplexity_result(
    windows: TokenWindows, total_nll: torch.Tensor, nonfinite: int, seconds: float
) -> PerplexityResult:
    count = len(windows)
    tokens = count * (windows.seq_len - 1)
    mean_nll = float(total_nll) / tokens
    ppl = math.exp(mean_nll) if math.isfinite(mean_nll) and mean_nll < 700 else float("inf")
    return PerplexityResult(
        dataset=windows.source,
        seq_len=windows.seq_len,
        windows=count,
        tokens=tokens,
        nll=mean_nll,
        ppl=ppl,
        seconds=seconds,
        tokens_per_second=count * windows.seq_len / seconds if seconds > 0 else float("inf"),
        nonfinite_windows=nonfinite,
    )


_VOCAB_SLICE = 16384  # at most this many rows of the LM head made fp32 at a time (8B: 16 k × 4,096 × 4 B = 268 MB)
_MIN_VOCAB_SLICE = 256
# a vocabulary slice's fp32 logits are kept about this size: measured on SmolLM2 (2,032 tokens, 2-core CPU),
# slices of 2,048 rows (16 MB of logits) take 0.36 s where the whole vocabulary at once takes 0.58 s
_SLICE_LOGITS_BYTES = 16 * 2**20


@torch.no_grad()
def streamed_perplexity(
    store, windows: TokenWindows, batch_size: int = 1, progress: CountProgress | None = None
) -> PerplexityResult:
    """`perplexity` of the model in `store` (a StreamedLayers), one decoder layer in memory at a time.

    progress counts layers (and the head as the last step), not windows.
    """
    start = time.perf_counter()
    steps = store.num_layers + 1
    hidden = store.embed(windows.ids)
    runner = store.runner(windows.seq_len, batch_size)
    for index in range(store.num_layers):
        layer = store.load(index)
        hidden = runner.layer(layer, hidden)
        store.release(index, layer, changed=False)
        if progress:
            progress(index + 1, steps)
    norm = store.skeleton.model.norm.to_empty(device=store.device)
    norm.load_state_dict({k: v.to(store.dtype) for k, v in store.read_tensors("model.norm.").items()})
    head = (store.read_tensors("lm_head.") or store.read_tensors("model.embed_tokens."))["weight"]  # stored dtype
    per_window = torch.stack(
        [window_nll(norm(h[None])[0], ids[1:], head, store) for h, ids in zip(hidden, windows.ids, strict=False)]
    )
    if progress:
        progress(steps, steps)
    return _perplexity_result(
        windows, per_window.sum(), int((~torch.isfinite(per_window)).sum()), time.perf_counter() - start
    )


def window_nll(normed: torch.Tensor, targets: torch.Tensor, head: torch.Tensor, store) -> torch.Tensor:
    """Summed NLL of one window's next tokens (`sliced_nll` on the store's device and dtype)."""
    return sliced_nll(normed[:-1], targets, head, store.device, store.dtype)


def sliced_nll(
    normed: torch.Tensor,
    targets: torch.Tensor,
    head: torch.Tensor,
    device: torch.device | str,
    dtype: torch.dtype,
    head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token NLL of `normed` (tokens × hidden, after the final norm) under `head` (vocab × hidden).

    The log-sum-exp runs over the vocabulary a slice of rows at a time (fp32), each slice's logits kept
    to about `_SLICE_LOGITS_BYTES`: they stay in the CPU's cache, and the head stays in its stored dtype
    (an 8B head made fp32 at once would be 2 GB, plus its logits). Returns a float64 scalar on the CPU.
    """
    targets = targets.to(device)
    tokens = targets.shape[0]
    rows = max(_MIN_VOCAB_SLICE, min(_VOCAB_SLICE, _SLICE_LOGITS_BYTES // (4 * max(tokens, 1))))
    lse = torch.full((tokens,), -math.inf, dtype=torch.float32, device=device)
    target_logit = torch.zeros(tokens, dtype=torch.float32, device=device)
    for first in range(0, head.shape[0], rows):
        bias = head_bias[first : first + rows].to(device, dtype) if head_bias is not None else None
        logits = F.linear(normed, head[first : first + rows].to(device, dtype), bias).float()
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        inside = (targets >= first) & (targets < first + logits.shape[-1])
        target_logit[inside] = logits[inside, targets[inside] - first]
    return (lse - target_logit).double().sum().cpu()


@torch.inference_mode()
def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of `prompt` (a smoke test that the model still writes language)."""
    if tokenizer is None:
        raise UserInputError(
            "this model has no tokenizer, so it cannot generate text", "save the tokenizer with the model"
        )
    encoded = tokenizer(prompt, return_tensors="pt").to(_model_device(model))
    output = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- the eval command's engine


@dataclass
class EvalConfig(LoadOptions):
    """What `llmprune eval` does (the model: LoadOptions)."""

    dataset: str = "wikitext2"
    """Text source; its evaluation (test) split is used."""
    seq_len: int = 2048
    """Tokens per window."""
    max_windows: int | None = None
    """Only the first N windows (None: all)."""
    batch_size: int = 1
    """Windows per forward pass."""
    prompt: str | None = None
    """If set, also generate greedily from this prompt."""
    max_new_tokens: int = 32
    """Length of that generation."""
    stream: bool | None = None
    """Stream the layers from disk (the model never in memory). None: automatically when it would not fit."""

    def validate(self) -> None:
        check_window_options(self.seq_len, self.max_windows, self.batch_size)
        check_text_source(self.dataset)
        if self.stream and self.prompt:
            raise UserInputError(
                "--stream cannot generate text (--prompt needs the model in memory)", "drop --prompt, or --stream"
            )
        if self.max_new_tokens < 1:
            raise UserInputError(
                f"--max-new-tokens must be ≥ 1, got {self.max_new_tokens}", "use e.g. --max-new-tokens 32"
            )


@dataclass
class EvalResult(PerplexityResult):
    model: str = ""
    params: int = 0
    device: str = ""
    generation: str | None = None


def _check_generation_fits(loaded: Any, prompt: str, max_new_tokens: int) -> None:
    """The prompt and the tokens to generate must fit the model's context (else generation runs on and on, or fails)."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    prompt_tokens = len(loaded.tokenizer(prompt)["input_ids"])
    if prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        hint = f"use --max-new-tokens {room} or less" if room >= 1 else "use a shorter --prompt"
        raise UserInputError(
            f"--prompt ({prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} do not fit the model's context"
            f" ({limit} tokens)",
            hint,
        )


def run_evaluation(config: EvalConfig, progress: CountProgress | None = None) -> EvalResult:
    """Load the model and the data, measure perplexity (and generate if asked)."""
    from llmprune.engine.core.device import choose_placement
    from llmprune.engine.data import load_evaluation_windows
    from llmprune.engine.io.models import load_model

    config.validate()
    placement = choose_placement(config.device, config.dtype)
    source = _stream_source(config, placement)
    if source is not None:
        return _run_streamed_evaluation(config, source, placement, progress)
    loaded = load_model(
        config.model, base_model=config.base_model, trust_pickle=config.trust_pickle, placement=placement
    )
    if loaded.tokenizer is None:
        raise UserInputError(
            f"{config.model} has no tokenizer", "save the tokenizer next to the weights or use --base-model"
        )
    check_seq_len_fits(config.seq_len, loaded.model)
    if config.prompt:
        _check_generation_fits(loaded, config.prompt, config.max_new_tokens)
    windows = load_evaluation_windows(loaded.tokenizer, config.dataset, config.seq_len, config.max_windows)
    measured = perplexity(loaded.model, windows, config.batch_size, progress)
    generation = (
        generate_text(loaded.model, loaded.tokenizer, config.prompt, config.max_new_tokens) if config.prompt else None
    )
    return EvalResult(
        **measured.to_dict(),
        model=config.model,
        params=loaded.num_parameters,
        device=placement.describe(),
        generation=generation,
    )


def _stream_source(config: EvalConfig, placement) -> Path | None:
    """The safetensors directory to stream from, or None to evaluate in memory."""
    if config.stream is False or config.prompt:
        return None
    from llmprune.engine.walk.streaming import should_stream, stream_source

    source = stream_source(config.model)
    if config.stream and source is None:
        raise UserInputError(
            f"--stream needs a model directory with safetensors weights (or a .gguf / alias), not {config.model}",
            "save the model with save_pretrained(..., safe_serialization=True) first",
        )
    if source is not None and (config.stream or should_stream(source, placement.device)):
        return source
    return None


def _run_streamed_evaluation(config: EvalConfig, source, placement, progress: CountProgress | None) -> EvalResult:
    from transformers import AutoTokenizer

    from llmprune.engine.data import load_evaluation_windows
    from llmprune.engine.walk.streaming import StreamedLayers, parameter_count

    windows = load_evaluation_windows(
        AutoTokenizer.from_pretrained(str(source)), config.dataset, config.seq_len, config.max_windows
    )
    store = StreamedLayers(source, placement.device, placement.dtype)
    measured = streamed_perplexity(store, windows, config.batch_size, progress)
    return EvalResult(
        **measured.to_dict(),
        model=config.model,
        params=parameter_count(source),
        device=placement.describe() + " (streamed)",
    )
