"""The admin Stats RPC and `guardianctl stats`: counts from the audit trail, the memories and the keys."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from shared.rpc.guardian.v1 import admin_pb2
from tests.support.harness import agent_pb2, running_guardian

pb = agent_pb2


def test_stats_count_what_the_trail_holds() -> None:
    with running_guardian() as guardian:
        token = guardian.add_agent("counter")
        channel, stub = guardian.agent_stub()
        with channel:
            session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
            for text in ("one", "two", "<script>held</script>"):
                stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content=text)))
            for _ in range(2):
                with pytest.raises(grpc.RpcError):
                    stub.Get(pb.GetRequest(session_id=session, id="mem_" + "0" * 32))
        stats = guardian.admin("Stats", admin_pb2.StatsRequest())
        counts = {(row.agent, row.operation, row.decision): row.count for row in stats.requests}
        assert counts[("counter", "memory.store", "allow")] == 3
        assert counts[("counter", "memory.get", "deny")] == 2
        audited = sum(1 for row in guardian.audit_rows() if row["ts_ms"] >= stats.since_ms)
        assert sum(row.count for row in stats.requests) == audited - 1  # all but the Stats call's own row
        assert [(n.namespace, n.active, n.quarantined) for n in stats.namespaces] == [("counter", 2, 1)]
        assert stats.quarantined == 1 and stats.open_incidents == 0
        assert {key.ring for key in stats.primary_keys} == {"memory", "audit", "token", "database", "audit-signing"}
        assert stats.until_ms - stats.since_ms == 24 * 3600 * 1000  # the last 24 hours

        now = int(time.time() * 1000)
        later = guardian.admin("Stats", admin_pb2.StatsRequest(since_ms=now + 60_000, until_ms=now + 120_000))
        assert list(later.requests) == []
        with pytest.raises(grpc.RpcError) as caught:
            guardian.admin("Stats", admin_pb2.StatsRequest(since_ms=10, until_ms=5))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "until_ms" in str(caught.value.details())

        printed = guardian.ctl("stats", "--since", "1h")
        assert printed.returncode == 0, printed.stderr
        assert "memory.store" in printed.stdout and "quarantined" in printed.stdout and "one" not in printed.stdout
        as_json = json.loads(guardian.ctl("--json", "stats").stdout)
        assert as_json["quarantined"] == "1"  # uint64 in JSON is a string
