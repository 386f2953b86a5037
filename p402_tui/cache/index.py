"""The vector index of one cache scope: a float32 matrix, searched by matrix products.

Rows are unit vectors, so a dot product is the cosine. The matrix grows by
doubling and rows are removed by moving the last row into the gap, so adding
and removing are O(1) and the matrix always stays one contiguous block.

A scan of every row grows with the cache, and every miss pays it: at 13,000 rows
a quarter of a millisecond a lookup here, more than the rest of the request. So
from `BUCKET_FROM_ROWS` rows on, the index is also split into buckets (spherical
k-means over its rows, as an IVF index does, about `BUCKET_ROWS` rows each,
trained again when the index has doubled): a lookup reads only the rows of the
`PROBES` buckets whose centres are closest to its query. Those rows are then
filtered on 384-bit sign codes (random-hyperplane LSH): the fraction of
differing bits between two codes estimates angle/pi, and only rows whose
Hamming distance is within 4 standard deviations of the largest distance a row
above the cosine threshold could have are scored exactly (a true match is
dropped there about once in 30,000; at 6 the filter kept seven times as many
rows of gateway-like prompts, and scoring them cost more than the rest of the
search). Before the buckets are trained, a large index filters every row this
way. The buckets are the approximate part: a row close to the query sits in
another bucket now and then (bench/cache.py measures `bucket_recall` against a
full scan).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

CODE_BITS = 384
CODE_WORDS = CODE_BITS // 64
FULL_SCAN_ROWS = 4096  # below this a plain product is faster than filtering first
PREFILTER_SIGMAS = 4.0
BUCKET_FROM_ROWS = 8192  # buckets from this many rows on, trained again at each doubling
# Up to this many rows a batch of lookups is scored by one matrix product: below about 10,000 rows that
# beat the buckets (at 8,192 rows 73 us a lookup against 94; at 13,000, 153 against 96; measured here).
BATCH_SCAN_ROWS = 10_000
BUCKET_ROWS = 128  # rows a bucket holds on average when trained
PROBES = 16  # buckets a lookup reads
TRAIN_SAMPLE = 24  # rows sampled per bucket to train the centres
TRAIN_ROUNDS = 5


@functools.lru_cache(maxsize=8)
def _hyperplanes(dim: int) -> np.ndarray:
    # A fixed seed: codes of rows written by one process must compare with queries of another.
    return np.random.default_rng(402).standard_normal((dim, CODE_BITS)).astype(np.float32)


def sign_codes(vectors: np.ndarray) -> np.ndarray:
    """(n, dim) float32 -> (n, CODE_WORDS) uint64: a row's 384 bits in six words, rows contiguous
    (a bucketed search gathers the codes of a few thousand rows: 48 bytes each, in one piece)."""
    bits = (vectors @ _hyperplanes(vectors.shape[1])) > 0
    return np.packbits(bits, axis=1).view(np.uint64)


_ONES = np.ones(CODE_WORDS, np.float32)


@functools.lru_cache(maxsize=64)
def max_hamming(threshold: float) -> int:
    """The Hamming distance a row with cosine >= threshold stays within, except with negligible probability."""
    p = math.acos(max(-1.0, min(1.0, threshold))) / math.pi
    return math.ceil(CODE_BITS * p + PREFILTER_SIGMAS * math.sqrt(CODE_BITS * p * (1 - p)))


class Buckets(NamedTuple):
    """The bucket centres and each bucket's rows (the first `sizes[b]` of `rows[b]`)."""

    centres: np.ndarray  # (buckets, dim), unit rows
    rows: list[np.ndarray]  # int32 each
    sizes: np.ndarray


class Snapshot(NamedTuple):
    """The rows present when a search began; searched in a worker thread while the loop may add more."""

    vectors: np.ndarray
    codes: np.ndarray
    buckets: Buckets | None = None


class Trained(NamedTuple):
    """Buckets made by `train_buckets` for the first `len(bucket_of)` rows of an index."""

    buckets: Buckets
    bucket_of: np.ndarray  # row -> its bucket
    slot_of: np.ndarray  # row -> its place in the bucket's rows


