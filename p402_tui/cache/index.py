"""The vector index of one cache scope: a float32 matrix, searched by matrix-vector product.

Rows are unit vectors, so a dot product is the cosine. The matrix grows by
doubling and rows are removed by moving the last row into the gap, so adding
and removing are O(1) and the matrix always stays one contiguous block.

A full scan reads every float: 150 MB at 100k rows of 384, far more than the
2 ms budget allows on a small machine. So large indexes first filter on
384-bit sign codes (random-hyperplane LSH): the fraction of differing bits
between two codes estimates angle/pi, and only rows whose Hamming distance is
within 6 standard deviations of the largest distance a row above the cosine
threshold could have are scored exactly. A true match is dropped with
probability well under 1e-8; when the filter keeps too much, it falls back to
the full scan, so the answer is never worse than the plain product + argmax.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

CODE_BITS = 384
CODE_WORDS = CODE_BITS // 64
FULL_SCAN_ROWS = 4096  # below this a plain product is faster than filtering first
PREFILTER_SIGMAS = 6.0


@functools.lru_cache(maxsize=8)
def _hyperplanes(dim: int) -> np.ndarray:
    # A fixed seed: codes of rows written by one process must compare with queries of another.
    return np.random.default_rng(402).standard_normal((dim, CODE_BITS)).astype(np.float32)


def sign_codes(vectors: np.ndarray) -> np.ndarray:
    """(n, dim) float32 -> (CODE_WORDS, n) uint64: one word-row per 64 hyperplanes, rows as columns."""
    bits = (vectors @ _hyperplanes(vectors.shape[1])) > 0
    packed = np.packbits(bits, axis=1)
    return np.ascontiguousarray(packed.view(np.uint64).T)


@functools.lru_cache(maxsize=64)
def max_hamming(threshold: float) -> int:
    """The Hamming distance a row with cosine >= threshold stays within, except with negligible probability."""
    p = math.acos(max(-1.0, min(1.0, threshold))) / math.pi
    return math.ceil(CODE_BITS * p + PREFILTER_SIGMAS * math.sqrt(CODE_BITS * p * (1 - p)))


class Snapshot(NamedTuple):
    """The rows present when a search began; searched in a worker thread while the loop may add more."""

    vectors: np.ndarray
    codes: np.ndarray


class VectorIndex:
    def __init__(self, dim: int, capacity: int = 16) -> None:
        self.dim = dim
        self.size = 0
        self.vectors = np.empty((capacity, dim), np.float32)
        self.codes = np.empty((CODE_WORDS, capacity), np.uint64)
        self.owners: list[Any] = []

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.codes.nbytes

    def add(self, vector: np.ndarray, owner: Any, code: np.ndarray | None = None) -> int:
        """Append a unit vector (and its sign code, if the caller has it); returns its row."""
        if self.size == self.vectors.shape[0]:
            self._grow(self.size * 2)
        row = self.size
        self.vectors[row] = vector
        self.codes[:, row] = sign_codes(vector.reshape(1, -1))[:, 0] if code is None else code
        self.owners.append(owner)
        self.size += 1
        return row

    def extend(self, vectors: np.ndarray, owners: list[Any]) -> None:
        """Append many rows at once (loading from the database)."""
        needed = self.size + len(vectors)
        if needed > self.vectors.shape[0]:
            self._grow(max(needed, self.vectors.shape[0] * 2))
        self.vectors[self.size : needed] = vectors
        self.codes[:, self.size : needed] = sign_codes(vectors)
        self.owners.extend(owners)
        self.size = needed

    def remove(self, row: int) -> Any | None:
        """Remove a row by moving the last row into it; returns the owner that moved (now at `row`), if any."""
        last = self.size - 1
        moved = None
        if row != last:
            self.vectors[row] = self.vectors[last]
            self.codes[:, row] = self.codes[:, last]
            moved = self.owners[last]
            self.owners[row] = moved
        self.owners.pop()
        self.size = last
        return moved

    def score(self, row: int, query: np.ndarray) -> float:
        return float(self.vectors[row] @ query)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.vectors[: self.size], self.codes[:, : self.size])

    def _grow(self, capacity: int) -> None:
        vectors = np.empty((capacity, self.dim), np.float32)
        vectors[: self.size] = self.vectors[: self.size]
        codes = np.empty((CODE_WORDS, capacity), np.uint64)
        codes[:, : self.size] = self.codes[:, : self.size]
        # New arrays, not resize(): a search running in a thread keeps reading its snapshot of the old ones.
        self.vectors, self.codes = vectors, codes


def search(
    snapshot: Snapshot, query: np.ndarray, threshold: float, k: int = 4, code: np.ndarray | None = None
) -> list[tuple[int, float]]:
    """Up to k (row, cosine) at or above threshold, best first (`code`: the query's sign code, if known).
    Pure function of its arguments: safe in a thread."""
    vectors, codes = snapshot
    n = vectors.shape[0]
    if n == 0:
        return []
    rows: np.ndarray | None = None
    if n > FULL_SCAN_ROWS:
        query_code = sign_codes(query.reshape(1, -1))[:, 0] if code is None else code
        distance = np.bitwise_count(codes[0] ^ query_code[0]).astype(np.uint16)
        for word in range(1, CODE_WORDS):
            distance += np.bitwise_count(codes[word] ^ query_code[word])
        kept = np.flatnonzero(distance <= max_hamming(threshold))
        if kept.size == 0:
            return []
        if kept.size <= n // 4:
            rows = kept
    scores = vectors @ query if rows is None else vectors[rows] @ query
    if scores.size > k:
        top = np.argpartition(scores, -k)[-k:]
    else:
        top = np.arange(scores.size)
    top = top[np.argsort(scores[top])[::-1]]
    found = []
    for i in top:
        score = float(scores[i])
        if score < threshold:
            break
        found.append((int(i) if rows is None else int(rows[i]), score))
    return found
