"""The model catalog: providers and models as data, validated once at load.

The shipped file is `p402_tui/core/catalog.json`. A user override file (written by
`p402 catalog import`) may update prices and context windows of known models; the
shipped file is never changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import CatalogError, UnknownModelError
from .types import CAPABILITIES, TIER_RANK, Capability, Tier, Wire

CATALOG_PATH = Path(__file__).with_name("catalog.json")


class ProviderSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str
    wire: Wire
    base_url: str
    api_key_env: list[str] = Field(default_factory=list)  # the official SDK's names, its first choice first
    base_url_env: list[str] = Field(default_factory=list)  # the official SDK's base URL variable, if it reads one
    keyless: bool = False  # a local server (Ollama, vLLM) that needs no key
    headers: dict[str, str] = Field(default_factory=dict)
    unsupported_params: list[str] = Field(default_factory=list)
    notes: str = ""

    @property
    def base_path(self) -> str:
        """The path part of the official base URL (`/openai/v1` for Groq), used to mount the simulator."""
        return urlsplit(self.base_url).path.rstrip("/")


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str  # provider/model
    name: str
    tier: Tier
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    input_per_1m: float = Field(ge=0)
    output_per_1m: float = Field(ge=0)
    cached_input_per_1m: float | None = Field(default=None, ge=0)
    capabilities: frozenset[Capability]
    quality: float = Field(ge=0, le=1)
    tokens_per_s: float = Field(gt=0)
    ttft_ms: float = Field(default=500, gt=0)
    deprecated_on: str | None = None  # YYYY-MM-DD the provider retires (or retired) this id, when announced
    source: str = ""

    @field_validator("id")
    @classmethod
    def _has_provider(cls, value: str) -> str:
        if "/" not in value or value.startswith("/") or value.endswith("/"):
            raise ValueError("id must be 'provider/model'")
        return value

    @cached_property
    def provider(self) -> str:
        return self.id.split("/", 1)[0]

    @cached_property
    def model(self) -> str:
        return self.id.split("/", 1)[1]

    @property
    def tier_rank(self) -> int:
        return TIER_RANK[self.tier]

    def has(self, capabilities: set[str] | frozenset[str]) -> bool:
        return capabilities <= self.capabilities

    def to_dict(self) -> dict[str, Any]:
        """The model as the CLI's and the gateway's JSON show it."""
        return {
            "id": self.id,
            "provider": self.provider,
            "model": self.model,
            "name": self.name,
            "tier": self.tier,
            "context_window": self.context_window,
            "max_output_tokens": self.max_output_tokens,
            "input_per_1m": self.input_per_1m,
            "output_per_1m": self.output_per_1m,
            "cached_input_per_1m": self.cached_input_per_1m,
            "capabilities": sorted(self.capabilities),
            "quality": self.quality,
            "tokens_per_s": self.tokens_per_s,
        }

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """USD for one call. Cached prompt tokens are billed at the cached rate where there is one."""
        cached_rate = self.input_per_1m if self.cached_input_per_1m is None else self.cached_input_per_1m
        fresh = max(prompt_tokens - cached_tokens, 0)
        # Term by term, so that without cached tokens the float is exactly in*price/1e6 + out*price/1e6.
        return (
            fresh * self.input_per_1m / 1e6
            + cached_tokens * cached_rate / 1e6
            + completion_tokens * self.output_per_1m / 1e6
        )


class CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checked_on: str
    providers: list[ProviderSpec]
    models: list[ModelSpec]

    @model_validator(mode="after")
    def _consistent(self) -> "CatalogFile":
        provider_ids = {p.id for p in self.providers}
        if len(provider_ids) != len(self.providers):
            raise ValueError("duplicate provider id")
        seen: set[str] = set()
        for model in self.models:
            if model.id in seen:
                raise ValueError(f"duplicate model id {model.id!r}")
            seen.add(model.id)
            if model.provider not in provider_ids:
                raise ValueError(f"model {model.id!r} names unknown provider {model.provider!r}")
        return self


@dataclass(frozen=True, slots=True)
class Catalog:
    """Providers and models by id, in catalog order."""

    checked_on: str
    providers: dict[str, ProviderSpec]
    models: dict[str, ModelSpec]

    def model(self, ref: str) -> ModelSpec:
        """A model by `provider/model`, or by a bare wire id that only one provider has."""
        found = self.models.get(ref)
        if found is not None:
            return found
        matches = [m for m in self.models.values() if m.model == ref]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            options = ", ".join(m.id for m in matches)
            raise UnknownModelError(f"model {ref!r} is ambiguous; say which provider: {options}")
        raise UnknownModelError(f"unknown model {ref!r}; `p402 models` lists the known ones")

    def provider(self, provider_id: str) -> ProviderSpec:
        try:
            return self.providers[provider_id]
        except KeyError:
            raise UnknownModelError(f"unknown provider {provider_id!r}") from None

    def models_of(self, provider_id: str) -> list[ModelSpec]:
        return [m for m in self.models.values() if m.provider == provider_id]

    def with_extra(self, providers: list[ProviderSpec], models: list[ModelSpec]) -> "Catalog":
        """A catalog with configured extra providers (Ollama, vLLM) added."""
        all_providers = dict(self.providers)
        all_providers.update({p.id: p for p in providers})
        all_models = dict(self.models)
        all_models.update({m.id: m for m in models})
        return Catalog(self.checked_on, all_providers, all_models)


def _describe(error: ValidationError, raw: dict[str, Any]) -> str:
    """Name the broken entry, not just its list index."""
    problems = []
    for item in error.errors()[:5]:
        loc = item["loc"]
        where = ".".join(str(part) for part in loc)
        if len(loc) >= 2 and loc[0] in ("models", "providers") and isinstance(loc[1], int):
            entries = raw.get(loc[0]) or []
            entry = entries[loc[1]] if loc[1] < len(entries) else {}
            name = entry.get("id", f"#{loc[1]}") if isinstance(entry, dict) else f"#{loc[1]}"
            field = ".".join(str(part) for part in loc[2:]) or "entry"
            where = f"{loc[0][:-1]} {name!r} field {field}"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)


def parse_catalog(raw: dict[str, Any], overrides: dict[str, Any] | None = None, origin: str = "catalog") -> Catalog:
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        parsed = CatalogFile.model_validate(raw)
    except ValidationError as error:
        raise CatalogError(f"broken {origin}: {_describe(error, raw)}") from None
    return Catalog(
        checked_on=parsed.checked_on,
        providers={p.id: p for p in parsed.providers},
        models={m.id: m for m in parsed.models},
    )


OVERRIDABLE = ("input_per_1m", "output_per_1m", "cached_input_per_1m", "context_window", "max_output_tokens")


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Override file shape: {"models": {"provider/model": {"input_per_1m": ..., ...}}}."""
    changes = overrides.get("models", {})
    models = []
    for entry in raw.get("models", []):
        patch = changes.get(entry.get("id"))
        if patch:
            entry = {**entry, **{k: v for k, v in patch.items() if k in OVERRIDABLE}}
        models.append(entry)
    return {**raw, "models": models}


