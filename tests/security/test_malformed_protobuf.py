"""Request bytes that are not the message they claim to be, sent to every agent method.

A compromised gateway need not use the stubs: it can send truncated fields, wrong
wire types, fields the contract does not define, nesting without end, or no message
at all. Each must be INVALID_ARGUMENT (never INTERNAL or UNKNOWN), audited under the
method's operation before any session is looked at (so the row names no agent), and
leave the guardian serving.
"""

from __future__ import annotations

from typing import Final

import grpc
import pytest

from tests.security.hostile import AGENT_METHODS, OPERATION, Attack, AuditWatch, marker, raw_call, refused
from tests.security.wire import END_GROUP, FIXED64, START_GROUP, VARINT, field, key, varint
from tests.support.harness import Guardian

MARK: Final = marker()

#: (attack, the request bytes), each sent to every agent method.
PAYLOADS: Final[tuple[tuple[Attack, bytes], ...]] = (
    (Attack("protobuf.garbage", "bytes that are no protobuf at all"), b"\xff\xff\xff\xff" + MARK.encode()),
    (
        Attack("protobuf.truncated-varint", "a varint whose continuation bit promises a byte that never comes"),
        b"\x08\x80",
    ),
    (
        Attack("protobuf.length-overrun", "a length-delimited field claiming 100 bytes and holding 14"),
        key(1, 2) + varint(100) + MARK.encode(),
    ),
    (
        Attack("protobuf.overlong-varint", "an 11-byte varint (at most 10 are valid)"),
        key(3, VARINT) + b"\xff" * 10 + b"\x01",
    ),
    (Attack("protobuf.field-number-zero", "a field numbered 0, which no message may have"), field(0, MARK.encode())),
    (Attack("protobuf.wire-type-7", "a field of wire type 7, which does not exist"), bytes([1 << 3 | 7]) + b"\x00"),
    (
        Attack("protobuf.string-as-varint", "field 1 (a string in every request) sent as a varint"),
        key(1, VARINT) + varint(2**63),
    ),
    (
        Attack("protobuf.string-as-fixed64", "field 1 (a string in every request) sent as a fixed64"),
        key(1, FIXED64) + b"\x01" * 8,
    ),
    (
        Attack("protobuf.unknown-field", "a field number the contract does not define (smuggled data)"),
        field(1, b"ses_x") + field(99, MARK.encode()),
    ),
    (
        Attack("protobuf.unknown-group-nesting", "unknown groups nested 10,000 deep, to exhaust a recursive parser"),
        key(100, START_GROUP) * 10_000 + key(100, END_GROUP) * 10_000,
    ),
    (Attack("protobuf.stray-end-group", "an end-group tag with no group open"), key(5, END_GROUP)),
    (
        Attack("protobuf.huge-field-number", "a field number over the maximum (2^29 - 1)"),
        varint((1 << 29) << 3 | 2) + b"\x01a",
    ),
)

NO_MESSAGE: Final = Attack("protobuf.no-message", "a unary call that ends without sending any request message")
ATTACKS: Final = (*(attack for attack, _ in PAYLOADS), NO_MESSAGE)


@pytest.mark.parametrize(("attack", "payload"), [pytest.param(a, p, id=a.id) for a, p in PAYLOADS])
@pytest.mark.parametrize("method", AGENT_METHODS)
def test_malformed_bytes_are_refused_on_every_method(
    guardian: Guardian, attack: Attack, payload: bytes, method: str
) -> None:
    refused(
        guardian,
        lambda: raw_call(guardian, method, payload),
        grpc.StatusCode.INVALID_ARGUMENT,
        OPERATION[method],
        payloads=[MARK],
        agent="",
    )


def test_a_call_without_a_message_is_refused_and_audited(guardian: Guardian) -> None:
    # A client-streaming call on a unary method: the request stream ends before any message.
    with grpc.insecure_channel(f"unix:{guardian.agent_socket}") as channel:
        for method in AGENT_METHODS:
            watch = AuditWatch(guardian)
            call = channel.stream_unary(
                f"/guardian.v1.AgentService/{method}", request_serializer=None, response_deserializer=None
            )
            with pytest.raises(grpc.RpcError) as caught:
                call(iter(()), timeout=20)
            code = caught.value.code()
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {code.name}: {caught.value.details()}"
            assert [(row["operation"], row["decision"]) for row in watch.rows()] == [(OPERATION[method], "deny")]
