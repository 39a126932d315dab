"""The one place guardian errors become gRPC statuses.

Messages are passed through as written (they are made safe to show an
agent); InternalError always goes out as a bare "internal error", and a
RateLimited carries ``retry-after-ms`` in the trailing metadata.
"""

from __future__ import annotations

from typing import Any, Final, NoReturn

import grpc
import grpc.aio

from shared.errors import (
    ConfigError,
    DataLoss,
    FailedPrecondition,
    GuardianError,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from shared.formats import RETRY_AFTER_METADATA_KEY

__all__ = ["STATUS_OF", "abort_with", "status_of"]

_MAX_MESSAGE_CHARS: Final = 1000

STATUS_OF: Final[dict[type[GuardianError], grpc.StatusCode]] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DataLoss: grpc.StatusCode.DATA_LOSS,
    InternalError: grpc.StatusCode.INTERNAL,
    ConfigError: grpc.StatusCode.INTERNAL,
}


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: GuardianError) -> NoReturn:
    """End the call with the status that error maps to."""
    code = status_of(error)
    if code is grpc.StatusCode.INTERNAL:
        await context.abort(code, "internal error")
    if isinstance(error, RateLimited):
        context.set_trailing_metadata(((RETRY_AFTER_METADATA_KEY, str(error.retry_after_ms)),))
    # Messages are short by construction; the bound keeps any one within gRPC's metadata limits.
    await context.abort(code, error.message[:_MAX_MESSAGE_CHARS])


def status_of(error: GuardianError) -> grpc.StatusCode:
    """The status code of error: the nearest class in the hierarchy decides (ContentRefused is a PermissionDenied)."""
    return next((STATUS_OF[kind] for kind in type(error).__mro__ if kind in STATUS_OF), grpc.StatusCode.INTERNAL)
