"""The one error table (shared/error_table.py), as the guardian, the gateway and guardianctl read it."""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn, cast, get_args

import grpc
import grpc.aio
import pytest
from mcp import MCPError
from mcp.types import CallToolResult, TextContent

import shared.errors
from gateway.client import UNAVAILABLE_MESSAGE, _from_status
from gateway.outcomes import mcp_outcome
from guardian.access.key_file import create_key_file
from guardian.ctl.main import _report_rpc_error, main
from guardian.service.status import abort_with, status_of
from shared.error_table import ERROR_TABLE, ErrorRow, StatusName, error_row, received_row
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
    Unavailable,
)
from shared.formats import RETRY_AFTER_METADATA_KEY

MESSAGE = "what was wrong, and what to do"


def _error_classes() -> set[type[GuardianError]]:
    """Every GuardianError subclass that shared.errors defines."""
    return {
        value
        for value in vars(shared.errors).values()
        if inspect.isclass(value) and issubclass(value, GuardianError) and value is not GuardianError
    }


def _example(kind: type[GuardianError]) -> GuardianError:
    """An instance of kind, built with whatever its constructor needs."""
    if kind is ContentRefused:
        return ContentRefused(MESSAGE, rule="aws-access-key-id")
    if kind is RateLimited:
        return RateLimited(MESSAGE, retry_after_ms=1200)
    return kind(MESSAGE)


def _rpc_error(
    code: grpc.StatusCode, details: str = MESSAGE, trailing: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(*trailing),
        details=details,
        debug_error_string="",
    )


class _Aborted(Exception):
    pass


class _Context:
    """The part of a grpc.aio.ServicerContext that abort_with uses, recording what it was given."""

    def __init__(self) -> None:
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        self.code, self.details = code, details
        raise _Aborted


def _sent(error: GuardianError) -> grpc.aio.AioRpcError:
    """The status the guardian answers error with, as the gateway's channel raises it."""
    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(abort_with(cast("grpc.aio.ServicerContext[Any, Any]", context), error))
    assert context.code is not None
    return _rpc_error(context.code, context.details, context.trailing)


def test_every_error_class_has_exactly_one_row() -> None:
    counts = Counter(row.error for row in ERROR_TABLE)
    assert set(counts) == _error_classes()
    assert all(count == 1 for count in counts.values()), counts
    for kind in _error_classes():
        assert error_row(kind).error is kind
        assert error_row(_example(kind)).error is kind


def test_status_names_are_grpc_status_codes() -> None:
    assert set(get_args(StatusName)) == {code.name for code in grpc.StatusCode}
    for row in ERROR_TABLE:
        assert grpc.StatusCode[row.status] in grpc.StatusCode


def test_every_status_code_is_received_as_exactly_one_class() -> None:
    received = Counter(status for row in ERROR_TABLE for status in row.receives)
    assert set(received) == {code.name for code in grpc.StatusCode}  # no code is left to a fallback
    assert all(count == 1 for count in received.values()), received
    for code in grpc.StatusCode:
        assert type(_from_status(_rpc_error(code))) is received_row(code.name).error


def test_a_row_that_receives_anything_receives_its_own_status() -> None:
    for row in ERROR_TABLE:
        assert not row.receives or row.status in row.receives, row


def _arrives_as(row: ErrorRow) -> type[GuardianError]:
    """The class row's error arrives as: itself, or (receiving nothing) its parent or InternalError."""
    if row.receives:
        return row.error
    arrives = received_row(row.status).error
    assert issubclass(row.error, arrives) or arrives is InternalError, row
    return arrives


@pytest.mark.parametrize("row", ERROR_TABLE, ids=lambda row: row.error.__name__)
def test_each_class_round_trips_from_the_guardian_to_the_gateway(row: ErrorRow) -> None:
    sent = _example(row.error)
    status = _sent(sent)
    assert status.code() is status_of(sent) is grpc.StatusCode[row.status]
    back = _from_status(status)
    arrived = _arrives_as(row)
    assert type(back) is arrived
    if error_row(arrived).carries_details:
        assert back.message == MESSAGE
    else:
        assert back.message == error_row(arrived).default_message
    if isinstance(sent, RateLimited):
        assert isinstance(back, RateLimited) and back.retry_after_ms == sent.retry_after_ms


def test_a_status_without_details_gets_the_rows_default_message() -> None:
    for row in ERROR_TABLE:
        for status in row.receives:
            assert _from_status(_rpc_error(grpc.StatusCode[status], details="")).message == row.default_message


