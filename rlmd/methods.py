"""The JSON-RPC method table (kept as the import path other modules use).

The handlers are plain functions in :mod:`rlmd.handlers` (one module per family); the
table is :func:`rlmd.handlers.registry.build_methods`.  :class:`App` is in
:mod:`rlmd.app`.
"""

from __future__ import annotations

from .app import App, ModelParts
from .handlers.registry import FAMILIES, build_methods

__all__ = ["FAMILIES", "App", "ModelParts", "build_methods"]
