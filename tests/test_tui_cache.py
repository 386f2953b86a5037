"""The Spend pane says which embedder the answer cache matches with, in-process and attached to a gateway."""

from __future__ import annotations

import pytest
from test_tui import wait_until
from test_tui_fixtures import SIZE

from p402_tui.core.config import CacheConfig, ConfigFile, Settings
from p402_tui.runtime import Runtime
from p402_tui.tui.app import ConsoleApp
from p402_tui.tui.attach import AttachClient, RemoteSource
from p402_tui.tui.source import LocalSource
from p402_tui.tui.state import CacheInfo
from p402_tui.tui.widgets.spend import WIDTH, cache_text, tier_rows


def totals(app: ConsoleApp) -> str:
    return str(app.screen.query_one("#spend-totals").render())


def cache_line(app: ConsoleApp) -> str | None:
    """The line naming the embedder (the others are "cache saved" and "cache hits")."""
    return next((line for line in totals(app).splitlines() if line.startswith("cache  ")), None)


async def test_in_process_the_pane_shows_the_default_two_stage_embedder(static_table, sim, catalog, tmp_path):
    # cache.embedder = auto: static vectors find candidates, MiniLM confirms them (when installed)
    settings = Settings(ConfigFile(), catalog, env={}).point_at(sim.url)
    async with Runtime.open(settings, db_path=tmp_path / "p402.db") as runtime:
        await runtime.cache.ready()
        app = ConsoleApp(LocalSource(runtime))
        async with app.run_test(size=SIZE) as pilot:
            # drawn as soon as the store answers, not at the idle redraw 5 s later (there is no traffic)
            await wait_until(pilot, lambda: cache_line(app) is not None, timeout=3.0)
            assert cache_line(app).split() == ["cache", "MiniLM-L6", "·", "two-stage"]
            assert "cache saved" in totals(app) and "cache hits" in totals(app)


async def test_attached_the_pane_shows_the_gateways_embedder(sim, catalog, tmp_path):
    settings = Settings(ConfigFile(cache=CacheConfig(embedder="hashed")), catalog, env={}).point_at(sim.url)
    async with Runtime.open(settings, db_path=tmp_path / "p402.db") as runtime:
        running = await runtime.serve_gateway("127.0.0.1", 0)
        source = RemoteSource(AttachClient(running.url))
        await source.start()
        try:
            await source.client.wait_until_up()
            await runtime.cache.ready()
            app = ConsoleApp(source)
            async with app.run_test(size=SIZE) as pilot:
                await wait_until(pilot, lambda: cache_line(app) is not None)
                assert cache_line(app).split() == ["cache", "n-gram", "hash", "·", "lexical"]
        finally:
            await source.aclose()


async def test_attached_to_a_gateway_with_the_cache_off_the_pane_says_off(sim, catalog, tmp_path):
    settings = Settings(ConfigFile(cache=CacheConfig(enabled=False)), catalog, env={}).point_at(sim.url)
    async with Runtime.open(settings, db_path=tmp_path / "p402.db") as runtime:
        running = await runtime.serve_gateway("127.0.0.1", 0)
        async with AttachClient(running.url) as client:
            summary = await RemoteSource(client).summary()
    assert summary.cache == CacheInfo(enabled=False)


@pytest.mark.parametrize(
    ("cache", "shown"),
    [
        (CacheInfo(enabled=False), "off"),
        (CacheInfo(enabled=True), "loading…"),  # the embedder loads in the background
        (CacheInfo(enabled=True, embedder="all-MiniLM-L6-v2", label="semantic"), "MiniLM-L6 · semantic"),
        (CacheInfo(enabled=True, embedder="hashed-ngram", label="lexical"), "n-gram hash · lexical"),
        (CacheInfo(enabled=True, embedder="openai/text-embedding-3-small", label="semantic"), "openai/te… · semantic"),
    ],
)
def test_the_cache_line_fits_the_totals_column(cache, shown):
    assert cache_text(cache) == shown
    assert len("cache  ") + len(shown) <= 28  # two spaces apart at least


def test_the_pane_shows_hit_rate_by_tier_and_the_semantic_tiers_cpu():
    cache = CacheInfo.from_snapshot(
        {"enabled": True, "embedder": {"name": "static-minilm-53aa5117-v1", "label": "semantic"}, "confirmer": {},
         "hits": 3, "misses": 7, "exact_hit_rate": 0.2, "semantic_hit_rate": 0.1, "semantic_lookups": 8,
         "semantic_cpu_ms_per_lookup": 0.0512}
    )  # fmt: skip
    assert cache_text(cache) == "MiniLM-L6 · two-stage"
    assert tier_rows(cache) == [("hits exact·sem", "20% · 10%"), ("semantic cpu", "0.05 ms/req")]
    assert all(len(f"{label:<14}{value:>14}") <= WIDTH for label, value in tier_rows(cache))
    assert tier_rows(CacheInfo.from_snapshot({"enabled": True, "hits": 0, "misses": 0})) == []  # nothing asked yet
