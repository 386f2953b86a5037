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
    api_key_env: list[str] = Field(default_factory=list)
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

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """USD for one call. Cached prompt tokens are billed at the cached rate where there is one."""
        cached_rate = self.input_per_1m if self.cached_input_per_1m is None else self.cached_input_per_1m
        fresh = max(prompt_tokens - cached_tokens, 0)
        return (fresh * self.input_per_1m + cached_tokens * cached_rate + completion_tokens * self.output_per_1m) / 1e6


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
    if overrides_path is not None and overrides_path.exists():
        try:
            overrides = json.loads(overrides_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise CatalogError(f"cannot read catalog overrides {overrides_path}: {error}") from None
    return parse_catalog(raw, overrides, origin=str(path.name))


__all__ = [
    "CAPABILITIES",
    "CATALOG_PATH",
    "Catalog",
    "ModelSpec",
    "ProviderSpec",
    "apply_overrides",
    "load_catalog",
    "parse_catalog",
]
