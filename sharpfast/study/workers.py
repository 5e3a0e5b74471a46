"""The study's worker processes (the sweep's and the zoo's pools) end with their driver."""
from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Worker-pool initializer: end this worker when the driver dies (even by ``kill -9``),
    instead of leaving it orphaned. A daemon thread polls the parent pid."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(interval)

    threading.Thread(target=watch, daemon=True, name="sharpfast-parent-watch").start()
