"""MCP clients for the system test; they run INSIDE the throwaway root, with the installed venv's Python.

The real MCP client (``mcp.Client`` over streamable HTTP) talks to the installed
gateway at ``--url`` with the agent token read from a file (never from the
command line, which any user can read in /proc). Every command prints one JSON
document on stdout.

    store  --token-file F --content TEXT [TEXT ...]     {"ids": ["mem_...", ...]}  (one session)
    get    --token-file F --id ID             {"content": "..."}
    list   --token-file F                     {"memories": [{"id": ..., "content": ...}, ...]}  (every page)
    search --token-file F --query TEXT [TEXT ...] [--mode hybrid|lexical|semantic]
           {"results": [{"query": ..., "hits": [{"id", "content", "score", "found_by"}, ...], "note": ...}, ...]}
           (one memory_search a query, on one session)
    load   --token-file F [F ...] --out FILE --stop-file FILE
           one client per token file, each storing memories in a loop until
           the stop file appears; FILE gets every call: client, start and end
           (time.monotonic(), the clock systemd's *TimestampMonotonic use),
           outcome ("ok"; the gateway's error kind, e.g. "unavailable", with
           whether it is retryable; "tool_error"; "transport" when the
           connection broke under the call; "connect" when no session could be
           opened; "hung" after CALL_TIMEOUT_S), the memory id or the error
           text. A client whose connection broke (the gateway restarted)
           connects again.

It imports only the standard library and the gateway's own dependencies (mcp,
httpx2), so it runs from the installed venv without this repository's tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import ssl
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

#: A call that takes longer than this is recorded as hung (the test asserts far less).
CALL_TIMEOUT_S = 30.0
#: Pause between one client's writes, so four clients make a steady load, not a flood.
PACE_S = 0.02
#: Pause after a failed call or connection before the next attempt.
RETRY_PAUSE_S = 0.1


#: A CA file to trust for an https URL (--ca; a proxy's own certificate in the TLS test), else the system's.
_TRUST: list[ssl.SSLContext | bool] = [True]


@contextlib.asynccontextmanager
async def connect(url: str, token: str) -> AsyncIterator[Client]:
    """One MCP session with the gateway, authenticated with the agent token."""
    async with (
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=CALL_TIMEOUT_S, verify=_TRUST[0]
        ) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool call that must succeed; its structured result."""
    async with asyncio.timeout(CALL_TIMEOUT_S):
        result = await client.call_tool(tool, arguments)
    if result.is_error or result.structured_content is None:
        text = " ".join(getattr(block, "text", "") for block in result.content)
        raise SystemExit(f"{tool} failed: {text}")
    content: dict[str, Any] = result.structured_content
    return content


async def store(url: str, token: str, contents: list[str]) -> dict[str, Any]:
    async with connect(url, token) as client:
        ids = [(await call(client, "memory_store", content=content))["memory"]["id"] for content in contents]
    return {"ids": ids}


async def get(url: str, token: str, memory_id: str) -> dict[str, Any]:
    async with connect(url, token) as client:
        result = await call(client, "memory_get", id=memory_id)
    return {"content": result["memory"]["content"]}


async def search(url: str, token: str, queries: list[str], mode: str) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    async with connect(url, token) as client:
        for query in queries:
            found = await call(client, "memory_search", query=query, mode=mode)
            hits = [
                {
                    "id": h["memory"]["id"],
                    "content": h["memory"]["content"],
                    "score": h["score"],
                    "found_by": h["found_by"],
                }
                for h in found["hits"]
            ]
            results.append({"query": query, "hits": hits, "note": found.get("note")})
    return {"results": results}


async def list_all(url: str, token: str) -> dict[str, Any]:
    memories: list[dict[str, str]] = []
    async with connect(url, token) as client:
        cursor: str | None = None
        while True:
            arguments: dict[str, Any] = {"page_size": 100}
            if cursor:
                arguments["cursor"] = cursor
            page = await call(client, "memory_list", **arguments)
            memories.extend({"id": m["id"], "content": m["content"]} for m in page["memories"])
            cursor = page["next_cursor"]
            if not cursor:
                return {"memories": memories}


def _error_kind(err: MCPError) -> tuple[str | None, bool]:
    """The gateway's error kind and whether it is retryable; (None, False) for an error without one."""
    data = err.data if isinstance(err.data, dict) else {}
    kind = data.get("kind")
    return (str(kind) if kind else None), bool(data.get("retryable", False))


