"""Process-wide BLAS threading, set before numpy loads."""

from __future__ import annotations

import logging
import os
import sys


def single_threaded_blas() -> None:
    """Keep numpy's OpenBLAS from starting worker threads in this process.

    OpenBLAS's fork handler waits for its worker threads; with two threads in BLAS calls
    (MiniLM embeddings, semantic lookups) while the event loop forks a REPL worker, the
    fork never returns (reproduced: with 4 threads multiplying small matrices, 1,500 forks
    hung; with one BLAS thread they finish).  The daemon's matrices are small, so one BLAS
    thread costs nothing.  Must run before numpy is imported; REPL workers and their numpy
    inherit it.
    """
    if "numpy" in sys.modules:
        logging.getLogger("rlmd").warning(
            "numpy was imported before the daemon set OPENBLAS_NUM_THREADS=1"
        )
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
