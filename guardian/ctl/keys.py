"""``guardianctl keys`` and ``guardianctl sessions``: key versions and open sessions, over the admin socket.

- ``keys list``: every version of every ring (memory, audit, token, database,
  audit-signing), which one signs, which are retired, and how many memories or
  tokens use each.
- ``keys rotate RING``: a new version signs (or encrypts) from now on; older
  ones still verify. No downtime: a database rekey makes requests wait a moment.
- ``keys resign``: re-sign every memory with the memory ring's primary key (rows
  that fail verification are left alone and reported).
- ``keys retire RING KEY_ID``: stop a rotated memory, token, audit or database
  key being used, once nothing needs it (the guardian says what still does).
- ``keys public``: the audit-signing public keys, in the file format ``audit
  verify --public-key`` reads (guardian/keys/signing.py).
- ``sessions list [--agent NAME]``, ``sessions revoke REF``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from guardian.ctl.admins import add_propose_flag
from guardian.ctl.audit import key_record
from guardian.ctl.connection import call
from guardian.ctl.output import when
from guardian.keys.signing import format_public_keys
from shared.errors import ConfigError
from shared.rpc.guardian.v1 import admin_pb2

__all__ = ["add_key_commands", "add_session_commands"]

_RINGS = ("memory", "audit", "token", "database", "audit-signing")
_RETIRABLE = ("memory", "token", "audit", "database")


def cmd_keys_list(args: argparse.Namespace) -> int:
    """guardianctl keys list."""
    response = call(args, "ListKeys", admin_pb2.ListKeysRequest())
    rows = [
        {
            "ring": key.ring,
            "key_id": key.key_id,
            "source": key.source,
            "primary": key.primary,
            "retired": key.retired,
            "created": when(key.created_at_ms),
            "in_use": key.in_use,
        }
        for key in response.keys
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'RING':<13} {'KEY':<6} {'SOURCE':<8} {'STATE':<8} {'CREATED':<21} IN USE")
    for row in rows:
        state = "primary" if row["primary"] else "retired" if row["retired"] else "verifies"
        used = row["in_use"] if row["ring"] in ("memory", "token") else "-"
        print(f"{row['ring']:<13} {row['key_id']:<6} {row['source']:<8} {state:<8} {row['created']:<21} {used}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """guardianctl keys rotate RING."""
    response = call(args, "RotateKey", admin_pb2.RotateKeyRequest(ring=args.ring))
    if args.json:
        print(json.dumps({"ring": response.ring, "key_id": response.key_id, "previous": response.previous_key_id}))
        return 0
    print(f"{response.ring}: {response.key_id} is the primary now (was {response.previous_key_id})")
    if response.ring == "memory":
        print("older memories still verify; `guardianctl keys resign` re-signs them with the new key")
    if response.ring == "audit-signing":
        print("heads are signed with it from now on; give verifiers the new public key: guardianctl keys public")
    return 0


def cmd_keys_resign(args: argparse.Namespace) -> int:
    """guardianctl keys resign."""
    response = call(args, "ResignMemories", admin_pb2.ResignMemoriesRequest())
    if args.json:
        print(
            json.dumps(
                {
                    "key_id": response.key_id,
                    "resigned": response.resigned,
                    "failed": response.failed,
                    "failed_ids": list(response.failed_ids),
                }
            )
        )
    else:
        print(f"{response.resigned} memories re-signed with {response.key_id}")
        if response.failed:
            print(f"{response.failed} memories FAIL verification and were left as they are:")
            for memory_id in response.failed_ids:
                print(f"  {memory_id}")
    return 1 if response.failed else 0


def cmd_keys_retire(args: argparse.Namespace) -> int:
    """guardianctl keys retire RING KEY_ID."""
    call(args, "RetireKey", admin_pb2.RetireKeyRequest(ring=args.ring, key_id=args.key_id))
    doing = {
        "database": "the database and its backups are no longer opened with it",
        "audit": "its rows are proven by the signed heads from now on",
    }.get(args.ring, "it no longer verifies anything")
    print(f"{args.ring} key {args.key_id} retired: {doing}")
    return 0


def cmd_keys_public(args: argparse.Namespace) -> int:
    """guardianctl keys public [--output FILE]."""
    keys = call(args, "AuditSigningKeys", admin_pb2.AuditSigningKeysRequest()).keys
    if args.json:
        print(json.dumps([key_record(key) for key in keys]))
        return 0
    text = format_public_keys((key.key_id, key.public_key, _key_comment(key)) for key in keys)
    if args.output == "-":
        print(text, end="")
        return 0
    try:
        with open(args.output, "x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        raise ConfigError(f"{args.output} exists: choose another file") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {args.output}: {exc.strerror}") from None
    print(f"{len(keys)} audit-signing public keys written to {args.output}")
    return 0


def _key_comment(key: Any) -> str:
    signed = (
        f"signed {key.heads} heads, rows {key.first_seq}..{key.last_seq}, {when(key.first_ts_ms)} to"
        f" {when(key.last_ts_ms)}"
        if key.heads
        else "no head signed yet"
    )
    return f"{key.key_id}: created {when(key.created_at_ms)}{', primary' if key.primary else ''}; {signed}"


def cmd_sessions_list(args: argparse.Namespace) -> int:
    """guardianctl sessions list."""
    response = call(args, "ListSessions", admin_pb2.ListSessionsRequest(agent=args.agent or ""))
    rows = [
        {
            "ref": s.ref,
            "agent": s.agent,
            "opened": when(s.opened_at_ms),
            "last_used": when(s.last_used_at_ms),
            "ends": when(s.expires_at_ms),
        }
        for s in response.sessions
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'REF':<17} {'AGENT':<24} {'OPENED':<21} {'LAST USED':<21} ENDS (if unused)")
    for row in rows:
        print(f"{row['ref']:<17} {row['agent']:<24} {row['opened']:<21} {row['last_used']:<21} {row['ends']}")
    return 0


def cmd_sessions_revoke(args: argparse.Namespace) -> int:
    """guardianctl sessions revoke REF."""
    response = call(args, "RevokeSession", admin_pb2.RevokeSessionRequest(ref=args.ref))
    print(f"session {args.ref} of agent {response.agent!r} ended (its gateway opens a new one with the token)")
    return 0


def add_key_commands(commands: Any) -> None:
    """Register ``keys list|rotate|resign|retire|public``."""
    keys = commands.add_parser("keys", help="list, rotate, re-sign and retire key versions")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="every key version, which one signs, and what uses it").set_defaults(
        func=cmd_keys_list
    )
    rotate = actions.add_parser(
        "rotate",
        help="make a new key version the primary (older ones still verify)",
        description="memory/audit/token: a new HMAC key signs from now on; database: the database is re-encrypted"
        " under a new key while requests wait; audit-signing: a new Ed25519 key signs the audit chain's heads from"
        " now on (older public keys still verify the heads they signed: hand out `keys public` again). The guardian"
        " generates the key and keeps it, wrapped, in its state dir; no secret key is ever shown.",
    )
    rotate.add_argument("ring", choices=_RINGS)
    add_propose_flag(rotate)
    rotate.set_defaults(func=cmd_keys_rotate)
    actions.add_parser(
        "resign", help="re-sign every memory with the memory ring's primary key (exit 1 if some fail verification)"
    ).set_defaults(func=cmd_keys_resign)
    retire = actions.add_parser(
        "retire",
        help="stop using a rotated key once nothing needs it (the guardian says what still does)",
        description="memory: once no memory or vector is signed with it (keys resign); token: once no agent's token"
        " was hashed with it; audit: once a signed head covers every row it sealed (the guardian signs one first),"
        " here and in every backup in the backup directory: its rows are proven by the public hash chain from then"
        " on; database: once neither the database nor any backup in the backup directory is encrypted under it."
        " The primary and base keys are never retired here; audit-signing keys are never retired.",
    )
    retire.add_argument("ring", choices=_RETIRABLE)
    retire.add_argument("key_id", help="a rotated key id from `keys list`, e.g. r1")
    add_propose_flag(retire)
    retire.set_defaults(func=cmd_keys_retire)
    public = actions.add_parser(
        "public",
        help="the audit-signing public keys, for `audit verify --public-key` (one '<id> ed25519 <base64>' a line)",
        description="Prints every audit-signing key version's public key (old ones too: they verify the heads they"
        " signed), one line each: '<key id> ed25519 <base64 of the raw 32-byte public key>', with a comment line"
        " saying when it was made and which rows and times its heads signed. Give the file to whoever verifies an"
        " export; it holds nothing secret.",
    )
    public.add_argument("--output", default="-", help="file to create (refuses to overwrite); '-': stdout")
    public.set_defaults(func=cmd_keys_public)


def add_session_commands(commands: Any) -> None:
    """Register ``sessions list|revoke``."""
    sessions = commands.add_parser("sessions", help="list or end agents' open sessions")
    actions = sessions.add_subparsers(dest="sessions_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="open sessions (by reference, never the session id)")
    listing.add_argument("--agent", help="only this agent's")
    listing.set_defaults(func=cmd_sessions_list)
    revoke = actions.add_parser("revoke", help="end one session")
    revoke.add_argument("ref", help="a reference from `sessions list`")
    revoke.set_defaults(func=cmd_sessions_revoke)
