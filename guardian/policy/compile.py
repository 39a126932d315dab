"""The policy: the security team's YAML that decides every request.

Read with ``guardian.files.strict_yaml.parse_yaml`` (safe, no aliases, bounded nesting),
validated strictly (unknown keys, wrong types and bad regexes are errors that
name their path), compiled once into an
immutable :class:`Policy` (filters compiled and trial-run here, so a bad rule
fails the load, never a request). Default deny: an operation no profile grants
is refused. ``version`` is the sha256 of the canonical (sorted-key JSON) form
of the parsed YAML, so the same policy always has the same version whatever
its formatting or comments; every audit row names the version that decided it.

What a key left out means is documented in the shipped policy
(``guardian/policy/default.py``): limits, rate limits and anomaly detectors
fall back to built-in defaults; ``filters`` left out means the built-in
default rules, ``filters: []`` means none.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import urllib.parse
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, cast

from guardian.access.oauth import DEFAULT_ALGORITHMS, DEFAULT_SCOPES, OAuthRules
from guardian.access.proposals import MAX_PROPOSAL_TTL_MS, TWO_PERSON_OPERATIONS, TwoPersonRule
from guardian.checks.anomaly import (
    ANOMALY_KINDS,
    ANOMALY_RESPONSES,
    AnomalyKind,
    AnomalyResponse,
    AnomalySpec,
    DetectorSpec,
)
from guardian.checks.filters import (
    FILTER_ACTIONS,
    FILTER_FIELDS,
    FilterAction,
    FilterSet,
    FilterSpec,
    default_filter_specs,
)
from guardian.checks.ratelimit import BucketSpec, RateSpec
from guardian.checks.review import ReviewRules
from guardian.files.strict_yaml import Section, parse_yaml
from guardian.recall.trust import (
    RECALL_ACTIONS,
    TRUST_LEVELS,
    UNRECORDED,
    RecallAction,
    SourceRules,
    TrustLevel,
    TrustView,
    frozen_levels,
)
from shared.errors import ConfigError
from shared.formats import AGENT_NAME_RE, SOURCE_RE

__all__ = [
    "OPERATIONS",
    "AllowedHours",
    "Limits",
    "Policy",
    "Profile",
    "Retention",
    "SessionRules",
    "compile_policy",
    "load_policy",
]

#: Every memory operation a profile can grant.
OPERATIONS: Final = frozenset({"store", "get", "search", "list", "update", "delete"})

#: Names of namespaces (an agent's own namespace is its name) and of filter rules.
_NAMESPACE_RE: Final = AGENT_NAME_RE
_DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: A policy file larger than this is refused before parsing.
MAX_POLICY_BYTES: Final = 1_048_576


@dataclass(frozen=True)
class Limits:
    """Size and count limits checked at the shape stage."""

    max_content_bytes: int
    max_metadata_bytes: int
    max_metadata_depth: int
    max_tags: int
    max_tag_bytes: int
    max_batch: int
    max_page_size: int
    max_query_bytes: int


@dataclass(frozen=True)
class SessionRules:
    """How long a session lives and how many an agent may hold at once."""

    idle_timeout_ms: int
    max_lifetime_ms: int
    max_per_agent: int


@dataclass(frozen=True)
class AllowedHours:
    """When a profile's agents may make requests: on these days, from start to end (local to timezone).

    ``start > end`` spans midnight (22:00-06:00 allows the night).
    """

    timezone: str
    days: frozenset[int]  # 0 = Monday
    start_minute: int
    end_minute: int

    def allows(self, now_ms: int) -> bool:
        """Whether a request at now_ms (Unix ms) falls inside the allowed hours."""
        local = datetime.datetime.fromtimestamp(now_ms / 1000, tz=zoneinfo.ZoneInfo(self.timezone))
        minute = local.hour * 60 + local.minute
        if self.start_minute <= self.end_minute:
            return local.weekday() in self.days and self.start_minute <= minute < self.end_minute
        # Across midnight: the early-morning part belongs to the previous day's window.
        if minute >= self.start_minute:
            return local.weekday() in self.days
        return minute < self.end_minute and (local.weekday() - 1) % 7 in self.days


@dataclass(frozen=True)
class Profile:
    """What the agents bound to this profile may do."""

    name: str
    operations: frozenset[str]
    limits: Limits
    rates: RateSpec
    #: An agent sees only memories younger than this; None: no limit.
    read_window_ms: int | None
    allowed_hours: AllowedHours | None
    #: Namespaces besides the agent's own that it may read, and write.
    read_namespaces: frozenset[str]
    write_namespaces: frozenset[str]
    #: The sources its agents may declare, at what trust, and what its recall does per trust level.
    sources: SourceRules

    def readable_namespaces(self, agent: str) -> tuple[str, ...]:
        """The agent's own namespace first, then the shared ones it may read (or write)."""
        shared = sorted((self.read_namespaces | self.write_namespaces) - {agent})
        return (agent, *shared)


