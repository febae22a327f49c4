"""Perplexity and a generation smoke test."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.engine.data import TokenWindows, check_seq_len_fits, check_text_source, check_window_options
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.load_options import LoadOptions

ProgressCallback = Callable[[int, int], None]  # (windows done, windows total)


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
    progress: ProgressCallback | None = None,
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
    seconds = time.perf_counter() - start
    model.train(was_training)
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


@torch.inference_mode()
def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of `prompt` (a smoke test that the model still writes language)."""
    if tokenizer is None:
        raise UserInputError("this model has no tokenizer, so it cannot generate text", "save the tokenizer with the model")
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

    def validate(self) -> None:
        check_window_options(self.seq_len, self.max_windows, self.batch_size)
        check_text_source(self.dataset)
        if self.max_new_tokens < 1:
            raise UserInputError(f"--max-new-tokens must be ≥ 1, got {self.max_new_tokens}", "use e.g. --max-new-tokens 32")


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
            f"--prompt ({prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} do not fit the model's context ({limit} tokens)", hint,
        )


def run_evaluation(config: EvalConfig, progress: ProgressCallback | None = None) -> EvalResult:
    """Load the model and the data, measure perplexity (and generate if asked)."""
    from llmprune.engine.data import load_evaluation_windows
    from llmprune.engine.core.device import choose_placement
    from llmprune.engine.io.models import load_model

    config.validate()
    placement = choose_placement(config.device, config.dtype)
    loaded = load_model(config.model, base_model=config.base_model, trust_pickle=config.trust_pickle, placement=placement)
    if loaded.tokenizer is None:
        raise UserInputError(f"{config.model} has no tokenizer", "save the tokenizer next to the weights or use --base-model")
    check_seq_len_fits(config.seq_len, loaded.model)
    if config.prompt:
        _check_generation_fits(loaded, config.prompt, config.max_new_tokens)
    windows = load_evaluation_windows(loaded.tokenizer, config.dataset, config.seq_len, config.max_windows)
    measured = perplexity(loaded.model, windows, config.batch_size, progress)
    generation = generate_text(loaded.model, loaded.tokenizer, config.prompt, config.max_new_tokens) if config.prompt else None
    return EvalResult(
        **measured.to_dict(),
        model=config.model,
        params=loaded.num_parameters,
        device=placement.describe(),
        generation=generation,
    )
