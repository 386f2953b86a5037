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

Most lookups find nothing, and proving that by a scan reads every row's 256
floats. So from `PROJECT_FROM_ROWS` rows on, each row also keeps a short
*projection*: its coordinates along the index's `PROJECT_DIMS` principal
directions (fitted to its own rows, off the loop, again at each doubling) and
the length of what is left. A query's cosine to a row is at most the product of
the two projections plus the product of the two lengths left (Cauchy-Schwarz on
the rest), so a scan reads the projections, a quarter of the bytes, and scores
exactly only the rows whose bound reaches the threshold: no row above it is
missed. Amid gateway-like prompts about 1 row in 600 gets through. Up to
`PROJECT_SCAN_ROWS` rows this scan is how a fitted index is searched; past it
the buckets take over (they read a bounded number of rows whatever the size).

Sign codes serve only the searches that filter on them: buckets, and a large index
with no projection to scan. Below that (`needs_codes`) an index keeps none, and a
lookup makes none for its prompt; an index that grows into it has its rows' codes
made on a worker (`start_coding`, `install_codes`), and until they are in, those
searches score their rows exactly.
"""

from __future__ import annotations

import functools
import math
import mmap
import sys
from typing import Any, NamedTuple

import numpy as np

CODE_BITS = 384
CODE_WORDS = CODE_BITS // 64
CODE_CHUNK_ROWS = 2048  # rows coded at a time: the product is 384 floats a row (3 MB here; 150 MB for 100k rows at once)
# Capacity arrays from this size on get a mapping of their own (`capacity_array`).
MAPPED_FROM_BYTES = 1 << 20
PAGE = mmap.PAGESIZE
FULL_SCAN_ROWS = 4096  # below this a plain product is faster than filtering first
PREFILTER_SIGMAS = 4.0
# Buckets from this many rows on, trained again at each doubling: ready before an index outgrows the
# projections' scan (`PROJECT_SCAN_ROWS`), which searches smaller ones faster.
BUCKET_FROM_ROWS = 16_384
# Up to this many rows a batch of lookups is scored by one matrix product: below about 10,000 rows that
# beat the buckets (at 8,192 rows 73 us a lookup against 94; at 13,000, 153 against 96; measured here).
BATCH_SCAN_ROWS = 10_000
BUCKET_ROWS = 128  # rows a bucket holds on average when trained
PROBES = 16  # buckets a lookup reads
TRAIN_SAMPLE = 24  # rows sampled per bucket to train the centres
TRAIN_ROUNDS = 5
PROJECT_DIMS = 64  # directions a projection keeps (at 48, 2.3 % of gateway-like rows passed the bound; at 64, 0.2 %)
PROJECT_FROM_ROWS = 1024  # below this a plain product is cheap enough
# Up to this many rows a lookup scans the projections (any batch size); past it, the buckets. The projections
# of an index past twice this are dropped (they would only take memory), and fitted again if it shrinks back.
PROJECT_SCAN_ROWS = 20_000
FIT_SAMPLE = 8192  # rows the principal directions are fitted on
BOUND_SLACK = 1e-3  # float32 rounding in the bound: a row within this below the threshold is scored exactly
MAX_PASSED = 0.05  # a basis whose bound passes more of the sampled row pairs than this (beyond the true matches) is not worth scanning
DENSE_PASSED = 16  # past 1 pair in this many passing the bound, the plain product scores them faster
PASS_QUERIES = 256  # rows a fit leaves out and measures that with, as queries against the rows it fitted


_PLANES: dict[int, np.ndarray] = {}  # by vector size: made with the first codes of that size, kept for the rest


def _hyperplanes(dim: int) -> np.ndarray:
    planes = _PLANES.get(dim)
    if planes is None:  # two threads may both make them: the same planes, one copy kept
        # A fixed seed: codes of rows written by one process must compare with queries of another.
        planes = _PLANES[dim] = np.random.default_rng(402).standard_normal((dim, CODE_BITS)).astype(np.float32)
    return planes


def planes_bytes() -> int:
    """What the sign codes' hyperplanes hold in this process: one set per vector size, made when an index of
    that size first codes its rows and shared by every index of it since."""
    return sum(planes.nbytes for planes in list(_PLANES.values()))


def sign_codes(vectors: np.ndarray) -> np.ndarray:
    """(n, dim) float32 -> (n, CODE_WORDS) uint64: a row's 384 bits in six words, rows contiguous
    (a bucketed search gathers the codes of a few thousand rows: 48 bytes each, in one piece)."""
    planes = _hyperplanes(vectors.shape[1])
    if len(vectors) <= CODE_CHUNK_ROWS:
        return np.packbits((vectors @ planes) > 0, axis=1).view(np.uint64)
    codes = np.empty((len(vectors), CODE_WORDS), np.uint64)
    for start in range(0, len(vectors), CODE_CHUNK_ROWS):
        part = vectors[start : start + CODE_CHUNK_ROWS]
        codes[start : start + len(part)] = np.packbits((part @ planes) > 0, axis=1).view(np.uint64)
    return codes


def capacity_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An unwritten array for an index's rows, the capacity past them included. From `MAPPED_FROM_BYTES` on
    it is an anonymous mapping of its own, in 4 KB pages: only the pages of rows written become resident
    (numpy asks for 2 MB pages on its arrays from 4 MB on, and a huge page at the last row makes up to 2 MB
    of capacity resident; searching 100k rows was no faster in them, taken in turn with 4 KB ones), and when a grow drops the
    array its pages go back to the system at once (a malloc'd one may stay in glibc's heap, or raise glibc's
    threshold so that later large blocks stay in theirs)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MAPPED_FROM_BYTES or not hasattr(mmap, "MAP_PRIVATE"):  # Windows: numpy's own
        return np.empty(shape, dtype)
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        area.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(area, dtype).reshape(shape)


def mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The mapping of its own a `capacity_array` (or a view of one) lives in; None for numpy's."""
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def _resident(array: np.ndarray, rows: int) -> int:
    """What an index array whose first `rows` rows were written holds in memory: a mapping, the pages of
    those rows; a malloc'd one, all of it (its pages may be resident from an earlier use of the heap)."""
    if mapping_of(array) is None:
        return array.nbytes
    size = rows * array.itemsize * (array.shape[1] if array.ndim == 2 else 1)
    return -(-size // PAGE) * PAGE


_ONES = np.ones(CODE_WORDS, np.float32)
_ARRAY_HEADER = sys.getsizeof(np.empty(0, np.int32))  # an array object besides its data


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
    codes: np.ndarray | None  # None: the index keeps no sign codes yet
    buckets: Buckets | None = None
    basis: np.ndarray | None = None  # (dim, PROJECT_DIMS): the directions the projections are taken along
    heads: np.ndarray | None = None  # the rows' projections, `project(basis, vectors)`


class Trained(NamedTuple):
    """Buckets made by `train_buckets` for the first `len(bucket_of)` rows of an index."""

    buckets: Buckets
    bucket_of: np.ndarray  # row -> its bucket
    slot_of: np.ndarray  # row -> its place in the bucket's rows


class VectorIndex:
    def __init__(self, dim: int, capacity: int = 16) -> None:
        self.dim = dim
        self.size = 0
        self.high = 0  # the most rows the arrays have held: rows past `size` stay resident once written
        self.vectors = capacity_array((capacity, dim), np.float32)
        self.codes = capacity_array((capacity, CODE_WORDS), np.uint64)  # valid only while `coded`
        self.coded = False
        self.coding = False  # the rows' codes are being made on a worker
        self._recode: list[int] = []  # while coding: rows whose vector changed
        self._code_low = 0  # while coding: the fewest rows the index held
        self.owners: list[Any] = []
        self.buckets: Buckets | None = None
        self.bucket_of = capacity_array((capacity,), np.int32)
        self.slot_of = capacity_array((capacity,), np.int32)
        self.trained_rows = 0  # rows when the buckets were last trained
        self.training = False  # a training is under way on a worker
        self._changed: list[int] = []  # while training: rows whose vector changed (another row moved in)
        self._low = 0  # while training: the fewest rows the index held (rows past it were added again)
        self.basis: np.ndarray | None = None
        self.heads: np.ndarray | None = None  # (capacity, PROJECT_DIMS + 1) once a basis is fitted
        self.fitted_rows = 0  # rows when the basis was last fitted
        self.fitting = False  # a fit is under way on a worker
        self._refit: list[int] = []  # while fitting: rows whose vector changed
        self._fit_low = 0  # while fitting: the fewest rows the index held

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        total = self.vectors.nbytes + self.codes.nbytes + self.bucket_of.nbytes + self.slot_of.nbytes
        if self.buckets is not None:
            total += self.buckets.centres.nbytes + sum(rows.nbytes for rows in self.buckets.rows)
        if self.heads is not None and self.basis is not None:
            total += self.heads.nbytes + self.basis.nbytes
        return total

    @property
    def memory_bytes(self) -> int:
        """What the index keeps resident: its arrays (a large one, a mapping, up to the most rows it has held,
        in whole pages: the capacity past them is never written, so the OS has not given it pages), the row
        owners' list and the buckets' row lists."""
        rows = max(self.size, self.high)
        total = sum(_resident(array, rows) for array in (self.vectors, self.codes, self.bucket_of, self.slot_of))
        total += sys.getsizeof(self.owners)
        if self.heads is not None and self.basis is not None:
            total += _resident(self.heads, rows) + self.basis.nbytes
        if self.buckets is not None:
            buckets = self.buckets
            total += buckets.centres.nbytes + buckets.sizes.nbytes + sys.getsizeof(buckets.rows)
            total += sum(rows.nbytes for rows in buckets.rows) + len(buckets.rows) * _ARRAY_HEADER
        return total

    def add(
        self, vector: np.ndarray, owner: Any, code: np.ndarray | None = None, bucket: int | None = None,
        head: np.ndarray | None = None,
    ) -> int:
        """Append a unit vector (and its sign code, bucket and projection, if the caller has them); returns its row."""
        if self.size == self.vectors.shape[0]:
            self._grow(self.size * 2)
        row = self.size
        self.vectors[row] = vector
        if self.coded:
            self.codes[row] = sign_codes(vector.reshape(1, -1))[0] if code is None else code
        self.owners.append(owner)
        self.size += 1
        self.high = max(self.high, self.size)
        if self.buckets is not None:
            self._put(row, int(np.argmax(self.buckets.centres @ vector)) if bucket is None else bucket)
        if self.heads is not None and self.basis is not None:
            if self.size > 2 * PROJECT_SCAN_ROWS:
                self._drop_projection()
            else:
                self.heads[row] = project(self.basis, vector.reshape(1, -1))[0] if head is None else head
        return row

    def extend(self, vectors: np.ndarray, owners: list[Any]) -> None:
        """Append many rows at once (loading from the database; the first search asks for buckets)."""
        needed = self.size + len(vectors)
        if needed > self.vectors.shape[0]:
            self._grow(max(needed, self.vectors.shape[0] * 2))
        start = self.size
        self.vectors[start:needed] = vectors
        if self.coded:
            self.codes[start:needed] = sign_codes(vectors)
        elif self.needs_codes(needed):
            self.codes[:needed] = sign_codes(self.vectors[:needed])
            self.coded = True
        self.owners.extend(owners)
        self.size = needed
        self.high = max(self.high, needed)
        if self.buckets is not None:
            for row, bucket in zip(range(start, needed), nearest_bucket(self.buckets.centres, vectors)):
                self._put(row, int(bucket))
        if self.heads is not None and self.basis is not None:
            self.heads[start:needed] = project(self.basis, vectors)

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
            if self.heads is not None:
                self.heads[row] = self.heads[last]
            moved = self.owners[last]
            self.owners[row] = moved
        self.owners.pop()
        self.size = last
        if self.training:
            self._changed.append(row)
            self._low = min(self._low, last)
        if self.fitting:
            self._refit.append(row)
            self._fit_low = min(self._fit_low, last)
        if self.coding:
            self._recode.append(row)
            self._code_low = min(self._code_low, last)
        return moved

    def score(self, row: int, query: np.ndarray) -> float:
        return float(self.vectors[row] @ query)

    def snapshot(self) -> Snapshot:
        """The rows as they are now (taken in the batch worker while the loop may add rows: each array is
        cut at one size, read once; a row array of a bucket may still change under a search)."""
        size, buckets = self.size, self.buckets
        if buckets is not None:
            buckets = Buckets(buckets.centres, list(buckets.rows), buckets.sizes.copy())
        heads = self.heads[:size] if self.heads is not None else None
        codes = self.codes[:size] if self.coded else None
        return Snapshot(self.vectors[:size], codes, buckets, self.basis if heads is not None else None, heads)

    # --- sign codes --------------------------------------------------------------------

    def needs_codes(self, size: int | None = None) -> bool:
        """Whether an index of this size (its own by default) may be searched by a filter on sign codes: past
        FULL_SCAN_ROWS with no projection, or near the size buckets are trained at. Made a little ahead of that."""
        size = self.size if size is None else size
        return size > FULL_SCAN_ROWS // 2 and (self.basis is None or size >= BUCKET_FROM_ROWS or self.buckets is not None)

    def wants_coding(self) -> bool:
        return not self.coded and not self.coding and self.needs_codes()

    def start_coding(self) -> np.ndarray:
        """The rows to make codes for (in a worker: `install_codes` mends rows the loop moves meanwhile)."""
        self.coding = True
        self._recode, self._code_low = [], self.size
        return self.vectors[: self.size]

    def install_codes(self, codes: np.ndarray | None) -> None:
        """Take the codes made for this index's first `len(codes)` rows; rows changed or added since are
        coded here (the few the loop added and moved while the worker made them). None: the job failed."""
        self.coding = False
        if codes is None:
            self._recode = []
            return
        kept = min(len(codes), self._code_low)
        self.codes[:kept] = codes[:kept]
        stale = _redo(self._recode, kept, self.size)
        if stale.size:
            self.codes[stale] = sign_codes(self.vectors[stale])
        self._recode = []
        self.coded = True

    # --- projections -------------------------------------------------------------------

    def wants_projection(self) -> bool:
        """Large enough to scan by projections, small enough to scan at all, and doubled since the last fit."""
        return (
            not self.fitting
            and self.dim >= 2 * PROJECT_DIMS
            and PROJECT_FROM_ROWS <= self.size <= PROJECT_SCAN_ROWS
            and self.size >= 2 * self.fitted_rows
        )

    def start_projection(self) -> np.ndarray:
        """The rows to fit a basis to (in a worker: `install_projection` mends rows the loop moves meanwhile)."""
        self.fitting = True
        self._refit, self._fit_low = [], self.size
        return self.vectors[: self.size]

    def install_projection(self, basis: np.ndarray | None, heads: np.ndarray | None = None) -> None:
        """Take a basis fitted to this index's first `len(heads)` rows, and their projections; rows changed or
        added since are projected here (a few: the loop's own inserts and evictions while the worker fitted).
        None: the fit found no basis worth scanning; the index is searched as it was until it doubles."""
        self.fitting = False
        if basis is None or heads is None:
            self._refit = []
            self.fitted_rows = self.size
            return
        kept = min(len(heads), self._fit_low)
        laid = capacity_array((self.vectors.shape[0], basis.shape[1] + 1), np.float32)
        laid[:kept] = heads[:kept]
        stale = _redo(self._refit, kept, self.size)
        if stale.size:
            laid[stale] = project(basis, self.vectors[stale])
        self.basis, self.heads = basis, laid
        self._refit = []
        self.fitted_rows = self.size

    def _drop_projection(self) -> None:
        self.basis = self.heads = None
        self.fitted_rows = 0  # fitted again should the index shrink back to a size that scans

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
            stale = _redo(self._changed, kept, self.size)
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
        vectors = capacity_array((capacity, self.dim), np.float32)
        vectors[: self.size] = self.vectors[: self.size]
        codes = capacity_array((capacity, CODE_WORDS), np.uint64)
        codes[: self.size] = self.codes[: self.size]
        # New arrays, not resize(): a search running in a thread keeps reading its snapshot of the old ones.
        self.vectors, self.codes = vectors, codes
        if self.heads is not None:
            heads = capacity_array((capacity, self.heads.shape[1]), np.float32)
            heads[: self.size] = self.heads[: self.size]
            self.heads = heads
        for name in ("bucket_of", "slot_of"):
            grown = capacity_array((capacity,), np.int32)
            grown[: self.size] = getattr(self, name)[: self.size]
            setattr(self, name, grown)
        self.high = self.size  # the new arrays hold the rows copied, nothing past them


def _redo(changed: list[int], kept: int, size: int) -> np.ndarray:
    """The rows an installed result must redo: those changed below `kept` while it was made, then every row
    from `kept` on. A set, not np.unique, whose first call imports numpy.ma: 10 to 14 ms holding the loop,
    where results are installed."""
    below = np.array(sorted({row for row in changed if row < kept}), np.int64)
    return np.concatenate([below, np.arange(kept, size)])


def warm(dim: int) -> None:
    """Run once, on a few thousand random rows, the numpy paths an index takes only when it grows large
    (bucket training, sign codes, a bucketed search), and make the hyperplanes of this vector size (a few
    ms of CPU and a 2 MB sample: a worker's). Otherwise the first index to pass `BUCKET_FROM_ROWS` brings
    numpy's code for them into memory then (its multiarray, random and libm pages: about 0.4 MB of RSS
    that no cache entry holds), and a lookup pays those page faults."""
    rows = np.random.default_rng(0).standard_normal(((PROBES + 1) * BUCKET_ROWS, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    trained = train_buckets(rows)
    codes = sign_codes(rows)
    search(Snapshot(rows, codes, trained.buckets), rows[0], 0.9, code=codes[0])


def project(basis: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(n, dim) -> (n, PROJECT_DIMS + 1): each row's coordinates along the basis, then the length of the rest."""
    part = vectors @ basis
    out = np.empty((len(vectors), basis.shape[1] + 1), np.float32)
    out[:, :-1] = part
    rest = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64) - np.einsum("ij,ij->i", part, part, dtype=np.float64)
    # float32 rounding leaves `rest` up to about 1e-6 off: the added 1e-6 keeps the length an upper bound
    # (at most 1.4e-3 over, for a row almost wholly in the basis; the bound stays a bound).
    out[:, -1] = np.sqrt(np.maximum(rest, 0.0) + 1e-6)
    return out


def fit_projection(vectors: np.ndarray, threshold: float, seed: int = 402) -> tuple[np.ndarray, np.ndarray] | None:
    """The `PROJECT_DIMS` principal directions of the rows (no centring: cosines are about the origin) and every
    row's projection (CPU: a worker's); None when the bound would let more than `MAX_PASSED` of row pairs through
    at `threshold` that are not above it (rows with no few dominant directions, random-like vectors: a scan of the
    projections would then cost more than a plain one)."""
    rng = np.random.default_rng(seed)
    # Fitted on some rows, measured with others as the queries: a lookup's prompt was not in the fit either.
    sample = vectors[rng.permutation(len(vectors))[: FIT_SAMPLE + PASS_QUERIES]]
    held = min(PASS_QUERIES, len(sample) // 4)
    queries, fitted = sample[:held], sample[held:]
    # The Gram matrix in float32 (half the cost of float64); `eigh` in float64 still gives an orthonormal basis,
    # which is all the bound needs: a rounded Gram only makes the directions a little less principal.
    _, directions = np.linalg.eigh((fitted.T @ fitted).astype(np.float64))  # ascending
    basis = np.ascontiguousarray(directions[:, ::-1][:, :PROJECT_DIMS], dtype=np.float32)
    rows = fitted[:2048]
    bound = project(basis, rows) @ project(basis, queries).T
    passed = float(np.mean(bound >= threshold - BOUND_SLACK)) if bound.size else 0.0
    # Pairs the bound lets through that a full scan would not have found anyway: the scan's extra work. Those a full
    # scan finds pass the bound too, so when no more than MAX_PASSED pass at all (the usual case), they need no scan.
    if passed > MAX_PASSED and passed - float(np.mean(rows @ queries.T >= threshold)) > MAX_PASSED:
        return None
    return basis, project(basis, vectors)


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
        ranked = assigned[order]
        starts = np.flatnonzero(np.concatenate(([True], ranked[1:] != ranked[:-1])))  # np.unique's, without numpy.ma
        used = ranked[starts]
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
    vectors, codes, buckets = snapshot.vectors, snapshot.codes, snapshot.buckets
    n = vectors.shape[0]
    if buckets is not None:
        near = buckets.centres @ query if near is None else near
        probed = np.argpartition(near, -PROBES)[-PROBES:] if len(near) > PROBES else range(len(near))
        rows = np.concatenate([buckets.rows[b][: buckets.sizes[b]] for b in probed])
        rows = rows[rows < n]  # rows added after the snapshot, or moved while it is read
        if codes is None:  # not made yet: the probed rows are all scored
            return rows
        subset = np.take(codes, rows, axis=0)
    elif codes is None:
        return None
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


def _projected(
    snapshot: Snapshot, queries: np.ndarray, heads: np.ndarray, threshold: float, k: int
) -> list[list[tuple[int, float]]]:
    """`search` for each query by a scan of the projections: only rows whose bound reaches the threshold are scored.

    Prompts made from one template (a ticket number, a name changed) pass the bound by the thousand: then
    the plain product is cheaper than scoring the passed pairs one by one, and either way each query keeps
    its k best in numpy, never in a loop over every close row."""
    assert snapshot.heads is not None
    count = len(queries)
    bound = snapshot.heads @ np.ascontiguousarray(heads.T)  # (rows, queries); this order is the faster product
    passed = np.flatnonzero(bound.ravel() >= threshold - BOUND_SLACK)
    if not passed.size:
        return [[] for _ in range(count)]
    if passed.size > bound.size // DENSE_PASSED:
        dense = snapshot.vectors @ np.ascontiguousarray(queries.T)
        return [_best(dense[:, j], None, threshold, k) for j in range(count)]
    rows, columns = np.divmod(passed, count)
    scores = np.einsum("ij,ij->i", snapshot.vectors[rows], queries[columns])
    kept = scores >= threshold
    rows, columns, scores = rows[kept], columns[kept], scores[kept]
    order = np.lexsort((-scores, columns))  # by query, best first
    rows, columns, scores = rows[order], columns[order], scores[order]
    rank = np.arange(columns.size) - np.searchsorted(columns, columns)  # place within its query's run
    top = rank < k
    found: list[list[tuple[int, float]]] = [[] for _ in range(count)]
    for row, column, score in zip(rows[top].tolist(), columns[top].tolist(), scores[top].tolist()):
        found[column].append((row, score))
    return found


def search(
    snapshot: Snapshot, query: np.ndarray, threshold: float, k: int = 4, code: np.ndarray | None = None,
    near: np.ndarray | None = None, head: np.ndarray | None = None,
) -> list[tuple[int, float]]:
    """Up to k (row, cosine) at or above threshold, best first (`code`: the query's sign code, `head`: its
    projection, if known). Pure function of its arguments: safe in a thread."""
    n = snapshot.vectors.shape[0]
    if n == 0:
        return []
    if snapshot.basis is not None and n <= PROJECT_SCAN_ROWS:
        queries = query.reshape(1, -1)
        heads = project(snapshot.basis, queries) if head is None else head.reshape(1, -1)
        return _projected(snapshot, queries, heads, threshold, k)[0]
    rows = _candidates(snapshot, query, threshold, code, near)
    if rows is not None and rows.size == 0:
        return []
    scores = snapshot.vectors @ query if rows is None else snapshot.vectors[rows] @ query
    return _best(scores, rows, threshold, k)


def search_many(
    snapshot: Snapshot, queries: np.ndarray, threshold: float, codes: np.ndarray | None, k: int = 4,
    heads: np.ndarray | None = None,
) -> tuple[list[list[tuple[int, float]]], np.ndarray | None]:
    """`search` for each row of `queries` (`codes`: their sign codes, `heads`: their projections on the
    snapshot's basis, a row each), and each query's closest bucket (for inserting it later; None without
    buckets). An index is scanned for all the queries at once, which reads its rows (or their projections)
    once instead of once a query."""
    vectors, _, buckets, basis, _ = snapshot
    n = vectors.shape[0]
    near = None if buckets is None else queries @ buckets.centres.T
    nearest = None if near is None else np.argmax(near, axis=1)
    if n == 0:
        return [[] for _ in range(len(queries))], nearest
    if basis is not None and n <= PROJECT_SCAN_ROWS:
        heads = project(basis, queries) if heads is None else heads
        return _projected(snapshot, queries, heads, threshold, k), nearest
    if n <= BATCH_SCAN_ROWS and len(queries) > 1:
        scores = vectors @ np.ascontiguousarray(queries.T)
        close = scores.max(axis=0) >= threshold  # most lookups have no candidate: one reduction answers them all
        return [_best(scores[:, i], None, threshold, k) if close[i] else [] for i in range(len(queries))], nearest
    found = [
        search(snapshot, query, threshold, k, None if codes is None else codes[i], None if near is None else near[i])
        for i, query in enumerate(queries)
    ]
    return found, nearest
