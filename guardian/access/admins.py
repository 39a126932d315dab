"""The people who administer the guardian: a name, one Ed25519 public key and a role each.

Roles nest: ``viewer`` reads the audit trail, status and statistics;
``operator`` also runs backups and manages sessions; ``security`` may do
everything (policy, agents, quarantine, keys, incidents, admins). The dispatch
table (guardian/service/rules.py) gives each admin RPC the least role it needs.

The nonces of signed requests are kept until their clock-skew window has passed,
in the database, so a request replayed after a restart is still refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

from guardian.access.signed_request import PublicKey
from guardian.store.database import Connection
from shared.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound
from shared.formats import AGENT_NAME_RE

__all__ = [
    "ROLES",
    "Admin",
    "Role",
    "add",
    "by_fingerprint",
    "check_role",
    "claim_nonce",
    "count",
    "listing",
    "parse_first_admins",
    "remove",
    "role_allows",
]

Role = Literal["viewer", "operator", "security"]
#: The roles, least first: each may do what the ones before it may.
ROLES: Final[tuple[Role, ...]] = get_args(Role)
_COLUMNS: Final = "name, role, public_key, fingerprint, added_at_ms, added_by"


@dataclass(frozen=True)
class Admin:
    """One person who may administer the guardian."""

    name: str
    role: Role
    public_key: PublicKey
    added_at_ms: int
    added_by: str

    @property
    def fingerprint(self) -> str:
        """The key's fingerprint (``SHA256:...``)."""
        return self.public_key.fingerprint

    @property
    def audit_name(self) -> str:
        """How the audit trail names this person (never a valid agent name)."""
        return f"@admin:{self.name}"


def role_allows(role: Role, needed: Role) -> bool:
    """Whether a person of role may make a request that needs the role needed."""
    return ROLES.index(role) >= ROLES.index(needed)


def check_role(value: str, field: str = "role") -> Role:
    """value as a role; InvalidArgument naming the roles otherwise."""
    for role in ROLES:
        if value == role:
            return role
    raise InvalidArgument(f"{field}: must be one of {', '.join(ROLES)}")


def check_name(value: str) -> str:
    """value as an admin's name (the agent-name form: letters, digits, '.', '_', '-'; 1-64)."""
    if not AGENT_NAME_RE.fullmatch(value):
        raise InvalidArgument("name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def _admin(row: tuple[str, str, str, str, int, str]) -> Admin:
    name, role, public_key, _fingerprint, added_at_ms, added_by = row
    return Admin(name, check_role(role), PublicKey.parse(public_key), added_at_ms, added_by)


def by_fingerprint(connection: Connection, fingerprint: str) -> Admin | None:
    """The person whose key has this fingerprint, or None."""
    row = connection.execute(
        f"SELECT {_COLUMNS} FROM admins WHERE fingerprint = ?",  # noqa: S608 (constant)
        (fingerprint,),
    ).fetchone()
    return _admin(row) if row else None


def listing(connection: Connection) -> list[Admin]:
    """Every admin, by name."""
    rows = connection.execute(f"SELECT {_COLUMNS} FROM admins ORDER BY name").fetchall()  # noqa: S608 (constant)
    return [_admin(row) for row in rows]


def count(connection: Connection, role: Role | None = None) -> int:
    """How many admins there are (of that role)."""
    if role is None:
        return int(connection.execute("SELECT count(*) FROM admins").fetchone()[0])
    return int(connection.execute("SELECT count(*) FROM admins WHERE role = ?", (role,)).fetchone()[0])


def add(connection: Connection, admin: Admin) -> None:
    """Enrol admin; FailedPrecondition when its name or its key is already enrolled."""
    if connection.execute("SELECT 1 FROM admins WHERE name = ?", (admin.name,)).fetchone():
        raise FailedPrecondition(f"an admin named {admin.name!r} already exists (remove it first to change it)")
    holder = by_fingerprint(connection, admin.fingerprint)
    if holder is not None:
        raise FailedPrecondition(f"that key ({admin.fingerprint}) is already enrolled, for {holder.name!r}")
    connection.execute(
        f"INSERT INTO admins ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608 (constant)
        (admin.name, admin.role, admin.public_key.openssh, admin.fingerprint, admin.added_at_ms, admin.added_by),
    )


def remove(connection: Connection, name: str) -> Admin:
    """Remove the admin named name; the one removed. Never the last with the security role."""
    row = connection.execute(f"SELECT {_COLUMNS} FROM admins WHERE name = ?", (name,)).fetchone()  # noqa: S608
    if row is None:
        raise NotFound(f"no admin is named {name!r} (see guardianctl admins list)")
    admin = _admin(row)
    if admin.role == "security" and count(connection, "security") == 1:
        raise FailedPrecondition(f"{name!r} is the last admin with the security role: enrol another before removing it")
    connection.execute("DELETE FROM admins WHERE name = ?", (name,))
    return admin


def parse_first_admins(text: str, source: str, now_ms: int) -> list[Admin]:
    """The admins a first-admins file names, one a line: ``NAME ROLE ssh-ed25519 AAAA... [comment]``.

    ConfigError naming the line when one is malformed; at least one must have the security role.
    """
    found: list[Admin] = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            if len(words) < 4:
                raise InvalidArgument("expected NAME ROLE ssh-ed25519 AAAA...")
            found.append(
                Admin(
                    check_name(words[0]),
                    check_role(words[1]),
                    PublicKey.parse(" ".join(words[2:4])),
                    now_ms,
                    "@first-admins",
                )
            )
        except InvalidArgument as error:
            raise ConfigError(f"{source} line {number}: {error.message}") from None
    if not any(admin.role == "security" for admin in found):
        raise ConfigError(f"{source}: names no admin with the security role (the first admins need one)")
    return found


def claim_nonce(connection: Connection, nonce: str, now_ms: int, keep_until_ms: int) -> bool:
    """Record a signed request's nonce; False when it was already used (a replay). Forgets expired ones."""
    connection.execute("DELETE FROM admin_nonces WHERE expires_at_ms < ?", (now_ms,))
    cursor = connection.execute(
        "INSERT OR IGNORE INTO admin_nonces (nonce, expires_at_ms) VALUES (?, ?)", (nonce, keep_until_ms)
    )
    return int(cursor.rowcount) == 1
