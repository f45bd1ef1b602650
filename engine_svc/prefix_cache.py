"""Prefix cache: a radix tree over token ids whose edges hold KV pool rows.

The tree holds exactly one pool reference on every row it stores. A row is evictable when that
reference is the only one (ref count 1) and no row below it on its path is held by anyone else.
Leaves are kept in a heap by last use (lazy deletion: stale entries are skipped when popped), so
eviction pops least-recently-used leaves and trims their tails.

Edge labels are int32 arrays; matching compares a whole edge at once with NumPy, so the Python
work per lookup is one step per tree level, never one per token.
"""
from __future__ import annotations

import heapq
from itertools import count
from typing import Sequence

import numpy as np

from engine_svc.kv_pool import KVPool

MAX_TOKEN_ID = 2**31 - 1


class _Node:
    """One edge of the radix tree: its tokens, the rows holding them, and its children."""

    __slots__ = ("tokens", "rows", "children", "parent", "last_used")

    def __init__(self, tokens: np.ndarray, rows: np.ndarray, parent: _Node | None, last_used: int) -> None:
        self.tokens = tokens  # [edge_len] int32
        self.rows = rows  # [edge_len] int64, pool row of each token
        self.children: dict[int, _Node] = {}  # first token id of the child edge -> child
        self.parent = parent
        self.last_used = last_used


def _common_prefix(edge: np.ndarray, query: np.ndarray) -> int:
    """Number of leading tokens equal in both arrays."""
    limit = min(edge.size, query.size)
    differ = np.flatnonzero(edge[:limit] != query[:limit])
    return int(differ[0]) if differ.size else limit


