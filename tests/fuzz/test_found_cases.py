"""Inputs the fuzzers found that broke a property, re-checked on every run (like hypothesis's ``@example``).

Each case is one request, sent over the real socket and held to the same
properties as the fuzzed ones (tests/fuzz/checks.py). A case stays after its
bug is fixed, so the bug cannot come back unnoticed.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import Message

from shared.rpc.guardian.v1 import admin_pb2, agent_pb2
from tests.fuzz import counting
from tests.fuzz.checks import budget_s, check_answer, every_method, send
from tests.fuzz.values import alias_bomb
from tests.fuzz.world import AdminWorld, AgentWorld

_METHODS = {(method.containing_service.name, method.name): method for method in every_method()}
_MAIN_SESSION = "<the fuzzing agent's session>"


#: (case id, service, method, request). A request naming _MAIN_SESSION gets the live session id.
CASES: list[tuple[str, str, str, Message]] = [
    # 306 bytes of YAML whose aliases expand to 9**8 scalars when the policy is hashed: seconds of CPU
    # with the GIL held and hundreds of MB per call (9**9: 36 s and 3.5 GB).
    ("policy-alias-bomb", "AdminService", "ValidatePolicy", admin_pb2.PolicyText(text=alias_bomb(7, 9))),
    # An integer of more than 4300 digits: int() refuses it with ValueError, which is not a YAMLError.
    ("policy-huge-int", "AdminService", "ValidatePolicy", admin_pb2.PolicyText(text="version: 1" + "0" * 5000)),
    ("policy-huge-int-diff", "AdminService", "DiffPolicy", admin_pb2.PolicyText(text="version: 1" + "0" * 5000)),
    # A YAML escape of a lone surrogate: text with no UTF-8, which the policy's version cannot hash
    # (the long profile's find, after the fixes above).
    ("policy-lone-surrogate", "AdminService", "ApplyPolicy", admin_pb2.PolicyText(text='"\\ud800": 1\nversion: 1\n')),
    # Nesting deeper than the parser's recursion: RecursionError, not a YAMLError.
    (
        "policy-deep-nesting",
        "AdminService",
        "ValidatePolicy",
        admin_pb2.PolicyText(text="x: " + "[" * 1200 + "]" * 1200),
    ),
    (
        "policy-deep-mapping",
        "AdminService",
        "ApplyPolicy",
        admin_pb2.PolicyText(text="x: " + "{a: " * 1200 + "1" + "}" * 1200),
    ),
    # A published head whose mac is not ASCII: hmac.compare_digest raises TypeError.
    (
        "verify-audit-non-ascii-mac",
        "AdminService",
        "VerifyAudit",
        admin_pb2.VerifyAuditRequest(published_heads=[admin_pb2.ChainHead(seq=1, mac="\u00e9")]),
    ),
    # A uint64 cursor past the int64 range: SQLite cannot bind it (OverflowError).
    ("query-audit-after-seq-2^63", "AdminService", "QueryAudit", admin_pb2.AuditQuery(after_seq=2**63)),
    # The error message repeats the name, which neither checks (AddAgent does): past about 8 000 characters
    # gRPC's metadata limits drop the answer (sometimes at 10 000, always at 20 000), and the client sees
    # RESOURCE_EXHAUSTED ("received metadata size exceeds hard limit") instead of NOT_FOUND.
    ("unlock-long-name", "AdminService", "UnlockAgent", admin_pb2.UnlockAgentRequest(name="a" * 20_000)),
    ("revoke-long-name", "AdminService", "RevokeAgent", admin_pb2.RevokeAgentRequest(name="a" * 20_000)),
    # Metadata whose JSON escapes a lone surrogate: canonical text cannot be encoded (UnicodeEncodeError).
    (
        "store-metadata-lone-surrogate",
        "AgentService",
        "Store",
        agent_pb2.StoreRequest(
            session_id=_MAIN_SESSION, memory=agent_pb2.MemoryDraft(content="x", metadata_json='{"a": "\\ud800"}')
        ),
    ),
    (
        "update-metadata-lone-surrogate-key",
        "AgentService",
        "Update",
        agent_pb2.UpdateRequest(session_id=_MAIN_SESSION, id="mem_" + "0" * 32, metadata_json='{"\\udfff": 1}'),
    ),
]


_BY_ID = {case[0]: case[1:] for case in CASES}


@pytest.mark.parametrize("case", list(_BY_ID))
def test_found_case(agent: AgentWorld, admin: AdminWorld, case: str) -> None:
    """The case's request, held to the fuzzers' properties."""
    service, name, request_message = _BY_ID[case]
    method = _METHODS[(service, name)]
    prop = f"found_cases[{case}]"
    counting.tried(prop)
    if service == "AgentService":
        message: Any = type(request_message)()
        message.CopyFrom(request_message)
        if message.session_id == _MAIN_SESSION:
            message.session_id = agent.session.session_id
        payload = message.SerializeToString()
        answer = send(agent.channel, method, payload, budget_s(method, payload, 0))
        check_answer(
            prop,
            agent.guardian,
            method,
            payload,
            answer,
            forbidden=agent.forbidden,
            namespaces=agent.namespaces,
            forbidden_ids=agent.forbidden_ids,
        )
    else:
        payload = request_message.SerializeToString()
        answer = send(admin.channel, method, payload, budget_s(method, payload, len(admin.guardian.calls) * 2))
        check_answer(
            prop,
            admin.guardian,
            method,
            payload,
            answer,
            forbidden=admin.forbidden,
            held=admin.held_only,
            held_allowed=name == "ShowQuarantined",
        )
