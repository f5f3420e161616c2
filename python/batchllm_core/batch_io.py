"""Batch files on disk: read the input, and recover what an earlier (maybe crashed) run already answered.

The output file is only ever appended to whole lines (see ``batch_writer``), so after a crash it holds
complete JSON lines plus, at worst, one trailing partial line. :func:`recover_output` cuts that partial
line away and returns the answered keys (see ``batch_requests.answer_key``) so ``--resume`` can skip them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple, Union

from .batch_requests import answer_key

__all__ = ["BatchFileError", "read_input_lines", "RecoveredOutput", "recover_output", "check_output_path"]


class BatchFileError(Exception):
    """A batch file cannot be used (unreadable, not UTF-8, a corrupt output to resume): the job stops."""


def read_input_lines(path: str) -> List[Tuple[int, str]]:
    """The input file as ``(line_number, text)`` pairs, numbered from 1, newlines stripped.

    Raises BatchFileError with the path and the reason when the file cannot be read or is not UTF-8.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise BatchFileError(f"cannot read input {path!r}: it is a directory") from None
    except OSError as exc:
        raise BatchFileError(f"cannot read input {path!r}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM some editors write
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BatchFileError(f"input {path!r} is not UTF-8 text (line {line}, byte {exc.start})") from None
    # split("\n") rather than splitlines(): JSON strings may hold U+2028 etc. which splitlines would cut.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [(i + 1, line.rstrip("\r")) for i, line in enumerate(lines)]


def check_output_path(path: str, input_path: Optional[str] = None) -> None:
    """Fail early (before loading a model) when the output cannot be written or would replace the input."""
    if input_path is not None and os.path.exists(path) and os.path.exists(input_path) \
            and os.path.samefile(path, input_path):
        raise BatchFileError(f"output {path!r} is the input file: answers would overwrite the requests")
    if os.path.isdir(path):
        raise BatchFileError(f"cannot write output {path!r}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise BatchFileError(f"cannot write output {path!r}: directory {parent!r} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise BatchFileError(f"cannot write output {path!r}: permission denied")
    elif not os.access(parent, os.W_OK):
        raise BatchFileError(f"cannot write output {path!r}: directory {parent!r} is not writable")


@dataclass
class RecoveredOutput:
    """What an existing output file already answers."""

    keys: Set[Tuple[str, Union[str, int]]] = field(default_factory=set)
    lines: int = 0               # complete answer lines kept
    truncated_bytes: int = 0     # size of the partial trailing line that was cut away


def recover_output(path: str) -> RecoveredOutput:
    """Read an output file for ``--resume``: cut a trailing partial line, collect the answered keys.

    A missing file answers nothing. A complete line that is not an answer object means the file is not
    ours (or was edited): BatchFileError, rather than guessing and losing or doubling answers. The file
    is streamed (answers of a large job need not fit in memory twice).
    """
    recovered = RecoveredOutput()
    if not os.path.exists(path):
        return recovered
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            complete = _end_of_last_line(f, size)
            if complete < size:
                f.truncate(complete)
                f.flush()
                os.fsync(f.fileno())
                recovered.truncated_bytes = size - complete
            f.seek(0)
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    recovered.keys.add(_answer_key_of(path, number, raw))
                    recovered.lines += 1
    except OSError as exc:
        raise BatchFileError(f"cannot resume from output {path!r}: {exc.strerror or exc}") from None
    return recovered


def _end_of_last_line(f, size: int, chunk_bytes: int = 1 << 16) -> int:
    """Offset just past the file's last newline (0 when it has none), reading backwards by chunks."""
    end = size
    while end > 0:
        start = max(0, end - chunk_bytes)
        f.seek(start)
        newline = f.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _answer_key_of(path: str, number: int, raw: bytes):
    try:
        answer = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict) or "custom_id" not in answer:
        raise BatchFileError(f"cannot resume from output {path!r}: line {number} is not an answer line "
                             f"(not a JSON object with a custom_id); move the file away or drop --resume")
    error = answer.get("error")
    if isinstance(error, dict):
        # Lines that own no custom_id carry their input line number (see batch_requests.answer_key).
        return answer_key(error.get("line", -1), answer.get("custom_id"), error.get("code"))
    return answer_key(-1, answer.get("custom_id"), None)
