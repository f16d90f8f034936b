"""rlmd: a Recursive Language Model daemon.

The package is laid out by responsibility: ``daemon`` (startup), ``server`` and
``protocol`` (the JSON-RPC socket), ``store`` (contexts), ``engine`` (the RLM loop),
``repl`` (sandboxed workers), ``providers`` and ``pool`` (model calls), ``cache``,
``cli`` (the ``rlm`` command) and ``bench`` (benchmark suites).
"""

__version__ = "0.1.0"
