"""Configuration: a TOML file, then environment variables, then command-line flags.

The file lives in the platform's user config dir (`p402 --config FILE` or
`P402_CONFIG` point elsewhere). Keys come from the file or, overriding it, the
provider's own environment variables. Keys are `SecretStr` so no repr, log or
screen ever shows one.

    [providers.openai]
    api_key = "sk-..."            # or OPENAI_API_KEY
    timeout_s = 60

    [providers.ollama]            # any id the catalog does not know is an extra
    wire = "openai"               # OpenAI-compatible provider
    base_url = "http://localhost:11434/v1"
    models = ["llama3.2", {model = "qwen2.5", context_window = 32768}]

    [providers.openai-eu]         # another deployment of a built-in provider
    inherits = "openai"
    base_url = "https://eu.example.com/v1"

    [models."openai/gpt-new"]     # a model the catalog lacks (both prices), or fields of one it has
    input_per_1m = 1.0
    output_per_1m = 2.0

    [aliases.fast]                # a model name whose members the router chooses among
    models = ["openai/gpt-4o-mini", "openai-eu/gpt-4o-mini"]

    [router]
    mode = "balanced"
    weights = {cost = 0.4, quality = 0.4, speed = 0.2}
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit, urlunsplit

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from .catalog import Catalog, ModelSpec, ProviderSpec, load_catalog, unlisted_model
from .errors import ConfigError, UnknownModelError
from .params import rules_for
from .types import Capability

APP_NAME = "p402"
Mode = Literal["cost", "quality", "speed", "balanced", "adaptive"]
MODES: tuple[str, ...] = Mode.__args__  # type: ignore[attr-defined]


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


def default_db_path() -> Path:
    return default_data_dir() / "p402.db"


def is_store_url(value: object) -> bool:
    """A PostgreSQL URL (the store on a server), not a SQLite file's path."""
    return isinstance(value, str) and value.startswith(("postgresql://", "postgres://"))


def store_target(value: str | Path) -> str | Path:
    """Where the store is: a PostgreSQL URL kept as it is, else a SQLite file's path."""
    return value if is_store_url(value) else Path(value).expanduser()


def describe_store(value: str | Path) -> str:
    """How messages name a store: a file's path, or a URL without its password."""
    if not is_store_url(value):
        return str(Path(value).expanduser())
    try:
        parts = urlsplit(str(value))
        if parts.password is None:
            return str(value)
        netloc = f"{parts.username}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    except ValueError:  # not a URL urllib can read (a bad port, a broken [host]): named by its scheme only
        return str(value).split("://", 1)[0] + "://..."
    return urlunsplit(parts._replace(netloc=netloc))


def default_overrides_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "catalog-overrides.json"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExtraModel(_Section):
    # The catalog's own limits, checked here so that a mistake is reported at its place in the config file.
    model: str = Field(min_length=1)
    name: str | None = None
    context_window: int = Field(default=32768, gt=0)
    max_output_tokens: int = Field(default=8192, gt=0)
    input_per_1m: float = Field(default=0.0, ge=0)
    output_per_1m: float = Field(default=0.0, ge=0)
    capabilities: list[Capability] = Field(default_factory=lambda: ["chat", "streaming"])
    tier: Literal["budget", "mid", "premium"] = "budget"
    quality: float = Field(default=0.5, ge=0, le=1)
    tokens_per_s: float = Field(default=40.0, gt=0)
    ttft_ms: float = Field(default=300.0, gt=0)


