"""What may the user running this do? Run INSIDE the throwaway root, as each user, by the system test.

    connect PATH...   connect a Unix stream socket to each path
    read PATH...      open each path for reading and read a byte
    tcp HOST:PORT...  open a TCP connection to each address (ETIMEDOUT: no answer within 1 s)
    health PATH       a gRPC health check of the agent service over the Unix socket PATH
    embed PATH        one text embedded by agent-embedder over the Unix socket PATH (its frames)

Prints one JSON object: path (or address) -> "ok" or the errno name ("EACCES",
...), or for health {"status": "SERVING" | the gRPC status code name}, for
embed {"status": "OK", "model": ..., "dims": ..., "vectors": ...} or {"status":
the errno name | "refused" | "closed", "details": ...}. Uses only the standard
library, and grpcio, the embedder's messages and frames from the installed venv
for health and embed.
"""

from __future__ import annotations

import errno
import json
import socket
import sys


def _outcome(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def connect(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(path)
        except OSError as exc:
            return _outcome(exc)
    return "ok"


def read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return _outcome(exc)
    return "ok"


def tcp(address: str) -> str:
    """On loopback a connection is taken or refused at once: a timeout means a filter dropped the packets."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            pass
    except TimeoutError:
        return "ETIMEDOUT"
    except OSError as exc:
        return _outcome(exc)
    return "ok"


def health(path: str) -> dict[str, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{path}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="guardian.v1.AgentService"), timeout=5
            )
        except grpc.RpcError as exc:
            return {"status": exc.code().name, "details": exc.details() or ""}
    return {"status": health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}


def embed(path: str) -> dict[str, object]:
    from shared.embedding import ask_once
    from shared.rpc.embedder.v1 import embedder_pb2

    try:
        frame = ask_once(path, embedder_pb2.EmbedRequest(texts=["who may ask the embedder"]).SerializeToString(), 10)
    except OSError as exc:
        return {"status": _outcome(exc), "details": str(exc)}
    if frame is None:
        return {"status": "closed", "details": "the embedder closed the connection without an answer"}
    response = embedder_pb2.EmbedResponse.FromString(frame)
    if response.refused:
        return {"status": "refused", "details": response.refused}
    return {"status": "OK", "model": response.model, "dims": response.dims, "vectors": len(response.vectors)}


def main() -> None:
    command, paths = sys.argv[1], sys.argv[2:]
    if command == "health":
        result: object = health(paths[0])
    elif command == "embed":
        result = embed(paths[0])
    else:
        probe = {"connect": connect, "read": read, "tcp": tcp}[command]
        result = {path: probe(path) for path in paths}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
