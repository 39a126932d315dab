"""The policy: the security team's YAML that decides every request.

Read with ``yaml.safe_load``, validated strictly (unknown keys are errors that
name their path), compiled into an immutable :class:`Policy`. Default deny:
an operation no profile grants is refused. ``version`` is the sha256 of the
canonical (sorted-key JSON) form of the file's content, so the same policy
always has the same version whatever its formatting; every audit row names
the version that decided it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from guardian.yamlfile import Section, load_yaml_mapping
from shared.errors import ConfigError
from shared.formats import AGENT_NAME_RE

__all__ = [
    "OPERATIONS",
    "Limits",
    "Policy",
    "Profile",
    "SessionRules",
    "load_policy",
    "parse_policy",
    "render_default_policy",
]

#: Every memory operation a profile can grant.
OPERATIONS: Final = frozenset({"store", "get", "search", "list", "update", "delete"})


@dataclass(frozen=True)
class Limits:
    """Size and count limits checked at the shape stage."""

    max_content_bytes: int
    max_metadata_bytes: int
    max_tags: int
    max_tag_bytes: int
    max_batch: int
    max_page_size: int
    max_query_bytes: int


@dataclass(frozen=True)
class SessionRules:
    """How long a session lives."""

    idle_timeout_ms: int
    max_lifetime_ms: int


@dataclass(frozen=True)
class Profile:
    """What the agents bound to this profile may do."""

    name: str
    operations: frozenset[str]
    limits: Limits


@dataclass(frozen=True)
class Policy:
    """A validated, compiled, immutable policy."""

    version: str
    sessions: SessionRules
    profiles: MappingProxyType[str, Profile]
    agent_profiles: MappingProxyType[str, str]
    default_profile: str

    def profile_for(self, agent: str) -> Profile:
        """The profile that governs agent (the default profile unless the policy names another)."""
        return self.profiles[self.agent_profiles.get(agent, self.default_profile)]


def load_policy(path: Path) -> Policy:
    """Read, validate and compile the policy file at path."""
    data, _ = load_yaml_mapping(path, "policy")
    return parse_policy(data)


def parse_policy(data: dict[str, Any]) -> Policy:
    """Validate and compile an already-parsed policy mapping."""
    top = Section(data, "")
    if top.integer("version", minimum=1, maximum=1) != 1:
        raise ConfigError("version: only policy format 1 is known")
    sessions_section = top.section("sessions")
    sessions = SessionRules(
        idle_timeout_ms=sessions_section.duration_ms("idle_timeout", "30m"),
        max_lifetime_ms=sessions_section.duration_ms("max_lifetime", "12h"),
    )
    sessions_section.done()
    default_limits = _limits(top.section("limits"), None)
    profiles_section = top.section("profiles", required=True)
    profiles: dict[str, Profile] = {}
    for name in profiles_section.keys():  # noqa: SIM118 - Section is not a dict
        profiles[name] = _profile(name, profiles_section.section(name), default_limits)
    default_profile = top.text("default_profile", "default")
    if default_profile not in profiles:
        raise ConfigError(f"default_profile: no profile named {default_profile!r} under profiles")
    agents_section = top.section("agents")
    agent_profiles: dict[str, str] = {}
    for agent in agents_section.keys():  # noqa: SIM118 - Section is not a dict
        if AGENT_NAME_RE.fullmatch(agent) is None:
            raise ConfigError(f"agents.{agent}: not a valid agent name")
        profile = agents_section.text(agent)
        if profile not in profiles:
            raise ConfigError(f"agents.{agent}: no profile named {profile!r} under profiles")
        agent_profiles[agent] = profile
    top.done()
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return Policy(
        version=hashlib.sha256(canonical.encode()).hexdigest(),
        sessions=sessions,
        profiles=MappingProxyType(profiles),
        agent_profiles=MappingProxyType(agent_profiles),
        default_profile=default_profile,
    )


def _profile(name: str, section: Section, default_limits: Limits) -> Profile:
    operations = section.list_of_str("operations")
    for index, operation in enumerate(operations):
        if operation not in OPERATIONS:
            known = ", ".join(sorted(OPERATIONS))
            raise ConfigError(
                f"{section.child_path('operations')}[{index}]: unknown operation {operation!r} (known: {known})"
            )
    limits = _limits(section.section("limits"), default_limits)
    section.done()
    return Profile(name=name, operations=frozenset(operations), limits=limits)


# Defaults for a policy that sets no limits; each can be overridden globally or per profile.
_DEFAULT_LIMITS: Final = Limits(
    max_content_bytes=65_536,
    max_metadata_bytes=4_096,
    max_tags=16,
    max_tag_bytes=64,
    max_batch=50,
    max_page_size=100,
    max_query_bytes=512,
)
_LIMIT_CEILINGS: Final = {
    "max_content_bytes": 1_048_576,
    "max_metadata_bytes": 65_536,
    "max_tags": 256,
    "max_tag_bytes": 256,
    "max_batch": 500,
    "max_page_size": 1_000,
    "max_query_bytes": 4_096,
}


def _limits(section: Section, inherited: Limits | None) -> Limits:
    base = inherited or _DEFAULT_LIMITS
    values = {
        field: section.integer(field, getattr(base, field), minimum=1, maximum=ceiling)
        for field, ceiling in _LIMIT_CEILINGS.items()
    }
    section.done()
    return Limits(**values)


def render_default_policy() -> str:
    """The policy.yaml that `guardianctl init` writes into a new state dir."""
    return """\
# agent-guardian policy: owned by the security team, read only by the guardian.
# Unknown keys are errors. An operation no profile grants is refused.
version: 1
sessions:
  idle_timeout: 30m     # a session unused this long ends
  max_lifetime: 12h     # no session lives longer
limits:                 # defaults for every profile; a profile may override any
  max_content_bytes: 65536
  max_metadata_bytes: 4096
  max_tags: 16
  max_tag_bytes: 64
  max_batch: 50
  max_page_size: 100
  max_query_bytes: 512
default_profile: default
profiles:
  default:
    operations: [store, get, search, list, update, delete]
  read-only:
    operations: [get, search, list]
agents: {}              # agent name -> profile, for agents not on the default
"""
