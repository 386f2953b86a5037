"""`p402 doctor` against the simulator, through a real proxy to a TLS upstream, and with providers broken."""

from __future__ import annotations

import json

import pytest

from egress_servers import INTERNAL, authority, forward_proxy, threaded_sim, tls_sim

from p402_tui.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("doctor")


@pytest.fixture(scope="module")
def ca(folder):
    return authority(folder)


@pytest.fixture(scope="module")
def plain_sim(catalog):
    with threaded_sim(catalog) as running:
        yield running


@pytest.fixture(scope="module")
def secure_sim(catalog, ca):
    with tls_sim(catalog, ca) as running:
        yield running


def doctor(monkeypatch, capsys, config: str, tmp_path, *args: str):
    path = tmp_path / "config.toml"
    path.write_text(config)
    monkeypatch.setenv("P402_CONFIG", str(path))
    code = main(["doctor", *args])
    out, err = capsys.readouterr()
    return code, out, err


def provider(pid: str, base: str, key: str = "sim-key", extra: str = "") -> str:
    paths = {"openai": "/v1", "anthropic": "", "google": "", "cohere": ""}
    return f'[providers.{pid}]\napi_key = "{key}"\nbase_url = "{base}/{pid}{paths[pid]}"\n{extra}\n'


def test_every_step_passes_against_the_simulator(plain_sim, monkeypatch, capsys, tmp_path):
    config = "".join(provider(pid, plain_sim.url) for pid in ("openai", "anthropic", "google", "cohere"))
    code, out, err = doctor(monkeypatch, capsys, config, tmp_path, "--json")
    assert code == 0, out + err
    checkups = {c["provider"]: c for c in json.loads(out)}
    assert set(checkups) == {"openai", "anthropic", "google", "cohere"}
    for c in checkups.values():
        steps = {s["name"]: s for s in c["steps"]}
        assert c["verdict"] == "ok" and c["route"] == "direct" and c["fix"] is None
        assert steps["dns"]["ok"] and "127.0.0.1" in steps["dns"]["detail"]
        assert steps["tcp"]["ok"] and steps["tls"]["ok"] is None and steps["auth"]["ok"]
    code, out, _ = doctor(monkeypatch, capsys, config, tmp_path)  # the table
    assert code == 0 and out.splitlines()[0].split() == ["PROVIDER", "ROUTE", "DNS", "TCP", "TLS", "AUTH", "VERDICT"]


def test_through_the_proxy_the_tunnel_and_the_certificate_issuer_show(secure_sim, ca, folder, monkeypatch, capsys, tmp_path):
    port = secure_sim.url.rsplit(":", 1)[1]
    with forward_proxy(folder) as proxy:
        network = f'[network]\nproxy = "{proxy.url()}"\nca_bundle = "{ca.ca_pem}"\n'
        config = network + provider("anthropic", f"https://{INTERNAL}:{port}")
        code, out, err = doctor(monkeypatch, capsys, config, tmp_path, "--json")
        assert code == 0, out + err
        (c,) = json.loads(out)
        steps = {s["name"]: s for s in c["steps"]}
        assert c["route"] == f"proxy {proxy.shown}" and c["verdict"] == "ok"
        assert steps["tcp"]["detail"] == f"{proxy.shown} tunnel to {INTERNAL}:{port}"
        assert steps["tls"]["ok"] and steps["tls"]["detail"].startswith("issued by trustme")
        assert proxy.connects(f"{INTERNAL}:{port}")


def test_a_wrong_key_and_an_untrusted_ca_each_fail_with_their_fix(plain_sim, secure_sim, monkeypatch, capsys, tmp_path):
    config = (provider("openai", plain_sim.url) + provider("cohere", plain_sim.url, key="invalid-key")
              + provider("anthropic", secure_sim.url))  # fmt: skip
    code, out, err = doctor(monkeypatch, capsys, config, tmp_path, "--json")
    assert code == 1, out + err
    checkups = {c["provider"]: c for c in json.loads(out)}
    assert checkups["openai"]["verdict"] == "ok"
    cohere, anthropic = checkups["cohere"], checkups["anthropic"]
    assert cohere["verdict"] == "failed" and cohere["steps"][-1]["name"] == "auth"
    assert cohere["steps"][-1]["detail"].startswith("authentication") and "CO_API_KEY" in cohere["fix"]
    assert anthropic["verdict"] == "failed" and anthropic["steps"][-1]["name"] == "tls"
    assert "is not trusted" in anthropic["steps"][-1]["detail"] and "ca_bundle" in anthropic["fix"]
    code, out, _ = doctor(monkeypatch, capsys, config, tmp_path)
    assert code == 1 and "anthropic fix: if your network inspects TLS" in out and "Traceback" not in out
