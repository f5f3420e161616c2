"""Plain-Python reference of the prefix tree and its groupings (``_C.PrefixTree``).

Written for clarity, not speed: tests compare the native tree's plans and stats with it on random
jobs, and ``bench/bench_plan.py`` times it for a ratio. It follows the same rules, stated in
``csrc/runtime/prefix_tree_grouping.cpp``, but computes them differently where it can (group
prefixes are longest common prefixes of the members' token lists, members are collected from item
subtrees), so that agreement means something.

Example
-------
>>> tree = ReferencePrefixTree()
>>> tree.insert_list([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [7, 8]])
>>> plan = tree.group_single_level(block_size=2)
>>> plan.end, plan.requests, plan.request_prefix
([4], [[0, 1]], [0, 0, -1])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence


class _Node:
    """A radix tree node: ``tokens`` is the edge from the parent; ``depth`` counts tokens from the root."""

    __slots__ = ("tokens", "children", "ends", "parent", "depth")

    def __init__(self, tokens: list, parent: Optional["_Node"], depth: int):
        self.tokens = tokens
        self.children: dict[int, _Node] = {}  # first token of the child's edge -> child
        self.ends: list[int] = []  # requests whose prompt ends exactly here
        self.parent = parent
        self.depth = depth


class _Item:
    """A node's place in BatchLLM's enlargement: its own readers and the items still below it."""

    __slots__ = ("depth", "direct", "children")

    def __init__(self, depth: int, direct: list, children: list):
        self.depth = depth  # prefix length this item's readers share at least
        self.direct = direct
        self.children = children

    def members(self) -> list:
        out = list(self.direct)
        for child in self.children:
            out.extend(child.members())
        return out


@dataclass
class ReferencePlan:
    """Same fields as ``_C.SharingPlan``, as plain lists."""

    parent: list = field(default_factory=list)
    depth: list = field(default_factory=list)
    begin: list = field(default_factory=list)
    end: list = field(default_factory=list)
    requests: list = field(default_factory=list)  # per prefix: ascending request indices
    request_prefix: list = field(default_factory=list)

    def add(self, parent: int, depth: int, begin: int, end: int, requests: list) -> int:
        self.parent.append(parent)
        self.depth.append(depth)
        self.begin.append(begin)
        self.end.append(end)
        self.requests.append(sorted(requests))
        return len(self.end) - 1


def _round_down(tokens: int, block_size: int) -> int:
    return max(tokens, 0) // block_size * block_size


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


class ReferencePrefixTree:
    """Compact radix tree over token-id prompts; identical prompts share a node (``ends`` lists both)."""

    def __init__(self):
        self.root = _Node([], None, 0)
        self.prompts: list[list[int]] = []
        self.num_nodes = 1

    def insert_list(self, prompts: Iterable[Sequence[int]]) -> None:
        for prompt in prompts:
            self.insert(prompt)

    def insert(self, prompt: Sequence[int]) -> None:
        prompt = [int(t) for t in prompt]
        if any(t < 0 for t in prompt):
            raise ValueError("token ids must be >= 0")
        request = len(self.prompts)
        self.prompts.append(prompt)
        node, pos = self.root, 0
        while pos < len(prompt):
            child = node.children.get(prompt[pos])
            if child is None:
                leaf = _Node(prompt[pos:], node, node.depth + len(prompt) - pos)
                node.children[prompt[pos]] = leaf
                self.num_nodes += 1
                node = leaf
                break
            matched = _common_prefix_length(child.tokens, prompt[pos:pos + len(child.tokens)])
            if matched < len(child.tokens):
                child = self._split(child, matched)
            node, pos = child, pos + matched
        node.ends.append(request)

    def _split(self, node: _Node, length: int) -> _Node:
        parent = node.parent
        middle = _Node(node.tokens[:length], parent, parent.depth + length)
        parent.children[node.tokens[0]] = middle
        node.tokens = node.tokens[length:]
        node.parent = middle
        middle.children[node.tokens[0]] = node
        self.num_nodes += 1
        return middle

    # ---- helpers ---------------------------------------------------------------------------------

    def _subtree_requests(self, node: _Node) -> list:
        out = list(node.ends)
        for child in node.children.values():
            out.extend(self._subtree_requests(child))
        return out

    def _ordered_children(self, node: _Node) -> list:
        """Children in input order of the first request below each (the native tree's canonical order)."""
        return sorted(node.children.values(), key=lambda c: min(self._subtree_requests(c)))

    # ---- BatchLLM single-level groups ------------------------------------------------------------

    def _enlarge(self, node: _Node) -> list:
        """Items of ``node``'s list after BatchLLM's first-level enlargement of its subtree."""
        items = []
        for child in self._ordered_children(node):
            item = _Item(child.depth, list(child.ends), self._enlarge(child))
            own_length = item.depth - node.depth
            kept = []
            for grandchild in item.children:
                readers = len(grandchild.members())
                gain = (readers - 1) * (grandchild.depth - item.depth) - own_length
                (items if gain > 0 else kept).append(grandchild)
            item.children = kept
            if not item.direct and len(kept) == 1:  # one reader set left: the prefix runs on into it
                only = kept[0]
                item.depth, item.direct, item.children = only.depth, only.direct, only.children
            if item.members():
                items.append(item)
        return items

    def group_single_level(self, block_size: int, min_prefix_tokens: int = 0) -> ReferencePlan:
        shortest = max(block_size, min_prefix_tokens)
        groups = []
        for item in self._enlarge(self.root):
            members = sorted(item.members())
            if len(members) < 2:
                continue
            first = self.prompts[members[0]]
            common = min(_common_prefix_length(first, self.prompts[r]) for r in members[1:])
            shortest_prompt = min(len(self.prompts[r]) for r in members)
            end = _round_down(min(common, shortest_prompt - 1), block_size)
            if end >= shortest:
                groups.append((members, end))
        groups.sort(key=lambda g: g[0][0])
        plan = ReferencePlan(request_prefix=[-1] * len(self.prompts))
        for members, end in groups:
            index = plan.add(-1, 0, 0, end, members)
            for r in members:
                plan.request_prefix[r] = index
        return plan

    # ---- multi-level structure -------------------------------------------------------------------

    def group_multi_level(self, block_size: int, max_depth: int = 8, min_prefix_tokens: int = 0) -> ReferencePlan:
        shortest = max(block_size, min_prefix_tokens)
        plan = ReferencePlan(request_prefix=[-1] * len(self.prompts))

        def walk(node: _Node, enclosing: int) -> None:
            for child in self._ordered_children(node):
                here = enclosing
                readers = self._subtree_requests(child)
                level = 0 if enclosing < 0 else plan.depth[enclosing] + 1
                if len(readers) >= 2 and level < max_depth:
                    begin = 0 if enclosing < 0 else plan.end[enclosing]
                    shortest_prompt = min(len(self.prompts[r]) for r in readers)
                    end = _round_down(min(child.depth, shortest_prompt - 1), block_size)
                    if end - begin >= shortest:
                        here = plan.add(enclosing, level, begin, end, readers)
                for r in child.ends:
                    plan.request_prefix[r] = here
                walk(child, here)

        walk(self.root, -1)
        return plan

    # ---- stats -----------------------------------------------------------------------------------

    def stats(self, plan: ReferencePlan) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)
        shared = sum((e - b) * (len(r) - 1) for b, e, r in zip(plan.begin, plan.end, plan.requests) if r)
        return {
            "requests": len(self.prompts),
            "prompt_tokens": prompt_tokens,
            "prefill_tokens": prompt_tokens - shared,
            "shared_tokens": shared,
            "groups": len(plan.end),
            "nodes": self.num_nodes,
        }
