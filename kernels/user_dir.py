"""The per-user directory ($LLM_HOME): models, profiles, and the kernels' build and tuning caches.

It sits in the lowest package so that kernels, the engine and the launcher all read this one
definition without importing upward."""
from __future__ import annotations

import os
from pathlib import Path


def llm_home() -> Path:
    """$LLM_HOME, else $XDG_CACHE_HOME/llm, else ~/.cache/llm."""
    if os.environ.get("LLM_HOME"):
        return Path(os.environ["LLM_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm"
