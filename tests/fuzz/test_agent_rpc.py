"""Fuzz every AgentService method over the real agent socket: descriptor-built requests and raw bytes.

Properties (tests/fuzz/checks.py): only the status codes the method may
legitimately answer with; no crash, no hang; no answer holds a planted
marker, a token or a key; every memory returned is readable by the fuzzing
agent, active when read, never a planted one; no Update or Delete of a
planted memory succeeds. The guardian must still serve after each test, and
(at the end of the session) every call has its audit row and the planted
memories are unchanged.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given
from hypothesis import strategies as st

from shared.rpc.guardian.v1 import agent_pb2
from tests.fuzz import counting
from tests.fuzz.checks import budget_s, check_answer, methods, send
from tests.fuzz.protogen import Ref, apply_mutations, build_message, raw_payloads, request_trees
from tests.fuzz.world import AgentWorld

AGENT_METHODS = {method.name: method for method in methods(agent_pb2, "AgentService")}


def _resolver(world: AgentWorld, method: MethodDescriptor) -> Any:
    """The world's resolver, except that CloseSession never closes the main session (it gets a fresh one)."""

    def resolve(ref: Ref) -> str:
        """The world's value for ref (a fresh session in place of the main one for CloseSession)."""
        if method.name == "CloseSession" and ref == Ref("session", "main"):
            return world.fresh_session()
        return world.resolve(ref)

    return resolve


def _build(world: AgentWorld, method: MethodDescriptor, tree: dict[str, Any]) -> Message:
    """The request a tree describes, its Refs resolved now."""
    return build_message(GetMessageClass(method.input_type), tree, _resolver(world, method))


def _call(world: AgentWorld, prop: str, method: MethodDescriptor, payload: bytes) -> None:
    """Send one input and hold the answer to every property; learn from it; close a session it opened."""
    counting.tried(prop)
    answer = send(world.channel, method, payload, budget_s(method, payload, 0))
    response = check_answer(
        prop,
        world.guardian,
        method,
        payload,
        answer,
        forbidden=world.forbidden,
        namespaces=world.namespaces,
        forbidden_ids=world.forbidden_ids,
    )
    if response is None:
        return
    world.learn(method.name, GetMessageClass(method.input_type).FromString(payload), response)
    if method.name == "OpenSession":
        opened: Any = response
        world.stub.CloseSession(agent_pb2.CloseSessionRequest(session_id=opened.session_id), timeout=15)


@pytest.mark.parametrize("name", sorted(AGENT_METHODS))
@given(data=st.data())
def test_agent_structured(agent: AgentWorld, name: str, data: st.DataObject) -> None:
    """Requests built from the descriptor, with a valid session most of the time."""
    method = AGENT_METHODS[name]
    tree = data.draw(request_trees(method.input_type), label="request")
    payload = _build(agent, method, tree).SerializeToString()
    _call(agent, f"agent_structured[{method.name}]", method, payload)


@pytest.mark.parametrize("name", sorted(AGENT_METHODS))
@given(data=st.data())
def test_agent_raw(agent: AgentWorld, name: str, data: st.DataObject) -> None:
    """Random bytes, and serialized requests mutated, through a raw channel."""
    method = AGENT_METHODS[name]
    kind, body, mutations = data.draw(raw_payloads(method.input_type), label="payload")
    payload = body if kind == "random" else apply_mutations(_build(agent, method, body).SerializeToString(), mutations)
    _call(agent, f"agent_raw[{method.name}]", method, payload)
