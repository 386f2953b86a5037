"""The console on a keyed gateway: the Keys screen with an admin key, only its own traffic with a user key."""

from __future__ import annotations

import httpx
from test_attach import gateway, wait_for
from test_tui_fixtures import SIZE, T0, run_command

from p402_tui.service import keys
from p402_tui.tui.app import ConsoleApp
from p402_tui.tui.attach import AttachClient, RemoteSource
from p402_tui.tui.screens.dashboard import DashboardScreen
from p402_tui.tui.screens.keys import KeyScreen, KeysScreen
from p402_tui.tui.widgets.decisions import DecisionsTable


def chat(text: str) -> dict:
    return {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": text}], "p402": {"cache": False}}


async def send(url: str, secret: str, text: str) -> str:
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {secret}"}) as client:
        answer = await client.post("/v1/chat/completions", json=chat(text))
    assert answer.status_code == 200, answer.text
    return answer.json()["p402"]["decision_id"]


async def test_the_keys_screen_shows_spend_rate_and_refusals_and_opens_a_keys_requests(fresh_sim_settings, tmp_path):
    async with gateway(fresh_sim_settings, db_path=tmp_path / "p402.db") as (runtime, running):
        _, admin = await keys.create_key(runtime.store, "root", role="admin")
        bot, secret = await keys.create_key(runtime.store, "ci-bot", policy={"rpm": 2, "budget_usd": 1.0})
        for n in range(2):
            await send(running.url, secret, f"question {n}")
        async with httpx.AsyncClient(base_url=running.url, headers={"authorization": f"Bearer {secret}"}) as client:
            assert (await client.post("/v1/chat/completions", json=chat("a third"))).status_code == 429
        source = RemoteSource(AttachClient(running.url, key=admin))
        await source.start()
        try:
            await source.client.wait_until_up()
            app = ConsoleApp(source, clock=lambda: T0, refresh_interval=0.25)
            async with app.run_test(size=SIZE) as pilot:
                await pilot.pause()
                await pilot.press("ctrl+p")
                await run_command(pilot, "Keys: gateway keys")
                await wait_for(lambda: isinstance(app.screen, KeysScreen) and app.screen.keys)
                screen = app.screen
                table = screen.query_one("#keys-table")
                await wait_for(lambda: table.row_count == 2)
                drawn = "\n".join(table.render_line(y).text for y in range(table.size.height))
                assert "ci-bot" in drawn and "2/2" in drawn and "root" in drawn
                row = next(k for k in screen.keys if k["id"] == bot["id"])
                assert row["live"] == {"requests_last_minute": 2, "tokens_last_minute": row["live"]["tokens_last_minute"],
                                       "refusals_last_hour": 1}
                assert row["usage"]["spent_usd"] > 0 and row["usage"]["budget_usd"] == 1.0
                assert secret not in drawn and admin not in drawn
                table.move_cursor(row=table.index_of(bot["id"]))
                await pilot.press("enter")
                await wait_for(lambda: isinstance(app.screen, KeyScreen) and len(app.screen.requests) == 2)
                assert "ci-bot" in str(app.screen.query_one("#key-summary").render())
                await pilot.press("escape")
                await pilot.pause()
                assert isinstance(app.screen, KeysScreen)
        finally:
            await source.aclose()


async def test_attached_with_a_user_key_the_console_shows_only_its_own_traffic(fresh_sim_settings, tmp_path):
    async with gateway(fresh_sim_settings, db_path=tmp_path / "p402.db") as (runtime, running):
        me, mine = await keys.create_key(runtime.store, "me", policy={"rpm": 1})
        _, theirs = await keys.create_key(runtime.store, "them")
        source = RemoteSource(AttachClient(running.url, key=mine))
        await source.start()
        try:
            await source.client.wait_until_up()
            app = ConsoleApp(source, clock=lambda: T0, refresh_interval=0.25)
            async with app.run_test(size=SIZE) as pilot:
                await pilot.pause()
                assert isinstance(app.screen, DashboardScreen)
                other = await send(running.url, theirs, "not yours")
                own = await send(running.url, mine, "yours")
                table = app.screen.query_one(DecisionsTable)
                await wait_for(lambda: own in app.state.decisions)
                await pilot.pause(0.5)
                assert other not in app.state.decisions and table.row_count == 1
                async with httpx.AsyncClient(base_url=running.url, headers={"authorization": f"Bearer {mine}"}) as me_client:
                    assert (await me_client.post("/v1/chat/completions", json=chat("again"))).status_code == 429
                # The key's own refusal shows in its decision list, with its reason and the key it is about.
                await wait_for(lambda: any(r.status == "refused" for r in app.state.decisions.values()))
                refused = next(r for r in app.state.decisions.values() if r.status == "refused")
                assert refused.chosen == f"429 rate_limit_exceeded · {me['id']}"
                await pilot.press("ctrl+p")
                await run_command(pilot, "Keys: gateway keys")
                await wait_for(lambda: isinstance(app.screen, KeysScreen) and app.screen.problem is not None)
                assert "403" in app.screen.problem or "admin" in app.screen.problem
        finally:
            await source.aclose()
