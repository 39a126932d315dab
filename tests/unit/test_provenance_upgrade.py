"""An existing state dir upgraded to provenance (schema 7): its memories verify, as ``unrecorded``, and re-sign."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardian.keys.ring import KeyRing
from guardian.policy.compile import compile_policy
from guardian.policy.default import render_default_policy
from guardian.store import database as database_module
from guardian.store.database import Connection, Database
from guardian.store.integrity import SignedFields, canonical_json, content_sha256, memory_message
from guardian.store.memories import MemoryStore, Scope

KEY_HEX = "cd" * 32
RING = KeyRing("k1", {"k1": b"k" * 32})
MEMORY_ID = "mem_" + "a" * 32


def _scope() -> Scope:
    policy = compile_policy(render_default_policy())
    return Scope(agent="alice", namespaces=("alice",), writable=frozenset({"alice"}), trust=policy.trust_view("alice"))


def _v2_row(connection: Connection) -> None:
    """A memory as a guardian before schema 7 stored it: signature format 2, no provenance columns."""
    content = "the printer on floor 2 needs a new drum"
    fields = SignedFields(
        MEMORY_ID, "alice", "alice", 1000, 1000, content_sha256(content), canonical_json(["office"]), "{}", "active"
    )
    key_id, mac = RING.sign(memory_message(fields, 2))
    connection.execute(
        "INSERT INTO memories (id, namespace, agent, created_at_ms, updated_at_ms, content, tags, metadata, sha256,"
        " key_id, hmac, sig_format, status, filter_hits) VALUES (?, 'alice', 'alice', 1000, 1000, ?, ?, '{}', ?, ?,"
        " ?, 2, 'active', 'flagged-rule')",
        (MEMORY_ID, content, canonical_json(["office"]), content_sha256(content), key_id, mac),
    )


def test_a_memory_signed_before_provenance_verifies_as_unrecorded_and_resigns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "memory.db"
    with monkeypatch.context() as old:
        old.setattr(database_module, "SCHEMA_VERSION", 6)
        before = Database(path, KEY_HEX)
        assert before.schema_version == 6
        with before.write() as connection:
            connection.execute(
                "INSERT INTO agents (name, token_key_id, token_hash, created_at_ms) VALUES ('alice', 'k1', 'h', 0)"
            )
            _v2_row(connection)
        before.close()

    upgraded = Database(path, KEY_HEX)
    try:
        assert upgraded.schema_version >= 7
        store = MemoryStore(RING)
        with upgraded.read() as reader:
            recalled = store.get(reader, _scope(), MEMORY_ID)
        memory = recalled.memory
        assert (memory.declared_source, memory.session, memory.derived_from, memory.trust) == ("unrecorded", "", (), "")
        assert memory.filter_hits == ("flagged-rule",)  # unsigned in format 2, kept as it was
        assert recalled.trust == "unverified"  # the policy's provenance.unrecorded
        with upgraded.write() as connection:
            resigned, failed, _ = store.resign_batch(connection, -1, 10)
        assert (resigned, failed) == (1, [])
        with upgraded.read() as reader:
            row = reader.execute("SELECT sig_format FROM memories WHERE id = ?", (MEMORY_ID,)).fetchone()
            assert row[0] == 3
            assert store.get(reader, _scope(), MEMORY_ID).memory.content == memory.content
        # A format-2 signature does not cover provenance: one set on such a row fails verification.
        with upgraded.write() as connection:
            connection.execute("UPDATE memories SET sig_format = 2, source = 'user' WHERE id = ?", (MEMORY_ID,))
            assert store.verify_all(connection) == (1, [MEMORY_ID])
    finally:
        upgraded.close()
