"""The audit trail's public proof, in process: the link and signed-head formats (pinned), the export
verifier on exports built by hand from the documented format, the public key file, and the
audit-signing ring and key retirement rules of the key store.

The integration tests (tests/integration/test_audit_export.py) run the same verifier on exports of a
real guardian; here every way an export can fail is tried on a small one, each naming its line.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guardian.keys.audit_proof import (
    EXPORT_FORMAT,
    GENESIS_LINK,
    ROW_FIELDS,
    ExportReport,
    SignedHead,
    canonical_v1,
    head_message,
    next_link,
    verify_export,
)
from guardian.keys.ring import create_keys, load_keys
from guardian.keys.rotated import KeyStore
from guardian.keys.signing import SigningKey, SigningRing, format_public_keys, parse_public_keys
from guardian.store.audit import AuditRow, canonical
from shared.errors import ConfigError, FailedPrecondition

PINNED_ROW: list[int | str] = [7, 1795600000000, "alice", "0123456789abcdef", "memory.store", "mem_x", "allow"]
PINNED_ROW += ["ok", "p" * 64, "d" * 32, "k1"]
PINNED_MAC = "61922f91e0e6c700122d992ff2b77e80ad0fcd182855b62a14a068f2dfe5b1be"
PINNED_LINK = "fa3a7cdd475d0dcae61f1f68f684d0589a4ac4512bba2cd09efee2aa8bfcd620"
PINNED_SIGNATURE = (
    "25522e79fe1e6cb7e3072536e793ba041c3f8f50c3c94d84f6bb571df437a53d"
    "56f23aa2f17edd3b7f89aacddd295d84c9cd2189f5277c94def455e202a3e402"
)


# -- the formats, pinned: a third party's verifier must get these same bytes -------------------------


def test_the_canonical_row_is_the_store_s_canonical_form_v1() -> None:
    row = AuditRow(*PINNED_ROW, "")  # type: ignore[arg-type, call-arg]
    assert canonical_v1(PINNED_ROW) == canonical(row)
    assert canonical_v1(PINNED_ROW).startswith(b"agent-guardian audit v1\n1:7,13:1795600000000,5:alice,")
    with pytest.raises(ValueError, match="11 fields"):
        canonical_v1(PINNED_ROW[:-1])


def test_the_link_formula_is_pinned() -> None:
    by_hand = hashlib.sha256(
        b"agent-guardian audit link v1\n" + canonical_v1(PINNED_ROW) + b"64:" + PINNED_MAC.encode() + b"," + b"0" * 64
    ).hexdigest()
    assert next_link(canonical_v1(PINNED_ROW), PINNED_MAC, GENESIS_LINK) == by_hand == PINNED_LINK
    # Every field, the mac and the previous link each change it.
    changed = [*PINNED_ROW[:7], "ok!", *PINNED_ROW[8:]]
    assert next_link(canonical_v1(changed), PINNED_MAC, GENESIS_LINK) != PINNED_LINK
    assert next_link(canonical_v1(PINNED_ROW), "0" * 64, GENESIS_LINK) != PINNED_LINK
    assert next_link(canonical_v1(PINNED_ROW), PINNED_MAC, "1" * 64) != PINNED_LINK


def test_the_signed_head_message_and_its_signature_are_pinned() -> None:
    message = head_message(7, 1795600000001, PINNED_LINK, "r1")
    assert message == (
        b"agent-guardian audit signed head v1\n1:7,13:1795600000001,64:" + PINNED_LINK.encode() + b",2:r1,"
    )
    key = SigningKey.from_private_bytes("r1", 0, bytes(range(32)))
    assert key.private.sign(message).hex() == PINNED_SIGNATURE  # Ed25519 is deterministic
    assert base64.b64encode(key.public_raw).decode() == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    head = SignedHead(7, 1795600000001, PINNED_LINK, "r1", PINNED_SIGNATURE)
    assert head.verifies_with(key.public)
    assert not SignedHead(8, 1795600000001, PINNED_LINK, "r1", PINNED_SIGNATURE).verifies_with(key.public)
    assert not SignedHead(7, 1795600000001, PINNED_LINK, "r2", PINNED_SIGNATURE).verifies_with(key.public)
    assert not SignedHead(7, 1795600000001, PINNED_LINK, "r1", "zz").verifies_with(key.public)


def test_a_signing_ring_signs_with_its_primary_and_an_empty_one_refuses() -> None:
    first = SigningKey.from_private_bytes("r1", 1, bytes(range(32)))
    second = SigningKey.from_private_bytes("r2", 2, bytes(range(1, 33)))
    ring = SigningRing("r2", {"r1": first, "r2": second})
    key_id, signature = ring.sign(b"message")
    assert key_id == "r2" and len(signature) == 128
    second.public.verify(bytes.fromhex(signature), b"message")
    assert "r1" in repr(ring) and "private" not in repr(ring).lower()
    with pytest.raises(FailedPrecondition, match="no audit-signing key"):
        SigningRing().sign(b"message")


# -- exports built by hand -------------------------------------------------------------------------


KEY = SigningKey.from_private_bytes("r1", 1000, bytes(range(32)))
OTHER = SigningKey.from_private_bytes("r1", 1000, bytes(range(100, 132)))


def build_export(rows: int = 10, heads: Iterable[int] = (4, 8), after: int = 0, key: SigningKey = KEY) -> list[str]:
    """An export of rows after..after+rows with heads signed at the given rows, as the format says."""
    start = GENESIS_LINK if not after else "ab" * 32
    lines = [
        json.dumps(
            {
                "type": "export",
                "format": EXPORT_FORMAT,
                "after_seq": after,
                "until_seq": after + rows,
                "start_link": start,
                "exported_at_ms": 5000,
            }
        ),
        json.dumps(
            {
                "type": "public_key",
                "key_id": key.key_id,
                "algorithm": "ed25519",
                "public_key": base64.b64encode(key.public_raw).decode(),
                "created_at_ms": 1000,
                "primary": True,
                "heads": 2,
                "first_seq": 4,
                "last_seq": 8,
                "first_ts_ms": 2000,
                "last_ts_ms": 3000,
            }
        ),
    ]
    link = start
    signed_at = set(heads)
    for seq in range(after + 1, after + rows + 1):
        values: list[Any] = [seq, 1000 + seq, "agent", "", "memory.store", f"mem_{seq}", "allow", "ok", "v", "", "k1"]
        mac = hashlib.sha256(str(seq).encode()).hexdigest()
        link = next_link(canonical_v1(values), mac, link)
        lines.append(
            json.dumps({"type": "row", **dict(zip(ROW_FIELDS, values, strict=True)), "mac": mac, "link": link})
        )
        if seq in signed_at:
            message = head_message(seq, 2000 + seq, link, key.key_id)
            head = SignedHead(seq, 2000 + seq, link, key.key_id, key.private.sign(message).hex())
            lines.append(json.dumps(head.to_record()))
    return lines


def check(lines: list[str], trusted: dict[str, Ed25519PublicKey] | None = None) -> ExportReport:
    data = [(line + "\n").encode() for line in lines]
    opener: Callable[[], Iterable[bytes]] = lambda: iter(data)  # noqa: E731
    return verify_export(opener, trusted if trusted is not None else {"r1": KEY.public})


def line_of(lines: list[str], seq: int, kind: str = "row") -> int:
    """The 1-based line number of the record of that type for that row."""
    return next(
        i for i, line in enumerate(lines, 1) if json.loads(line)["type"] == kind and json.loads(line)["seq"] == seq
    )


def edited(lines: list[str], number: int, **changes: Any) -> list[str]:
    record = json.loads(lines[number - 1])
    record.update(changes)
    return [*lines[: number - 1], json.dumps(record), *lines[number:]]


def test_an_intact_export_verifies_and_names_the_rows_not_covered() -> None:
    report = check(build_export())
    assert report.verified, report.problem
    assert (report.rows, report.first_seq, report.last_seq) == (10, 1, 10)
    assert (report.signed_through, report.heads_checked, report.keys_used, report.not_covered) == (8, 2, ("r1",), 2)
    assert report.warnings == ()


def test_an_export_that_starts_later_verifies_from_its_start_link() -> None:
    report = check(build_export(after=100, heads=(105,)))
    assert report.verified and (report.first_seq, report.signed_through, report.not_covered) == (101, 105, 5)


def test_heads_may_stand_anywhere_in_the_file() -> None:
    lines = build_export()
    heads = [line for line in lines if '"signed_head"' in line]
    moved = [line for line in lines if '"signed_head"' not in line] + heads[::-1]
    assert check(moved).verified


@pytest.mark.parametrize("field", ["reason", "agent", "ts_ms", "key_id", "mac"])
def test_a_changed_field_is_caught_at_its_row(field: str) -> None:
    lines = build_export()
    number = line_of(lines, 3)
    value: Any = 1 if field == "ts_ms" else "x" * 64 if field == "mac" else "edited"
    problem = check(edited(lines, number, **{field: value})).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("changed", number, 3)


def test_a_changed_row_whose_links_were_recomputed_is_caught_at_the_head() -> None:
    """Someone who edits a row and recomputes every link after it still cannot make the signed link."""
    lines = build_export()
    records = [json.loads(line) for line in lines]
    records[line_of(lines, 2) - 1]["reason"] = "edited"
    link = GENESIS_LINK
    for record in records:
        if record["type"] == "row":
            link = next_link(canonical_v1([record[name] for name in ROW_FIELDS]), record["mac"], link)
            record["link"] = link
    problem = check([json.dumps(record) for record in records]).problem
    head_line = line_of(lines, 4, "signed_head")
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("changed", head_line, 4)
    assert "do not match the head signed for row 4" in problem.message


def test_a_removed_row_is_caught_where_it_is_missing() -> None:
    lines = build_export()
    number = line_of(lines, 5)
    problem = check([*lines[: number - 1], *lines[number:]]).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("missing", number, 6)
    assert "row 5 is not in the export" in problem.message


def test_swapped_rows_are_caught_as_out_of_order() -> None:
    lines = build_export(heads=(8,))
    six, seven = line_of(lines, 6), line_of(lines, 7)
    swapped = list(lines)
    swapped[six - 1], swapped[seven - 1] = lines[seven - 1], lines[six - 1]
    problem = check(swapped).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("out_of_order", six, 7)
    assert "row 6" in problem.message


def test_a_duplicated_row_is_out_of_order() -> None:
    lines = build_export()
    number = line_of(lines, 2)
    problem = check([*lines[:number], lines[number - 1], *lines[number:]]).problem
    assert problem is not None and (problem.kind, problem.line) == ("out_of_order", number + 1)


def test_a_cut_tail_with_its_head_left_is_caught() -> None:
    lines = build_export()
    kept = [*lines[: line_of(lines, 7)], lines[line_of(lines, 8, "signed_head") - 1]]
    problem = check(kept).problem
    assert problem is not None and problem.kind == "missing" and "rows 8..8 were removed" in problem.message


def test_a_cut_tail_is_caught_by_the_header_bound() -> None:
    lines = build_export()
    problem = check(lines[: line_of(lines, 9)]).problem
    assert problem is not None and problem.kind == "missing" and "runs to row 10" in problem.message


def test_a_forged_head_signature_is_caught_at_its_line() -> None:
    lines = build_export()
    number = line_of(lines, 8, "signed_head")
    record = json.loads(lines[number - 1])
    forged = record["signature"][:-2] + ("00" if record["signature"][-2:] != "00" else "01")
    problem = check(edited(lines, number, signature=forged)).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("bad_signature", number, 8)
    assert check(build_export()).signed_through == 8


def test_another_guardian_s_public_key_fails_every_head() -> None:
    problem = check(build_export(), {"r1": OTHER.public}).problem
    assert problem is not None and (problem.kind, problem.seq) == ("bad_signature", 4)
    report = check(build_export(), {"r1": OTHER.public})
    assert report.warnings == ("the export lists key r1 with a public key other than the trusted one",)


def test_a_head_by_a_key_not_in_the_file_is_an_unknown_key() -> None:
    problem = check(build_export(), {"r9": KEY.public}).problem
    assert problem is not None and (problem.kind, problem.seq) == ("unknown_key", 4) and "'r1'" in problem.message


def test_an_export_with_no_signed_head_proves_nothing() -> None:
    problem = check(build_export(heads=())).problem
    assert problem is not None and problem.kind == "not_signed"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"type": "memo"}', "unknown record type 'memo'"),
        ("", "not JSON"),
    ],
)
def test_a_malformed_line_is_named(line: str, why: str) -> None:
    lines = build_export()
    problem = check([*lines[:4], line, *lines[4:]]).problem
    assert problem is not None and (problem.kind, problem.line) == ("malformed", 5) and why in problem.message


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"seq": "3"}, "seq must be a whole number"),
        ({"seq": True}, "seq must be a whole number"),
        ({"agent": 5}, "agent must be a string"),
        ({"link": "XYZ"}, "link must be 64 lowercase hex digits"),
        ({"extra": 1}, "unexpected extra"),
    ],
)
def test_a_row_of_the_wrong_shape_is_malformed(changes: dict[str, Any], why: str) -> None:
    lines = build_export()
    number = line_of(lines, 2)
    problem = check(edited(lines, number, **changes)).problem
    assert problem is not None and (problem.kind, problem.line) == ("malformed", number) and why in problem.message


def test_a_missing_or_foreign_header_is_malformed() -> None:
    lines = build_export()
    for bad in (lines[1:], [json.dumps({**json.loads(lines[0]), "format": "v0"}), *lines[1:]], []):
        problem = check(bad).problem
        assert problem is not None and (problem.kind, problem.line) == ("malformed", 1)


def test_a_malformed_line_after_a_changed_row_reports_the_changed_row_first() -> None:
    lines = build_export()
    number = line_of(lines, 2)
    problem = check([*edited(lines, number, reason="edited"), "{broken"]).problem
    assert problem is not None and (problem.kind, problem.line) == ("changed", number)


# -- the public key file ---------------------------------------------------------------------------


def test_the_public_key_file_round_trips() -> None:
    text = format_public_keys([("r1", KEY.public_raw, "r1: created then"), ("r2", OTHER.public_raw, "")])
    assert "# r1: created then\nr1 ed25519 " in text
    keys = parse_public_keys(text, "keys.txt")
    assert set(keys) == {"r1", "r2"} and keys["r1"].public_bytes_raw() == KEY.public_raw


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "holds no public key"),
        ("# only a comment\n", "holds no public key"),
        ("r1 ssh-ed25519 AAAA\n", "line 1: expected '<key id> ed25519 <base64 public key>'"),
        ("r1 ed25519\n", "line 1: expected"),
        ("r1 ed25519 not*base64\n", "line 1: the public key is not base64"),
        ("r1 ed25519 " + base64.b64encode(b"x" * 31).decode() + "\n", "32 bytes (44 base64 characters), not 31"),
        ("\nr1 ed25519 {k}\nr1 ed25519 {k}\n", "line 3: key id 'r1' appears twice"),
        ("r/1 ed25519 {k}\n", "line 1: expected"),
    ],
)
def test_a_malformed_public_key_file_is_refused_naming_the_line(text: str, why: str) -> None:
    encoded = base64.b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    with pytest.raises(ConfigError) as caught:
        parse_public_keys(text.replace("{k}", encoded), "keys.txt")
    assert why in caught.value.message and caught.value.message.startswith("keys.txt")


# -- the audit-signing ring in the key store -------------------------------------------------------


def test_the_guardian_makes_its_audit_signing_key_once_and_rotates_it(tmp_path: Path) -> None:
    create_keys(tmp_path / "keys")
    path = tmp_path / "rotated-keys.json"
    store = KeyStore(path, load_keys(tmp_path / "keys"))
    assert store.keys.audit_signing.primary_id == "" and not path.exists()  # a store made offline writes nothing
    assert store.ensure_audit_signing(1000) == "r1"
    assert store.ensure_audit_signing(2000) is None
    first = store.keys.audit_signing.keys["r1"].public_raw
    keys, key_id, previous = store.rotate("audit-signing", 3000)
    assert (key_id, previous, keys.audit_signing.primary_id) == ("r2", "r1", "r2")
    again = KeyStore(path, load_keys(tmp_path / "keys"))  # kept wrapped: the same keys after a restart
    assert again.keys.audit_signing.keys["r1"].public_raw == first and again.keys.audit_signing.primary_id == "r2"
    listed = [(v.key_id, v.source, v.primary) for v in again.versions() if v.ring == "audit-signing"]
    assert listed == [("r1", "rotated", False), ("r2", "rotated", True)]
    text = path.read_text()
    private = again.keys.audit_signing.keys["r1"].private.private_bytes_raw()
    assert base64.b64encode(private).decode() not in text and private.hex() not in text  # wrapped, never in clear
    with pytest.raises(FailedPrecondition, match="never retired"):
        again.check_retirable("audit-signing", "r1")


def test_only_rotated_non_primary_audit_and_database_keys_may_be_retired(tmp_path: Path) -> None:
    create_keys(tmp_path / "keys")
    store = KeyStore(tmp_path / "rotated-keys.json", load_keys(tmp_path / "keys"))
    for ring in ("audit", "database"):
        store.rotate(ring, 1000)
    for ring, key_id, why in (
        ("audit", "r1", "signs new audit data"),
        ("audit", "k1", "not a key the guardian rotated in"),
        ("database", "r1", "encrypts the database"),
        ("database", "base", "never retired: it also wraps the rotated keys"),
    ):
        with pytest.raises(FailedPrecondition, match=why):
            store.check_retirable(ring, key_id)
    for ring in ("audit", "database"):
        store.rotate(ring, 2000)
        store.check_retirable(ring, "r1")
    old_database = store.database_key("r1")
    keys = store.retire("database", "r1")
    assert old_database not in keys.database_history and len(keys.database_history) == 2  # r2, base
    keys = store.retire("audit", "r1")
    assert set(keys.audit.keys) == {"k1", "r2"}
    reread = KeyStore(tmp_path / "rotated-keys.json", load_keys(tmp_path / "keys"))
    retired = {(v.ring, v.key_id) for v in reread.versions() if v.retired}
    assert retired == {("audit", "r1"), ("database", "r1")}