class ProviderConfig(_Section):
    api_key: SecretStr | None = None
    base_url: str | None = None
    enabled: bool = True
    timeout_s: float = Field(default=120.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    first_token_timeout_s: float = Field(default=60.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    # This provider's own proxy and exceptions, over [network]'s (and the environment's).
    proxy: str | None = None
    no_proxy: list[str] | None = None
    # Only for extra (OpenAI-compatible) providers the catalog does not know:
    wire: Literal["openai"] | None = None
    name: str | None = None
    # For an extra provider, its models; for a built-in one, ids beyond the catalog, served unpriced.
    models: list[ExtraModel] = Field(default_factory=list)
    # Another deployment of a built-in provider: its wire and its models, under this provider's own id.
    inherits: str | None = None
    # Azure OpenAI: catalog model -> deployment name, and the data-plane API version.
    deployments: dict[str, str] = Field(default_factory=dict)
    api_version: str | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        # "llama3.2" is short for {model = "llama3.2"}; as one type, a mistake is reported at its own field
        # rather than as the string the entry is not.
        if isinstance(value, list):
            return [{"model": entry} if isinstance(entry, str) else entry for entry in value]
        return value


class RouterWeights(_Section):
    cost: float = Field(default=0.4, ge=0)
    quality: float = Field(default=0.4, ge=0)
    speed: float = Field(default=0.2, ge=0)


class RouterConfig(_Section):
    mode: Mode = "balanced"
    weights: RouterWeights = Field(default_factory=RouterWeights)
    max_retries: int = Field(default=2, ge=0, le=10)
    default_output_tokens: int = Field(default=512, ge=1)
    # Expected answer length per mode when a request sets no max_tokens; unset modes use default_output_tokens.
    output_tokens: dict[Mode, int] = Field(default_factory=dict)
    probe_interval_s: float | None = Field(default=None, gt=0)  # active health probes; off unless set
    # A request's whole life across attempts (each attempt has its provider's timeout_s): room for one
    # attempt that times out at the default 120 s and a fallback that answers.
    request_timeout_s: float | None = Field(default=180.0, gt=0)


class CacheConfig(_Section):
    enabled: bool = True
    # MiniLM's cosine for a semantic hit; 0.84 chosen on bench/data's tune split (bench/cache_eval.py).
    threshold: float = Field(default=0.84, gt=0, le=1)
    # The static vectors' cosine for a cached prompt to be worth MiniLM's confirmation. Each
    # candidate costs a MiniLM pass (~8 ms) on a miss, and the index prefilter keeps fewer rows
    # the higher this is; 0.74 on the tune split (bench/cache_eval.py).
    candidate_threshold: float = Field(default=0.74, gt=0, le=1)
    ttl_s: float = Field(default=7 * 24 * 3600, gt=0)
    max_entries: int = Field(default=100_000, ge=1)
    embedder: str = "auto"  # auto | minilm | hashed | provider/model
    model_dir: str | None = None


class StoreConfig(_Section):
    db_path: str | None = None
    # postgresql://user@host:port/dbname: the store on a PostgreSQL server (beside db_path, which names a file)
    url: str | None = Field(default=None, pattern=r"^postgres(ql)?://")
    # batch: a request's ledger row is committed within ~25 ms after its answer (one writer batch),
    # so a kill -9 may lose the rows of that window. strict: the gateway sends an answer's last
    # byte (a stream's [DONE]) only once its row is committed.
    durability: Literal["batch", "strict"] = "batch"
    # The writer's thread asks Linux for real-time scheduling (SCHED_FIFO 1: root with CAP_SYS_NICE, or an
    # RLIMIT_RTPRIO of 1), so that on saturated cores a batch is not held in the run queue past its window.
    realtime_writer: bool = True
    # Ledger, decisions and health history older than this many days are deleted in the background
    # (at start, then hourly, a few hundred rows a transaction); None keeps everything.
    retention_days: float | None = Field(default=None, gt=0)


class GatewayConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=4020, ge=0, le=65535)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # /api/v2/events: how many may listen, and how far one may fall behind before it is let go.
    max_event_subscribers: int = Field(default=1024, ge=1)
    event_buffer_events: int = Field(default=1000, ge=1)
    event_buffer_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Connections: a request's headers, then its body, must arrive within these; an idle keep-alive
    # connection is closed after keep_alive_s. Past limit_concurrency requests in flight new requests
    # get a 503; at max_connections a new connection closes the longest idle one, or is closed at once.
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    # Longer than httpx (and the openai and anthropic SDKs on it) and Node's undici keep an idle connection
    # (5 s, 4 s), and AWS's load balancers (60 s), so they let it go first. A server that closes first
    # races a client reusing the connection: a request goes out as the close arrives and fails with no
    # answer (at uvicorn's 5 s, httpx met it under load). Clients that keep one longer (Go's 90 s,
    # requests with no limit) must retry such a request, as they do anywhere. 75 s is nginx's default.
    keep_alive_s: float = Field(default=75.0, gt=0)
    limit_concurrency: int = Field(default=2048, ge=1)
    max_connections: int = Field(default=4096, ge=1)
    # Processes serving the one port (`p402 serve --workers`); limits above are each worker's.
    workers: int = Field(default=1, ge=1, le=64)
    # Logs on stderr (`p402 serve`): one JSON object or one text line per record, and an access line
    # per request unless access_log is false. P402_LOG_FORMAT / P402_LOG_LEVEL override the file.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    # SIGTERM: new connections are refused at once; requests in flight (streams too) get this long to
    # finish, then the rest are cut. The ledger is flushed either way.
    drain_timeout_s: float = Field(default=30.0, gt=0)


class TelemetryConfig(_Section):
    # OpenTelemetry traces (the `otel` extra): on when this is true or OTEL_EXPORTER_OTLP_ENDPOINT
    # (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set; the exporter reads the other OTEL_* variables.
    otel: bool = False


class FleetConfig(_Section):
    # Several gateways on one database: each tells the others of the circuits it opens, the answers it
    # caches and (with `events`) every event it publishes, so each shows the fleet's. `name` labels this
    # gateway (default hostname:pid). P402_FLEET=1 and P402_FLEET_NAME do the same from the environment.
    enabled: bool = False
    name: str | None = None
    events: bool = True
    # The bus: by default the store's own (its table on SQLite, LISTEN/NOTIFY on PostgreSQL); a
    # postgresql:// URL here (or P402_FLEET_BUS) puts it on that server, whatever the store.
    bus_url: str | None = None


class HealthConfig(_Section):
    """Outlier ejection (core/health.py), after Envoy's, with defaults for a handful of providers.

    Why these numbers: one failure in twenty is ordinary noise, so a model is ejected only at
    half its calls failing, and only once 20 calls in the last minute make that rate mean something;
    the window keeps at most the last 100 calls, so however busy the model was, an outage
    ejects it within about as many failures.
    Three refused connections in a row say the host is gone. Two ejected models say it is
    the provider, not a model. Ejection starts short (5 s, doubling, at most 2 min) because
    a wrong ejection costs capacity and a right one is soon confirmed by failed trials.
    Never more than half the candidates are skipped for ejection: past that, trying the
    least-bad is better than refusing. Three trials at once, so one slow trial cannot
    hold a provider out. A 429 without Retry-After waits 1 s, doubled while 429s go on
    (a lasting limit is soon waited out properly, a passing one costs the model little);
    an asked-for wait is honoured up to 5 min.
    """

    window_s: float = Field(default=60.0, gt=0)  # the sliding window error rates are taken over
    window_max: int = Field(default=100, ge=1)  # ... holding at most this many calls
    min_requests: int = Field(default=20, ge=1)  # calls in the window before its error rate may eject
    error_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    hard_failures: int = Field(default=3, ge=1)  # consecutive refused connections that eject a provider at once
    provider_ejected_models: int = Field(default=2, ge=1)  # ejected (or failing together) models that eject it
    base_ejection_s: float = Field(default=5.0, gt=0)  # doubled for each ejection in a row ...
    max_ejection_s: float = Field(default=120.0, gt=0)  # ... up to this
    max_ejection_percent: float = Field(default=50.0, ge=0, le=100)  # of a request's candidates
    half_open_trials: int = Field(default=3, ge=1)  # calls admitted at once after an ejection
    rate_limit_default_s: float = Field(default=1.0, gt=0)  # a 429 without Retry-After; doubled while they go on
    rate_limit_max_s: float = Field(default=300.0, gt=0)  # the longest Retry-After honoured
    auth_ejection_s: float = Field(default=60.0, gt=0)  # a rejected key
    trial_timeout_s: float = Field(default=30.0, gt=0)  # a trial that never reports frees its slot
    degraded_error_rate: float = Field(default=0.2, gt=0, le=1)  # shown as degraded from this error rate


class ModelConfig(_Section):
    """`[models."provider/model"]`: a model the catalog lacks (both prices required), or fields of one it has."""

    name: str | None = None
    tier: Literal["budget", "mid", "premium"] | None = None
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    input_per_1m: float | None = Field(default=None, ge=0)
    output_per_1m: float | None = Field(default=None, ge=0)
    cached_input_per_1m: float | None = Field(default=None, ge=0)
    capabilities: list[Capability] | None = None
    quality: float | None = Field(default=None, ge=0, le=1)
    tokens_per_s: float | None = Field(default=None, gt=0)
    ttft_ms: float | None = Field(default=None, gt=0)
    deprecated_on: str | None = None
    drops: list[str] | None = None
    renames: dict[str, str] | None = None
    requires: dict[str, Any] | None = None


# What a model added in `[models."..."]` gets for the fields it leaves out.
NEW_MODEL_DEFAULTS: dict[str, Any] = {
    "tier": "mid",
    "context_window": 128_000,
    "max_output_tokens": 16_384,
    "capabilities": ["chat", "streaming"],
    "quality": 0.5,
    "tokens_per_s": 50.0,
    "ttft_ms": 500.0,
}


class AliasConfig(_Section):
    """`[aliases.NAME]`: a model name clients send; the router chooses among `models` only."""

    models: list[str] = Field(min_length=1)
    mode: Mode | None = None


class NetworkConfig(_Section):
    """How provider calls leave this machine; each key overrides its environment variable."""

    proxy: str | None = None  # over HTTPS_PROXY / HTTP_PROXY / ALL_PROXY; "" for none
    no_proxy: list[str] | None = None  # over NO_PROXY: hosts, .domain suffixes, host:port, IPs, CIDR ranges, "*"
    ca_bundle: str | None = None  # a PEM bundle trusted besides the OS store (or SSL_CERT_FILE / SSL_CERT_DIR)
    verify: bool = True  # false turns TLS verification off, and every start-up says so


class ConfigFile(_Section):
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    aliases: dict[str, AliasConfig] = Field(default_factory=dict)
    router: RouterConfig = Field(default_factory=RouterConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)


@dataclass(frozen=True, slots=True)
class ResolvedProvider:
    """One provider as it will be called: spec plus the settings in force."""

    spec: ProviderSpec
    base_url: str
    api_key: SecretStr | None
    enabled: bool
    timeout_s: float
    connect_timeout_s: float
    first_token_timeout_s: float
    headers: dict[str, str]
    deployments: dict[str, str] = dataclass_field(default_factory=dict)  # Azure: model -> deployment
    api_version: str | None = None  # Azure's api-version query parameter
    proxy: str | None = None  # the provider's own [providers.x] proxy, over [network]'s
    no_proxy: tuple[str, ...] | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def usable(self) -> bool:
        """Configured (a key, or a keyless local server) and not disabled."""
        return self.enabled and (self.api_key is not None or self.spec.keyless)

    def key(self) -> str:
        return self.api_key.get_secret_value() if self.api_key is not None else ""


class Settings:
    """The whole configuration in force, with the catalog it applies to."""

    def __init__(self, file: ConfigFile, catalog: Catalog, env: Mapping[str, str], source: Path | None = None) -> None:
        self.file = file
        self.source = source
        self.env = env
        self.catalog = catalog.with_extra(*_extra_specs(file, catalog))
        _configured_models(self.catalog, file)
        self.providers: dict[str, ResolvedProvider] = {
            pid: _resolve(spec, file.providers.get(pid), env) for pid, spec in self.catalog.providers.items()
        }
        self.aliases = _aliases(self.catalog, file)
        self.catalog.aliases.update({name: tuple(alias.models) for name, alias in self.aliases.items()})
        db = file.store.url or file.store.db_path or env.get("P402_DB")
        self.db_path = store_target(db) if db else default_db_path()

    @property
    def router(self) -> RouterConfig:
        return self.file.router

    @property
    def cache(self) -> CacheConfig:
        return self.file.cache

    @property
    def gateway(self) -> GatewayConfig:
        return self.file.gateway

    @property
    def health(self) -> HealthConfig:
        return self.file.health

    def azure_deployments(self) -> dict[str, str]:
        """Deployment name -> OpenAI model, over every Azure provider (the built-in one and any that inherit it)."""
        return {
            deployment: model
            for provider in self.providers.values() if (provider.spec.inherits or provider.id) == "azure"
            for model, deployment in provider.deployments.items()
        }

    @property
    def network(self) -> NetworkConfig:
        return self.file.network

    def usable_providers(self) -> list[ResolvedProvider]:
        return [p for p in self.providers.values() if p.usable]

    def secrets(self) -> tuple[str, ...]:
        """Every key in force, so error text can be scrubbed of them."""
        return tuple(p.key() for p in self.providers.values() if p.api_key is not None)

    def point_at(self, base: str, key: str = "sim-key") -> "Settings":
        """Every provider at `base/<id><official path>` with a key: how the demo and tests reach the simulator."""
        base = base.rstrip("/")
        for pid, provider in list(self.providers.items()):
            mount = provider.spec.inherits or pid  # another deployment of a provider is served where it is
            self.providers[pid] = replace(
                provider,
                base_url=f"{base}/{mount}{provider.spec.base_path}",
                api_key=provider.api_key if provider.spec.keyless else SecretStr(key),
                no_proxy=("*",),  # the simulator is on this machine: never reached through a proxy
            )
        return self

    def with_overrides(self, *, db_path: str | None = None, mode: str | None = None) -> "Settings":
        """Command-line flags, the last word."""
        if db_path:
            self.db_path = store_target(db_path)
        if mode:
            if mode not in MODES:
                raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
            self.file.router.mode = mode  # type: ignore[assignment]
        return self


def settings_from(args: Any) -> Settings:
    """Settings with file < env < flags applied; `args` (a command line's) may carry `config`, `db` and `mode`."""
    settings = load_settings(getattr(args, "config", None))
    return settings.with_overrides(db_path=getattr(args, "db", None), mode=getattr(args, "mode", None))


def check_header(name: str, value: str) -> None:
    """Refuse a header that could split a request or garble it: a line break, a NUL, non-ASCII, a colon in the name."""
    text = f"{name}{value}"
    if not name or ":" in name or not text.isascii() or any(c in text for c in "\r\n\0"):
        raise ValueError(f"HTTP header {name!r} has a character a header cannot carry")


def _resolve(spec: ProviderSpec, conf: ProviderConfig | None, env: Mapping[str, str]) -> ResolvedProvider:
    conf = conf or ProviderConfig()
    key = conf.api_key
    for name in spec.api_key_env:
        if env.get(name):
            key = SecretStr(env[name])
            break
    sdk_url = next((env[name] for name in spec.base_url_env if env.get(name)), None)
    own = env.get(f"P402_{spec.id.upper().replace('-', '_')}_BASE_URL")
    base_url = own or sdk_url or conf.base_url or spec.base_url
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"provider {spec.id!r}: base_url {base_url!r} is not an http:// or https:// URL")
    for name, value in conf.headers.items():
        try:
            check_header(name, value)
        except ValueError as error:
            raise ConfigError(f"provider {spec.id!r}: {error}") from None
    return ResolvedProvider(
        spec=spec,
        base_url=base_url.rstrip("/"),
        api_key=key,
        enabled=conf.enabled,
        timeout_s=conf.timeout_s,
        connect_timeout_s=conf.connect_timeout_s,
        first_token_timeout_s=conf.first_token_timeout_s,
        headers=dict(conf.headers),
        deployments=dict(conf.deployments),
        api_version=(conf.api_version or env.get("OPENAI_API_VERSION") or spec.api_version) if spec.api_version else None,
        proxy=conf.proxy,
        no_proxy=None if conf.no_proxy is None else tuple(conf.no_proxy),
    )


