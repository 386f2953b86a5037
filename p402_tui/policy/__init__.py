"""Per-key policy: roles, budgets, rate limits, model rules and guardrails.

The gateway asks `PolicyEngine.enforce` once per model call, on every surface;
the orchestrator then asks the request's `Admission` before going upstream
(budget and tokens on the router's worst-case estimate) and settles it after.
"""
