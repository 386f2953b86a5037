"""Opt-in OpenTelemetry traces of the gateway's requests.

On when the `otel` extra is installed and `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, or `[telemetry] otel = true`. Otherwise nothing
here imports OpenTelemetry and the gateway runs as it would without it (`tracer` returns None).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Any

from ..core.errors import ConfigError

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
EXTRA_MISSING = "OpenTelemetry traces need the otel extra: pip install 'p402-tui[otel]'"

_traces: Any = None  # the process's otel.Traces, made on first use


def wanted(settings: Any) -> bool:
    """Whether the configuration asks for traces (installed or not)."""
    return settings.file.telemetry.otel or any(settings.env.get(name) for name in ENDPOINT_VARIABLES)


def installed() -> bool:
    """Whether the otel extra is there (looked up only once traces are asked for)."""
    try:
        return importlib.util.find_spec("opentelemetry.sdk") is not None and (
            importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
        )
    except ModuleNotFoundError:  # not even the `opentelemetry` namespace
        return False


def tracer(settings: Any) -> Callable[[Any, float], None] | None:
    """The gateway's per-request observer that records its trace, or None when traces are off.

    `[telemetry] otel = true` without the extra is a configuration error; an OTEL_* endpoint
    without it only a warning, since the variable may be meant for other programs."""
    global _traces
    if not wanted(settings):
        return None
    if not installed():
        if settings.file.telemetry.otel:
            raise ConfigError(f"[telemetry] otel = true: {EXTRA_MISSING}")
        logging.getLogger("p402.telemetry").warning("%s; tracing is off", EXTRA_MISSING)
        return None
    if _traces is None:
        from .otel import Traces

        _traces = Traces()
    return _traces.observe


def shutdown() -> None:
    """Send the spans still buffered, then stop exporting (at the process's end)."""
    global _traces
    if _traces is not None:
        _traces.shutdown()
        _traces = None