def _extra_specs(file: ConfigFile, catalog: Catalog) -> tuple[list[ProviderSpec], list[ModelSpec]]:
    """Providers the catalog does not know (OpenAI-compatible servers, or deployments that inherit
    a built-in provider), with their models; and Azure's models, one per configured deployment."""
    providers: list[ProviderSpec] = []
    models: list[ModelSpec] = []
    for pid, conf in file.providers.items():
        if pid in catalog.providers:
            models += _builtin_models(pid, conf, catalog)
            continue
        if "/" in pid:
            raise ConfigError(f"provider id {pid!r} may not contain '/'")
        if conf.inherits is not None:
            parent = catalog.providers.get(conf.inherits)
            if parent is None:
                raise ConfigError(
                    f"provider {pid!r}: inherits {conf.inherits!r}, which is not a built-in provider "
                    f"({', '.join(catalog.providers)})"
                )
            if parent.inherits is not None:
                raise ConfigError(f"provider {pid!r}: inherits {conf.inherits!r}, which itself inherits")
            providers.append(parent.model_copy(update={
                "id": pid, "name": conf.name or f"{parent.name} ({pid})", "inherits": parent.id, "api_key_env": [],
                "base_url_env": [], "base_url": conf.base_url or parent.base_url,
            }))
            if parent.id == "azure":
                source = _azure_models(conf, catalog)
            else:
                source = catalog.models_of(parent.id) + _builtin_models(parent.id, conf, catalog)
            models += [_renamed(m, f"{pid}/{m.model}") for m in source]
            continue
        if conf.wire != "openai" or not conf.base_url:
            raise ConfigError(
                f"provider {pid!r} is not in the catalog; an extra provider needs wire = \"openai\" and a base_url, "
                "or inherits = \"<built-in provider>\" for another deployment of one"
            )
        providers.append(
            ProviderSpec(
                id=pid,
                name=conf.name or pid,
                wire="openai",
                base_url=conf.base_url,
                keyless=conf.api_key is None,
            )
        )
        for extra in conf.models:
            models.append(
                ModelSpec(
                    id=f"{pid}/{extra.model}",
                    name=extra.name or extra.model,
                    tier=extra.tier,
                    context_window=extra.context_window,
                    max_output_tokens=min(extra.max_output_tokens, extra.context_window),
                    input_per_1m=extra.input_per_1m,
                    output_per_1m=extra.output_per_1m,
                    capabilities=frozenset(extra.capabilities),
                    quality=extra.quality,
                    tokens_per_s=extra.tokens_per_s,
                    ttft_ms=extra.ttft_ms,
                    source="config",
                )
            )
    return providers, models