def load_catalog(path: Path = CATALOG_PATH, overrides_path: Path | None = None) -> Catalog:
    """Read and validate the catalog (sync; call it at start-up or via a thread)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CatalogError(f"cannot read catalog {path}: {error}") from None
    overrides = None
    origin = str(path.name)
    if overrides_path is not None and overrides_path.exists():
        overrides = read_overrides(overrides_path)
        origin += f" with the overrides in {overrides_path}"  # a bad price there is not the shipped file's fault
    return parse_catalog(raw, overrides, origin=origin)


def read_overrides(path: Path) -> dict[str, Any]:
    """An override file (see `apply_overrides`), or a CatalogError that names it and says what it should hold."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CatalogError(f"cannot read catalog overrides {path}: {error}") from None
    models = data.get("models", {}) if isinstance(data, dict) else None
    if not isinstance(models, dict) or not all(isinstance(fields, dict) for fields in models.values()):
        raise CatalogError(
            f"catalog overrides {path} are not of the form "
            '{"models": {"provider/model": {"input_per_1m": ...}}}; fix or delete the file'
        )
    return data


# --- `p402 catalog import`: LiteLLM's model_prices_and_context_window.json -------------

# LiteLLM's `litellm_provider` value -> our provider id.
LITELLM_PROVIDERS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "google",
    "groq": "groq",
    "deepseek": "deepseek",
    "mistral": "mistral",
    "codestral": "mistral",
    "together_ai": "together",
    "fireworks_ai": "fireworks",
    "fireworks_ai-embedding-models": "fireworks",
    "openrouter": "openrouter",
    "cohere": "cohere",
    "cohere_chat": "cohere",
    "perplexity": "perplexity",
    "ai21": "ai21",
    "ai21_chat": "ai21",
}
# Routing prefixes LiteLLM puts in front of the provider's own model id.
LITELLM_PREFIXES = frozenset(LITELLM_PROVIDERS) | {"google"}


