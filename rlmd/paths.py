"""Where the daemon keeps things: socket, state (contexts, caches, traces) and model files.

Each default can be overridden by a flag or an environment variable; the precedence is
flag, then environment, then the platform default.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import platformdirs

APP = "rlmd"


def default_socket_path() -> Path:
    """The socket path clients use when told nothing else (``RLMD_SOCKET`` overrides)."""
    env = os.environ.get("RLMD_SOCKET")
    if env:
        return Path(env)
    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR platformdirs warns and falls back to /tmp/runtime-UID,
        # which is what we want (and what rlm.el computes too): no need to alarm the user.
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP)) / "rlmd.sock"


def default_state_dir() -> Path:
    """Contexts, caches and traces (``RLMD_STATE_DIR`` overrides)."""
    env = os.environ.get("RLMD_STATE_DIR")
    if env:
        return Path(env)
    return Path(platformdirs.user_state_dir(APP))


def default_config_path() -> Path | None:
    """``RLMD_CONFIG``, else the user's config file if it exists, else None (defaults)."""
    env = os.environ.get("RLMD_CONFIG")
    if env:
        return Path(env)
    candidate = Path(platformdirs.user_config_dir(APP)) / "config.toml"
    return candidate if candidate.exists() else None


def default_cache_dir() -> Path:
    """Large re-creatable files such as the embedded model (``RLMD_CACHE_DIR`` overrides)."""
    env = os.environ.get("RLMD_CACHE_DIR")
    if env:
        return Path(env)
    return Path(platformdirs.user_cache_dir(APP))
