"""Retiring audit and database keys on a real guardian, once nothing needs them, and not before.

An audit key is needed while rows it sealed can be proven only by their mac: here or in a
backup in the backup directory. The guardian signs a head when asked to retire one, so the
live chain is covered at once; a backup made before any head covered those rows keeps the key
until it is pruned. Afterwards the chain (and a new backup) still verifies, through the public
chain and the signed heads, and a row changed since is still caught.

A database key is needed while the database or a backup in the backup directory is encrypted
under it.

The housekeeping thread is slowed to an hour so that no head is signed unless a test says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.harness import Guardian, running_guardian

QUIET = {"housekeeping_interval": "1h", "audit": {"head_interval": "1h"}, "backup": {"keep": 1}}


@pytest.fixture
def guardian() -> Iterator[Guardian]:
    with running_guardian(config=QUIET) as running:
        yield running


def ok(guardian: Guardian, *args: str) -> str:
    result = guardian.ctl(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def refused(guardian: Guardian, *args: str) -> str:
    result = guardian.ctl(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("guardianctl: not possible in the current state: "), result.stderr
    return result.stderr


def versions(guardian: Guardian, ring: str) -> dict[str, dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ok(guardian, "--json", "keys", "list"))
    return {row["key_id"]: row for row in rows if row["ring"] == ring}


def backup(guardian: Guardian) -> str:
    name: str = json.loads(ok(guardian, "--json", "backup", "create"))["name"]
    return name


def test_an_audit_key_is_retired_once_signed_heads_cover_every_row_it_sealed(guardian: Guardian) -> None:
    ok(guardian, "keys", "rotate", "audit")  # r1 seals from now on
    for name in ("sealed-1", "sealed-2", "sealed-3"):
        guardian.add_agent(name)
    ok(guardian, "keys", "rotate", "audit")  # r2 seals from now on
    sealed = [row["seq"] for row in guardian.audit_rows() if row["key_id"] == "r1"]
    assert len(sealed) >= 4

    assert "r2 signs new audit data; rotate first" in refused(guardian, "keys", "retire", "audit", "r2")
    assert "not a key the guardian rotated in" in refused(guardian, "keys", "retire", "audit", "k1")
    old = backup(guardian)  # its r1 rows: no signed head in it covers them
    why = refused(guardian, "keys", "retire", "audit", "r1")
    assert f"backup {old} (holds" in why and "rows sealed with r1 after its last signed head" in why
    assert "guardianctl backup create" in why
    assert not versions(guardian, "audit")["r1"]["retired"]

    backup(guardian)  # the head signed for the refused retirement is in it; the old backup is pruned (keep 1)
    ok(guardian, "keys", "retire", "audit", "r1")
    listed = versions(guardian, "audit")
    assert listed["r1"]["retired"] and listed["r2"]["primary"] and not listed["k1"]["retired"]
    rows = [row for row in guardian.audit_rows() if row["operation"] == "admin.keys.retire"]
    assert [(row["object_id"], row["decision"]) for row in rows][-2:] == [("audit:r1", "deny"), ("audit:r1", "allow")]

    # Without r1, its rows are proven by the signed head: the chain, a new backup, a restart all verify.
    intact = json.loads(ok(guardian, "--json", "audit", "verify"))
    assert intact["intact"] and intact["rows_checked"] == len(guardian.audit_rows()) - 1  # not its own row
    assert json.loads(ok(guardian, "--json", "backup", "create"))["audit"] == "ok"
    guardian.stop()
    guardian.start()
    assert json.loads(ok(guardian, "--json", "audit", "verify"))["intact"]

    # A row r1 sealed, changed now, is still caught: by the signed head that covers it.
    guardian.check_audit = False
    with guardian.keyed_db() as db:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET reason = 'nothing happened' WHERE seq = ?", (sealed[1],))
    broken = guardian.ctl("audit", "verify")
    assert broken.returncode == 1, broken.stdout
    assert broken.stdout.startswith(f"BROKEN at row {sealed[0]}:"), broken.stdout
    assert "sealed with a retired audit key" in broken.stdout and "one of them was changed" in broken.stdout


def test_an_audit_key_whose_rows_do_not_verify_is_not_retired(guardian: Guardian) -> None:
    ok(guardian, "keys", "rotate", "audit")
    guardian.add_agent("sealed")
    ok(guardian, "keys", "rotate", "audit")
    guardian.check_audit = False
    seq = next(row["seq"] for row in guardian.audit_rows() if row["key_id"] == "r1")
    with guardian.keyed_db() as db:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET reason = 'edited' WHERE seq = ?", (seq,))
    why = refused(guardian, "keys", "retire", "audit", "r1")
    assert f"r1 is still needed: the chain cannot be signed (row {seq} does not match its mac" in why
    assert not versions(guardian, "audit")["r1"]["retired"]
    with guardian.keyed_db() as db:
        assert db.execute("SELECT count(*) FROM audit_signed_heads").fetchone()[0] == 0


def test_a_database_key_is_retired_once_neither_the_database_nor_a_backup_is_under_it(guardian: Guardian) -> None:
    ok(guardian, "keys", "rotate", "database")  # the database is under r1 now
    assert "r1 encrypts the database; rotate first" in refused(guardian, "keys", "retire", "database", "r1")
    assert "db.key) is never retired" in refused(guardian, "keys", "retire", "database", "base")
    old = backup(guardian)  # encrypted under r1
    ok(guardian, "keys", "rotate", "database")  # the database is under r2
    why = refused(guardian, "keys", "retire", "database", "r1")
    assert f"backup {old} is encrypted under r1 and needs it" in why
    assert not versions(guardian, "database")["r1"]["retired"]

    new = backup(guardian)  # under r2; the old one is pruned (keep 1)
    ok(guardian, "keys", "retire", "database", "r1")
    listed = versions(guardian, "database")
    assert listed["r1"]["retired"] and listed["r2"]["primary"] and not listed["base"]["retired"]
    kept = json.loads((guardian.state_dir / "rotated-keys.json").read_text())["keys"]
    assert [(k["ring"], k["id"], k["retired"]) for k in kept if k["ring"] == "database"] == [
        ("database", "r1", True),
        ("database", "r2", False),
    ], "a retired key stays in the file, marked, never used again"
    guardian.stop()
    guardian.start()  # opens under r2 without r1
    assert json.loads(ok(guardian, "--json", "backup", "verify", new))["ok"]
    assert json.loads(ok(guardian, "--json", "audit", "verify"))["intact"]
