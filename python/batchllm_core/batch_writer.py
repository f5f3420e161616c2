"""Durable, incremental JSONL output: every answer line reaches the file whole, as soon as it exists.

Why it is crash-safe:
- each line is encoded first and handed to the kernel with ``os.write`` on an ``O_APPEND`` descriptor
  (one call in practice; a short write is continued), so a killed process leaves complete lines plus at
  most one partial trailing line, which ``batch_io.recover_output`` cuts away on resume;
- Ctrl-C / SIGTERM are deferred while a line is being written (:class:`DeferredSignals`), so an
  interrupt never splits a line in a run that is stopped cleanly;
- ``fsync`` makes lines survive a machine crash too. It is batched: at most one fsync every
  ``fsync_interval_s`` (plus one at close), because one fsync per line would cap a large job at a few
  thousand answers per second on ordinary disks. A process crash loses nothing either way: written
  lines are already in the kernel's page cache.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional

__all__ = ["DeferredSignals", "DurableWriter"]


class DeferredSignals:
    """Hold SIGINT/SIGTERM while a critical section runs, then deliver them as the usual exceptions.

    Installed once around the job (``with DeferredSignals() as signals``). Outside a critical section a
    signal acts at once (KeyboardInterrupt for SIGINT, ``SystemExit(128 + signum)`` for SIGTERM) so a long
    model step can be interrupted; inside ``signals.critical()`` it is remembered and raised on exit.
    Only usable from the main thread (Python delivers signals there); elsewhere it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._depth = 0
        self._pending: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        self._active = False
        self.received: Optional[int] = None

    def __enter__(self) -> "DeferredSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            self._active = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._active:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._active = False

    def critical(self) -> "_Critical":
        return _Critical(self)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        if self._depth > 0:
            self._pending = signum
            return
        self._raise(signum)

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _leave(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._pending is not None:
            signum, self._pending = self._pending, None
            self._raise(signum)


class _Critical:
    def __init__(self, owner: DeferredSignals) -> None:
        self._owner = owner

    def __enter__(self) -> None:
        self._owner._depth += 1

    def __exit__(self, *exc_info) -> None:
        self._owner._leave()


class DurableWriter:
    """Append JSON objects as lines to a file, durably (see the module docstring).

    Parameters
    ----------
    path : str
        The output file. ``append=False`` truncates it first (a fresh job); ``append=True`` keeps what
        is there (``--resume``; the caller has already cut any partial trailing line).
    fsync_interval_s : float
        Longest time a written line may wait for its fsync. 0 fsyncs after every line.
    signals : DeferredSignals or None
        When given, each line is written inside ``signals.critical()``.
    clock : callable
        Monotonic seconds (tests pass a fake).
    """

    def __init__(self, path: str, append: bool, fsync_interval_s: float = 0.1,
                 signals: Optional[DeferredSignals] = None, clock: Callable[[], float] = time.monotonic) -> None:
        if fsync_interval_s < 0:
            raise ValueError(f"fsync_interval_s must be >= 0, got {fsync_interval_s}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        existed = os.path.exists(path)
        self._fd: Optional[int] = os.open(path, flags, 0o644)
        if not existed:
            _fsync_directory_of(path)  # a new file's name must survive a crash too, not only its lines
        self._fsync_interval_s = fsync_interval_s
        self._signals = signals
        self._clock = clock
        self._last_fsync = clock()
        self._unsynced = False
        self.lines_written = 0
        self.fsyncs = 0

    def write(self, obj: Dict[str, Any]) -> None:
        """Append ``obj`` as one JSON line (compact, UTF-8 kept as is); fsync if the interval has passed."""
        if self._fd is None:
            raise ValueError("write to a closed DurableWriter")
        data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        if self._signals is not None:
            with self._signals.critical():
                self._write_all(data)
        else:
            self._write_all(data)
        self.lines_written += 1
        self._unsynced = True
        if self._clock() - self._last_fsync >= self._fsync_interval_s:
            self.sync()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def sync(self) -> None:
        """fsync now if anything was written since the last one."""
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self.fsyncs += 1
            self._unsynced = False
        self._last_fsync = self._clock()

    def close(self) -> None:
        """fsync what is left and close; safe to call twice."""
        if self._fd is None:
            return
        try:
            self.sync()
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DurableWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _fsync_directory_of(path: str) -> None:
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    except OSError:  # some file systems cannot fsync a directory; the lines are still fsynced
        pass
    finally:
        os.close(directory)
