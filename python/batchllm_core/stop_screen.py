"""Which sampled tokens can complete a stop string: the per-step screen over a job's rows.

A stop string is matched on the detokenized text, and detokenizing every row every step costs the
host ~3 us a row in Python: ~3 ms a step at 1,024 rows, about an H100's whole step for W1 (3.5 ms).
But a match ends in the text of the token that completes it, and a token's text is known in advance
(:meth:`Tokenizer.token_texts`). So a row needs its text only when its token's text holds the last
character of one of its request's stop strings; every other row just files its token, and the
tokens wait until such a row comes (or the completion ends, when the whole text is decoded once).
For a stop string like "\\n" that is a few rows a step instead of all of them.

Tokens that are not screened out whatever the stop strings (so the check is never skipped wrongly):
a piece of a multi-byte character (its text holds U+FFFD: the character it completes is not known
from the token alone), a token whose text depends on its left neighbour (``token_texts`` gives None),
and ids past the tokenizer's vocabulary. A token's text may also gain U+FFFD, for an invalid byte
sequence an earlier token began: stop strings ending in U+FFFD check every row.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["StopScreen"]

# More distinct final characters than this over one job's stop strings: no screen (every row checks).
_MAX_CHARS = 64


class StopScreen:
    """Per request, which token ids can complete one of its stop strings.

    Parameters
    ----------
    token_texts : list of (str or None)
        What each token id adds to the text (``Tokenizer.token_texts()``).
    stops : sequence of (sequence of str or None)
        Each request's stop strings (None or empty: it has none, and no row of it is flagged).

    Examples
    --------
    >>> screen = StopScreen(["a", "b\\n", "\\ufffd", None], [["\\n"], None])
    >>> screen.flags(np.array([0, 0, 0, 0, 1]), np.array([0, 1, 2, 3, 1])).tolist()
    [False, True, True, True, False]
    """

    def __init__(self, token_texts: Sequence[Optional[str]], stops: Sequence[Optional[Sequence[str]]]):
        finals = [sorted({s[-1] for s in (request_stops or ()) if s}) for request_stops in stops]
        chars = sorted({c for request_chars in finals for c in request_chars})
        self._vocab = len(token_texts)
        self._has_stops = np.array([bool(f) for f in finals], bool)
        # A delta can also hold U+FFFD for an invalid byte sequence that an earlier token began.
        self.active = 0 < self._vocab and len(chars) <= _MAX_CHARS and "\ufffd" not in chars
        if not self.active:
            return
        # Row 0 of the table: no character (padding of requests with fewer, and requests without any).
        index = {c: i + 1 for i, c in enumerate(chars)}
        always = np.array([t is None or "\ufffd" in t for t in token_texts], bool)
        self._table = np.zeros((len(chars) + 1, self._vocab), bool)
        for c, row in index.items():
            self._table[row] = np.array([t is not None and c in t for t in token_texts], bool) | always
        width = max(1, max(len(f) for f in finals) if finals else 1)
        self._request_chars = np.zeros((len(stops), width), np.int64)
        for request, request_chars in enumerate(finals):
            self._request_chars[request, :len(request_chars)] = [index[c] for c in request_chars]

    def flags(self, requests: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """bool [R]: row r's token (``tokens[r]``, of request ``requests[r]``) may complete a stop
        string of its request, so its text must be checked this step."""
        has_stops = self._has_stops[requests]
        if not self.active:
            return has_stops
        outside = tokens >= self._vocab
        hit = self._table[self._request_chars[requests], np.minimum(tokens, self._vocab - 1)[:, None]].any(axis=1)
        return has_stops & (hit | outside)
