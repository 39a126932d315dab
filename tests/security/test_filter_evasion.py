"""Secrets the shipped filters reject, disguised: invisible characters, compatibility forms, case.

The filters run after Unicode NFKC and the removal of control, format and other
invisible characters, so each disguise below is still the secret it hides. The
store must be refused (PERMISSION_DENIED, the rule named), in whichever field the
secret sits; the secret must appear neither in the error, nor in the audit row,
nor in the guardian's log; and nothing of it may be stored.
"""

from __future__ import annotations

import itertools
import json
import secrets
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

import grpc
import pytest

from tests.security.hostile import Agent, Attack, enrol, hostile_guardian, memory_row, refused
from tests.support.harness import Guardian, agent_pb2

pb = agent_pb2
_UPPER_DIGITS: Final = string.ascii_uppercase + string.digits
_ALNUM: Final = string.ascii_letters + string.digits
#: The random part of every secret sent in this module, for the final look at the log.
SENT: Final[list[str]] = []


@dataclass(frozen=True)
class Secret:
    """A credential the shipped filters reject, and its random part (what must never leak)."""

    text: str
    random: str
    rule: str


def aws_key() -> Secret:
    """An AWS access key id (rule aws-access-key-id)."""
    random = "".join(secrets.choice(_UPPER_DIGITS) for _ in range(16))
    return Secret("AKIA" + random, random, "aws-access-key-id")


def github_token() -> Secret:
    """A GitHub personal access token (rule github-token)."""
    random = "".join(secrets.choice(_ALNUM) for _ in range(36))
    return Secret("ghp_" + random, random, "github-token")


def aws_secret_mixed_case() -> Secret:
    """An AWS secret access key assigned under a mixed-case name (rule aws-secret-access-key)."""
    random = "".join(secrets.choice(_ALNUM + "/+") for _ in range(40))
    return Secret(f"AwS_SeCrEt_AcCeSs_KeY = {random}", random, "aws-secret-access-key")


def pem_block() -> Secret:
    """A PEM private key block (rule private-key-block)."""
    random = "".join(secrets.choice(_ALNUM) for _ in range(48))
    # NBSP and an ideographic space where the header has spaces: NFKC makes them plain spaces.
    return Secret(f"-----BEGIN\u00a0RSA\u3000PRIVATE KEY-----\nMIIE{random}\n", random, "private-key-block")


def between(separators: str) -> Callable[[str], str]:
    """A disguise that puts the separators, in turn, between every two characters."""

    def disguise(text: str) -> str:
        """text with the separators woven in."""
        cycle = itertools.cycle(separators)
        return "".join(char + next(cycle) for char in text[:-1]) + text[-1]

    return disguise


def mapped(table: Callable[[str], str]) -> Callable[[str], str]:
    """A disguise that replaces each character by its compatibility form (others left as they are)."""
    return lambda text: "".join(table(char) for char in text)


def fullwidth(char: str) -> str:
    """The fullwidth form of a printable ASCII character."""
    return chr(ord(char) + 0xFEE0) if "!" <= char <= "~" else char


def math_bold(char: str) -> str:
    """The mathematical bold form of an ASCII letter or digit."""
    if char.isascii() and char.isupper():
        return chr(0x1D400 + ord(char) - ord("A"))
    if char.isascii() and char.islower():
        return chr(0x1D41A + ord(char) - ord("a"))
    if char.isascii() and char.isdigit():
        return chr(0x1D7CE + int(char))
    return char


def circled(char: str) -> str:
    """The circled form of an upper-case ASCII letter or a digit."""
    if char.isascii() and char.isupper():
        return chr(0x24B6 + ord(char) - ord("A"))
    if char.isascii() and char.isdigit():
        return "\u24ea" if char == "0" else chr(0x2460 + int(char) - 1)
    return char


def mixed_compat(text: str) -> str:
    """Fullwidth, bold, circled and plain characters in turn, a zero-width space between each."""
    forms: Iterator[Callable[[str], str]] = itertools.cycle((fullwidth, math_bold, circled, str))
    return "\u200b".join(next(forms)(char) for char in text)


