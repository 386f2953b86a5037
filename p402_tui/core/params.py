"""Per-model parameter rules: what a model refuses, names differently, or must be sent.

Rules are catalog data (`param_rules` patterns and a model's own `drops`, `renames`,
`requires`), overridable in `[models."..."]`. The orchestrator applies a model's rules
to each attempt's request before its adapter sees it, and reports what was dropped.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .types import ChatRequest


class ParamRule(BaseModel):
    """One catalog rule: the models whose `provider/model` id matches `match` (fnmatch) get its fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    match: str = Field(min_length=1)
    drops: list[str] = Field(default_factory=list)
    renames: dict[str, str] = Field(default_factory=dict)
    requires: dict[str, Any] = Field(default_factory=dict)
    why: str = ""

    def applies(self, model_id: str) -> bool:
        return fnmatchcase(model_id, self.match)


def rules_for(model_id: str, rules: tuple[ParamRule, ...], provider_drops: list[str]) -> dict[str, Any]:
    """The merged rule fields for one model: the provider's unsupported parameters, then each matching rule."""
    drops = list(provider_drops)
    renames: dict[str, str] = {}
    requires: dict[str, Any] = {}
    for rule in rules:
        if rule.applies(model_id):
            drops += [name for name in rule.drops if name not in drops]
            renames.update(rule.renames)
            requires.update(rule.requires)
    return {"drops": drops, "renames": renames, "requires": requires}


def apply_rules(request: ChatRequest, drops: frozenset[str], renames: dict[str, str],
                requires: dict[str, Any]) -> tuple[ChatRequest, list[str]]:
    """The request as this model takes it, and the parameters the caller set that were dropped.

    The caller's request is never changed: an attempt on another model starts from it again.
    Only the parameters the rules name are looked at (no dump of the request: this runs per attempt)."""
    declared = type(request).model_fields
    extra = request.model_extra or {}

    def value(name: str) -> Any:
        return getattr(request, name) if name in declared else extra.get(name)

    dropped = sorted(name for name in drops if value(name) is not None)
    moved = {old: new for old, new in renames.items() if old not in drops and value(old) is not None}
    missing = {name: v for name, v in requires.items() if value(name) is None}
    if not (dropped or moved or missing):
        return request, []
    update: dict[str, Any] = {}
    extra = dict(extra)
    for name in dropped:
        if name in declared:
            update[name] = None
        else:
            extra.pop(name, None)
    for old, new in moved.items():
        moved_value = value(old)
        if old in declared:
            update[old] = None
        else:
            extra.pop(old, None)
        if new in declared:
            update[new] = moved_value
        else:
            extra[new] = moved_value
    for name, required in missing.items():
        if name in declared:
            update[name] = required
        else:
            extra[name] = required
    changed = request.model_copy(update=update)
    # model_copy shares the original's extras dict; the copy gets its own
    object.__setattr__(changed, "__pydantic_extra__", extra)
    return changed, dropped


__all__ = ["ParamRule", "apply_rules", "rules_for"]
