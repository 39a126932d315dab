"""The guardian's hold on its state dir, its storage settings, and sessions seen from the admin socket."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from guardian.state.config import load_config
from guardian.state.statedir import init_state_dir
from guardian.store.database import Database
from shared.errors import ConfigError
from tests.support.harness import ROOT, Guardian, agent_pb2

pb = agent_pb2


def test_a_second_guardian_on_the_same_state_dir_refuses_to_start(guardian: Guardian) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "guardian.daemon.main", "--config", str(guardian.config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 2
    assert "another guardian is running" in second.stderr
    channel, stub = guardian.agent_stub()
    with channel:  # the first one is untouched
        assert stub.OpenSession(pb.OpenSessionRequest(agent_token=guardian.add_agent("still-served"))).session_id


@pytest.mark.parametrize(("durability", "synchronous"), [("normal", 1), ("full", 2)])
def test_durability_sets_how_each_commit_is_synced(tmp_path: Path, durability: str, synchronous: int) -> None:
    config_path = init_state_dir(tmp_path / "state").config
    config_path.write_text(config_path.read_text().replace("durability: normal", f"durability: {durability}"))
    config = load_config(config_path)
    assert config.durability == durability
    database = Database(tmp_path / "d.db", "cd" * 32, durability=config.durability)
    try:
        with database.write() as connection:
            assert connection.execute("PRAGMA synchronous").fetchone()[0] == synchronous
    finally:
        database.close()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("storage:\n  durability: fast\n", "storage.durability: expected normal or full, got 'fast'"),
        ("storage:\n  min_free: lots\n", 'storage.min_free: expected a size like "64MiB" or "512KiB"'),
        ("storage:\n  wal: on\n", "storage.wal"),
        ("backup:\n  keep: 0\n", "backup.keep"),
    ],
)
def test_bad_storage_and_backup_settings_name_the_key(tmp_path: Path, section: str, message: str) -> None:
    config_path = init_state_dir(tmp_path / "state").config
    text = config_path.read_text()
    head = text[: text.index("storage:")]
    config_path.write_text(head + section)
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert message in caught.value.message


def test_sessions_are_listed_by_reference_and_revoked(guardian: Guardian) -> None:
    token = guardian.add_agent("listed")
    channel, stub = guardian.agent_stub()
    with channel:
        session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
        listed = guardian.ctl("--json", "sessions", "list", "--agent", "listed")
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert row["agent"] == "listed" and session not in listed.stdout and len(row["ref"]) == 16
        revoked = guardian.ctl("sessions", "revoke", row["ref"])
        assert revoked.returncode == 0 and "of agent 'listed' ended" in revoked.stdout
        with pytest.raises(grpc.RpcError) as caught:
            stub.List(pb.ListRequest(session_id=session))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        again = guardian.ctl("sessions", "revoke", row["ref"])
        assert again.returncode == 1 and "no open session with that reference" in again.stderr
    rows = [r for r in guardian.audit_rows() if r["operation"] == "admin.session.revoke"]
    assert [r["decision"] for r in rows] == ["allow", "deny"] and rows[0]["object_id"] == row["ref"]
