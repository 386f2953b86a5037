"""Config: file < environment < flags, extra providers, and keys that never show."""

from __future__ import annotations

import pytest

from p402_tui.core.config import load_settings
from p402_tui.core.errors import ConfigError, redact


def write(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path, catalog):
    settings = load_settings(env={"P402_CONFIG": ""}, catalog=catalog)
    assert settings.router.mode == "balanced"
    assert settings.cache.enabled is True
    assert not settings.usable_providers()  # no keys anywhere: nothing is usable


def test_file_then_env_then_flags(tmp_path, catalog):
    path = write(
        tmp_path,
        """
[providers.openai]
api_key = "sk-file-0000000000"
base_url = "http://127.0.0.1:9/openai/v1"
timeout_s = 12

[router]
mode = "quality"

[store]
db_path = "/tmp/from-file.db"
""",
    )
    file_only = load_settings(path, env={}, catalog=catalog)
    assert file_only.providers["openai"].key() == "sk-file-0000000000"
    assert file_only.providers["openai"].base_url == "http://127.0.0.1:9/openai/v1"
    assert file_only.providers["openai"].timeout_s == 12
    assert file_only.router.mode == "quality"

    env = {"OPENAI_API_KEY": "sk-env-1111111111", "P402_MODE": "speed", "P402_OPENAI_BASE_URL": "http://127.0.0.1:8/v1"}
    with_env = load_settings(path, env=env, catalog=catalog)
    assert with_env.providers["openai"].key() == "sk-env-1111111111"
    assert with_env.providers["openai"].base_url == "http://127.0.0.1:8/v1"
    assert with_env.router.mode == "speed"
    assert str(with_env.db_path) == "/tmp/from-file.db"

    flags = load_settings(path, env=env, catalog=catalog).with_overrides(db_path="/tmp/flag.db", mode="cost")
    assert flags.router.mode == "cost"
    assert str(flags.db_path) == "/tmp/flag.db"


def test_p402_config_env_names_the_file(tmp_path, catalog):
    path = write(tmp_path, '[router]\nmode = "cost"\n')
    assert load_settings(env={"P402_CONFIG": str(path)}, catalog=catalog).router.mode == "cost"


def test_second_key_variable_counts(catalog):
    settings = load_settings(env={"GEMINI_API_KEY": "AIzaSyFAKE00000000000"}, catalog=catalog)
    assert settings.providers["google"].usable


def test_disabled_provider_is_not_usable(tmp_path, catalog):
    path = write(tmp_path, '[providers.groq]\napi_key = "gsk_x"\nenabled = false\n')
    settings = load_settings(path, env={}, catalog=catalog)
    assert not settings.providers["groq"].usable


def test_extra_openai_compatible_provider(tmp_path, catalog):
    path = write(
        tmp_path,
        """
[providers.ollama]
wire = "openai"
base_url = "http://127.0.0.1:11434/v1"
models = ["llama3.2", {model = "qwen2.5", context_window = 65536, capabilities = ["chat", "streaming", "function_calling"]}]
""",
    )
    settings = load_settings(path, env={}, catalog=catalog)
    ollama = settings.providers["ollama"]
    assert ollama.usable and ollama.spec.keyless and ollama.spec.wire == "openai"
    assert settings.catalog.model("ollama/qwen2.5").context_window == 65536
    assert "function_calling" in settings.catalog.model("ollama/qwen2.5").capabilities
    assert settings.catalog.model("ollama/llama3.2").provider == "ollama"


def test_extra_provider_needs_wire_and_base_url(tmp_path, catalog):
    path = write(tmp_path, '[providers.mystery]\napi_key = "x"\n')
    with pytest.raises(ConfigError, match="mystery"):
        load_settings(path, env={}, catalog=catalog)


EXTRA = '[providers.local]\nwire = "openai"\nbase_url = "http://127.0.0.1:8000/v1"\n'


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[router]\nmode = \"fastest\"\n", "router.mode"),
        ("[providers.openai]\ntimeout_s = -1\n", "timeout_s"),
        ("not toml at all [[[", "cannot read config"),
        ("[surprise]\nx = 1\n", "surprise"),
        # An extra provider's models are checked at their place in the file, not as a pydantic dump later.
        (EXTRA + 'models = [{model = "m", capabilities = ["telepathy"]}]\n', r"providers\.local\.models\.0\.capabilities\.0"),
        (EXTRA + 'models = [{model = "m", context_window = 0}]\n', r"providers\.local\.models\.0\.context_window"),
        (EXTRA + 'models = ["ok", ""]\n', r"providers\.local\.models\.1\.model"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, catalog, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_settings(write(tmp_path, text), env={}, catalog=catalog)


def test_missing_explicit_config_is_an_error(tmp_path, catalog):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml", env={}, catalog=catalog)


def test_keys_never_show(tmp_path, catalog):
    secret = "sk-live-SECRET-abcdef123456"
    settings = load_settings(write(tmp_path, f'[providers.openai]\napi_key = "{secret}"\n'), env={}, catalog=catalog)
    provider = settings.providers["openai"]
    assert secret not in repr(provider)
    assert secret not in str(provider)
    assert secret not in repr(settings.file)
    assert secret not in settings.file.model_dump_json()
    assert provider.key() == secret


def test_redact_masks_key_shapes():
    text = "bad key sk-abcdef1234567890 and Bearer tok123 and ?key=AIzaSECRET&x=1 and mine"
    clean = redact(text, ("mine",))
    for leaked in ("sk-abcdef1234567890", "tok123", "AIzaSECRET", "mine"):
        assert leaked not in clean


def test_point_at_simulator_keeps_each_official_path(catalog):
    settings = load_settings(env={}, catalog=catalog).point_at("http://127.0.0.1:5555")
    assert settings.providers["groq"].base_url == "http://127.0.0.1:5555/groq/openai/v1"
    assert settings.providers["anthropic"].base_url == "http://127.0.0.1:5555/anthropic"
    assert settings.providers["google"].base_url == "http://127.0.0.1:5555/google"
    assert all(p.usable for p in settings.providers.values())
