"""The one table of agent-guardian's errors: how each crosses the socket and how each is shown.

One row per class of ``shared.errors``; nothing else maps errors to statuses,
MCP outcomes or exit codes:

- the guardian (``guardian/service/status.py``) answers an error with its row's
  ``status``; the nearest class in the hierarchy decides, so a ContentRefused
  goes out as PERMISSION_DENIED;
- the gateway (``gateway/client.py``) turns a status back into the class whose
  row ``receives`` it, passing the status details on only if the row
  ``carries_details`` (else the row's ``default_message``, which is also used
  when a status arrives without details); ``gateway/outcomes.py`` makes an
  ``agent_actionable`` error an MCP tool error (an ``isError`` result) and any
  other a protocol error (``MCPError``);
- ``guardianctl`` turns a status into a class the same way, prints
  ``guardianctl: <cli_prefix>: <details>`` and exits with the row's
  ``exit_code``.

``receives`` lists a row's own status plus the aliases only a client sees
(DEADLINE_EXCEEDED and CANCELLED are an unavailable guardian; UNKNOWN,
UNIMPLEMENTED and every other code the guardian never sends are a fault). A
row receiving nothing never arrives as itself: a ContentRefused arrives as a
PermissionDenied (the rule is not sent), a ConfigError as an InternalError.

Status codes are named by ``grpc.StatusCode`` member name (``StatusName``), so
this module needs no grpc and a misspelt name fails type checking.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from shared.errors import (
    ConfigError,
    ContentRefused,
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

__all__ = ["ERROR_TABLE", "ErrorRow", "StatusName", "error_row", "received_row"]

#: The name of every ``grpc.StatusCode`` member.
StatusName = Literal[
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorRow:
    """How one error class crosses the socket and how the gateway and guardianctl show it."""

    #: The class this row is about.
    error: type[GuardianError]
    #: The status the guardian answers this error with.
    status: StatusName
    #: The statuses the gateway and guardianctl turn into this class (none: it arrives as another).
    receives: tuple[StatusName, ...]
    #: True: an MCP tool error (a smarter model could have avoided it); False: a protocol error.
    agent_actionable: bool
    #: Whether the gateway passes the status details on; if not, an agent always sees ``default_message``.
    carries_details: bool
    #: The message when the details are not passed on or a status arrives without any.
    default_message: str
    #: What guardianctl prints before the details, for a human.
    cli_prefix: str
    #: guardianctl's exit status.
    exit_code: int


ERROR_TABLE: Final[tuple[ErrorRow, ...]] = (
    ErrorRow(
        error=InvalidArgument,
        status="INVALID_ARGUMENT",
        receives=("INVALID_ARGUMENT",),
        agent_actionable=True,
        carries_details=True,
        default_message="the request is malformed",
        cli_prefix="invalid request",
        exit_code=1,
    ),
    ErrorRow(
        error=PermissionDenied,
        status="PERMISSION_DENIED",
        receives=("PERMISSION_DENIED",),
        agent_actionable=True,
        carries_details=True,
        default_message="the policy does not allow this request",
        cli_prefix="refused by policy",
        exit_code=1,
    ),
    ErrorRow(
        error=ContentRefused,
        status="PERMISSION_DENIED",
        receives=(),  # arrives as a PermissionDenied: the rule id is in the message, not on the wire
        agent_actionable=True,
        carries_details=True,
        default_message="content refused by a filter",
        cli_prefix="refused by a content filter",
        exit_code=1,
    ),
    ErrorRow(
        error=RateLimited,
        status="RESOURCE_EXHAUSTED",
        receives=("RESOURCE_EXHAUSTED",),
        agent_actionable=True,
        carries_details=True,
        default_message="rate limit reached",
        cli_prefix="rate limited",
        exit_code=1,
    ),
    ErrorRow(
        error=Unauthenticated,
        status="UNAUTHENTICATED",
        receives=("UNAUTHENTICATED",),
        agent_actionable=False,
        carries_details=True,
        default_message="the session is unknown or has expired",
        cli_prefix="not authenticated",
        exit_code=1,
    ),
    ErrorRow(
        error=NotFound,
        status="NOT_FOUND",
        receives=("NOT_FOUND",),
        agent_actionable=True,
        carries_details=True,
        default_message="not found",
        cli_prefix="not found",
        exit_code=1,
    ),
    ErrorRow(
        error=FailedPrecondition,
        status="FAILED_PRECONDITION",
        receives=("FAILED_PRECONDITION",),
        agent_actionable=True,
        carries_details=True,
        default_message="the request cannot run in the current state",
        cli_prefix="not possible in the current state",
        exit_code=1,
    ),
    ErrorRow(
        error=Unavailable,
        status="UNAVAILABLE",
        # CANCELLED: the gateway never cancels a call it still awaits (that is an asyncio
        # CancelledError), so it comes from a stopping guardian dropping calls it had not started.
        receives=("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"),
        agent_actionable=False,
        carries_details=False,
        default_message="the memory guardian is unavailable; retry in a few seconds",
        cli_prefix="the guardian is unavailable",
        exit_code=3,
    ),
    ErrorRow(
        error=DataLoss,
        status="DATA_LOSS",
        receives=("DATA_LOSS",),
        agent_actionable=False,  # no smarter model avoids a memory that fails its integrity check
        carries_details=True,
        default_message="a stored memory failed its integrity check",
        cli_prefix="integrity check failed",
        exit_code=1,
    ),
    ErrorRow(
        error=InternalError,
        status="INTERNAL",
        # A bug or a fault; OK never comes with an error, so it is one too.
        receives=("INTERNAL", "UNKNOWN", "UNIMPLEMENTED", "ABORTED", "OUT_OF_RANGE", "ALREADY_EXISTS", "OK"),
        agent_actionable=False,
        carries_details=False,
        default_message="internal error",
        cli_prefix="internal error",
        exit_code=1,
    ),
    ErrorRow(
        error=ConfigError,
        status="INTERNAL",  # its detail stays in the guardian's log
        receives=(),  # raised at start-up and by guardianctl itself, which prints its message alone
        agent_actionable=False,
        carries_details=False,
        default_message="internal error",
        cli_prefix="invalid configuration or file",
        exit_code=2,
    ),
)

_BY_CLASS: Final[Mapping[type[GuardianError], ErrorRow]] = MappingProxyType({row.error: row for row in ERROR_TABLE})
_BY_STATUS: Final[Mapping[str, ErrorRow]] = MappingProxyType(
    {status: row for row in ERROR_TABLE for status in row.receives}
)
_FAULT: Final = _BY_CLASS[InternalError]


def error_row(error: GuardianError | type[GuardianError]) -> ErrorRow:
    """The row of an error or error class: the nearest class in the hierarchy that has one (else InternalError's)."""
    kind = error if isinstance(error, type) else type(error)
    return next((_BY_CLASS[base] for base in kind.__mro__ if base in _BY_CLASS), _FAULT)


def received_row(status: str) -> ErrorRow:
    """The row of the class a status (a ``grpc.StatusCode`` name) arrives as; InternalError's for an unknown one."""
    return _BY_STATUS.get(status, _FAULT)
