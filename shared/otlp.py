"""OpenTelemetry spans, exported over OTLP/HTTP when an endpoint is configured (off by default).

Each process names itself (``service.name``): the gateway's spans are the MCP SDK's own
(one per request, made by its OpenTelemetry middleware once a tracer provider is set);
the guardian makes one per request (guardian/service/pipeline.py), a child of the span
whose ``traceparent`` the gateway sent (shared/trace.py). Spans carry the operation, the
outcome and ids, never memory content or a token. An unreachable collector costs the
exporter's retries in its own thread, never a request.

The SDK and its exporter are imported only by ``export_spans``: a process that does not
export spans (the default) never loads them (about 3 MiB of resident memory).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable

from opentelemetry import trace

from shared.errors import ConfigError

__all__ = ["check_endpoint", "export_spans", "exporting"]

_exporting = False


def exporting() -> bool:
    """Whether this process exports spans (so that making one is worth its cost)."""
    return _exporting


def check_endpoint(url: str, where: str) -> str:
    """url as an OTLP/HTTP traces endpoint (http or https, with a host); ConfigError naming where otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: expected an http(s):// OTLP traces URL, e.g. http://127.0.0.1:4318/v1/traces")
    return url


def export_spans(service: str, endpoint: str) -> Callable[[], None]:
    """Send every span this process makes to endpoint, from now on; the function that flushes and stops it."""
    global _exporting  # noqa: PLW0603 - one switch per process, set once at start
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415 - see above
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5)))
    trace.set_tracer_provider(provider)
    _exporting = True
    return provider.shutdown
