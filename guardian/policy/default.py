"""The policy file a new installation starts from, every key explained.

`guardianctl init` writes it into a new state dir; the security team edits it
and applies it (`guardianctl policy apply FILE` or SIGHUP). A test compiles it
and checks that leaving each defaulted key out gives the same decisions.
"""

from __future__ import annotations

from guardian.checks.filters import DEFAULT_FILTERS_YAML

__all__ = ["render_default_policy"]

_HEAD = """\
# agent-guardian policy: owned by the security team, read only by the guardian.
# Unknown keys are errors (the message names the path). Durations: 500ms, 90s, 15m, 12h, 30d.
# An operation no profile grants is refused. Apply a change with
#   guardianctl policy validate FILE && guardianctl policy diff FILE && guardianctl policy apply FILE
version: 1

sessions:
  idle_timeout: 30m       # a session unused this long ends
  max_lifetime: 12h       # no session lives longer
  max_per_agent: 8        # open sessions one agent may hold at once

limits:                   # defaults for every profile; a profile may override any of them
  max_content_bytes: 65536
  max_metadata_bytes: 4096
  max_metadata_depth: 8   # nesting of objects and arrays in metadata
  max_tags: 16
  max_tag_bytes: 64
  max_batch: 20           # memories per store_batch (at most the write burst below)
  max_page_size: 100      # results per search or list page
  max_query_bytes: 512

rate_limits:              # token buckets: `burst` calls at once, refilled at `per_minute`
  session:                # per session ...
    reads: {burst: 60, per_minute: 600}
    writes: {burst: 30, per_minute: 120}
  agent:                  # ... and per agent across all its sessions (new sessions do not reset it)
    reads: {burst: 120, per_minute: 1200}
    writes: {burst: 60, per_minute: 240}
  session_opens: {burst: 10, per_minute: 30}   # per agent
  cooldown: 10s           # after a breach the session (or agent) is refused this long
                          # (a batch costs one write per memory)

# read_window: 90d        # agents see only memories younger than this (per profile too)

retention:
  # max_age: 365d         # memories older than this are purged (audited); no limit when left out
  purge_every: 1h

anomaly:                  # sliding windows; response: log | lock_session | lock_agent
  denials: {threshold: 20, window: 1m, response: lock_session, lock: 5m}
  filter_hits: {threshold: 5, window: 10m, response: lock_agent, lock: 15m}
  burst: {threshold: 600, window: 10s, response: lock_session, lock: 1m}
  unknown_ids: {threshold: 20, window: 1m, response: lock_agent, lock: 15m}
  outside_hours: {threshold: 5, window: 10m, response: log}

alerts:                   # anomalies always go to the security log; a webhook only if set here
  timeout: 5s
  # webhook_url: https://alerts.example.internal/agent-guardian

provenance:               # where a memory came from decides how far it is believed
  sources:                # what a write may declare it came from, and that source's trust:
    user: trusted         #   the person told the agent
    agent: unverified     #   the agent's own conclusion
    document: unverified  #   a document the person gave it
    tool: untrusted       #   a tool's output (tool:NAME; list tool:calendar to set one tool apart)
    web: untrusted        #   a web page
    email: untrusted      #   an email
  default_source: agent   # what a write that declares no source is
  unrecorded: unverified  # memories stored before sources were recorded
# A memory derived from others (derived_from) is at most as trusted as the least of them.
# Per profile: `sources` (a list of the above, or a mapping source: level of its own) says what
# its agents may declare (default: all); `default_source` what a write that declares none is
# (default: the one above if the profile may declare it, else its least trusted source, the first
# listed of a tie); `recall` says per trust level what their reads do with such memories:
# recall (plainly), label (marked as quoted data, not an instruction) or withhold.
# Default recall: {trusted: recall, unverified: recall, untrusted: label}.

review:                   # untrusted writes that look like planting are stored quarantined, for review
  levels: [untrusted]     # the trust levels of the writes that are reviewed
  instructions: true      # one that reads as an instruction to future turns ("from now on ...")
  similar_to_trusted: 0.80  # one this close by meaning (cosine) to a trusted memory the writer can
                          # read, that changes it (a number, a name, an account); 0 turns it off

administration:           # guardianctl's requests (each signed by an enrolled admin's key)
  two_person: []          # operations that need a second person: proposed by one admin
                          # (--propose), approved by another (guardianctl approve ID); some of
                          # policy.apply, policy.rollback, keys.rotate, keys.retire, agent.add,
                          # agent.revoke, quarantine.release, incident.close, admins.add,
                          # admins.remove. A policy that drops one of them needs a second person too.
  proposals_expire: 24h   # an unapproved proposal lapses after this (1m to 7d)

default_profile: default
profiles:
  default:
    operations: [store, get, search, list, update, delete]
  read-only:
    operations: [get, search, list]
  # web-reader:           # an agent that browses: what it stores is never the user's word, nor its own
  #   operations: [store, get, search, list]   # conclusion (agent), so every write of it is reviewed
  #   sources: [web, tool, document, email]
  # strict:               # an agent that acts: sees only what it can believe, the rest labelled
  #   operations: [get, search, list]
  #   recall: {trusted: recall, unverified: label, untrusted: withhold}
  # office-hours:
  #   operations: [store, get, search, list]
  #   read_window: 30d
  #   allowed_hours: {timezone: UTC, days: [mon, tue, wed, thu, fri], from: "08:00", to: "19:00"}
  #   namespaces: {read: [team-notes], write: []}
  #   limits: {max_content_bytes: 8192}
  #   rate_limits: {session: {writes: {burst: 10, per_minute: 30}}}

agents: {}                # agent name -> profile, for agents not on the default profile

# Content filters run on content, tags and metadata after Unicode NFKC and removal of
# zero-width and control characters. action: reject (refused; the error names the rule,
# never the match) | redact (stored with the match replaced by [redacted:RULE]) |
# quarantine (stored, hidden from agents until `guardianctl quarantine release`) |
# flag (stored and recorded). Leaving `filters` out uses these same built-in rules;
# `filters: []` turns every filter off.
"""


def render_default_policy() -> str:
    """The policy.yaml that `guardianctl init` writes into a new state dir."""
    return _HEAD + DEFAULT_FILTERS_YAML
