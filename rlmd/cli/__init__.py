"""The ``rlm`` command-line client."""