@dataclass(frozen=True, slots=True)
class ImportReport:
    updated: list[str]  # catalog ids with at least one changed value
    unchanged: int  # known models whose values already match
    unknown: int  # entries that name no model we know (ignored)


def _litellm_model_id(key: str, entry: dict[str, Any]) -> str | None:
    provider = LITELLM_PROVIDERS.get(str(entry.get("litellm_provider", "")))
    if provider is None:
        return None
    prefix, _, rest = key.partition("/")
    model = rest if rest and prefix in LITELLM_PREFIXES else key
    return f"{provider}/{model}"


def _per_1m(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    # 2.5e-06 * 1e6 is 2.4999999999999996; nine decimals keep every real price and drop the noise.
    return round(value * 1e6, 9)


def _tokens(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return int(value)


def _litellm_values(entry: dict[str, Any]) -> dict[str, float | int]:
    values = {
        "input_per_1m": _per_1m(entry.get("input_cost_per_token")),
        "output_per_1m": _per_1m(entry.get("output_cost_per_token")),
        "cached_input_per_1m": _per_1m(entry.get("cache_read_input_token_cost")),
        "context_window": _tokens(entry.get("max_input_tokens")),
        "max_output_tokens": _tokens(entry.get("max_output_tokens")),
    }
    return {field: value for field, value in values.items() if value is not None}


def import_litellm_prices(litellm_json: dict[str, Any], catalog: Catalog) -> tuple[dict[str, Any], ImportReport]:
    """Map LiteLLM's price file onto the models we know.

    Returns an override dict in the `apply_overrides` shape holding only values that
    differ from `catalog`, and a report. Entries for models we do not know are ignored.
    """
    changes: dict[str, dict[str, float | int]] = {}
    unchanged = unknown = 0
    seen: set[str] = set()
    for key, entry in litellm_json.items():
        if not isinstance(entry, dict) or key == "sample_spec":
            continue
        model_id = _litellm_model_id(key, entry)
        known = catalog.models.get(model_id) if model_id else None
        if known is None:
            unknown += 1
            continue
        if known.id in seen:  # "deepseek-chat" and "deepseek/deepseek-chat" are one model; the first wins
            continue
        seen.add(known.id)
        if "embeddings" in known.capabilities:
            # our embedding entries bill no output; LiteLLM's output fields mean nothing for them
            values = {k: v for k, v in _litellm_values(entry).items() if k in ("input_per_1m", "context_window")}
        else:
            values = _litellm_values(entry)
        changed = {field: value for field, value in values.items() if getattr(known, field) != value}
        if changed:
            changes[known.id] = changed
        else:
            unchanged += 1
    report = ImportReport(updated=sorted(changes), unchanged=unchanged, unknown=unknown)
    return {"models": changes}, report


def merge_overrides(existing: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` over `existing`, field by field per model; neither argument is changed."""
    models = {model_id: dict(fields) for model_id, fields in existing.get("models", {}).items()}
    for model_id, fields in new.get("models", {}).items():
        models[model_id] = {**models.get(model_id, {}), **fields}
    return {**existing, **{k: v for k, v in new.items() if k != "models"}, "models": models}


__all__ = [
    "CAPABILITIES",
    "CATALOG_PATH",
    "Catalog",
    "ImportReport",
    "ModelSpec",
    "ProviderSpec",
    "apply_overrides",
    "import_litellm_prices",
    "load_catalog",
    "merge_overrides",
    "parse_catalog",
    "read_overrides",
]
