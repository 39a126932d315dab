"""Hypothesis profiles, the fuzz worlds as fixtures, the after-each-test liveness check, and the input count.

Profiles (``HYPOTHESIS_PROFILE``, default ``fast``):

- ``fast``: what ``make test`` runs; few examples per property, derandomized so
  CI is reproducible, no shrinking (a failure is reported as found; run the
  long profile, or the printed ``@reproduce_failure`` blob, to shrink it).
- ``long``: ``make fuzz-long``; thousands of examples per property, random each
  run, shrinking on.

``FUZZ_EXAMPLES=N`` sets the examples per property of either profile.

Both: no deadline (real processes answer in their own time; the properties
have their own hang budget) and no example database (nothing is written
into the work tree but ``tests/fuzz/.last-run.json`` and hypothesis's
self-ignoring ``tests/fuzz/.hypothesis`` cache).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, settings
from hypothesis.configuration import set_hypothesis_home_dir

from shared.rpc.guardian.v1 import admin_pb2
from tests.fuzz import counting
from tests.fuzz.mcp_world import McpWorld, mcp_world
from tests.fuzz.world import AdminWorld, AgentWorld, admin_world, agent_world
from tests.support.harness import Guardian

set_hypothesis_home_dir(Path(__file__).resolve().parent / ".hypothesis")

#: Examples per property in each profile.
FAST_EXAMPLES: Final = 12
LONG_EXAMPLES: Final = 1000

_COMMON: Final = {
    "deadline": None,
    "database": None,
    "print_blob": True,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
}
settings.register_profile(
    "fast",
    max_examples=FAST_EXAMPLES,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    **_COMMON,  # type: ignore[arg-type]
)
settings.register_profile("long", max_examples=LONG_EXAMPLES, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
if os.environ.get("FUZZ_EXAMPLES"):  # e.g. FUZZ_EXAMPLES=5000 make fuzz-long, for a longer run
    settings.register_profile("chosen", settings(max_examples=int(os.environ["FUZZ_EXAMPLES"])))
    settings.load_profile("chosen")

#: Guardians started by the fixtures, checked after every test.
_STARTED: list[Guardian] = []
_MCP: list[McpWorld] = []


@contextlib.contextmanager
def _watched(world_context: Any) -> Iterator[Any]:
    """Enter a world and have its guardian checked after every test while it lives."""
    with world_context as world:
        _STARTED.append(world.guardian)
        try:
            yield world
        finally:
            _STARTED.remove(world.guardian)


@pytest.fixture(scope="session")
def agent() -> Iterator[AgentWorld]:
    """The agent-socket fuzzers' guardian (shared with the MCP fuzzers)."""
    with _watched(agent_world()) as world:
        yield world


@pytest.fixture(scope="session")
def admin() -> Iterator[AdminWorld]:
    """The admin-socket fuzzer's own guardian."""
    with _watched(admin_world()) as world:
        yield world


@pytest.fixture(scope="session")
def mcp(agent: AgentWorld) -> Iterator[McpWorld]:
    """A real stdio gateway for ``mcp-fuzzer`` on the agent world's guardian, and a real MCP client to it."""
    with mcp_world(agent) as world:
        _MCP.append(world)
        try:
            yield world
        finally:
            _MCP.remove(world)


def _serving(guardian: Guardian) -> None:
    """Alive, both sockets report SERVING, and the admin socket answers a real call."""
    assert guardian.process is not None and guardian.process.poll() is None, "the guardian process has exited"
    for socket in (guardian.agent_socket, guardian.admin_socket):
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, f"{socket} is not serving"
    assert guardian.admin("ShowPolicy", admin_pb2.ShowPolicyRequest()).version


@pytest.fixture(autouse=True)
def still_serving() -> Iterator[None]:
    """After each test: every fuzzed guardian is alive and serving, and every gateway answers."""
    yield
    for guardian in _STARTED:
        _serving(guardian)
    for world in _MCP:
        assert world.list_tool_names(), "the gateway lists no tools"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    """Print how many inputs were tried, per property and in total, and write them to .last-run.json."""
    if not counting.COUNTS:
        return
    figures = counting.write_summary(int(exitstatus))
    write = terminalreporter.write_line
    write("")
    write(f"fuzz ({figures['profile']} profile): inputs tried per property")
    for prop, count in figures["inputs_per_property"].items():
        failing = figures["failing_inputs_per_property"].get(prop, 0)
        write(f"  {prop:<48} {count:>7}" + (f"   failing inputs: {failing}" if failing else ""))
    write(
        f"fuzz: {figures['total_inputs']} inputs tried in total in {figures['seconds']} s; "
        f"guardian crashes: {figures['crashes']}; properties failing: {len(figures['failing_inputs_per_property'])}"
        f" (figures in {counting.LAST_RUN})"
    )