def _as_tokens(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, np.int32)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token_ids must hold integers, got dtype {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID:
        low, high = int(arr.min()), int(arr.max())
        raise ValueError(f"token_ids must lie in [0, {MAX_TOKEN_ID}], got values in [{low}, {high}]")
    return arr.astype(np.int32)


class PrefixCache:
    """Radix tree over token ids whose nodes hold pool rows (one tree reference per row)."""

    def __init__(self, pool: KVPool) -> None:
        self._pool = pool
        self._root = _Node(np.empty(0, np.int32), np.empty(0, np.int64), None, 0)
        self._clock = 0  # logical time of the last match / insert
        self._num_tokens = 0
        self._num_nodes = 0  # root excluded
        self._leaf_heap: list[tuple[int, int, _Node]] = []  # (last_used, tie-break, leaf)
        self._tie = count()

    @property
    def num_cached_tokens(self) -> int:
        """Tokens (rows) held by the tree."""
        return self._num_tokens

    # ---- lookup and insertion -------------------------------------------------------------
    def match(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of the longest cached prefix of token_ids; the caller receives one reference on each."""
        tokens = _as_tokens(token_ids)
        self._clock += 1
        node, pos, pieces = self._root, 0, []
        while pos < tokens.size:
            child = node.children.get(int(tokens[pos]))
            if child is None:
                break
            matched = _common_prefix(child.tokens, tokens[pos:])
            self._touch(child)
            pieces.append(child.rows[:matched])
            pos += matched
            if matched < child.tokens.size:
                break
            node = child
        rows = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
        self._pool.share(rows)
        return rows

    def insert(self, token_ids: Sequence[int] | np.ndarray, rows: np.ndarray | Sequence[int]) -> int:
        """Record that token_ids[i] lives in rows[i]; the tree references only the part it lacked.

        Parts already cached keep their rows (the caller's duplicates are not taken). Returns the
        number of tokens newly added.
        """
        tokens = _as_tokens(token_ids)
        row_arr = np.asarray(rows)
        if row_arr.ndim != 1 or row_arr.size != tokens.size:
            raise ValueError(
                f"rows must be 1-D with len(rows) == len(token_ids) == {tokens.size},"
                f" got shape {row_arr.shape}"
            )
        if row_arr.size and not np.issubdtype(row_arr.dtype, np.integer):
            raise ValueError(f"rows must hold integers, got dtype {row_arr.dtype}")
        self._clock += 1
        node, pos = self._root, 0
        while pos < tokens.size:
            child = node.children.get(int(tokens[pos]))
            if child is None:
                return self._add_leaf(node, tokens[pos:], row_arr[pos:])
            matched = _common_prefix(child.tokens, tokens[pos:])
            self._touch(child)
            pos += matched
            if matched < child.tokens.size:
                if pos == tokens.size:
                    return 0  # the sequence ends inside this edge: nothing new
                child = self._split(child, matched)
            node = child
        return 0

    def _add_leaf(self, parent: _Node, tokens: np.ndarray, rows: np.ndarray) -> int:
        new_rows = rows.astype(np.int64)  # a copy the tree owns
        self._pool.share(new_rows)  # raises (changing nothing) when a row is not live
        leaf = _Node(tokens.copy(), new_rows, parent, self._clock)
        parent.children[int(tokens[0])] = leaf
        self._num_nodes += 1
        self._num_tokens += int(tokens.size)
        self._push(leaf)
        return int(tokens.size)

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut child's edge after `at` tokens; returns the new upper node (child keeps the rest)."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.tokens[:at], child.rows[:at], parent, child.last_used)
        parent.children[int(child.tokens[0])] = upper
        child.tokens, child.rows, child.parent = child.tokens[at:], child.rows[at:], upper
        upper.children[int(child.tokens[0])] = child
        self._num_nodes += 1
        return upper

    # ---- LRU heap -------------------------------------------------------------------------
    def _touch(self, node: _Node) -> None:
        node.last_used = self._clock
        if not node.children:
            self._push(node)

    def _push(self, leaf: _Node) -> None:
        if len(self._leaf_heap) > 2 * self._num_nodes + 64:
            self._rebuild_heap()
        heapq.heappush(self._leaf_heap, (leaf.last_used, next(self._tie), leaf))

    def _rebuild_heap(self) -> None:
        leaves = [node for node in self._nodes() if not node.children]
        self._leaf_heap = [(leaf.last_used, next(self._tie), leaf) for leaf in leaves]
        heapq.heapify(self._leaf_heap)

    def _pop_leaf(self) -> _Node | None:
        """Least recently used live leaf, skipping stale heap entries."""
        while self._leaf_heap:
            last_used, _, node = heapq.heappop(self._leaf_heap)
            if node.parent is not None and not node.children and node.last_used == last_used:
                return node
        return None

    # ---- eviction -------------------------------------------------------------------------
    def evict(self, num_rows: int) -> int:
        """Trim LRU leaves (rows held by the tree alone) until num_rows rows are freed or none is left.

        Takes exactly min(num_rows, evictable_tokens()) rows: a leaf's tail is cut when only part of it
        is needed. Returns the number of rows that went back to the pool.
        """
        if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)):
            raise ValueError(f"num_rows must be an integer, got {num_rows!r}")
        freed, kept = 0, []
        while freed < num_rows:
            leaf = self._pop_leaf()
            if leaf is None:
                break
            held = np.flatnonzero(self._pool.ref_counts(leaf.rows) > 1)
            first_evictable = int(held[-1]) + 1 if held.size else 0  # rows after it: tree only
            take = min(leaf.rows.size - first_evictable, num_rows - freed)
            if take > 0:
                freed += take
                self._trim(leaf, leaf.rows.size - take)
            if leaf.parent is not None:
                kept.append(leaf)  # still a leaf: back into the heap after this round
        for leaf in kept:
            self._push(leaf)
        return freed

    def _trim(self, leaf: _Node, keep: int) -> None:
        """Drop the tree's reference on leaf rows [keep:]; removes the leaf when keep == 0."""
        self._pool.free(leaf.rows[keep:])
        self._num_tokens -= int(leaf.rows.size - keep)
        if keep:
            leaf.tokens, leaf.rows = leaf.tokens[:keep], leaf.rows[:keep]
            return
        parent = leaf.parent
        assert parent is not None
        del parent.children[int(leaf.tokens[0])]
        leaf.parent = None
        self._num_nodes -= 1
        if parent is not self._root and not parent.children:
            self._push(parent)

    def clear(self) -> None:
        """Drop every tree reference; rows still used by requests stay used by them."""
        rows = [node.rows for node in self._nodes()]
        if rows:
            self._pool.free(np.concatenate(rows))
        self._root.children.clear()
        self._leaf_heap.clear()
        self._num_tokens = self._num_nodes = 0

    def evictable_tokens(self) -> int:
        """Rows that evict() could return to the pool now (O(nodes) walk, O(tokens) vectorised)."""
        nodes, subtree_end = self._preorder()
        if not nodes:
            return 0
        lengths = np.array([node.rows.size for node in nodes])
        offsets = np.r_[0, np.cumsum(lengths)]  # node i's rows sit at flat [offsets[i], offsets[i+1])
        held_rows = np.flatnonzero(self._pool.ref_counts(np.concatenate([node.rows for node in nodes])) > 1)
        if held_rows.size == 0:
            return int(offsets[-1])
        held_before = np.searchsorted(held_rows, offsets)  # held rows in flat [0, offsets[i])
        held_below = held_before[np.asarray(subtree_end)] - held_before[1:]  # in node i's descendants
        node_of_held = np.searchsorted(offsets, held_rows, side="right") - 1  # sorted, like held_rows
        last = np.flatnonzero(np.r_[node_of_held[1:] != node_of_held[:-1], True])  # last held row per node
        pinned = np.where(held_below > 0, lengths, 0)  # a held descendant pins the whole edge
        tail_pin = held_rows[last] + 1 - offsets[node_of_held[last]]  # edge rows up to the last held one
        pinned[node_of_held[last]] = np.maximum(pinned[node_of_held[last]], tail_pin)
        return int(offsets[-1] - pinned.sum())

    # ---- traversal ------------------------------------------------------------------------
    def _nodes(self) -> list[_Node]:
        return self._preorder()[0]

    def _preorder(self) -> tuple[list[_Node], list[int]]:
        """Nodes in pre-order (root excluded) and, per node, the index one past its subtree."""
        nodes: list[_Node] = []
        subtree_end: list[int] = []
        stack: list[tuple[_Node, int]] = [(child, -1) for child in self._root.children.values()]
        while stack:
            node, index = stack.pop()
            if index >= 0:  # closing marker: every descendant has been listed
                subtree_end[index] = len(nodes)
                continue
            stack.append((node, len(nodes)))
            nodes.append(node)
            subtree_end.append(0)
            stack.extend((child, -1) for child in node.children.values())
        return nodes, subtree_end
