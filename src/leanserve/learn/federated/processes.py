"""Process management for the federation's Flower processes: each child in a session (process group) of its
own, stopped with all its descendants however the block ends, and SIGTERM turned into ``Terminated`` so that
the stopping runs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from contextlib import contextmanager

from leanserve.errors import LeanserveError

log = logging.getLogger(__name__)


class Terminated(LeanserveError):
    """The federation was stopped by SIGTERM (after every Flower process was stopped)."""


@contextmanager
def stopped_on_sigterm():
    """Turn SIGTERM into Terminated while the block runs (in the main thread), so that its ``finally``
    clauses stop the Flower processes; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated("stopped by SIGTERM; every Flower process was stopped, nothing registered")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ProcessTree:
    """Child processes, each in a session (process group) of its own, stopped with all their descendants when
    the ``with`` block ends, however it ends. Flower detaches some of its helpers into sessions of their own
    (``flower-superexec``, the ServerApp), so the descendants are found by parentage (psutil), before any is
    signalled: once a parent exits its children are re-parented and could no longer be found."""

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.processes: list[subprocess.Popen] = []

    def start(self, command: list[str], **popen) -> subprocess.Popen:
        """``subprocess.Popen(command, **popen)`` in a new session, stdin closed."""
        process = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL, **popen)
        self.processes.append(process)
        return process

    def __enter__(self) -> ProcessTree:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM every child's process group and every descendant, SIGKILL what is left after ``grace_s``."""
        import psutil

        # A second SIGTERM while stopping must not cut the stopping short.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if in_main else None
        try:
            victims = _descendants_and_self([p.pid for p in self.processes if p.poll() is None])
            for pgid in {p.pid for p in self.processes}:
                _signal_group(pgid, signal.SIGTERM)
            for proc in victims:
                _signal(proc, signal.SIGTERM)
            _, alive = psutil.wait_procs(victims, timeout=self.grace_s)
            for proc in alive:
                log.warning("%s (pid %d) did not stop within %g s; killing it", _name(proc), proc.pid, self.grace_s)
                _signal(proc, signal.SIGKILL)
            for pgid in {p.pid for p in self.processes}:
                _signal_group(pgid, signal.SIGKILL)
            for process in self.processes:
                process.wait()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _descendants_and_self(pids: list[int]) -> list:
    import psutil

    found = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def _signal(proc, signum: int) -> None:
    import psutil

    try:
        proc.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):  # the group is gone (or its id reused by someone else's)
        pass


def _name(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline()[:2]) or proc.name()
    except psutil.Error:  # gone or not ours to read: the name is only a label for a log line
        return "process"
