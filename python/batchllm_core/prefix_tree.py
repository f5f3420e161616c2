"""Convenience around ``_C.PrefixTree``: build from prompts in whatever form they come, read plans as lists.

Example
-------
>>> from batchllm_core.prefix_tree import build_prefix_tree, plan_to_lists
>>> tree = build_prefix_tree([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [7, 8]])
>>> plan = tree.group_single_level(block_size=2)
>>> plan_to_lists(plan)["requests"], plan.end.tolist()
([[0, 1]], [4])
>>> tree.stats(plan)["shared_tokens"]
4
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import _C


def build_prefix_tree(
    prompts: Optional[Sequence] = None,
    *,
    tokens: Optional[np.ndarray] = None,
    offsets: Optional[np.ndarray] = None,
) -> "_C.PrefixTree":
    """A prefix tree over a job's prompts.

    Parameters
    ----------
    prompts : list of token-id lists or 1-D integer arrays, optional
        One entry per request, in input order.
    tokens : int32 ndarray [T], optional
        Every prompt's tokens back to back (with ``offsets``; read without copying).
    offsets : int64 ndarray [N + 1], optional
        Prompt i is ``tokens[offsets[i]:offsets[i + 1]]``.
    """
    if (prompts is None) == (tokens is None):
        raise ValueError("pass either prompts or tokens + offsets")
    tree = _C.PrefixTree()
    if prompts is not None:
        tree.insert_list(prompts)
    else:
        if offsets is None:
            raise ValueError("tokens needs offsets")
        tree.insert(tokens, offsets)
    return tree


def plan_to_lists(plan: "_C.SharingPlan") -> dict:
    """The plan as plain lists: parent, depth, begin, end, requests (one list per prefix), request_prefix."""
    indptr = plan.request_indptr
    flat = plan.requests.tolist()
    return {
        "parent": plan.parent.tolist(),
        "depth": plan.depth.tolist(),
        "begin": plan.begin.tolist(),
        "end": plan.end.tolist(),
        "requests": [flat[indptr[i]:indptr[i + 1]] for i in range(len(plan))],
        "request_prefix": plan.request_prefix.tolist(),
    }


__all__ = ["build_prefix_tree", "plan_to_lists"]