class VectorIndex:
    def __init__(self, dim: int, capacity: int = 16) -> None:
        self.dim = dim
        self.size = 0
        self.vectors = np.empty((capacity, dim), np.float32)
        self.codes = np.empty((capacity, CODE_WORDS), np.uint64)
        self.owners: list[Any] = []
        self.buckets: Buckets | None = None
        self.bucket_of = np.empty(capacity, np.int32)
        self.slot_of = np.empty(capacity, np.int32)
        self.trained_rows = 0  # rows when the buckets were last trained
        self.training = False  # a training is under way on a worker
        self._changed: list[int] = []  # while training: rows whose vector changed (another row moved in)
        self._low = 0  # while training: the fewest rows the index held (rows past it were added again)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        total = self.vectors.nbytes + self.codes.nbytes + self.bucket_of.nbytes + self.slot_of.nbytes
        if self.buckets is not None:
            total += self.buckets.centres.nbytes + sum(rows.nbytes for rows in self.buckets.rows)
        return total

    def add(self, vector: np.ndarray, owner: Any, code: np.ndarray | None = None, bucket: int | None = None) -> int:
        """Append a unit vector (and its sign code and bucket, if the caller has them); returns its row."""
        if self.size == self.vectors.shape[0]:
            self._grow(self.size * 2)
        row = self.size
        self.vectors[row] = vector
        self.codes[row] = sign_codes(vector.reshape(1, -1))[0] if code is None else code
        self.owners.append(owner)
        self.size += 1
        if self.buckets is not None:
            self._put(row, int(np.argmax(self.buckets.centres @ vector)) if bucket is None else bucket)
        return row

    def extend(self, vectors: np.ndarray, owners: list[Any]) -> None:
        """Append many rows at once (loading from the database; the first search asks for buckets)."""
        needed = self.size + len(vectors)
        if needed > self.vectors.shape[0]:
            self._grow(max(needed, self.vectors.shape[0] * 2))
        start = self.size
        self.vectors[start:needed] = vectors
        self.codes[start:needed] = sign_codes(vectors)
        self.owners.extend(owners)
        self.size = needed
        if self.buckets is not None:
            for row, bucket in zip(range(start, needed), nearest_bucket(self.buckets.centres, vectors)):
                self._put(row, int(bucket))

    def remove(self, row: int) -> Any | None:
        """Remove a row by moving the last row into it; returns the owner that moved (now at `row`), if any."""
        last = self.size - 1
        moved = None
        if self.buckets is not None:
            self._take(row)
            if row != last:
                bucket, slot = int(self.bucket_of[last]), int(self.slot_of[last])
                self.buckets.rows[bucket][slot] = row
                self.bucket_of[row], self.slot_of[row] = bucket, slot
        if row != last:
            self.vectors[row] = self.vectors[last]
            self.codes[row] = self.codes[last]
            moved = self.owners[last]
            self.owners[row] = moved
        self.owners.pop()
        self.size = last
        if self.training:
            self._changed.append(row)
            self._low = min(self._low, last)
        return moved

    def score(self, row: int, query: np.ndarray) -> float:
        return float(self.vectors[row] @ query)

    def snapshot(self) -> Snapshot:
        """The rows as they are now (taken in the batch worker while the loop may add rows: each array is
        cut at one size, read once; a row array of a bucket may still change under a search)."""
        size, buckets = self.size, self.buckets
        if buckets is not None:
            buckets = Buckets(buckets.centres, list(buckets.rows), buckets.sizes.copy())
        return Snapshot(self.vectors[:size], self.codes[:size], buckets)

    # --- buckets ---------------------------------------------------------------------

    def wants_training(self) -> bool:
        """Large enough for buckets, or doubled since they were trained."""
        return not self.training and self.size >= max(BUCKET_FROM_ROWS, 2 * self.trained_rows)

    def start_training(self) -> np.ndarray:
        """The rows to train buckets on (in a worker: the loop may move rows meanwhile, `install` mends that)."""
        self.training = True
        self._changed, self._low = [], self.size
        return self.vectors[: self.size]

    def install(self, trained: Trained) -> None:
        """Take buckets trained on this index's first `len(trained.bucket_of)` rows. Rows whose vector
        changed since (removals move the last row into the gap) or were added since are put in their
        closest bucket here; when any had changed, the buckets' row lists are laid out again (at 100k
        rows about 10 ms on the loop, once per doubling of the index)."""
        self.training = False
        centres = trained.buckets.centres
        kept = min(len(trained.bucket_of), self._low if self._changed else self.size)
        if not self._changed:
            self.buckets = trained.buckets
            self.bucket_of[:kept] = trained.bucket_of
            self.slot_of[:kept] = trained.slot_of
            for row, bucket in zip(range(kept, self.size), nearest_bucket(centres, self.vectors[kept : self.size])):
                self._put(row, int(bucket))
        else:
            assigned = np.empty(self.size, np.int32)
            assigned[:kept] = trained.bucket_of[:kept]
            stale = np.unique(np.array([row for row in self._changed if row < kept], np.int64))
            stale = np.concatenate([stale, np.arange(kept, self.size)])
            assigned[stale] = nearest_bucket(centres, self.vectors[stale])
            laid = _layout(centres, assigned)
            self.buckets = laid.buckets
            self.bucket_of[: self.size] = laid.bucket_of
            self.slot_of[: self.size] = laid.slot_of
        self._changed = []
        self.trained_rows = self.size

    def _put(self, row: int, bucket: int) -> None:
        assert self.buckets is not None
        rows, sizes = self.buckets.rows, self.buckets.sizes
        slot = int(sizes[bucket])
        if slot == len(rows[bucket]):
            grown = np.empty(2 * slot, np.int32)
            grown[:slot] = rows[bucket]
            rows[bucket] = grown  # a new array: a search in a thread keeps reading the old one
        rows[bucket][slot] = row
        sizes[bucket] = slot + 1
        self.bucket_of[row], self.slot_of[row] = bucket, slot

    def _take(self, row: int) -> None:
        """Take a row out of its bucket, moving the bucket's last row into its place."""
        assert self.buckets is not None
        bucket, slot = int(self.bucket_of[row]), int(self.slot_of[row])
        rows, sizes = self.buckets.rows[bucket], self.buckets.sizes
        last = int(sizes[bucket]) - 1
        other = int(rows[last])
        rows[slot] = other
        self.slot_of[other] = slot
        sizes[bucket] = last

    def _grow(self, capacity: int) -> None:
        vectors = np.empty((capacity, self.dim), np.float32)
        vectors[: self.size] = self.vectors[: self.size]
        codes = np.empty((capacity, CODE_WORDS), np.uint64)
        codes[: self.size] = self.codes[: self.size]
        # New arrays, not resize(): a search running in a thread keeps reading its snapshot of the old ones.
        self.vectors, self.codes = vectors, codes
        for name in ("bucket_of", "slot_of"):
            grown = np.empty(capacity, np.int32)
            grown[: self.size] = getattr(self, name)[: self.size]
            setattr(self, name, grown)


