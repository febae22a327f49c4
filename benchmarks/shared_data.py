"""Where the benchmarks find the shared text (never copied into the repository).

../shared/data next to the checkout, as the tests use it; LLMPRUNE_SHARED_DATA overrides it.
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLMPRUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIBRATION_TEXT = str(DATA / "wikitext-2" / "wiki.valid.tokens")  # calibration only
EVALUATION_TEXT = str(DATA / "wikitext-2-raw" / "wiki.test.raw")  # evaluation only


def wiki_and_pydoc_windows(tokenizer, seq_len: int, windows: int) -> dict:
    """The two evaluation texts of the quality benchmarks: wikitext-2 test, and CPython's pydoc prose (unseen)."""
    from llmprune.engine.data import load_evaluation_windows

    return {
        name: load_evaluation_windows(tokenizer, source, seq_len, windows)
        for name, source in (("wiki", EVALUATION_TEXT), ("pydoc", "pydoc"))
    }
