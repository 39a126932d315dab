"""Bytes on the wire, built by hand: protobuf fields and HTTP/2 frames.

A compromised gateway is not bound to the generated stubs, so the suite builds
requests from bytes: protobuf fields of any wire type (wrong ones included), and
raw HTTP/2 (the connection preface, frames, HPACK-literal request headers) for
clients that stall part-way through a request.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterable
from typing import Final

__all__ = [
    "DATA",
    "END_GROUP",
    "END_HEADERS",
    "FIXED64",
    "HEADERS",
    "LENGTH_DELIMITED",
    "PREFACE",
    "SETTINGS",
    "SETTINGS_ACK",
    "SETTINGS_FRAME",
    "START_GROUP",
    "VARINT",
    "field",
    "frame",
    "grpc_request_headers",
    "key",
    "message",
    "open_http2",
    "varint",
]

# -- protobuf ------------------------------------------------------------------------------------

VARINT: Final = 0
FIXED64: Final = 1
LENGTH_DELIMITED: Final = 2
START_GROUP: Final = 3
END_GROUP: Final = 4


def varint(value: int) -> bytes:
    """value as a base-128 varint (negative values as their 64-bit two's complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    """The tag that starts a field."""
    return varint(number << 3 | wire_type)


def field(number: int, value: bytes) -> bytes:
    """A length-delimited field (a string, bytes or an embedded message) holding value as is."""
    return key(number, LENGTH_DELIMITED) + varint(len(value)) + value


def message(*fields: bytes) -> bytes:
    """Fields concatenated, as a message body."""
    return b"".join(fields)


# -- HTTP/2 --------------------------------------------------------------------------------------

#: What every HTTP/2 client sends first.
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA: Final = 0x0
HEADERS: Final = 0x1
SETTINGS: Final = 0x4
END_HEADERS: Final = 0x4
ACK: Final = 0x1


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


#: An empty SETTINGS frame, and the acknowledgement of the server's.
SETTINGS_FRAME: Final = frame(SETTINGS, 0, 0)
SETTINGS_ACK: Final = frame(SETTINGS, ACK, 0)


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman coding."""
    encoded_name, encoded_value = name.encode(), value.encode()
    if len(encoded_name) >= 127 or len(encoded_value) >= 127:
        raise ValueError("this encoder only writes short header fields")
    return b"\x00" + bytes([len(encoded_name)]) + encoded_name + bytes([len(encoded_value)]) + encoded_value


def grpc_request_headers(path: str) -> bytes:
    """The HPACK block of a gRPC request's headers for path."""
    headers: Iterable[tuple[str, str]] = (
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    )
    return b"".join(_literal(name, value) for name, value in headers)


def open_http2(path: str, *, settle_s: float = 1.0) -> socket.socket:
    """A Unix-socket connection that has sent the preface and SETTINGS and acknowledged the server's."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(PREFACE + SETTINGS_FRAME)
    sock.settimeout(settle_s)
    with contextlib.suppress(TimeoutError):
        sock.recv(65_536)  # the server's SETTINGS (and perhaps a WINDOW_UPDATE)
    sock.sendall(SETTINGS_ACK)
    return sock