def _renamed(spec: ModelSpec, model_id: str) -> ModelSpec:
    """The same model under another id (a deployment's): a new spec, so no cached part of the old id remains."""
    return ModelSpec(**{**spec.model_dump(), "id": model_id})


def _builtin_models(pid: str, conf: ProviderConfig, catalog: Catalog) -> list[ModelSpec]:
    """`models = [...]` under a built-in provider: ids beyond the catalog, served unpriced ([models."..."] prices one)."""
    if pid == "azure":
        if conf.models:
            raise ConfigError('provider "azure": its models come from deployments = {"<model>" = "<deployment>"}')
        return _azure_models(conf, catalog)
    out = []
    for extra in conf.models:
        model_id = f"{pid}/{extra.model}"
        if model_id in catalog.models:
            continue  # listed already, with its price
        priced = extra.model_fields_set & {"input_per_1m", "output_per_1m"}
        if priced:
            raise ConfigError(
                f"provider {pid!r}: models = [...] under a built-in provider adds unpriced ids; "
                f'price {extra.model!r} under [models."{model_id}"] instead'
            )
        out.append(unlisted_model(
            model_id, catalog, source="config",
            **{k: getattr(extra, k) for k in extra.model_fields_set if k not in ("model",)},
        ))
    return out


def _azure_models(conf: ProviderConfig, catalog: Catalog) -> list[ModelSpec]:
    """One model per Azure deployment, priced and described as the OpenAI model it deploys."""
    out = []
    for model, deployment in conf.deployments.items():
        if not deployment or "/" in deployment:
            raise ConfigError(f"provider \"azure\": deployment name {deployment!r} for {model!r} is not a name")
        openai_spec = catalog.models.get(f"openai/{model}")
        if openai_spec is not None:
            out.append(_renamed(openai_spec, f"azure/{model}"))
        else:
            out.append(unlisted_model(f"azure/{model}", catalog, source="config"))
    return out


