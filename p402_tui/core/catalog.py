"""The model catalog: providers and models as data, validated once at load.

The shipped file is `p402_tui/core/catalog.json`. A user override file (written by
`p402 catalog import`) may update prices and context windows of known models; the
shipped file is never changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import CatalogError, UnknownModelError
from .params import ParamRule, rules_for
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
    inherits: str | None = None  # a configured deployment of this built-in provider: its wire and catalog
    api_version: str | None = None  # Azure: the default api-version (OPENAI_API_VERSION or the config overrides it)

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
    # Finite: an infinite price made every cost estimate, and the router's ranking by them, not a number.
    input_per_1m: float = Field(ge=0, allow_inf_nan=False)
    output_per_1m: float = Field(ge=0, allow_inf_nan=False)
    cached_input_per_1m: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    capabilities: frozenset[Capability]
    quality: float = Field(ge=0, le=1)
    tokens_per_s: float = Field(gt=0, allow_inf_nan=False)
    ttft_ms: float = Field(default=500, gt=0, allow_inf_nan=False)
    deprecated_on: str | None = None  # YYYY-MM-DD the provider retires (or retired) this id, when announced
    reference: str = ""  # where the catalog's figures for it come from
    source: str = "catalog"  # catalog | config | import | pinned (an unlisted id a caller named)
    # False: no price is known (an unlisted id); its calls cost NULL, and the router never picks it unasked.
    priced: bool = True
    # Parameter rules (core/params.py): merged from the catalog's param_rules unless the entry sets them.
    drops: frozenset[str] = frozenset()
    renames: dict[str, str] = Field(default_factory=dict)
    requires: dict[str, Any] = Field(default_factory=dict)

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
            "input_per_1m": self.input_per_1m if self.priced else None,
            "output_per_1m": self.output_per_1m if self.priced else None,
            "cached_input_per_1m": self.cached_input_per_1m if self.priced else None,
            "capabilities": sorted(self.capabilities),
            "quality": self.quality,
            "tokens_per_s": self.tokens_per_s,
            "source": self.source,
            "priced": self.priced,
            "drops": sorted(self.drops),
            "renames": dict(self.renames),
            "requires": dict(self.requires),
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
    param_rules: list[ParamRule] = Field(default_factory=list)

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
    rules: tuple[ParamRule, ...] = ()
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # configured names -> member ids

    def model(self, ref: str) -> ModelSpec:
        """A model by `provider/model`, or by a bare wire id that only one provider has."""
        found = self.models.get(ref)
        if found is not None:
            return found
        # Unlisted ids callers pinned are found by their full id only: a bare id names a listed model.
        matches = [m for m in self.models.values() if m.model == ref and m.source != "pinned"]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            options = ", ".join(m.id for m in matches)
            raise UnknownModelError(f"model {ref!r} is ambiguous; say which provider: {options}")
        raise UnknownModelError(f"unknown model {ref!r}; `p402 models` lists the known ones")

    def resolve(self, ref: str) -> ModelSpec:
        """`model(ref)`, and beyond the catalog any `provider/<id>` of a known provider: an unpriced
        model, added here so that it is listed from now on. A bare id the catalog does not know stays unknown."""
        try:
            return self.model(ref)
        except UnknownModelError:
            provider, _, name = ref.partition("/")
            if not name or provider not in self.providers or name.strip() != name or len(ref) > MAX_MODEL_ID:
                raise
        if sum(1 for m in self.models.values() if m.source == "pinned") >= MAX_PINNED:
            raise UnknownModelError(
                f"unknown model {ref!r}, and {MAX_PINNED} unlisted models are in use already; "
                'list it under [models."..."] in the config'
            )
        spec = unlisted_model(ref, self)
        self.models[spec.id] = spec
        return spec

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
        return Catalog(self.checked_on, all_providers, all_models, self.rules, dict(self.aliases))


# An unlisted model is taken on trust: the provider, not the catalog, says what it accepts.
MAX_PINNED = 1000  # unlisted ids one process keeps, so a client cannot grow the catalog without end
MAX_MODEL_ID = 256


def unlisted_model(ref: str, catalog: Catalog, **fields: Any) -> ModelSpec:
    """An unpriced model for an id the catalog does not list, with the catalog's rules that match it."""
    provider, _, name = ref.partition("/")
    rules = rules_for(ref, catalog.rules, catalog.providers[provider].unsupported_params)
    values: dict[str, Any] = {
        "id": ref,
        "name": name,
        "tier": "mid",
        "context_window": 10_000_000,
        "max_output_tokens": 10_000_000,
        "input_per_1m": 0.0,
        "output_per_1m": 0.0,
        "capabilities": frozenset(CAPABILITIES),
        "quality": 0.5,
        "tokens_per_s": 50.0,
        "source": "pinned",
        "priced": False,
        "drops": frozenset(rules["drops"]),
        "renames": rules["renames"],
        "requires": rules["requires"],
    }
    values.update(fields)
    return ModelSpec(**values)


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
    providers = {p.id: p for p in parsed.providers}
    rules = tuple(parsed.param_rules)
    models = {}
    for model in parsed.models:
        # A model's own rule fields win; else the provider's unsupported parameters and every matching rule.
        own = {k for k in ("drops", "renames", "requires") if k in model.model_fields_set}
        merged = rules_for(model.id, rules, providers[model.provider].unsupported_params)
        update = {k: (frozenset(v) if k == "drops" else v) for k, v in merged.items() if k not in own}
        models[model.id] = model.model_copy(update=update) if update else model
    return Catalog(checked_on=parsed.checked_on, providers=providers, models=models, rules=rules)


