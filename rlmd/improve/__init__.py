"""The improvement cycle: Analysis -> Improvement -> Testing -> Iteration, with a person's
approval as the only way anything reaches the repository.

- ``patch.py``: reading the root model's proposal (a unified diff) and refusing one that
  touches anything outside the repository or its ``.git``.
- ``workspace.py``: the repository's state (fingerprint, so approval can refuse a tree
  that changed under the proposal), disposable copies, applying a diff.
- ``runner.py``: running a test or benchmark command under the REPL workers' protection
  (no network, a clean environment, time and memory limits).
- ``records.py``: the history of every cycle under the state dir.
- ``cycle.py``: the cycle itself (``ImproveService``), driven by ``handlers.py``.
"""

from rlmd.improve.cycle import ImproveService
from rlmd.improve.patch import PatchError, extract_diff, touched_paths

__all__ = ["ImproveService", "PatchError", "extract_diff", "touched_paths"]
