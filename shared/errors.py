"""The one error hierarchy of agent-guardian.

Every error a request can end in is one of these. How each crosses the
socket and how each is shown (its gRPC status, an MCP tool error or a
protocol error, guardianctl's wording and exit status) is its row in the one
table, ``shared/error_table.py``, which the guardian (``guardian/service/status.py``),
the gateway (``gateway/client.py``, ``gateway/outcomes.py``) and guardianctl
all read::

    GuardianError                 message is safe to show an agent
    ├── InvalidArgument           shape, size, format
    ├── PermissionDenied          policy or content filter
    │   └── ContentRefused        a filter rule (named) refused content
    ├── RateLimited               retry_after_ms says when
    ├── Unauthenticated           no, bad or expired session/token
    ├── NotFound                  no such object visible to the caller
    ├── FailedPrecondition        not in a state where the request can run
    ├── Unavailable               retryable
    ├── DataLoss                  an HMAC that does not verify
    ├── InternalError             never carries detail
    └── ConfigError               an operator's bad file or key (start-up, guardianctl)

Messages are short, name what was wrong and what to do, and never echo
memory content, a token, a key, a matched secret or a filesystem path.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigError",
    "ContentRefused",
    "DataLoss",
    "FailedPrecondition",
    "GuardianError",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "Unauthenticated",
    "Unavailable",
]


class GuardianError(Exception):
    """Base of every agent-guardian error; ``str(err)`` is safe to show an agent."""

    #: A stable, machine-readable name of the kind of error.
    kind: ClassVar[str] = "error"
    #: Whether the same request may succeed if simply sent again later.
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(GuardianError):
    """The request's shape is wrong: a missing, mistyped, malformed or oversized field."""

    kind = "invalid_argument"


class PermissionDenied(GuardianError):
    """The policy or a content filter refuses the request."""

    kind = "permission_denied"


class ContentRefused(PermissionDenied):
    """A content filter rule refused the request (its rule id is safe to show; the match never is)."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class RateLimited(GuardianError):
    """A rate limit or cooldown refuses the request for now."""

    kind = "rate_limited"
    retryable = True

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        if retry_after_ms < 0:
            raise ValueError("retry_after_ms must be >= 0")
        self.retry_after_ms = retry_after_ms


class Unauthenticated(GuardianError):
    """No session, an unknown or expired session, or a wrong or revoked token."""

    kind = "unauthenticated"


class NotFound(GuardianError):
    """No such object visible to the caller."""

    kind = "not_found"


class FailedPrecondition(GuardianError):
    """The system is not in a state where the request can run (e.g. a name already taken)."""

    kind = "failed_precondition"


class Unavailable(GuardianError):
    """The guardian cannot be reached or is shutting down; retrying later may succeed."""

    kind = "unavailable"
    retryable = True


class DataLoss(GuardianError):
    """Stored data failed its integrity check; it is never returned."""

    kind = "data_loss"


class InternalError(GuardianError):
    """A bug or an unexpected fault. The detail stays in the guardian's log."""

    kind = "internal"

    def __init__(self, message: str = "internal error") -> None:
        super().__init__(message)


class ConfigError(GuardianError):
    """An operator's configuration, policy or key file is invalid; raised at load."""

    kind = "config"
