"""An audit trail anyone can verify, end to end: a real guardian signs its chain heads with its
Ed25519 audit-signing key, `guardianctl audit export` writes the trail, and `guardianctl audit
verify --public-key` checks it with the public key alone, after the guardian has stopped (no
socket, no state dir, no secret key).

One guardian serves the module: traffic, a restart (a head signed at shutdown with r1), a
rotation of the audit-signing key, more traffic and another restart (a head signed with r2).
Each tampering is tried on a copy of its export, and each must fail naming its line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guardian.keys.signing import format_public_keys
from shared.rpc.guardian.v1 import admin_pb2
from tests.integration.test_audit import traffic
from tests.support.harness import Guardian, agent_pb2, running_guardian


@dataclass(frozen=True)
class Exported:
    """What the module's guardian left behind: its export, its public keys, and itself (stopped)."""

    guardian: Guardian
    export: Path
    public_keys: Path
    #: The public key file as it was before the audit-signing key was rotated (r1 alone).
    keys_before_rotation: Path
    #: Rows at the first stop: a head was signed over all of them with r1.
    rows_at_first_stop: int


def offline(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """guardianctl as someone on another machine runs it: no socket, no config, no admin key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GUARDIAN") and k != "SSH_AUTH_SOCK"}
    return subprocess.run(
        [sys.executable, "-m", "guardian.ctl.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def verify(exported: Exported, export: Path, key_file: Path | None = None) -> dict[str, Any]:
    """Verify export offline with the public keys; the JSON report (exit status checked against it)."""
    keys = key_file or exported.public_keys
    result = offline("--json", "audit", "verify", "--public-key", str(keys), str(export), cwd=export.parent)
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == (0 if report["verified"] else 1), result.stdout + result.stderr
    return report


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    place = tmp_path_factory.mktemp("verifier")
    with running_guardian() as guardian:
        traffic(guardian)
        guardian.stop()  # signs a head over every row, with r1
        rows_at_first_stop = len(guardian.audit_rows())
        guardian.start()
        before = place / "keys-before.txt"
        assert guardian.ctl("keys", "public", "--output", str(before)).returncode == 0
        rotated = guardian.ctl("--json", "keys", "rotate", "audit-signing")
        assert rotated.returncode == 0, rotated.stderr
        assert json.loads(rotated.stdout) == {"ring": "audit-signing", "key_id": "r2", "previous": "r1"}
        guardian.add_agent("after-rotation")
        guardian.stop()  # signs a head with r2
        guardian.start()
        keys, export = place / "keys.txt", place / "audit.jsonl"
        made = guardian.ctl("keys", "public", "--output", str(keys))
        assert made.returncode == 0, made.stderr
        result = guardian.ctl("audit", "export", "--output", str(export))
        assert result.returncode == 0, result.stderr
        assert "signed heads" in result.stderr
        guardian.stop()
        yield Exported(guardian, export, keys, before, rows_at_first_stop)


def lines_of(exported: Exported) -> list[str]:
    return exported.export.read_text().splitlines()


def write_copy(exported: Exported, name: str, lines: list[str]) -> Path:
    path = exported.export.parent / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def find(lines: list[str], kind: str, seq: int) -> int:
    """The index of the record of that type for that row."""
    return next(
        i for i, line in enumerate(lines) if json.loads(line)["type"] == kind and json.loads(line)["seq"] == seq
    )


def first_signed(lines: list[str]) -> int:
    seqs: list[int] = [json.loads(line)["seq"] for line in lines if '"signed_head"' in line]
    return min(seqs)


# -- what an export is, and that it verifies -------------------------------------------------------


def test_an_export_verifies_offline_with_the_public_key_alone(exported: Exported) -> None:
    report = verify(exported, exported.export)
    assert report["verified"] and report["problem"] == "" and report["first_seq"] == 1
    assert report["signed_through"] >= exported.rows_at_first_stop
    assert report["keys_used"] == ["r1", "r2"], "heads of the old key and the new one both verify"
    assert (
        report["rows"] == report["last_seq"] and report["not_covered"] == report["last_seq"] - report["signed_through"]
    )
    text = offline("audit", "verify", "--public-key", str(exported.public_keys), str(exported.export), cwd=Path("/"))
    assert text.returncode == 0 and text.stdout.startswith("verified: rows 1..")


def test_the_export_holds_the_rows_heads_and_public_keys_and_no_content(exported: Exported) -> None:
    records = [json.loads(line) for line in lines_of(exported)]
    assert records[0]["type"] == "export" and records[0]["after_seq"] == 0
    kinds = {record["type"] for record in records}
    assert kinds == {"export", "public_key", "row", "signed_head"}
    rows = [record for record in records if record["type"] == "row"]
    assert [row["seq"] for row in rows] == list(range(1, len(rows) + 1)) and rows[-1]["seq"] == records[0]["until_seq"]
    keys = {record["key_id"]: record for record in records if record["type"] == "public_key"}
    assert set(keys) == {"r1", "r2"} and keys["r2"]["primary"] and not keys["r1"]["primary"]
    assert keys["r1"]["heads"] >= 1 and keys["r1"]["first_seq"] <= keys["r1"]["last_seq"] < keys["r2"]["first_seq"]
    assert keys["r1"]["last_ts_ms"] <= keys["r2"]["first_ts_ms"], "each key's time range is published"
    text = exported.export.read_text()
    assert "note 0" not in text and "agt_" not in text  # traffic() stored "note N" with an agent token


def test_the_public_key_file_says_what_each_key_signed(exported: Exported) -> None:
    text = exported.public_keys.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert [line.split()[:2] for line in lines] == [["r1", "ed25519"], ["r2", "ed25519"]]
    assert "# r2: created " in text and ", primary; signed " in text


def test_an_export_from_a_later_row_verifies_too(exported: Exported) -> None:
    exported.guardian.start()
    try:
        part = exported.export.parent / "from-row-5.jsonl"
        result = exported.guardian.ctl("audit", "export", "--after-seq", "5", "--output", str(part))
        assert result.returncode == 0, result.stderr
    finally:
        exported.guardian.stop()
    report = verify(exported, part)
    assert report["verified"] and report["first_seq"] == 6 and report["heads_checked"] >= 2


# -- tampering, each caught naming its line --------------------------------------------------------


def test_a_changed_field_is_caught_at_its_line(exported: Exported) -> None:
    lines = lines_of(exported)
    index = find(lines, "row", 5)
    record = json.loads(lines[index])
    record["decision"] = "deny" if record["decision"] == "allow" else "allow"
    report = verify(
        exported, write_copy(exported, "changed.jsonl", [*lines[:index], json.dumps(record), *lines[index + 1 :]])
    )
    assert (report["verified"], report["kind"], report["line"], report["seq"]) == (False, "changed", index + 1, 5)


def test_a_changed_field_with_its_links_recomputed_is_caught_at_the_signed_head(exported: Exported) -> None:
    from guardian.keys.audit_proof import ROW_FIELDS, canonical_row, next_link

    lines = lines_of(exported)
    records = [json.loads(line) for line in lines]
    records[find(lines, "row", 3)]["reason"] = "nothing happened here"
    link = records[0]["start_link"]
    for record in records:
        if record["type"] == "row":
            canonical = canonical_row([record[n] for n in ROW_FIELDS], record.get("trace", ""))
            link = record["link"] = next_link(canonical, record["mac"], link)
    report = verify(exported, write_copy(exported, "relinked.jsonl", [json.dumps(r) for r in records]))
    head = first_signed(lines)
    assert (report["kind"], report["seq"], report["line"]) == ("changed", head, find(lines, "signed_head", head) + 1)


def test_a_removed_line_is_caught_where_it_is_missing(exported: Exported) -> None:
    lines = lines_of(exported)
    index = find(lines, "row", 4)
    report = verify(exported, write_copy(exported, "removed.jsonl", [*lines[:index], *lines[index + 1 :]]))
    assert (report["kind"], report["line"], report["seq"]) == ("missing", index + 1, 5)
    assert "row 4 is not in the export" in report["problem"]


def test_two_swapped_lines_are_caught_as_out_of_order(exported: Exported) -> None:
    lines = lines_of(exported)
    six, seven = find(lines, "row", 6), find(lines, "row", 7)
    swapped = list(lines)
    swapped[six], swapped[seven] = lines[seven], lines[six]
    report = verify(exported, write_copy(exported, "swapped.jsonl", swapped))
    assert (report["kind"], report["line"], report["seq"]) == ("out_of_order", six + 1, 7)


def test_a_forged_head_signature_is_caught_at_its_line(exported: Exported) -> None:
    lines = lines_of(exported)
    head = first_signed(lines)
    index = find(lines, "signed_head", head)
    record = json.loads(lines[index])
    record["signature"] = Ed25519PrivateKey.generate().sign(b"anything").hex()
    report = verify(
        exported, write_copy(exported, "forged.jsonl", [*lines[:index], json.dumps(record), *lines[index + 1 :]])
    )
    assert (report["kind"], report["line"], report["seq"]) == ("bad_signature", index + 1, head)
    assert "head signature invalid" in report["problem"]


def test_a_cut_tail_is_caught(exported: Exported) -> None:
    lines = lines_of(exported)
    report = verify(exported, write_copy(exported, "cut.jsonl", lines[: find(lines, "row", 3)]))
    assert report["kind"] == "missing" and not report["verified"]


def test_another_public_key_fails_naming_the_first_head(exported: Exported) -> None:
    lines = lines_of(exported)
    impostor = exported.export.parent / "impostor.txt"
    fakes = [(key_id, Ed25519PrivateKey.generate().public_key().public_bytes_raw(), "") for key_id in ("r1", "r2")]
    impostor.write_text(format_public_keys(fakes))
    report = verify(exported, exported.export, impostor)
    head = first_signed(lines)
    assert (report["kind"], report["seq"], report["line"]) == (
        "bad_signature",
        head,
        find(lines, "signed_head", head) + 1,
    )
    assert any("other than the trusted one" in warning for warning in report["warnings"])


def test_the_key_file_from_before_a_rotation_does_not_know_the_new_key(exported: Exported) -> None:
    report = verify(exported, exported.export, exported.keys_before_rotation)
    assert report["kind"] == "unknown_key" and "'r2'" in report["problem"] and report["signed_through"] > 0


# -- bad input: a clear error, nothing verified ----------------------------------------------------


def test_a_malformed_export_line_is_named(exported: Exported) -> None:
    lines = lines_of(exported)
    report = verify(
        exported, write_copy(exported, "malformed.jsonl", [*lines[:5], '{"type": "row", "seq": 1', *lines[6:]])
    )
    assert (report["kind"], report["line"]) == ("malformed", 6) and "not JSON" in report["problem"]


def test_a_malformed_public_key_file_is_refused(exported: Exported) -> None:
    bad = exported.export.parent / "bad-keys.txt"
    bad.write_text("r1 ed25519 c2hvcnQ=\n")
    result = offline("audit", "verify", "--public-key", str(bad), str(exported.export), cwd=bad.parent)
    assert result.returncode == 2 and result.stdout == ""
    assert "bad-keys.txt line 1: an Ed25519 public key is 32 bytes" in result.stderr


def test_verifying_an_export_needs_its_public_key_and_an_existing_file(exported: Exported) -> None:
    alone = offline("audit", "verify", str(exported.export), cwd=exported.export.parent)
    assert alone.returncode == 2 and "--public-key FILE" in alone.stderr
    missing = offline(
        "audit", "verify", "--public-key", str(exported.public_keys), "no-such.jsonl", cwd=exported.export.parent
    )
    assert missing.returncode == 2 and "cannot read the export no-such.jsonl" in missing.stderr


# -- the guardian's side ---------------------------------------------------------------------------


def test_the_guardian_s_own_verify_checks_the_signed_heads_and_refuses_bad_export_requests() -> None:
    with running_guardian() as guardian:
        guardian.check_audit = False  # the signed heads are rewritten on purpose
        token = guardian.add_agent("exporter")
        channel, stub = guardian.agent_stub()
        with channel:
            session = stub.OpenSession(agent_pb2.OpenSessionRequest(agent_token=token)).session_id
            stub.Store(agent_pb2.StoreRequest(session_id=session, memory=agent_pb2.MemoryDraft(content="kept")))
        for request, field in (
            (admin_pb2.ExportAuditRequest(after_link="not-a-link"), "after_link"),
            (admin_pb2.ExportAuditRequest(limit=5000), "limit"),
            (admin_pb2.ExportAuditRequest(after_seq=2**63), "after_seq"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                guardian.admin("ExportAudit", request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in str(caught.value.details())
        filtered = guardian.ctl("audit", "export", "--agent", "exporter")
        assert filtered.returncode == 2 and "--format jsonl" in filtered.stderr
        guardian.stop()  # signs a head
        guardian.start()
        intact = guardian.ctl("--json", "audit", "verify")
        assert intact.returncode == 0, intact.stdout
        with guardian.keyed_db() as db:
            (seq,) = db.execute("SELECT max(seq) FROM audit_signed_heads").fetchone()
            db.execute("DROP TRIGGER audit_signed_heads_no_update")
            db.execute("UPDATE audit_signed_heads SET signature = ? WHERE seq = ?", ("ab" * 64, seq))
        broken = guardian.ctl("audit", "verify")
        assert broken.returncode == 1 and broken.stdout.startswith(f"BROKEN at row {seq}:"), broken.stdout
        assert "signature that does not verify" in broken.stdout
        log = guardian.log_path.read_text()
        heads = [json.loads(line) for line in log.splitlines() if '"audit_chain_head"' in line]
        assert heads and heads[-1]["signed_seq"] >= 1 and len(heads[-1]["link"]) == 64
        assert heads[-1]["signing_key_id"] == "r1"
