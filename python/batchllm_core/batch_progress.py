"""Progress and summary of a batch job, for people watching a terminal and for log files.

On a terminal one status line is redrawn in place (at most 5 times a second); elsewhere (a pipe, a log
file, CI) a plain line is printed every ``interval_s`` seconds so logs stay readable. The status says
requests done, output tokens/s, the share of prompt tokens served from shared prefixes, and KV use
when the engine reports it. A background ticker keeps the status coming while no request finishes
(the first completions of a large job can take minutes: silence there looks like a hang).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

__all__ = ["JobCounters", "ProgressReporter", "format_summary"]


@dataclass
class JobCounters:
    """What a job has done so far (answers written in this run; resumed answers are ``skipped``)."""

    total: int = 0              # answers this run has to write
    ok: int = 0
    failed: int = 0
    skipped: int = 0            # already answered by an earlier run (--resume)
    prompt_tokens: int = 0      # of the requests that ran
    cached_tokens: int = 0      # prompt tokens served from a shared prefix (every reader of a prefix counts it)
    prefilled_tokens: Optional[int] = None  # prompt tokens the engine computed (known when the run completes)
    output_tokens: int = 0
    seconds: float = 0.0        # running the engine (the rate's basis)
    wall_seconds: float = 0.0   # the whole job: reading, loading the model, tokenizing, running
    kv_peak_fraction: Optional[float] = None
    interrupted: bool = False

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def shared_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def prefill_tokens_saved(self) -> Optional[int]:
        """Prompt tokens not computed thanks to sharing (each shared prefix is computed once per group)."""
        return None if self.prefilled_tokens is None else self.prompt_tokens - self.prefilled_tokens

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"requests": self.total, "ok": self.ok, "failed": self.failed, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "wall_seconds": round(self.wall_seconds, 3), "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "prefill_tokens_saved": self.prefill_tokens_saved,
                "output_tokens": self.output_tokens,
                "output_tokens_per_s": round(self.output_tokens_per_s, 1), "interrupted": self.interrupted}


class ProgressReporter:
    """Prints job status to ``stream`` (stderr): stage lines, periodic status, nothing else.

    Parameters
    ----------
    counters : JobCounters
        Read (never written) each time a status is drawn.
    stream : text stream
    interval_s : float
        Seconds between plain status lines when ``stream`` is not a terminal.
    kv_usage : callable or None
        Returns the KV pool's used fraction now, when the engine can say.
    """

    TTY_REFRESH_S = 0.2
    TICK_MIN_S = 0.05  # the ticker never spins, whatever interval it is given

    def __init__(self, counters: JobCounters, stream: TextIO, interval_s: float = 5.0,
                 kv_usage: Optional[Callable[[], Optional[float]]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counters = counters
        self.stream = stream
        self.is_tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval_s = self.TTY_REFRESH_S if self.is_tty else interval_s
        self.kv_usage = kv_usage
        self._clock = clock
        self._start = clock()
        self._last_draw = self._start
        self._status_shown = False
        self._lock = threading.Lock()
        self._ticker: Optional[threading.Thread] = None
        self._stop_ticker = threading.Event()

    def start_ticker(self) -> None:
        """Redraw the status every interval from a daemon thread until :meth:`close`."""
        if self._ticker is not None:
            return

        def tick() -> None:
            while not self._stop_ticker.wait(max(self.interval_s, self.TICK_MIN_S)):
                self.update()

        self._ticker = threading.Thread(target=tick, name="batchllm-progress", daemon=True)
        self._ticker.start()

    def restart_clock(self) -> None:
        """Start timing the run itself (after reading, tokenizing and loading the model)."""
        self._start = self._last_draw = self._clock()

    def elapsed_s(self) -> float:
        return self._clock() - self._start

    def stage(self, message: str) -> None:
        """A one-off line: what the job is doing now (reading, tokenizing, loading, running)."""
        with self._lock:
            self._end_status_line()
            self.stream.write(f"batchllm: {message}\n")
            self.stream.flush()

    def update(self, force: bool = False) -> None:
        """Draw the status if the refresh interval has passed (or ``force``)."""
        with self._lock:
            now = self._clock()
            # The ticker wakes every interval_s; the small slack keeps it from skipping a beat.
            if not force and now - self._last_draw < 0.9 * self.interval_s:
                return
            self._last_draw = now
            line = self.status_line(now - self._start)
            if self.is_tty:
                self.stream.write("\r\x1b[2K" + line)
                self._status_shown = True
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def status_line(self, elapsed_s: float) -> str:
        c = self.counters
        rate = c.output_tokens / elapsed_s if elapsed_s > 0 else 0.0
        parts = [f"{c.done}/{c.total} requests", f"{rate:,.1f} output tok/s",
                 f"{100 * c.shared_fraction:.1f}% prompt tokens from shared prefixes"]
        kv = self.kv_usage() if self.kv_usage is not None else None
        if kv is not None:
            parts.append(f"KV {100 * kv:.0f}% used")
        if c.failed:
            parts.append(f"{c.failed} failed")
        return "batchllm: " + ", ".join(parts) + f" [{elapsed_s:.1f}s]"

    def close(self) -> None:
        """Stop the ticker and end an open status line."""
        self._stop_ticker.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            self._end_status_line()

    def _end_status_line(self) -> None:
        if self._status_shown:
            self.stream.write("\n")
            self._status_shown = False


def format_summary(counters: JobCounters, output_path: str) -> str:
    """The end-of-job summary (a few plain lines)."""
    c = counters
    head = "interrupted" if c.interrupted else "done"
    lines = [f"batchllm run-batch {head}: {c.done} of {c.total} requests answered "
             f"({c.ok} ok, {c.failed} failed) in {c.seconds:.2f} s"
             + (f" ({c.wall_seconds:.2f} s with reading, loading and tokenizing)" if c.wall_seconds > c.seconds else "")]
    if c.skipped:
        lines.append(f"  {c.skipped} requests were already answered in {output_path} (--resume) and were skipped")
    lines.append(f"  output tokens: {c.output_tokens:,} ({c.output_tokens_per_s:,.1f} tokens/s)")
    lines.append(f"  prompt tokens: {c.prompt_tokens:,}, served from shared prefixes: {c.cached_tokens:,} "
                 f"({100 * c.shared_fraction:.1f}%)")
    if c.prefill_tokens_saved is not None:
        share = c.prefill_tokens_saved / c.prompt_tokens if c.prompt_tokens else 0.0
        lines.append(f"  prefill tokens saved: {c.prefill_tokens_saved:,} ({100 * share:.1f}% of the prompt tokens; "
                     f"{c.prefilled_tokens:,} computed, each shared prefix once)")
    if c.kv_peak_fraction is not None:
        lines.append(f"  KV cache peak: {100 * c.kv_peak_fraction:.1f}% of the pool")
    if c.interrupted:
        lines.append(f"  answers so far are in {output_path}; rerun with --resume to finish the job")
    else:
        lines.append(f"  answers: {output_path}")
    return "\n".join(lines)