def _configured_models(catalog: Catalog, file: ConfigFile) -> None:
    """`[models."..."]`: fields of a model the catalog has, or a whole new one, priced from the config."""
    for model_id, conf in file.models.items():
        provider, _, name = model_id.partition("/")
        if not name or provider not in catalog.providers:
            raise ConfigError(
                f'[models."{model_id}"]: a model id is "provider/model" with a known provider '
                f"({', '.join(catalog.providers)})"
            )
        given = {k: getattr(conf, k) for k in conf.model_fields_set if getattr(conf, k) is not None}
        if "drops" in given:
            given["drops"] = frozenset(given["drops"])
        if "capabilities" in given:
            given["capabilities"] = frozenset(given["capabilities"])
        known = catalog.models.get(model_id)
        if known is not None and known.priced:
            values = {**known.model_dump(), **given, "source": "config"}
        else:
            missing = [k for k in ("input_per_1m", "output_per_1m") if k not in given]
            if missing:
                raise ConfigError(
                    f'[models."{model_id}"]: a model the catalog does not list needs {" and ".join(missing)}'
                )
            rules = rules_for(model_id, catalog.rules, catalog.providers[provider].unsupported_params)
            values = {"id": model_id, "name": name, **NEW_MODEL_DEFAULTS, "drops": frozenset(rules["drops"]),
                      "renames": rules["renames"], "requires": rules["requires"], **given, "source": "config"}
        values["max_output_tokens"] = min(values["max_output_tokens"], values["context_window"])
        try:
            catalog.models[model_id] = ModelSpec(**values)
        except ValueError as error:
            raise ConfigError(f'[models."{model_id}"]: {error}') from None