def nearest_bucket(centres: np.ndarray, vectors: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Each row's closest centre (in chunks: 100k rows by 800 centres would be 320 MB at once)."""
    return np.concatenate(
        [np.argmax(vectors[i : i + chunk] @ centres.T, axis=1) for i in range(0, len(vectors), chunk)]
    ).astype(np.int32) if len(vectors) else np.empty(0, np.int32)


def train_buckets(vectors: np.ndarray, seed: int = 402) -> Trained:
    """Spherical k-means over a sample of the rows, then every row put in its closest bucket (CPU: a worker's)."""
    n = len(vectors)
    count = max(PROBES, n // BUCKET_ROWS)
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, min(n, count * TRAIN_SAMPLE), replace=False))]
    centres = sample[rng.choice(len(sample), count, replace=False)].copy()
    for _ in range(TRAIN_ROUNDS):
        assigned = np.argmax(sample @ centres.T, axis=1)
        order = np.argsort(assigned, kind="stable")
        used, starts = np.unique(assigned[order], return_index=True)
        sums = np.add.reduceat(sample[order], starts, axis=0)
        centres[used] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return _layout(centres, nearest_bucket(centres, vectors))


def _layout(centres: np.ndarray, bucket_of: np.ndarray) -> Trained:
    """Each bucket's rows, in an array with room to grow, from each row's bucket."""
    n, count = len(bucket_of), len(centres)
    order = np.argsort(bucket_of, kind="stable").astype(np.int32)
    sizes = np.bincount(bucket_of, minlength=count).astype(np.int64)
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    rows = []
    for b in range(count):
        held = np.empty(max(8, 2 * int(sizes[b])), np.int32)  # room to grow before the next copy
        held[: sizes[b]] = order[bounds[b] : bounds[b + 1]]
        rows.append(held)
    slot_of = np.empty(n, np.int32)
    slot_of[order] = np.arange(n, dtype=np.int32) - bounds[bucket_of[order]].astype(np.int32)
    return Trained(Buckets(centres, rows, sizes), bucket_of, slot_of)


