"""The context store: named texts kept as files under the state dir, read through mmap.

See ``docs/store.md``.
"""

from rlmd.store.store import (
    ContextInfo,
    ContextStore,
    Pinned,
    PutResult,
    SearchMatch,
    Skipped,
    StoreError,
)

__all__ = [
    "ContextInfo",
    "ContextStore",
    "Pinned",
    "PutResult",
    "SearchMatch",
    "Skipped",
    "StoreError",
]
