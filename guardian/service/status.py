"""The one place guardian errors become gRPC statuses.

The status of each error is its row of ``shared/error_table.py`` (the nearest
class in the hierarchy decides: ContentRefused is a PermissionDenied).
Messages are passed through as written (they are made safe to show an
agent); INTERNAL always goes out as a bare "internal error", and a
RateLimited carries ``retry-after-ms`` in the trailing metadata.
"""

from __future__ import annotations

from typing import Any, Final, NoReturn

import grpc
import grpc.aio

from shared.error_table import error_row
from shared.errors import GuardianError, RateLimited
from shared.formats import RETRY_AFTER_METADATA_KEY

__all__ = ["abort_with", "status_of"]

_MAX_MESSAGE_CHARS: Final = 1000


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
    """The status code of error, from the error table."""
    return grpc.StatusCode[error_row(error).status]
