"""The benchmark of issue 5: agent-guardian's operations against floors measured in the same run.

``python -m bench`` (or ``make bench``) starts a guardian on a fresh state dir
for each size, fills it to that many memories, then measures store,
store_batch, get, search, search_common (words every memory holds) and list,
at each concurrency, through

- ``grpc``: the agent socket directly (``grpc.aio``, the gateway's client library);
- ``stdio``: the real MCP client, one ``agent-gateway --transport stdio`` process per client;
- ``http``: the real MCP client against one ``agent-gateway --transport http``.

Beside each figure it prints the floor measured in the same run with the same
client code and concurrency: an MCP no-op tool on the same SDK and transport
that makes one no-op gRPC call to another process (:mod:`bench.noop_server`),
a gRPC no-op call on the same kind of Unix socket
with the guardian's thread-pool size (:mod:`bench.noop_grpc`), and a bare
SQLCipher insert and FTS5 query on a table of the same size
(:mod:`bench.sqlfloor`). It then evaluates the targets of issues 5 and 15, measures
recall on the eval set (:mod:`bench.recall_eval.quality`, not with ``--quick``), and
writes every figure to JSON (``bench/results/latest.json`` by default).

Modules, one concept each:

==================  ===============================================================
``cli``             ``main``: the run from start to end, the output, the exit status
``options``         the command line (sizes, clients, transports, budget, ``--quick``)
``runner``          one size after another: guardian, prefill, floors, measurements, checks
``corpus``          the synthetic memories, queries and ids the operations use
``procs``           starting and stopping processes by PID; peak RSS and CPU; the guardian
``prefill``         filling a guardian to N memories (StoreBatch, or its own modules)
``clients``         per-transport clients: direct gRPC, MCP over stdio and HTTP
``load``            running N concurrent clients and timing every call
``sqlfloor``        the bare SQLCipher floor
``noop_server``     the MCP no-op server (stdio or streamable HTTP)
``noop_grpc``       the gRPC no-op server
``report``          the table, the targets, the JSON
==================  ===============================================================

Nothing here changes product code; the bench only drives it.
"""
