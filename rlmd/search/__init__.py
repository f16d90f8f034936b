"""Search over a context: ranked passages (BM25), grep by lines, and span locations.

``ranked``/``grep`` work on a ``str`` or the REPL's mmap view (they run inside REPL
workers); the store adds a per-context index for large texts (``rlmd/search/index.py``)
behind ``ContextStore.search_ranked``.  See ``docs/search.md``.
"""

from rlmd.search.grep import grep
from rlmd.search.hit import MAX_HIT_TEXT, Hit
from rlmd.search.locate import Locator, Source, source_of
from rlmd.search.ranked import ranked

__all__ = ["MAX_HIT_TEXT", "Hit", "Locator", "Source", "grep", "ranked", "source_of"]