def _candidates(
    snapshot: Snapshot, query: np.ndarray, threshold: float, code: np.ndarray | None, near: np.ndarray | None = None
) -> np.ndarray | None:
    """The rows worth scoring exactly (None: all of them). `near`: the query's cosine to each bucket centre."""
    vectors, codes, buckets = snapshot
    n = vectors.shape[0]
    if buckets is not None:
        near = buckets.centres @ query if near is None else near
        probed = np.argpartition(near, -PROBES)[-PROBES:] if len(near) > PROBES else range(len(near))
        rows = np.concatenate([buckets.rows[b][: buckets.sizes[b]] for b in probed])
        rows = rows[rows < n]  # rows added after the snapshot, or moved while it is read
        subset = np.take(codes, rows, axis=0)
    elif n > FULL_SCAN_ROWS:
        rows, subset = None, codes
    else:
        return None
    query_code = sign_codes(query.reshape(1, -1))[0] if code is None else code
    # The query's code repeated row by row: numpy runs (m, 6) ^ (m, 6) as one loop, (m, 6) ^ (6,) as m loops of 6;
    # the row sums of six counts are a product with ones, which BLAS does at once (3.7x faster, measured).
    differing = np.bitwise_count(np.bitwise_xor(subset, np.tile(query_code, (len(subset), 1))))
    distance = differing.astype(np.float32) @ _ONES
    kept = np.flatnonzero(distance <= max_hamming(threshold))
    if rows is not None:
        return rows[kept]
    return kept if kept.size <= n // 4 else None


def _best(scores: np.ndarray, rows: np.ndarray | None, threshold: float, k: int) -> list[tuple[int, float]]:
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


def search(
    snapshot: Snapshot, query: np.ndarray, threshold: float, k: int = 4, code: np.ndarray | None = None,
    near: np.ndarray | None = None,
) -> list[tuple[int, float]]:
    """Up to k (row, cosine) at or above threshold, best first (`code`: the query's sign code, if known).
    Pure function of its arguments: safe in a thread."""
    if snapshot.vectors.shape[0] == 0:
        return []
    rows = _candidates(snapshot, query, threshold, code, near)
    if rows is not None and rows.size == 0:
        return []
    scores = snapshot.vectors @ query if rows is None else snapshot.vectors[rows] @ query
    return _best(scores, rows, threshold, k)


def search_many(
    snapshot: Snapshot, queries: np.ndarray, threshold: float, codes: np.ndarray, k: int = 4
) -> tuple[list[list[tuple[int, float]]], np.ndarray | None]:
    """`search` for each row of `queries` (`codes`: their sign codes, a row each), and each query's
    closest bucket (for inserting it later; None without buckets). A small index is scored for all the
    queries in one matrix product, which reads its rows once instead of once a query."""
    vectors, _, buckets = snapshot
    n = vectors.shape[0]
    near = None if buckets is None else queries @ buckets.centres.T
    nearest = None if near is None else np.argmax(near, axis=1)
    if n == 0:
        return [[] for _ in range(len(queries))], nearest
    if n <= BATCH_SCAN_ROWS and len(queries) > 1:
        scores = vectors @ np.ascontiguousarray(queries.T)
        close = scores.max(axis=0) >= threshold  # most lookups have no candidate: one reduction answers them all
        return [_best(scores[:, i], None, threshold, k) if close[i] else [] for i in range(len(queries))], nearest
    found = [
        search(snapshot, query, threshold, k, codes[i], None if near is None else near[i])
        for i, query in enumerate(queries)
    ]
    return found, nearest