@dataclass(frozen=True)
class Retention:
    """How long memories are kept; the guardian purges older ones on a schedule."""

    max_age_ms: int | None
    purge_every_ms: int


@dataclass(frozen=True)
class Policy:
    """A validated, compiled, immutable policy."""

    version: str
    #: The YAML text as the security team wrote it (comments included), for `policy show`.
    text: str
    sessions: SessionRules
    profiles: MappingProxyType[str, Profile]
    agent_profiles: MappingProxyType[str, str]
    default_profile: str
    filters: FilterSet
    anomaly: AnomalySpec
    retention: Retention
    webhook_url: str | None
    webhook_timeout_ms: int
    #: The source of a write that declares none, and the trust of memories stored before sources were.
    default_source: str
    unrecorded: TrustLevel
    #: Agent -> its profile's source rules, for the agents the policy names.
    writer_sources: MappingProxyType[str, SourceRules]
    #: Which writes are held for review, and on which signals (guardian/checks/review.py).
    review: ReviewRules
    #: Which admin operations need a second person (guardian/access/proposals.py).
    two_person: TwoPersonRule
    #: Whose OAuth access tokens open sessions, as which agents (guardian/access/oauth.py); None: off.
    oauth: OAuthRules | None

    def profile_for(self, agent: str) -> Profile:
        """The profile that governs agent (the default profile unless the policy names another)."""
        return self.profiles[self.agent_profiles.get(agent, self.default_profile)]

    def trust_view(self, agent: str) -> TrustView:
        """Trust as agent's requests see it (guardian/recall/trust.py)."""
        return TrustView(
            own=self.profile_for(agent).sources,
            writers=MappingProxyType(
                {name: self.profiles[profile].sources for name, profile in self.agent_profiles.items()}
            ),
            default_writer=self.profiles[self.default_profile].sources,
            unrecorded=self.unrecorded,
        )


