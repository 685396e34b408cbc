"""Signals: SIGTERM stops a step the way Ctrl-C does, in one place.

Kubernetes, systemd and `kill` send SIGTERM; Python's default is to die on the spot, leaving
temporary outputs and an open tracking run behind. Inside `sigterm_raises()` SIGTERM raises
`Terminated` (a KeyboardInterrupt) instead, so `finally` blocks and context managers unwind
(temporary outputs removed, the run ended KILLED) exactly as for SIGINT.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from tlpipe.errors import Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(*_: object) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
