"""Process pools where they are allowed.

A daemonic process (a Celery prefork worker, a ``multiprocessing`` pool worker) may not start
children: ``ProcessPoolExecutor`` fails there with "daemonic processes are not allowed to have
children". Every place in StepML that would start a process pool asks :func:`process_workers`
first and runs in the calling process when it says 1.
"""

from __future__ import annotations

import multiprocessing as mp


def can_start_processes() -> bool:
    """False inside a daemonic process, which may not have children."""
    return not mp.current_process().daemon


def process_workers(requested: int) -> int:
    """``requested`` processes, or 1 (work in the calling process) where no child process may be started."""
    return max(1, int(requested)) if can_start_processes() else 1
