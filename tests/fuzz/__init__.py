"""Property-based fuzzing (hypothesis) of the guardian's two gRPC services and the gateway's MCP tools.

Every test here drives real processes: a guardian on real Unix sockets
(``tests/support/harness.py``) and, for the MCP tools, a real stdio gateway reached
with the real MCP client (``tests/support/mcp_harness.py``). The settings profiles
("fast", the default, and "long") are registered in ``conftest.py``; choose
one with ``HYPOTHESIS_PROFILE``. ``make fuzz-long`` runs the long profile and
prints how many inputs were tried.
"""