def load_policy(path: Path) -> Policy:
    """Read, validate and compile the policy file at path."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the policy file {path}: {exc.strerror}") from exc
    return compile_policy(raw, str(path))


def compile_policy(raw: bytes | str, source: str = "the policy") -> Policy:
    """Validate and compile policy YAML text; ConfigError names the offending path."""
    if len(raw) > MAX_POLICY_BYTES:
        raise ConfigError(f"{source} is over {MAX_POLICY_BYTES} bytes; a policy is not that large")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise ConfigError(f"{source} is not UTF-8 text") from None
    data = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping at the top level")
    try:
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: use only strings, numbers, booleans, lists and mappings") from None
    return _parse(data, text, hashlib.sha256(canonical.encode()).hexdigest())


def _parse(data: dict[str, Any], text: str, version: str) -> Policy:
    top = Section(data, "")
    if top.integer("version", minimum=1, maximum=1) != 1:
        raise ConfigError("version: only policy format 1 is known")
    sessions_section = top.section("sessions")
    sessions = SessionRules(
        idle_timeout_ms=sessions_section.duration_ms("idle_timeout", "30m"),
        max_lifetime_ms=sessions_section.duration_ms("max_lifetime", "12h"),
        max_per_agent=sessions_section.integer("max_per_agent", 8, minimum=1, maximum=1_000),
    )
    sessions_section.done()
    default_limits = _limits(top.section("limits"), _DEFAULT_LIMITS)
    default_rates = _rates(top.section("rate_limits"), _DEFAULT_RATES)
    default_read_window = _optional_duration(top, "read_window")
    provenance = top.section("provenance")
    source_levels = _source_levels(provenance, "sources", _DEFAULT_SOURCES)
    default_source = provenance.text("default_source", "agent")
    if default_source not in source_levels:
        raise ConfigError(f"{provenance.child_path('default_source')}: {default_source!r} is not under sources")
    unrecorded = _level(provenance, UNRECORDED, "unverified")
    provenance.done()
    review = _review(top.section("review"))
    profiles_section = top.section("profiles", required=True)
    profiles: dict[str, Profile] = {}
    for name in profiles_section.keys():  # noqa: SIM118 - Section is not a dict
        profiles[name] = _profile(
            name,
            profiles_section.section(name),
            default_limits=default_limits,
            default_rates=default_rates,
            default_read_window=default_read_window,
            source_levels=source_levels,
            default_source=default_source,
        )
    if not profiles:
        raise ConfigError("profiles: name at least one profile")
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
    filters = _filters(top)
    anomaly = _anomaly(top)
    retention_section = top.section("retention")
    retention = Retention(
        max_age_ms=_optional_duration(retention_section, "max_age"),
        purge_every_ms=retention_section.duration_ms("purge_every", "1h"),
    )
    retention_section.done()
    alerts = top.section("alerts")
    webhook_url = cast("str | None", alerts.optional("webhook_url", (str,)))
    webhook_timeout_ms = alerts.duration_ms("timeout", "5s")
    if webhook_url is not None:
        parts = urllib.parse.urlsplit(webhook_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("alerts.webhook_url: expected an http:// or https:// URL with a host")
    alerts.done()
    two_person = _two_person(top.section("administration"))
    oauth = _oauth(top.section("oauth")) if top.optional("oauth", (dict,)) is not None else None
    top.done()
    return Policy(
        version=version,
        text=text,
        sessions=sessions,
        profiles=MappingProxyType(profiles),
        agent_profiles=MappingProxyType(agent_profiles),
        default_profile=default_profile,
        filters=filters,
        anomaly=anomaly,
        retention=retention,
        webhook_url=webhook_url,
        webhook_timeout_ms=webhook_timeout_ms,
        default_source=default_source,
        unrecorded=unrecorded,
        writer_sources=MappingProxyType({agent: profiles[name].sources for agent, name in agent_profiles.items()}),
        review=review,
        two_person=two_person,
        oauth=oauth,
    )


def _profile(
    name: str,
    section: Section,
    *,
    default_limits: Limits,
    default_rates: RateSpec,
    default_read_window: int | None,
    source_levels: dict[str, TrustLevel],
    default_source: str,
) -> Profile:
    operations = section.list_of_str("operations")
    for index, operation in enumerate(operations):
        if operation not in OPERATIONS:
            known = ", ".join(sorted(OPERATIONS))
            raise ConfigError(
                f"{section.child_path('operations')}[{index}]: unknown operation {operation!r} (known: {known})"
            )
    limits = _limits(section.section("limits"), default_limits)
    rates = _rates(section.section("rate_limits"), default_rates)
    if limits.max_batch > min(rates.session_writes.capacity, rates.agent_writes.capacity):
        raise ConfigError(
            f"{section.child_path('limits')}.max_batch: {limits.max_batch} is over the write burst"
            " (rate_limits ... writes.burst), so a full batch could never pass"
        )
    read_window = _optional_duration(section, "read_window")
    namespaces = section.section("namespaces")
    read_namespaces = _namespaces(namespaces, "read")
    write_namespaces = _namespaces(namespaces, "write")
    namespaces.done()
    allowed_hours = _allowed_hours(section)
    levels = _profile_sources(section, source_levels)
    sources = SourceRules(
        levels=levels, actions=_recall_actions(section), default_source=_default_source(section, levels, default_source)
    )
    section.done()
    return Profile(
        name=name,
        operations=frozenset(operations),
        limits=limits,
        rates=rates,
        read_window_ms=read_window if read_window is not None else default_read_window,
        allowed_hours=allowed_hours,
        read_namespaces=read_namespaces,
        write_namespaces=write_namespaces,
        sources=sources,
    )


#: The sources a policy that names none knows, and their trust.
_DEFAULT_SOURCES: Final[dict[str, TrustLevel]] = {
    "user": "trusted",
    "agent": "unverified",
    "document": "unverified",
    "tool": "untrusted",
    "web": "untrusted",
    "email": "untrusted",
}
#: What a profile's recall does per level when the policy does not say.
_DEFAULT_RECALL: Final[dict[TrustLevel, RecallAction]] = {
    "trusted": "recall",
    "unverified": "recall",
    "untrusted": "label",
}


def _review(section: Section) -> ReviewRules:
    names = section.list_of_str("levels", ["untrusted"])
    levels: set[TrustLevel] = set()
    for index, name in enumerate(names):
        level = next((level for level in TRUST_LEVELS if level == name), None)
        if level is None:
            raise ConfigError(f"{section.child_path('levels')}[{index}]: expected one of {', '.join(TRUST_LEVELS)}")
        levels.add(level)
    instructions = section.flag("instructions", default=True)
    value = section.optional("similar_to_trusted", (int, float))
    similar = ReviewRules().similar_to_trusted if value is None else value
    if isinstance(similar, bool) or not isinstance(similar, (int, float)) or not 0 <= similar <= 1:
        raise ConfigError(f"{section.child_path('similar_to_trusted')}: a cosine between 0 (off) and 1")
    section.done()
    return ReviewRules(frozenset(levels), instructions, float(similar))


_JWT_ALGORITHMS: Final = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)


def _oauth(section: Section) -> OAuthRules:
    issuer = str(section.text("issuer"))
    audience = str(section.text("audience"))
    for key, value in (("issuer", issuer), ("audience", audience)):
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment:
            raise ConfigError(f"{section.child_path(key)}: expected an https:// URL (http:// only for testing)")
    claim = str(section.text("claim", "client_id"))
    if claim not in ("client_id", "sub"):
        raise ConfigError(f"{section.child_path('claim')}: client_id or sub")
    agents_section = section.section("agents", required=True)
    agents: dict[str, str] = {}
    for caller in agents_section.keys():  # noqa: SIM118 - Section is not a dict
        agent = str(agents_section.text(caller))
        if AGENT_NAME_RE.fullmatch(agent) is None:
            raise ConfigError(f"{agents_section.child_path(caller)}: {agent!r} is not a valid agent name")
        agents[caller] = agent
    agents_section.done()
    scopes: dict[str, frozenset[str]] = dict(DEFAULT_SCOPES)
    if section.optional("scopes", (dict,)) is not None:
        scopes_section = section.section("scopes")
        scopes = {}
        for scope in scopes_section.keys():  # noqa: SIM118 - Section is not a dict
            operations = scopes_section.list_of_str(scope)
            unknown = sorted(set(operations) - OPERATIONS)
            if unknown:
                raise ConfigError(f"{scopes_section.child_path(scope)}: {unknown[0]!r} is not an operation")
            scopes[scope] = frozenset(operations)
        scopes_section.done()
    algorithms = section.list_of_str("algorithms", list(DEFAULT_ALGORITHMS))
    bad = [name for name in algorithms if name not in _JWT_ALGORITHMS]
    if bad or not algorithms:
        raise ConfigError(f"{section.child_path('algorithms')}: some of {', '.join(sorted(_JWT_ALGORITHMS))}")
    keys_max_age_ms = section.duration_ms("keys_max_age", "24h")
    clock_skew_ms = section.duration_ms("clock_skew", "30s")
    if clock_skew_ms > 300_000:
        raise ConfigError(f"{section.child_path('clock_skew')}: at most 5m")
    section.done()
    return OAuthRules(issuer, audience, claim, agents, scopes, tuple(algorithms), keys_max_age_ms, clock_skew_ms)


def _two_person(section: Section) -> TwoPersonRule:
    names = section.list_of_str("two_person", [])
    for index, name in enumerate(names):
        if name not in TWO_PERSON_OPERATIONS:
            raise ConfigError(
                f"{section.child_path('two_person')}[{index}]: {name!r} is not an operation the two-person rule"
                f" covers; expected some of {', '.join(sorted(TWO_PERSON_OPERATIONS))}"
            )
    expires_ms = section.duration_ms("proposals_expire", "24h")
    if not 60_000 <= expires_ms <= MAX_PROPOSAL_TTL_MS:
        raise ConfigError(f"{section.child_path('proposals_expire')}: between 1m and 7d")
    section.done()
    return TwoPersonRule(frozenset(names), expires_ms)


def _level(section: Section, key: str, default: str) -> TrustLevel:
    value = section.text(key, default)
    for level in TRUST_LEVELS:
        if value == level:
            return level
    raise ConfigError(f"{section.child_path(key)}: expected one of {', '.join(TRUST_LEVELS)}, got {value!r}")


def _source_levels(parent: Section, key: str, default: dict[str, TrustLevel]) -> dict[str, TrustLevel]:
    """A mapping of source -> trust level (absent: default)."""
    if parent.optional(key, (dict,)) is None:
        return dict(default)
    section = parent.section(key)
    levels: dict[str, TrustLevel] = {}
    for source in section.keys():  # noqa: SIM118 - Section is not a dict
        if SOURCE_RE.fullmatch(source) is None or source == UNRECORDED:
            raise ConfigError(
                f"{section.child_path(source)}: not a source name (a lowercase kind such as web, or kind:name such"
                f" as tool:calendar; {UNRECORDED!r} is reserved)"
            )
        levels[source] = _level(section, source, "untrusted")
    section.done()
    if not levels:
        raise ConfigError(f"{parent.child_path(key)}: name at least one source")
    return levels


def _profile_sources(profile: Section, levels: dict[str, TrustLevel]) -> Mapping[str, TrustLevel]:
    """The sources a profile may declare: a list (at the policy's levels), a mapping (its own levels), or all."""
    value = profile.optional("sources", (list, dict))
    if value is None:
        return frozen_levels(levels)
    if isinstance(value, dict):
        return frozen_levels(_source_levels(profile, "sources", levels))
    names = profile.list_of_str("sources")
    for index, source in enumerate(names):
        if source not in levels:
            raise ConfigError(
                f"{profile.child_path('sources')}[{index}]: {source!r} is not under provenance.sources"
                " (list it there with its trust level, or give this profile a mapping of source: level)"
            )
    return frozen_levels({source: levels[source] for source in names})


def _default_source(profile: Section, levels: Mapping[str, TrustLevel], policy_default: str) -> str:
    """A profile's default source: its own ``default_source``; else the policy's, if the profile may declare
    it; else the least trusted source it may declare (a browsing agent's notes default to what it reads)."""
    own = profile.optional("default_source", (str,))
    if own is not None:
        if own not in levels:
            raise ConfigError(f"{profile.child_path('default_source')}: {own!r} is not one of this profile's sources")
        return str(own)
    if policy_default in levels:
        return policy_default
    return max(levels, key=lambda source: TRUST_LEVELS.index(levels[source]))


def _recall_actions(profile: Section) -> Mapping[TrustLevel, RecallAction]:
    section = profile.section("recall")
    actions: dict[TrustLevel, RecallAction] = {}
    for level in TRUST_LEVELS:
        action = section.text(level, _DEFAULT_RECALL[level])
        if action not in RECALL_ACTIONS:
            raise ConfigError(
                f"{section.child_path(level)}: expected one of {', '.join(RECALL_ACTIONS)}, got {action!r}"
            )
        actions[level] = cast("RecallAction", action)
    section.done()
    return MappingProxyType(actions)


def _namespaces(section: Section, key: str) -> frozenset[str]:
    names = section.list_of_str(key, [])
    for index, name in enumerate(names):
        if _NAMESPACE_RE.fullmatch(name) is None:
            raise ConfigError(f"{section.child_path(key)}[{index}]: not a valid namespace name")
    return frozenset(names)


def _optional_duration(section: Section, key: str) -> int | None:
    if section.optional(key, (str,)) is None:
        return None
    return section.duration_ms(key, "1s")


def _allowed_hours(profile: Section) -> AllowedHours | None:
    if profile.optional("allowed_hours", (dict,)) is None:
        return None
    section = profile.section("allowed_hours")
    timezone = section.text("timezone", "UTC")
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{section.child_path('timezone')}: unknown time zone {timezone!r}") from None
    days = section.list_of_str("days", list(_DAYS))
    for index, day in enumerate(days):
        if day not in _DAYS:
            raise ConfigError(f"{section.child_path('days')}[{index}]: expected one of {', '.join(_DAYS)}")
    start = _clock_minute(section, "from")
    end = _clock_minute(section, "to")
    if start == end:
        raise ConfigError(f"{section.child_path('to')}: must differ from 'from'")
    section.done()
    return AllowedHours(timezone, frozenset(_DAYS.index(day) for day in days), start, end)


def _clock_minute(section: Section, key: str) -> int:
    value = section.text(key)
    hours, _, minutes = value.partition(":")
    if not (hours.isdigit() and minutes.isdigit() and len(minutes) == 2 and int(hours) <= 24 and int(minutes) < 60):
        raise ConfigError(f"{section.child_path(key)}: expected a time like 08:00, got {value!r}")
    minute = int(hours) * 60 + int(minutes)
    if minute > 24 * 60:
        raise ConfigError(f"{section.child_path(key)}: expected a time no later than 24:00, got {value!r}")
    return minute % (24 * 60) if key == "from" else minute


# Defaults for a policy that sets no limits; each can be overridden globally or per profile.
_DEFAULT_LIMITS: Final = Limits(
    max_content_bytes=65_536,
    max_metadata_bytes=4_096,
    max_metadata_depth=8,
    max_tags=16,
    max_tag_bytes=64,
    max_batch=20,
    max_page_size=100,
    max_query_bytes=512,
)
_LIMIT_CEILINGS: Final = {
    "max_content_bytes": 1_048_576,
    "max_metadata_bytes": 65_536,
    "max_metadata_depth": 32,
    "max_tags": 256,
    "max_tag_bytes": 256,
    "max_batch": 500,
    "max_page_size": 1_000,
    "max_query_bytes": 4_096,
}


def _limits(section: Section, base: Limits) -> Limits:
    values = {
        field: section.integer(field, getattr(base, field), minimum=1, maximum=ceiling)
        for field, ceiling in _LIMIT_CEILINGS.items()
    }
    section.done()
    return Limits(**values)


_DEFAULT_RATES: Final = RateSpec(
    session_reads=BucketSpec(capacity=60, refill_per_s=10.0),
    session_writes=BucketSpec(capacity=30, refill_per_s=2.0),
    agent_reads=BucketSpec(capacity=120, refill_per_s=20.0),
    agent_writes=BucketSpec(capacity=60, refill_per_s=4.0),
    session_opens=BucketSpec(capacity=10, refill_per_s=0.5),
    cooldown_ms=10_000,
)


def _rates(section: Section, base: RateSpec) -> RateSpec:
    session = section.section("session")
    agent = section.section("agent")
    spec = RateSpec(
        session_reads=_bucket(session, "reads", base.session_reads),
        session_writes=_bucket(session, "writes", base.session_writes),
        agent_reads=_bucket(agent, "reads", base.agent_reads),
        agent_writes=_bucket(agent, "writes", base.agent_writes),
        session_opens=_bucket(section, "session_opens", base.session_opens),
        cooldown_ms=section.duration_ms("cooldown", f"{base.cooldown_ms}ms"),
    )
    session.done()
    agent.done()
    section.done()
    return spec


def _bucket(parent: Section, key: str, base: BucketSpec) -> BucketSpec:
    section = parent.section(key)
    capacity = section.integer("burst", base.capacity, minimum=1, maximum=1_000_000)
    per_minute = section.integer("per_minute", round(base.refill_per_s * 60), minimum=1, maximum=60_000_000)
    section.done()
    return BucketSpec(capacity=capacity, refill_per_s=per_minute / 60)


def _filters(top: Section) -> FilterSet:
    items = top.sections("filters")
    if items is None:
        return FilterSet.compile(default_filter_specs())
    specs: list[FilterSpec] = []
    for item in items:
        name = item.text("name")
        pattern = item.text("pattern")
        action = item.text("action")
        if action not in FILTER_ACTIONS:
            raise ConfigError(f"{item.child_path('action')}: expected one of {', '.join(sorted(FILTER_ACTIONS))}")
        fields = item.list_of_str("fields", sorted(FILTER_FIELDS))
        for index, field in enumerate(fields):
            if field not in FILTER_FIELDS:
                known = ", ".join(sorted(FILTER_FIELDS))
                raise ConfigError(f"{item.child_path('fields')}[{index}]: expected one of {known}")
        ignore_case = item.flag("ignore_case", default=False)
        item.done()
        specs.append(FilterSpec(name, pattern, cast("FilterAction", action), frozenset(fields), ignore_case))
    return FilterSet.compile(specs, "filters")


_DEFAULT_DETECTORS: Final = AnomalySpec(
    detectors=(
        DetectorSpec("denials", threshold=20, window_ms=60_000, response="lock_session", lock_ms=300_000),
        DetectorSpec("filter_hits", threshold=5, window_ms=600_000, response="lock_agent", lock_ms=900_000),
        DetectorSpec("burst", threshold=600, window_ms=10_000, response="lock_session", lock_ms=60_000),
        DetectorSpec("unknown_ids", threshold=20, window_ms=60_000, response="lock_agent", lock_ms=900_000),
        DetectorSpec("outside_hours", threshold=5, window_ms=600_000, response="log", lock_ms=0),
    )
)


def _anomaly(top: Section) -> AnomalySpec:
    if top.optional("anomaly", (dict,)) is None:
        return _DEFAULT_DETECTORS
    section = top.section("anomaly")
    detectors: list[DetectorSpec] = []
    for kind in section.keys():  # noqa: SIM118 - Section is not a dict
        if kind not in ANOMALY_KINDS:
            known = ", ".join(sorted(ANOMALY_KINDS))
            raise ConfigError(f"{section.child_path(kind)}: unknown detector (known: {known})")
        detector = section.section(kind)
        response = detector.text("response")
        if response not in ANOMALY_RESPONSES:
            known = ", ".join(sorted(ANOMALY_RESPONSES))
            raise ConfigError(f"{detector.child_path('response')}: expected one of {known}")
        lock_ms = detector.duration_ms("lock", "15m") if response != "log" else 0
        detector.optional("lock", (str,))  # allowed, and meaningless, beside response: log
        spec = DetectorSpec(
            kind=cast("AnomalyKind", kind),
            threshold=detector.integer("threshold", minimum=1, maximum=1_000_000),
            window_ms=detector.duration_ms("window", "1m"),
            response=cast("AnomalyResponse", response),
            lock_ms=lock_ms,
        )
        detector.done()
        detectors.append(spec)
    return AnomalySpec(detectors=tuple(detectors))
