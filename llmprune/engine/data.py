"""Text sources, their tokenisation (cached), evaluation windows and calibration samples.

Named sources go through `datasets` (wikitext2, ptb, c4); local files are read
directly (.txt as one document exactly as it is, .jsonl by its `text` field,
.parquet by its `text` column); `pydoc` is the English prose shipped with
CPython (`pydoc_data.topics`), which exists on every machine, offline too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.hub import cache_only, hub_reachable
from llmprune.engine.core.paths import cache_dir

# name -> (dataset path, config, split for evaluation, split for calibration/training, text field)
NAMED_SOURCES: dict[str, tuple[str, str | None, str, str, str]] = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "train", "text"),
    "ptb": ("ptb-text-only/ptb_text_only", "penn_treebank", "test", "train", "sentence"),
    "c4": ("allenai/c4", "en", "validation", "train", "text"),
}
BUILTIN_SOURCES = ("pydoc",)
LOCAL_SUFFIXES = (".txt", ".raw", ".tokens", ".jsonl", ".parquet")
SOURCE_HELP = "wikitext2, ptb, c4, pydoc, or a local .txt/.jsonl/.parquet file; several joined by commas are mixed"


def _join_documents(texts: list[str], joiner: str) -> str:
    return joiner.join(texts)


def _load_named(name: str, purpose: str) -> str:
    path, config, eval_split, train_split, text_field = NAMED_SOURCES[name]
    split = eval_split if purpose == "eval" else train_split
    if name == "c4":  # the full C4 split is enormous; one shard is the field's custom
        shard = "validation" if purpose == "eval" else "train"
        files = {shard: f"en/c4-{shard}.00000-of-{'00008' if shard == 'validation' else '01024'}.json.gz"}
        load_args: dict[str, Any] = {"path": path, "data_files": files, "split": shard}
    else:
        load_args = {"path": path, "name": config, "split": split}
    online = hub_reachable()
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        with cache_only(not online):
            dataset = datasets.load_dataset(**load_args)
    except Exception as error:  # offline and not cached, missing, or renamed upstream
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        where = "" if online else " (the Hub cannot be reached and it is not in the local cache)"
        # calibration and training must never read the test split: the example differs by purpose
        example = (
            "../shared/data/wikitext-2-raw/wiki.test.raw"
            if purpose == "eval"
            else "../shared/data/wikitext-2/wiki.valid.tokens"
        )
        raise UserInputError(
            f"cannot load the '{name}' dataset ({split} split){where}: {reason}",
            f"pass a local text file instead, e.g. --dataset {example}, or --dataset pydoc",
        ) from None
    joiner = " " if name == "ptb" else "\n\n"
    return _join_documents([row[text_field] for row in dataset], joiner)


def _load_local(path: Path) -> str:
    if path.suffix == ".jsonl":
        try:
            return _load_jsonl(path)
        except UnicodeDecodeError:
            raise UserInputError(f"{path} is not UTF-8 text", "convert it to UTF-8") from None
    if path.suffix == ".parquet":
        return _load_parquet(path)
    try:  # .txt and anything else: one document, exactly as it is
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"{path} is not UTF-8 text", "convert it to UTF-8 or use a .jsonl/.parquet file") from None


def _load_jsonl(path: Path) -> str:
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserInputError(
                    f"{path} line {number} is not valid JSON", "each line must be an object with a 'text' field"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserInputError(
                    f"{path} line {number} has no 'text' field", "each line must be an object with a 'text' field"
                )
            texts.append(record["text"])
    return _join_documents(texts, "\n\n")


def _load_parquet(path: Path) -> str:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... on a damaged file
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise UserInputError(
            f"{path} is not a readable Parquet file ({reason})",
            "pass a valid .parquet file with a 'text' column, or a .txt file",
        ) from None
    if "text" not in table.column_names:
        raise UserInputError(
            f"{path} has no 'text' column (columns: {', '.join(table.column_names)})",
            "rename the text column to 'text'",
        )
    texts = [t for t in table.column("text").to_pylist() if t]
    if not all(isinstance(t, str) for t in texts):
        raise UserInputError(f"{path}: the 'text' column does not hold strings", "store the text as a string column")
    return _join_documents(texts, "\n\n")


def _load_pydoc() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def text_sources(source: str) -> list[str]:
    """The sources of one --dataset value: a single source, or several joined by commas (mixed calibration)."""
    parts = [part.strip() for part in str(source).split(",")]
    return [part for part in parts if part] or [str(source).strip()]


def check_text_source(source: str, option: str = "--dataset") -> None:
    """Each local text must exist, be a file and not be empty (cheap: checked before a model is loaded)."""
    for part in text_sources(source):
        _check_one_source(part, option)


def _check_one_source(source: str, option: str) -> None:
    if source in NAMED_SOURCES or source in BUILTIN_SOURCES:
        return
    path = Path(source).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserInputError(f"dataset file {path} is empty", f"pass a file with text in it to {option}")
        return
    if path.is_dir():
        raise UserInputError(
            f"dataset {path} is a folder", f"pass a file or a named source ({SOURCE_HELP}) to {option}"
        )
    raise UserInputError(
        f"dataset '{source}' not found: not a file and not a named source", f"use {SOURCE_HELP} for {option}"
    )


def load_text(source: str, purpose: str = "eval") -> str:
    """The raw text of `source`; `purpose` picks the split of named sources ('eval' or 'train').

    Several sources (`a,b`) give their texts one after the other.
    """
    if purpose not in ("eval", "train"):
        raise ValueError(f"purpose must be 'eval' or 'train', not {purpose!r}")
    sources = text_sources(source)
    if len(sources) > 1:
        return _join_documents([load_text(part, purpose) for part in sources], "\n\n")
    source = sources[0]
    if source in NAMED_SOURCES:
        return _load_named(source, purpose)
    if source == "pydoc":
        return _load_pydoc()
    check_text_source(source)
    return _load_local(Path(source).expanduser())


# ---------------------------------------------------------------- tokens


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())[:2000] + [len(vocab)], default=str).encode())
    digest.update(type(tokenizer).__name__.encode())
    return digest.hexdigest()[:16]


def tokenize(tokenizer: Any, text: str, use_cache: bool = True) -> torch.Tensor:
    """Token ids of `text` as one stream (no special tokens), cached on disk by content.

    Long corpora take seconds to tokenise; evaluation and analysis re-read the
    same ones many times.
    """
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24] + "-" + _tokenizer_fingerprint(tokenizer)
    path = cache_dir("tokens") / f"{key}.pt"
    if use_cache and path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:
            path.unlink(missing_ok=True)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if use_cache:
        tmp = path.with_suffix(f".{id(ids)}.tmp")
        torch.save(ids, tmp)
        tmp.replace(path)
    return ids


@dataclass(frozen=True)
class TokenWindows:
    """A batch-able set of token windows, all `seq_len` long."""

    ids: torch.Tensor  # [n, seq_len]
    source: str
    total_tokens_in_source: int

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def __len__(self) -> int:
        return self.ids.shape[0]


def _check_seq_len(seq_len: int, option: str = "--seq-len") -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise UserInputError(f"{option} must be an integer ≥ 2, got {seq_len}", f"use e.g. {option} 128 or 2048")


def _check_max_windows(max_windows: int | None) -> None:
    if max_windows is not None and max_windows < 1:
        raise UserInputError(f"--max-windows must be ≥ 1, got {max_windows}", "leave it out to use every window")


def check_window_options(
    seq_len: int | None, max_windows: int | None, batch_size: int, seq_len_option: str = "--seq-len"
) -> None:
    """Validate the evaluation options up front, before a model is loaded (None seq_len: not chosen yet).

    `seq_len_option` names the option in the message (prune calls it --eval-seq-len).
    """
    if seq_len is not None:
        _check_seq_len(seq_len, seq_len_option)
    _check_max_windows(max_windows)
    if batch_size < 1:
        raise UserInputError(f"--batch-size must be ≥ 1, got {batch_size}", "use e.g. --batch-size 4")


def check_seq_len_fits(seq_len: int, model: Any, option: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context (max_position_embeddings): they would run for hours or fail."""
    limit = getattr(getattr(model, "config", model), "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and seq_len > limit:
        raise UserInputError(
            f"{option} {seq_len} is longer than the model's context ({limit} tokens, max_position_embeddings)",
            f"use {option} {limit} or less",
        )


def evaluation_windows(
    ids: torch.Tensor, seq_len: int, max_windows: int | None = None, source: str = ""
) -> TokenWindows:
    """Consecutive, non-overlapping windows of the token stream (the tail shorter than seq_len is dropped)."""
    _check_seq_len(seq_len)
    _check_max_windows(max_windows)
    count = ids.numel() // seq_len
    if count == 0:
        raise UserInputError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}",
            "use a longer text or a smaller --seq-len",
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return TokenWindows(ids[: count * seq_len].view(count, seq_len).clone(), source, ids.numel())


