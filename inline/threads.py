"""Thread priorities: work beside the data path (QC taps, early transforms) yields to it."""

from __future__ import annotations

import os
import threading


def lower_thread_priority() -> None:
    """Nice the calling thread to 19 (Linux: a thread id is a process id for setpriority), so
    its work yields the CPU to the data path when both want it; a no-op where that is not
    possible (not Linux, or not permitted)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
