"""Hugging Face hub access that fails at once instead of retrying for a minute.

Files already in the local cache are used without any request. The network is tried only when the user allows it
(``HF_HUB_OFFLINE`` is not set) and the hub's host answers one TCP connection within 2 s (checked once per process,
through the HTTPS proxy when one is set); otherwise loading runs in offline mode and a missing file becomes the
caller's one-line :class:`~rewardtune.errors.ModelNotFoundError` immediately.

    path = hub_file("xswu/HPSv2", "HPS_v2_compressed.pt", explain=not_found_message(...))
    with offline_unless_reachable():          # transformers/open_clip loaders inside use the cache only
        model = CLIPModel.from_pretrained("yuvalkirstain/PickScore_v1")

Loaders use these through :mod:`rewardtune.modelfiles`, which also writes the one-line message (``explain``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import urllib.request
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from rewardtune.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_mode() -> bool:
    """The user asked for no network: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set."""
    if any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _address(url: str) -> tuple[str, int]:
    """``(host, port)`` to connect to for ``url``: the proxy that would carry it, or the host itself."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    proxy = urllib.request.getproxies().get(parsed.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlparse(proxy if "://" in proxy else "http://" + proxy)
        return via.hostname or "", via.port or 80
    return host, parsed.port or (443 if parsed.scheme == "https" else 80)


@functools.cache
def hub_reachable(url: str, timeout: float = CHECK_TIMEOUT_S) -> bool:
    """Whether one TCP connection to the hub at ``url`` (or its proxy) opens within ``timeout`` s (cached)."""
    host, port = _address(url)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError as exc:
        logger.info("Hugging Face hub %s not reachable (%s:%d: %s); using the local cache only", url, host, port,
                    exc)
        return False


def use_network() -> bool:
    """Downloads are allowed and have a chance: not in offline mode and the hub answers."""
    return not offline_mode() and hub_reachable(endpoint())


def cached_file(repo_id: str, filename: str, repo_type: str = "model", revision: str | None = None) -> Path | None:
    """The local path of ``filename`` of ``repo_id`` in the Hugging Face cache, without any request (or None)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    return Path(path) if isinstance(path, str) else None


def hub_file(repo_id: str, filename: str, explain: str, repo_type: str = "model") -> Path:
    """``filename`` of ``repo_id`` from the cache, else downloaded when :func:`use_network`; otherwise (or when the
    download fails) :class:`ModelNotFoundError` with the one-line ``explain``."""
    from huggingface_hub import hf_hub_download

    cached = cached_file(repo_id, filename, repo_type)
    if cached is not None:
        return cached
    if not use_network():
        raise ModelNotFoundError(explain)
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type))
    except Exception:  # HTTP, connection, missing-entry errors: all mean "not available here"
        raise ModelNotFoundError(explain) from None


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Run the block in huggingface_hub's offline mode unless :func:`use_network` (yields whether it may download):
    ``from_pretrained``/``hf_hub_download`` inside then read the cache and fail at once, with no retries."""
    from huggingface_hub import constants

    network = use_network()
    saved = constants.HF_HUB_OFFLINE
    if not network:
        constants.HF_HUB_OFFLINE = True
    try:
        yield network
    finally:
        constants.HF_HUB_OFFLINE = saved


__all__ = ["offline_mode", "hub_reachable", "use_network", "cached_file", "hub_file", "offline_unless_reachable"]