RESERVED_NAMES = frozenset({"auto", "router"})


def _aliases(catalog: Catalog, file: ConfigFile) -> dict[str, AliasConfig]:
    """Aliases with their members as catalog ids; a member beyond the catalog is an unpriced model."""
    out = {}
    for name, alias in file.aliases.items():
        if name in RESERVED_NAMES or name.startswith("p402/") or name in catalog.models or "/" in name:
            raise ConfigError(
                f"[aliases.{name}]: an alias name may not be a model id, contain '/', or be auto or router"
            )
        members = []
        for ref in alias.models:
            try:
                members.append(catalog.resolve(ref).id)
            except UnknownModelError as error:
                raise ConfigError(f"[aliases.{name}]: {error}") from None
        out[name] = AliasConfig(models=list(dict.fromkeys(members)), mode=alias.mode)
    return out


def read_config_file(path: Path) -> ConfigFile:
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    try:
        return ConfigFile.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None


def load_settings(
    config_path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    catalog: Catalog | None = None,
) -> Settings:
    """File < environment < flags (flags are applied by the caller with `with_overrides`).

    An explicit path (flag, then P402_CONFIG) must exist; the default path may be absent.
    """
    env = os.environ if env is None else env
    explicit = config_path or env.get("P402_CONFIG")
    path = Path(explicit).expanduser() if explicit else default_config_path()
    if explicit or path.exists():
        file = read_config_file(path)
    else:
        file, path = ConfigFile(), None  # type: ignore[assignment]
    if catalog is None:
        overrides = env.get("P402_CATALOG_OVERRIDES")
        catalog = load_catalog(overrides_path=Path(overrides) if overrides else default_overrides_path())
    if env.get("P402_MODE"):
        if env["P402_MODE"] not in MODES:
            raise ConfigError(f"P402_MODE={env['P402_MODE']!r} is not a mode; choose one of {', '.join(MODES)}")
        file.router.mode = env["P402_MODE"]  # type: ignore[assignment]
    for name, field, choices in (("P402_LOG_FORMAT", "log_format", ("text", "json")),
                                 ("P402_LOG_LEVEL", "log_level", ("debug", "info", "warning", "error"))):  # fmt: skip
        if env.get(name):
            if env[name] not in choices:
                raise ConfigError(f"{name}={env[name]!r}: choose one of {', '.join(choices)}")
            setattr(file.gateway, field, env[name])
    return Settings(file, catalog, env, source=path)
