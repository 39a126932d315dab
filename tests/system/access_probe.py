"""What may the user running this do? Run INSIDE the throwaway root, as each user, by the system test.

    connect PATH...   connect a Unix stream socket to each path
    read PATH...      open each path for reading and read a byte
    health PATH       a gRPC health check of the agent service over the Unix socket PATH

Prints one JSON object: path -> "ok" or the errno name ("EACCES", ...), or for
health {"status": "SERVING" | the gRPC status code name}. Uses only the
standard library, and grpcio from the installed venv for health.
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


def main() -> None:
    command, paths = sys.argv[1], sys.argv[2:]
    if command == "health":
        result: object = health(paths[0])
    else:
        probe = {"connect": connect, "read": read}[command]
        result = {path: probe(path) for path in paths}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
