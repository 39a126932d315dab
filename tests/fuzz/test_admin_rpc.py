"""Fuzz every AdminService method over the real admin socket: descriptor-built requests and raw bytes.

The admin fuzzer has its own guardian (tests/fuzz/world.py), so what it
changes (agents revoked, memories released or purged, policies applied)
cannot disturb the agent fuzzers. Properties (tests/fuzz/checks.py): only
the status codes the method may legitimately answer with (no session and no
rate limit here, so never UNAUTHENTICATED or RESOURCE_EXHAUSTED); no crash,
no hang; no answer holds a key, an existing agent's token or the content of
an active memory, and the content of a quarantined one only in a
ShowQuarantined answer.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given
from hypothesis import strategies as st

from shared.rpc.guardian.v1 import admin_pb2
from tests.fuzz import counting
from tests.fuzz.checks import budget_s, check_answer, methods, send
from tests.fuzz.protogen import apply_mutations, build_message, raw_payloads, request_trees
from tests.fuzz.world import AdminWorld

ADMIN_METHODS = {method.name: method for method in methods(admin_pb2, "AdminService")}


def _call(world: AdminWorld, prop: str, method: MethodDescriptor, payload: bytes) -> None:
    """Send one input and hold the answer to every property; learn from it."""
    counting.tried(prop)
    answer = send(world.channel, method, payload, budget_s(method, payload, len(world.guardian.calls) * 2))
    response = check_answer(
        prop,
        world.guardian,
        method,
        payload,
        answer,
        forbidden=world.forbidden,
        held=world.held_only,
        held_allowed=method.name == "ShowQuarantined",
    )
    if response is not None:
        world.learn(method.name, GetMessageClass(method.input_type).FromString(payload), response)


@pytest.mark.parametrize("name", sorted(ADMIN_METHODS))
@given(data=st.data())
def test_admin_structured(admin: AdminWorld, name: str, data: st.DataObject) -> None:
    """Requests built from the descriptor (names, ids and versions the guardian issued, most of the time)."""
    method = ADMIN_METHODS[name]
    tree = data.draw(request_trees(method.input_type), label="request")
    payload = build_message(GetMessageClass(method.input_type), tree, admin.resolve).SerializeToString()
    _call(admin, f"admin_structured[{method.name}]", method, payload)


@pytest.mark.parametrize("name", sorted(ADMIN_METHODS))
@given(data=st.data())
def test_admin_raw(admin: AdminWorld, name: str, data: st.DataObject) -> None:
    """Random bytes, and serialized requests mutated, through a raw channel."""
    method = ADMIN_METHODS[name]
    kind, body, mutations = data.draw(raw_payloads(method.input_type), label="payload")
    if kind == "random":
        payload = body
    else:
        message = build_message(GetMessageClass(method.input_type), body, admin.resolve)
        payload = apply_mutations(message.SerializeToString(), mutations)
    _call(admin, f"admin_raw[{method.name}]", method, payload)
