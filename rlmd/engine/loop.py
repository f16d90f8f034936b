"""Where ``Engine`` used to live; it is in ``rlmd.engine.query`` now.

Kept so that code written against ``rlmd.engine.loop.Engine`` goes on working; new code
imports ``rlmd.engine.Engine``.
"""

from rlmd.engine.query import Engine

__all__ = ["Engine"]