def test_what_the_gateway_never_passes_on() -> None:
    assert _from_status(_rpc_error(grpc.StatusCode.UNAVAILABLE, "shutting down")).message == UNAVAILABLE_MESSAGE
    assert _from_status(_rpc_error(grpc.StatusCode.CANCELLED, "x")).message == UNAVAILABLE_MESSAGE
    assert _from_status(_rpc_error(grpc.StatusCode.INTERNAL, "a trace /var/lib/x")).message == "internal error"
    assert _from_status(_rpc_error(grpc.StatusCode.UNKNOWN, "boom")).message == "internal error"
    long = _from_status(_rpc_error(grpc.StatusCode.NOT_FOUND, "n" * 5000))
    assert isinstance(long, NotFound) and 0 < len(long.message) < 5000
    limited = _from_status(
        _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", ((RETRY_AFTER_METADATA_KEY, "750"),))
    )
    assert isinstance(limited, RateLimited) and limited.retry_after_ms == 750


def test_data_loss_is_a_protocol_error_no_retry_fixes() -> None:
    with pytest.raises(MCPError) as caught:
        mcp_outcome(DataLoss("that memory failed its integrity check and is withheld"))
    assert caught.value.message == "that memory failed its integrity check and is withheld"
    assert caught.value.data == {"kind": "data_loss", "retryable": False}


@pytest.mark.parametrize(
    "kind", [InvalidArgument, PermissionDenied, ContentRefused, RateLimited, NotFound, FailedPrecondition]
)
def test_errors_a_smarter_model_avoids_are_tool_errors(kind: type[GuardianError]) -> None:
    result = mcp_outcome(_example(kind))
    assert isinstance(result, CallToolResult) and result.is_error
    block = result.content[0]
    assert isinstance(block, TextContent) and block.text.startswith(f"{kind.kind}: {MESSAGE}")


def test_mcp_outcome_follows_the_actionable_column() -> None:
    for row in ERROR_TABLE:
        error = _example(row.error)
        if row.agent_actionable:
            assert mcp_outcome(error).is_error
        else:
            with pytest.raises(MCPError) as caught:
                mcp_outcome(error)
            assert caught.value.data == {"kind": row.error.kind, "retryable": row.error.retryable}


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda code: code.name)
def test_guardianctl_prints_the_rows_prefix_and_exits_with_its_code(
    code: grpc.StatusCode, capsys: pytest.CaptureFixture[str]
) -> None:
    row = received_row(code.name)
    assert _report_rpc_error(_rpc_error(code, "no agent named bob")) == row.exit_code
    printed = capsys.readouterr().err
    assert printed.startswith(f"guardianctl: {row.cli_prefix}: ")
    assert f"guardianctl: {code.name.lower()}:" not in printed


def test_guardianctl_wording_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert _report_rpc_error(_rpc_error(grpc.StatusCode.PERMISSION_DENIED, "not allowed")) == 1
    assert capsys.readouterr().err == "guardianctl: refused by policy: not allowed\n"
    assert _report_rpc_error(_rpc_error(grpc.StatusCode.NOT_FOUND, "")) == 1
    assert capsys.readouterr().err == "guardianctl: not found\n"
    assert _report_rpc_error(_rpc_error(grpc.StatusCode.INTERNAL, "internal error")) == 1
    assert capsys.readouterr().err == "guardianctl: internal error\n"
    assert _report_rpc_error(_rpc_error(grpc.StatusCode.DATA_LOSS, "row 7 is altered")) == 1
    assert capsys.readouterr().err == "guardianctl: integrity check failed: row 7 is altered\n"
    assert _report_rpc_error(_rpc_error(grpc.StatusCode.UNAVAILABLE, "connect: ENOENT")) == 3
    assert capsys.readouterr().err == (
        "guardianctl: the guardian is unavailable: cannot reach the guardian's admin socket"
        " (is it running, and may this user connect?)\n"
    )
    assert error_row(Unavailable).exit_code == 3 and error_row(ConfigError).exit_code == 2


def test_guardianctl_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.yaml")
    assert main(["--socket", str(tmp_path / "admin.sock"), "policy", "validate", missing]) == 2
    assert capsys.readouterr().err.startswith(f"guardianctl: cannot read {missing}")
    key = tmp_path / "admin.key"
    create_key_file(key, "test")
    assert main(["--socket", str(tmp_path / "admin.sock"), "--key", str(key), "agents", "list"]) == 3
    assert "may this user connect?" in capsys.readouterr().err
    assert main(["--socket", str(tmp_path / "admin.sock"), "--key", str(tmp_path / "none"), "agents", "list"]) == 2
    assert capsys.readouterr().err.startswith("guardianctl: the admin key file")


def test_guardianctl_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for row in ERROR_TABLE:
        assert f"{row.exit_code} " in text and row.cli_prefix in text