@dataclass(frozen=True)
class Case:
    """One disguise: the attack, which secret, how it is disguised, and where it is put."""

    attack: Attack
    secret: Callable[[], Secret]
    disguise: Callable[[str], str]
    where: str = "content"


def _same(text: str) -> str:
    """No disguise."""
    return text


CASES: Final = (
    Case(Attack("evasion.plain", "an AWS access key id as it is (the baseline)"), aws_key, _same),
    Case(Attack("evasion.zero-width-space", "U+200B between every character"), aws_key, between("\u200b")),
    Case(
        Attack("evasion.zero-width-joiners", "U+200C and U+200D between the characters"),
        aws_key,
        between("\u200c\u200d"),
    ),
    Case(Attack("evasion.word-joiner", "U+2060 WORD JOINER between the characters"), aws_key, between("\u2060")),
    Case(Attack("evasion.soft-hyphen", "U+00AD SOFT HYPHEN between the characters"), aws_key, between("\u00ad")),
    Case(
        Attack("evasion.bom", "U+FEFF (BOM, zero-width no-break space) between the characters"),
        aws_key,
        between("\ufeff"),
    ),
    Case(
        Attack("evasion.bidi-controls", "bidi embeddings, overrides and isolates between the characters"),
        aws_key,
        between("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"),
    ),
    Case(
        Attack("evasion.tag-characters", "Unicode tag characters (U+E0000 block) between the characters"),
        aws_key,
        between("\U000e0041\U000e0020\U000e007f"),
    ),
    Case(
        Attack("evasion.variation-selectors", "variation selectors between the characters"),
        aws_key,
        between("\ufe0f\ufe00"),
    ),
    Case(
        Attack("evasion.grapheme-joiner", "U+034F COMBINING GRAPHEME JOINER between the characters"),
        aws_key,
        between("\u034f"),
    ),
    Case(Attack("evasion.hangul-filler", "U+3164 HANGUL FILLER between the characters"), aws_key, between("\u3164")),
    Case(Attack("evasion.fullwidth", "fullwidth forms (U+FF21...)"), aws_key, mapped(fullwidth)),
    Case(
        Attack("evasion.math-bold", "mathematical bold letters and digits (NFKC-compatible)"),
        aws_key,
        mapped(math_bold),
    ),
    Case(Attack("evasion.circled", "circled letters and digits (NFKC-compatible)"), aws_key, mapped(circled)),
    Case(
        Attack("evasion.mixed-forms", "fullwidth, bold, circled and plain in turn, zero-width spaces between"),
        aws_key,
        mixed_compat,
    ),
    Case(Attack("evasion.mixed-case", "an AWS secret-key assignment in mixed case"), aws_secret_mixed_case, _same),
    Case(Attack("evasion.odd-spaces", "a PEM private-key header with NBSP and ideographic spaces"), pem_block, _same),
    Case(Attack("evasion.github-fullwidth", "a GitHub token in fullwidth forms"), github_token, mapped(fullwidth)),
    Case(Attack("evasion.in-tag", "a fullwidth AWS key as a tag"), aws_key, mapped(fullwidth), "tag"),
    Case(
        Attack("evasion.in-metadata-value", "a zero-width-split AWS key as a metadata value"),
        aws_key,
        between("\u200b"),
        "metadata-value",
    ),
    Case(
        Attack("evasion.in-metadata-key", "a zero-width-split AWS key as a metadata key"),
        aws_key,
        between("\u200b"),
        "metadata-key",
    ),
    Case(
        Attack("evasion.in-update", "a zero-width-split AWS key written by Update"),
        aws_key,
        between("\u200b"),
        "update",
    ),
    Case(
        Attack("evasion.in-batch", "a fullwidth AWS key in the third memory of a StoreBatch"),
        aws_key,
        mapped(fullwidth),
        "batch",
    ),
)

