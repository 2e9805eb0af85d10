"""The Hugging Face hub: fail fast (or use the local cache) when there is no network."""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_unless_reachable() -> None:
    """Without a network, let the hub libraries use their caches instead of retrying for half a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("transformers.utils.hub", "_is_offline_mode")):
        if module in sys.modules and hasattr(sys.modules[module], attr):
            setattr(sys.modules[module], attr, True)