def random_windows(ids: torch.Tensor, count: int, seq_len: int, seed: int = 0, source: str = "") -> TokenWindows:
    """`count` windows starting at seeded random offsets (calibration and training samples)."""
    _check_seq_len(seq_len)
    if count < 1:
        raise UserInputError(f"the number of samples must be ≥ 1, got {count}", "use e.g. --samples 128")
    if ids.numel() <= seq_len:
        raise UserInputError(
            f"the text has {ids.numel()} tokens, not more than one sample of {seq_len}",
            "use a longer text or a smaller --seq-len",
        )
    starts = window_starts(ids.numel(), count, seq_len, seed)
    return TokenWindows(torch.stack([ids[s : s + seq_len] for s in starts]), source, ids.numel())


def window_starts(tokens: int, count: int, seq_len: int, seed: int = 0) -> list[int]:
    """The seeded random offsets `random_windows` cuts its windows at."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, tokens - seq_len, (count,), generator=generator).tolist()


def held_out_windows(
    ids: torch.Tensor, count: int, seq_len: int, avoid: list[int], seed: int = 1, source: str = ""
) -> TokenWindows:
    """`count` random windows of `ids` that share no token with the windows starting at `avoid` (same seq_len).

    Raises UserInputError when the text has no room for that many.
    """
    taken = sorted(avoid)
    generator = torch.Generator().manual_seed(seed)
    room = ids.numel() - seq_len
    chosen: list[int] = []
    import bisect

    for start in torch.randperm(max(room, 1), generator=generator).tolist():
        if len(chosen) == count:
            break
        at = bisect.bisect_left(taken, start)
        # a window overlaps another one starting less than seq_len before or after it
        near = taken[max(at - 1, 0) : at + 1]
        if all(abs(start - other) >= seq_len for other in near):
            chosen.append(start)
            bisect.insort(taken, start)
    if len(chosen) < count:
        raise UserInputError(
            f"the text{' ' + source if source else ''} has room for {len(chosen)} held-out windows of {seq_len}"
            f" tokens, {count} needed",
            "use a longer --dataset (or --search-dataset), fewer --search-windows or a smaller --seq-len",
        )
    return TokenWindows(torch.stack([ids[s : s + seq_len] for s in chosen]), source, ids.numel())


def load_evaluation_windows(tokenizer: Any, source: str, seq_len: int, max_windows: int | None = None) -> TokenWindows:
    """Evaluation split of `source`, tokenised once as a stream and cut into windows."""
    _check_seq_len(seq_len)
    return evaluation_windows(tokenize(tokenizer, load_text(source, "eval")), seq_len, max_windows, source)


def load_calibration_windows(tokenizer: Any, source: str, count: int, seq_len: int, seed: int = 0) -> TokenWindows:
    """Training split of `source`, `count` seeded random windows (never the test split of named sources).

    With several sources (`a,b`) the windows are drawn from each in equal numbers.
    """
    return calibration_and_held_out(tokenizer, source, count, 0, seq_len, seed)[0]


def calibration_and_held_out(
    tokenizer: Any,
    source: str,
    count: int,
    held_out: int,
    seq_len: int,
    seed: int = 0,
    held_out_source: str | None = None,
) -> tuple[TokenWindows, TokenWindows | None]:
    """`count` calibration windows of `source` and `held_out` more of `held_out_source` (default: `source`),
    in equal numbers from each of their sources; a held-out window shares no token with a calibration window.

    The calibration windows are `load_calibration_windows`' whatever `held_out` is; the held-out ones
    (None for 0) select without having been cut on, as the searched allocation needs.
    """
    _check_seq_len(seq_len)
    if count < 1:
        raise UserInputError(f"the number of samples must be ≥ 1, got {count}", "use e.g. --samples 128")
    streams: dict[str, torch.Tensor] = {}  # a text both cut and held out on is read and tokenised once
    cut_starts: dict[str, list[int]] = {}

    def cut_windows(stream: torch.Tensor, wanted: int, part: str) -> torch.Tensor:
        cut_starts[part] = window_starts(stream.numel(), wanted, seq_len, seed)
        return random_windows(stream, wanted, seq_len, seed, part).ids

    def held_windows(stream: torch.Tensor, wanted: int, part: str) -> torch.Tensor:
        return held_out_windows(stream, wanted, seq_len, cut_starts.get(part, []), seed + 1, part).ids

    cut = _windows_of_each(tokenizer, source, count, cut_windows, streams)
    if not held_out:
        return cut, None
    return cut, _windows_of_each(tokenizer, held_out_source or source, held_out, held_windows, streams)


def _windows_of_each(
    tokenizer: Any,
    source: str,
    count: int,
    pick: Callable[[torch.Tensor, int, str], torch.Tensor],
    streams: dict[str, torch.Tensor],
) -> TokenWindows:
    """`count` windows from the texts of `source` in equal numbers, `pick(stream, wanted, text)` choosing each share."""
    sources = text_sources(source)
    parts, total = [], 0
    for index, part in enumerate(sources):
        wanted = _share(count, len(sources), index)
        if wanted == 0:
            continue
        if part not in streams:
            streams[part] = tokenize(tokenizer, load_text(part, "train"))
        total += streams[part].numel()
        parts.append(pick(streams[part], wanted, part))
    return TokenWindows(torch.cat(parts), ",".join(sources), total)


def _share(count: int, parts: int, index: int) -> int:
    """Part `index` of `count` split as evenly as possible over `parts` (the first ones take the remainder)."""
    return count // parts + (1 if index < count % parts else 0)
