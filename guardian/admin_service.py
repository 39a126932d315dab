"""The admin service's handlers: the only implementation of guardian.v1.AdminService.

Served only on the admin socket. Every call is audited like an agent's,
with the caller recorded as the admin socket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guardian.core import GuardianCore
from guardian.database import Connection
from guardian.pipeline import Call
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = ["AdminHandlers"]

Work = Callable[[Connection], Any]


class AdminHandlers:
    """One method per AdminService RPC, named as the RPC."""

    def __init__(self, core: GuardianCore) -> None:
        self._core = core

    def AddAgent(self, call: Call, request: pb.AddAgentRequest) -> Work:
        call.object_id = request.name

        def work(connection: Connection) -> pb.AddAgentResponse:
            token = self._core.agents.add(connection, request.name, call.now_ms)
            return pb.AddAgentResponse(name=request.name, token=token)

        return work

    def ListAgents(self, call: Call, request: pb.ListAgentsRequest) -> Work:
        def work(connection: Connection) -> pb.ListAgentsResponse:
            return pb.ListAgentsResponse(
                agents=[
                    pb.AgentInfo(
                        name=agent.name,
                        created_at_ms=agent.created_at_ms,
                        revoked_at_ms=agent.revoked_at_ms or 0,
                        open_sessions=self._core.sessions.count(agent.name, call.now_ms),
                        memories=self._core.memories.count(connection, agent.name),
                    )
                    for agent in self._core.agents.list(connection)
                ]
            )

        return work

    def RevokeAgent(self, call: Call, request: pb.RevokeAgentRequest) -> Work:
        call.object_id = request.name

        def work(connection: Connection) -> pb.RevokeAgentResponse:
            self._core.agents.revoke(connection, request.name, call.now_ms)
            # Under the writer lock, so no OpenSession of this agent can slip in between.
            return pb.RevokeAgentResponse(sessions_ended=self._core.sessions.end_agent(request.name))

        return work
