"""``agent-embedder``: load the pinned sentence encoder, serve it on a Unix socket, until SIGTERM.

Run it as its own user, with no network and no access to the guardian's state
(systemd/agent-embedder.service): it holds no key and no database, and turns
the texts the guardian sends into vectors. The socket's mode and its
directory's group decide who may connect (the guardian's user only).

Exit codes: 0 stopped by a signal; 2 a bad argument or model file (the reason on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Final

from embedder.encoder import SentenceEncoder
from embedder.model_files import ModelFiles, shipped_files
from embedder.server import EmbedderServer
from shared.embedding import MAX_DIMS
from shared.errors import ConfigError
from shared.jsonlog import configure_logging
from shared.sdnotify import Watchdog, notify
from shared.unix_socket import remove_stale_socket

__all__ = ["main"]

log = logging.getLogger("agent_embedder")

#: How long a stop waits for the answers under way.
_STOP_GRACE_S: Final = 5.0


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an octal mode such as 0660, got {text!r}") from None
    if mode & ~0o777 or mode & 0o007:
        raise argparse.ArgumentTypeError(f"expected a mode that gives others nothing, such as 0660, got {text!r}")
    return mode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-embedder", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--socket", type=Path, required=True, help="the Unix socket to serve on")
    parser.add_argument("--socket-mode", type=_mode, default=0o660, help="its mode (default 0660)")
    parser.add_argument("--workers", type=int, default=2, help="texts embedded at once (default 2: one a core)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    model = parser.add_argument_group("another model (a BERT checkpoint; all six or none)")
    for name in ("weights", "tokenizer", "config"):
        model.add_argument(f"--{name}", type=Path)
        model.add_argument(f"--{name}-sha256")
    return parser


def _model_files(args: argparse.Namespace) -> ModelFiles:
    given = [args.weights, args.weights_sha256, args.tokenizer, args.tokenizer_sha256, args.config, args.config_sha256]
    if not any(given):
        return shipped_files()
    if not all(given):
        raise ConfigError("another model needs all of --weights, --tokenizer, --config and their --...-sha256")
    return ModelFiles(
        args.weights, args.weights_sha256, args.tokenizer, args.tokenizer_sha256, args.config, args.config_sha256
    )


def _serve(args: argparse.Namespace) -> None:
    encoder = SentenceEncoder(_model_files(args))
    if encoder.dims > MAX_DIMS:  # the guardian would refuse every answer as over its frame limit
        raise ConfigError(f"the model's vectors have {encoder.dims} dimensions; at most {MAX_DIMS} are served")
    path: Path = args.socket
    remove_stale_socket(path, "embedder")
    try:
        server = EmbedderServer(path, encoder, args.workers)
    except OSError as error:
        raise ConfigError(f"cannot listen on {path}: {error.strerror or error}") from None
    os.chmod(path, args.socket_mode)
    if stat.S_IMODE(path.stat().st_mode) != args.socket_mode:
        server.server_close()
        path.unlink(missing_ok=True)
        raise ConfigError(f"could not set mode {args.socket_mode:04o} on {path}")
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info(
        "embedder serving",
        extra={"event": "embedder_ready", "model": encoder.id, "socket": str(path), "workers": args.workers},
    )
    notify(f"READY=1\nSTATUS=serving {encoder.id}")
    watchdog = Watchdog()
    while not stop.wait(min(watchdog.interval_s or 1.0, 1.0)):
        watchdog.ping_if_due()
    notify("STOPPING=1")
    server.stop(_STOP_GRACE_S)
    path.unlink(missing_ok=True)
    log.info("embedder stopped", extra={"event": "embedder_stopped"})


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT; exit 2 with the reason on a bad argument or model."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        _serve(args)
    except ConfigError as error:
        print(f"agent-embedder: {error}", file=sys.stderr)
        raise SystemExit(2) from None