OVERRIDABLE = ("input_per_1m", "output_per_1m", "cached_input_per_1m", "context_window", "max_output_tokens")


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Override file shape: {"models": {"provider/model": {"input_per_1m": ..., ...}}}.

    An entry for a model the catalog lacks, written by `p402 catalog import` (`"source": "import"`),
    adds that model."""
    changes = overrides.get("models", {})
    models = []
    known = set()
    for entry in raw.get("models", []):
        known.add(entry.get("id"))
        patch = changes.get(entry.get("id"))
        if patch:
            entry = {**entry, **{k: v for k, v in patch.items() if k in OVERRIDABLE}}
        models.append(entry)
    providers = {p.get("id") for p in raw.get("providers", [])}
    for model_id, fields in changes.items():
        if model_id not in known and fields.get("source") == "import" and model_id.split("/", 1)[0] in providers:
            models.append(imported_entry(model_id, fields))
    return {**raw, "models": models}


# What an imported model gets for the fields a price file does not say.
IMPORT_DEFAULTS: dict[str, Any] = {
    "tier": "mid",
    "context_window": 128_000,
    "max_output_tokens": 8_192,
    "capabilities": ["chat", "streaming"],
    "quality": 0.5,
    "tokens_per_s": 50.0,
}
IMPORTED_FIELDS = (*OVERRIDABLE, *IMPORT_DEFAULTS, "name", "source")


def imported_entry(model_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    entry = {"id": model_id, "name": model_id.split("/", 1)[1], **IMPORT_DEFAULTS}
    entry.update({k: v for k, v in fields.items() if k in IMPORTED_FIELDS})
    entry["max_output_tokens"] = min(entry["max_output_tokens"], entry["context_window"])
    return entry


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
    unknown: int  # entries that name no model we know and were not added (no provider of ours, no price, not chat)
    added: list[str] = field(default_factory=list)  # models the catalog did not have, added with their prices


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


# LiteLLM's `supports_*` flags -> our capabilities.
LITELLM_CAPABILITIES = {
    "supports_vision": "vision",
    "supports_function_calling": "function_calling",
    "supports_response_schema": "json_mode",
    "supports_reasoning": "reasoning",
    "supports_web_search": "web_search",
}


def _litellm_new_model(entry: dict[str, Any]) -> dict[str, Any] | None:
    """A chat model's full entry from LiteLLM's, or None when it is not a priced chat model."""
    if entry.get("mode") != "chat":
        return None
    values: dict[str, Any] = dict(_litellm_values(entry))
    if "input_per_1m" not in values or "output_per_1m" not in values:
        return None
    capabilities = ["chat", "streaming"]
    capabilities += [cap for flag, cap in LITELLM_CAPABILITIES.items() if entry.get(flag) is True]
    values["capabilities"] = capabilities
    values["source"] = "import"
    return values


def import_litellm_prices(
    litellm_json: dict[str, Any], catalog: Catalog, providers: set[str] | None = None
) -> tuple[dict[str, Any], ImportReport]:
    """Map LiteLLM's price file onto our providers' models.

    Returns an override dict in the `apply_overrides` shape holding the values that differ
    from `catalog` for models it knows, and whole entries for priced chat models it does
    not have yet; and a report. `providers` limits both to those provider ids.
    """
    changes: dict[str, dict[str, Any]] = {}
    added: list[str] = []
    unchanged = unknown = 0
    seen: set[str] = set()
    for key, entry in litellm_json.items():
        if not isinstance(entry, dict) or key == "sample_spec":
            continue
        model_id = _litellm_model_id(key, entry)
        if model_id is not None and providers is not None and model_id.split("/", 1)[0] not in providers:
            continue
        known = catalog.models.get(model_id) if model_id else None
        if known is not None and known.source in ("pinned", "import") or known is None:
            new = _litellm_new_model(entry) if model_id and model_id not in seen else None
            if new is None:
                unknown += 1
                continue
            seen.add(model_id)  # type: ignore[arg-type]
            if known is None or any(getattr(known, k, None) != v for k, v in new.items() if k in OVERRIDABLE):
                changes[model_id] = new  # type: ignore[index]
                added.append(model_id)  # type: ignore[arg-type]
            else:
                unchanged += 1
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
    updated = sorted(mid for mid in changes if mid not in added)
    report = ImportReport(updated=updated, unchanged=unchanged, unknown=unknown, added=sorted(added))
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