class _Recorder:
    """One client's call records, and the call in flight (if the connection breaks under it, it failed)."""

    def __init__(self, index: int, records: list[dict[str, Any]]) -> None:
        self.index = index
        self.records = records
        self.in_flight: tuple[float, str] | None = None

    def record(self, started: float, outcome: str, **details: Any) -> None:
        self.in_flight = None
        self.records.append(
            {"client": self.index, "start": started, "end": time.monotonic(), "outcome": outcome, **details}
        )


async def _writes(client: Client, stop: Path, recorder: _Recorder, seq: Iterator[int]) -> None:
    """Store memories on one MCP session until the stop file appears or the session's connection breaks."""
    while not stop.exists():
        content = f"system-test load client {recorder.index} write {next(seq)}"
        started = time.monotonic()
        recorder.in_flight = (started, content)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                result = await client.call_tool("memory_store", {"content": content})
        except TimeoutError:
            recorder.record(started, "hung", content=content)
            return
        except MCPError as err:
            kind, retryable = _error_kind(err)
            if kind is None:  # no error kind from the gateway: the connection itself broke
                recorder.record(started, "transport", error=err.message, content=content)
                return
            recorder.record(started, kind, retryable=retryable, error=err.message, content=content)
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        if result.is_error:
            text = " ".join(getattr(block, "text", "") for block in result.content)
            recorder.record(started, "tool_error", error=text[:300], content=content)
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        memory = (result.structured_content or {}).get("memory", {})
        recorder.record(started, "ok", id=memory.get("id"), content=content)
        await asyncio.sleep(PACE_S)


async def _client_loop(index: int, url: str, token: str, stop: Path, records: list[dict[str, Any]]) -> None:
    """One client: connect, write until the connection breaks, connect again; until the stop file appears.

    The MCP client runs its transport in a task group: when the gateway goes away, the
    group cancels the call in flight and the error surfaces where the session's
    ``async with`` ends, so that is where a broken connection is caught.
    """
    recorder = _Recorder(index, records)
    seq = itertools.count(1)
    while not stop.exists():
        started = time.monotonic()
        connected = False
        try:
            async with connect(url, token) as client:
                connected = True
                await _writes(client, stop, recorder, seq)
        except Exception as err:
            error = repr(err)[:300]
            if recorder.in_flight is not None:  # the call the connection broke under failed
                call_started, content = recorder.in_flight
                recorder.record(call_started, "transport", error=error, content=content)
            elif not connected:  # the gateway is not listening (it is restarting)
                recorder.record(started, "connect", error=error)
        if not stop.exists():
            await asyncio.sleep(RETRY_PAUSE_S)


async def load(url: str, tokens: list[str], out: Path, stop: Path) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    progress = out.with_suffix(".progress")

    async def report_progress() -> None:
        while not stop.exists():
            acked = sum(1 for r in records if r["outcome"] == "ok")
            partial = progress.with_suffix(".partial")
            partial.write_text(json.dumps({"acked": acked, "calls": len(records), "now": time.monotonic()}))
            partial.replace(progress)  # atomically: the test reads it while this writes
            await asyncio.sleep(0.2)

    await asyncio.gather(
        report_progress(), *(_client_loop(i, url, token, stop, records) for i, token in enumerate(tokens))
    )
    out.write_text(json.dumps(records))
    return {"calls": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["store", "get", "list", "search", "load"])
    parser.add_argument("--url", default="http://127.0.0.1:8765/mcp")
    parser.add_argument("--ca", type=Path, help="trust this CA file for an https --url (e.g. a TLS proxy's)")
    parser.add_argument("--token-file", type=Path, nargs="+", required=True)
    parser.add_argument("--content", nargs="+")
    parser.add_argument("--query", nargs="+")
    parser.add_argument("--mode", default="hybrid", choices=["hybrid", "lexical", "semantic"])
    parser.add_argument("--id")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--stop-file", type=Path)
    args = parser.parse_args()
    if args.ca:
        _TRUST[0] = ssl.create_default_context(cafile=str(args.ca))
    tokens = [path.read_text().strip() for path in args.token_file]
    if args.command == "store":
        result = asyncio.run(store(args.url, tokens[0], args.content))
    elif args.command == "get":
        result = asyncio.run(get(args.url, tokens[0], args.id))
    elif args.command == "list":
        result = asyncio.run(list_all(args.url, tokens[0]))
    elif args.command == "search":
        result = asyncio.run(search(args.url, tokens[0], args.query, args.mode))
    else:
        result = asyncio.run(load(args.url, tokens, args.out, args.stop_file))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
