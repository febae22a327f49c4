"""Is the Hugging Face Hub reachable, and working from the local cache when it is not.

Offline, transformers and datasets retry every request for about a minute
before failing. One quick TCP connect decides instead; when it fails the
libraries are told to use their local caches only, so a cached model or
dataset still loads and a missing one fails at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

__all__ = ["hub_reachable", "cache_only"]


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the Hub (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def cache_only(active: bool = True) -> Iterator[None]:
    """While open (and `active`), huggingface_hub and datasets read their local caches and never the network."""
    if not active:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