ATTACKS: Final = tuple(case.attack for case in CASES)


#: The shipped filters, with write budgets that every case here fits in (rate limits are not the point).
ROOMY_RATES: Final = {
    "rate_limits": {"session": {"writes": {"burst": 500, "per_minute": 600}}, "agent": {"writes": {"burst": 500}}}
}


@pytest.fixture(scope="module")
def guardian() -> Iterator[Guardian]:
    """A guardian on the shipped filters, with room for every write of this module."""
    with hostile_guardian(**ROOMY_RATES) as started:
        yield started


@pytest.fixture(scope="module")
def agent(guardian: Guardian) -> Iterator[Agent]:
    """The agent that tries to smuggle the secrets."""
    with enrol(guardian, "smuggler") as enrolled:
        yield enrolled


def attempt_for(agent: Agent, where: str, disguised: str, target: str) -> tuple[Callable[[], object], str]:
    """The call that carries the disguised secret in the named place, and its audit operation."""
    session = agent.session
    draft = {
        "content": pb.MemoryDraft(content=f"deploy with {disguised} today"),
        "tag": pb.MemoryDraft(content="tagged", tags=[disguised]),
        "metadata-value": pb.MemoryDraft(content="annotated", metadata_json=json.dumps({"key": disguised})),
        "metadata-key": pb.MemoryDraft(content="annotated", metadata_json=json.dumps({disguised: 1})),
    }
    if where in draft:
        request = pb.StoreRequest(session_id=session, memory=draft[where])
        return lambda: agent.stub.Store(request, timeout=20), "memory.store"
    if where == "update":
        update = pb.UpdateRequest(session_id=session, id=target, content=f"rotated to {disguised}")
        return lambda: agent.stub.Update(update, timeout=20), "memory.update"
    batch = pb.StoreBatchRequest(
        session_id=session,
        memories=[pb.MemoryDraft(content="first"), pb.MemoryDraft(content="second"), draft["content"]],
    )
    return lambda: agent.stub.StoreBatch(batch, timeout=20), "memory.store_batch"


@pytest.mark.parametrize("case", [pytest.param(case, id=case.attack.id) for case in CASES])
def test_disguised_secrets_are_refused_and_never_echoed(guardian: Guardian, agent: Agent, case: Case) -> None:
    secret = case.secret()
    SENT.append(secret.random)
    disguised = case.disguise(secret.text)
    assert case.disguise is _same or disguised != secret.text
    target = agent.store("the memory an update would change").id
    before = memory_row(guardian, target)
    with guardian.keyed_db() as db:
        count_before = db.execute("SELECT count(*) FROM memories WHERE agent = ?", (agent.name,)).fetchone()[0]
    attempt, operation = attempt_for(agent, case.where, disguised, target)
    refusal = refused(
        guardian,
        attempt,
        grpc.StatusCode.PERMISSION_DENIED,
        operation,
        payloads=[secret.random, secret.random[:12], disguised],
        agent=agent.name,
    )
    assert refusal.details == f"content refused by filter {secret.rule}: remove that part and try again"
    assert refusal.row["reason"].startswith(f"permission_denied: content refused by filter {secret.rule}")
    assert memory_row(guardian, target) == before
    with guardian.keyed_db() as db:
        count = db.execute("SELECT count(*) FROM memories WHERE agent = ?", (agent.name,)).fetchone()[0]
        leaked = db.execute(
            "SELECT count(*) FROM memories WHERE content LIKE ? OR tags LIKE ? OR metadata LIKE ?",
            (f"%{secret.random[:12]}%",) * 3,
        ).fetchone()[0]
    assert (count, leaked) == (count_before, 0)


def test_no_refused_secret_reached_the_guardian_log(guardian: Guardian) -> None:
    """After every disguise above: the guardian's own log holds none of the secrets."""
    assert len(SENT) == len(CASES)
    log = guardian.log_path.read_text(errors="replace")
    for random in SENT:
        assert random[:12] not in log
