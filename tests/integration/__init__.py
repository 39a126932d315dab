"""Tests against real processes: a guardian on real Unix sockets, real gateways, the real MCP client."""
