"""Every method is covered, and a socket serves only its own service.

``test_every_method_has_a_strategy_and_expectations`` fails when a proto
gains a method that has no row in ``checks.ALLOWED`` (which refusals are
legitimate for it) or whose request type the generator cannot draw, and when
a row names a method that no longer exists. ``test_foreign_and_unknown_methods``
fuzzes method paths: each service's methods on the other socket, and made-up
paths, must all be UNIMPLEMENTED (and audited, checked when the session ends).
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import counting
from tests.fuzz.checks import ALLOWED, check_process, every_method, fail
from tests.fuzz.protogen import build_message, raw_payloads, request_trees
from tests.fuzz.world import AdminWorld, AgentWorld

_SOCKETS = ("agent", "admin")
_SERVES = {"agent": "guardian.v1.AgentService", "admin": "guardian.v1.AdminService"}


def test_every_method_has_a_strategy_and_expectations() -> None:
    """Every method has its row in ALLOWED and request strategies; no row is stale."""
    described = {(method.containing_service.full_name, method.name) for method in every_method()}
    expected = {(service, name) for service, rows in ALLOWED.items() for name in rows}
    assert described - expected == set(), f"methods with no row in checks.ALLOWED: {sorted(described - expected)}"
    assert expected - described == set(), f"rows in checks.ALLOWED for no method: {sorted(expected - described)}"
    for method in every_method():
        request_trees(method.input_type).validate()
        raw_payloads(method.input_type).validate()
        # An empty tree builds the empty request: the builder knows every request type.
        assert build_message(GetMessageClass(method.input_type), {}, str).ByteSize() == 0


_PATHS = st.one_of(
    st.sampled_from([f"/{method.containing_service.full_name}/{method.name}" for method in every_method()]),
    st.from_regex(r"/guardian\.v1\.(AgentService|AdminService)/[A-Za-z]{1,30}", fullmatch=True),
    st.from_regex(r"/[A-Za-z0-9_.]{1,40}/[A-Za-z0-9_]{1,40}", fullmatch=True),
    st.sampled_from(
        (
            "/guardian.v1.AgentService/",
            "/guardian.v1.agentservice/store",
            "//",
            "/x",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        )
    ),
)


@pytest.mark.parametrize("socket", _SOCKETS)
@given(path=_PATHS, payload=st.binary(max_size=64))
def test_foreign_and_unknown_methods(
    agent: AgentWorld, admin: AdminWorld, socket: str, path: str, payload: bytes
) -> None:
    """A path this socket does not serve is UNIMPLEMENTED; one it serves answers with an allowed code."""
    prop = f"method_paths[{socket}]"
    counting.tried(prop)
    world_guardian = agent.guardian if socket == "agent" else admin.guardian
    channel = agent.channel if socket == "agent" else admin.channel
    service, _, name = path.strip("/").rpartition("/")
    served = service == _SERVES[socket] and name in ALLOWED[service]
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=5)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
    counting.outcome(prop, code.name)
    check_process(prop, world_guardian)
    if not served and code != grpc.StatusCode.UNIMPLEMENTED:
        fail(prop, f"{path} on the {socket} socket answered {code.name}, not UNIMPLEMENTED")
    if served and code not in ALLOWED[service][name]:
        fail(prop, f"{path} on the {socket} socket answered {code.name}")
