"""The guardian's state, built once at start: database, keys, policy, sessions, limits.

The policy is an immutable object behind one reference, swapped atomically
(a reader sees either the old or the new policy, never a mix), and only after
the history row recording it has committed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Final

from guardian.access import admins
from guardian.access.oauth import IssuerKeys
from guardian.checks.alerts import WebhookAlerter
from guardian.checks.anomaly import AnomalyEvent, AnomalyMonitor
from guardian.checks.ratelimit import RateLimiter
from guardian.checks.sessions import SessionTable
from guardian.keys.audit_proof import SignedHead
from guardian.keys.ring import Keys, load_keys
from guardian.keys.rotated import FILE_NAME as ROTATED_KEYS_FILE
from guardian.keys.rotated import KeyStore
from guardian.policy import history as policy_history
from guardian.policy.compile import Policy, compile_policy, load_policy
from guardian.policy.in_force import PolicyInForce
from guardian.recall.model import Embedder, EmbeddingModel, ModelFiles, builtin_files
from guardian.recall.remote import RemoteEmbedder
from guardian.state.config import EmbedderService, GuardianConfig
from guardian.state.metrics import GuardianMetrics, StateReading
from guardian.state.profile import StageProfile
from guardian.state.statedir import lock_state_dir
from guardian.store import audit
from guardian.store.agents import AgentRegistry
from guardian.store.audit import AuditTrail, HeadFile
from guardian.store.database import Connection, Database
from guardian.store.memories import MemoryStore
from guardian.store.vectors import MemoryVectors
from shared.errors import ConfigError, DataLoss, FailedPrecondition, Unavailable
from shared.ops_http import Readiness

__all__ = ["GuardianCore", "now_ms", "session_ref"]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

#: What /readyz says while the policy file is refused.
_FILE_REFUSED_WARNING: Final = (
    "the policy file is refused; the last policy in force runs (why: guardianctl status, or the security log)"
)

#: The audit trail's name for the policy file as the one who applied a policy.
FILE_APPLIER = "@policy-file"

#: At shutdown a head is signed only over at most this many new rows (a stop must stay quick; the
#: housekeeping thread signs larger spans while the guardian runs).
_SHUTDOWN_SIGNING_MAX_ROWS: Final = 200_000


def _loaded(policy: Policy, source: str) -> Policy:
    """policy, after saying in the security log that the guardian starts with it."""
    security_log.info(
        "starting with the policy in force",
        extra={"event": "policy_loaded", "policy_version": policy.version, "source": source},
    )
    return policy


def _embedder(config: GuardianConfig) -> Embedder:
    """What embeds, as configured: agent-embedder's transformer, or a static model in this process."""
    chosen = config.embedding
    if isinstance(chosen, EmbedderService):
        return RemoteEmbedder(chosen.socket, chosen.model_id, chosen.dims)
    return EmbeddingModel(chosen if isinstance(chosen, ModelFiles) else builtin_files())


def now_ms() -> int:
    """Wall-clock time in Unix milliseconds."""
    return time.time_ns() // 1_000_000


def session_ref(session_id: str) -> str:
    """What the audit trail records of a session: a digest, since the id itself is a bearer credential."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:16] if session_id else ""


class GuardianCore:
    """Everything the services share."""

    def __init__(self, config: GuardianConfig, keystore: KeyStore, database: Database) -> None:
        self.config = config
        self.keystore = keystore
        #: The state dir's lock (guardian/state/statedir.py), held while the guardian runs.
        self._state_lock: int | None = None
        keys = keystore.keys
        self.database = database
        self.metrics = GuardianMetrics()
        #: CPU time by pipeline stage, when the config turns it on (guardian/state/profile.py).
        self.profile = StageProfile(config.profile_stages)
        if config.profile_stages:
            self.metrics.registry.register(self.profile)
            database.on_group_commit = self.profile.commit_done
        self.audit = AuditTrail(keys.audit, on_failure=self.metrics.audit_failures.inc, signing=keys.audit_signing)
        self.audit_head_file = HeadFile(config.state_dir / "audit-head.json")
        #: One head signing at a time (housekeeping, shutdown, an audit key's retirement).
        self._signing = threading.Lock()
        self._open_audit_chain()
        model = _embedder(config)
        self.memories = MemoryStore(keys.memory, MemoryVectors(model, keys.memory, database.after_commit))
        self.agents = AgentRegistry(keys.token)
        self.sessions = SessionTable()
        #: The OAuth issuer's keys, read from the key file when a token needs them (guardian/access/oauth.py).
        self.issuer_keys = IssuerKeys(config.oauth_keys)
        self.rates = RateLimiter()
        self._alerter: WebhookAlerter | None = None
        self.anomalies = AnomalyMonitor(alert=self._alert)
        #: Why the policy file on disk is refused (the guardian runs on the last policy in force), or None.
        self.policy_file_refusal: str | None = None
        self.in_force = PolicyInForce(self._startup_policy())
        self._configure_alerts(self.policy)
        self.metrics.watch_state(self.state_reading)

    @classmethod
    def open(cls, config: GuardianConfig) -> GuardianCore:
        """Load keys (validated), open the database, and choose the policy to start with."""
        lock = lock_state_dir(config.state_dir)
        try:
            keystore = KeyStore(config.state_dir / ROTATED_KEYS_FILE, load_keys(config.keys_dir))
            made = keystore.ensure_audit_signing(now_ms())  # an install from before the key gains it here
        except BaseException:
            os.close(lock)
            raise
        if made is not None:
            security_log.warning(
                "audit-signing key created; print its public key with guardianctl keys public",
                extra={"event": "audit_signing_key_created", "key_id": made},
            )
        database = Database(
            config.database,
            keystore.keys.database_hexes,
            durability=config.durability,
            min_free_bytes=config.min_free_bytes,
        )
        if database.key_index:
            security_log.warning(
                "the database opened with an older database key: a rekey did not finish, or a backup made"
                " before a rekey was restored; rotate the database key again (guardianctl keys rotate database)",
                extra={"event": "database_key_fallback"},
            )
        try:
            core = cls(config, keystore, database)
            core._enrol_first_admins()
        except BaseException:
            database.close()
            os.close(lock)
            raise
        core._state_lock = lock
        return core

    def _enrol_first_admins(self) -> None:
        """With no admin enrolled, enrol those the first-admins file names (each audited); ConfigError if bad."""
        with self.database.read() as reader:
            if admins.count(reader):
                return
        path = self.config.first_admins
        try:
            text = path.read_text()
        except FileNotFoundError:
            security_log.warning(
                "no admin is enrolled, and there is no first-admins file: every admin request will be refused",
                extra={"event": "no_admins", "first_admins": str(path)},
            )
            return
        except OSError as error:
            raise ConfigError(f"the first-admins file {path} cannot be read: {error.strerror}") from None
        first = admins.parse_first_admins(text, str(path), now_ms())
        with self.database.write() as connection:
            for admin in first:
                admins.add(connection, admin)
                self.audit.record(
                    connection,
                    ts_ms=admin.added_at_ms,
                    agent="@first-admins",
                    session=admin.fingerprint,
                    operation="admin.admins.add",
                    object_id=admin.name,
                    decision="allow",
                    reason=f"ok; first admin, role {admin.role}, from the first-admins file",
                    policy_version=self.policy.version,
                )
        for admin in first:
            security_log.info(
                "admin enrolled",
                extra={
                    "event": "admin_added",
                    "admin": admin.name,
                    "role": admin.role,
                    "fingerprint": admin.fingerprint,
                },
            )

    def use_keys(self, keys: Keys) -> None:
        """Sign and verify with keys from now on (after a rotation or a retirement of an HMAC key)."""
        self.memories.use_ring(keys.memory)
        self.audit.use_ring(keys.audit, keys.audit_signing)
        self.agents.use_ring(keys.token)

    def _open_audit_chain(self) -> None:
        """Chain rows from before the chain existed, then check the last published head is still there."""
        with self.database.write() as connection:
            adopted = self.audit.adopt_unchained_rows(connection)
        if adopted:
            log.info("audit rows moved into the chain", extra={"event": "audit_rows_chained", "rows": adopted})
        self._holds_published_head()

    def _holds_published_head(self) -> bool:
        """Whether the chain still holds the last head published to the head file (a security event if not)."""
        published = self.audit_head_file.read()
        if published is None:
            return True
        with self.database.read() as reader:
            row = reader.execute("SELECT mac FROM audit WHERE seq = ?", (published.seq,)).fetchone()
        if row is not None and row[0] == published.mac:
            return True
        security_log.error(
            "the audit chain no longer holds its last published head: rows were truncated, rolled back"
            " or rewritten; run guardianctl audit verify",
            extra={"event": "audit_head_mismatch", "published_seq": published.seq},
        )
        return False

    def sign_audit_head(self, max_rows: int | None = None) -> SignedHead | None:
        """Sign the committed chain head with the audit-signing key, continuing the last signed head.

        The rows are read and checked on this thread's reader; only the head's insert takes the
        writer. None when there is nothing new (or more than max_rows new rows); DataLoss when a
        row it would cover does not verify (nothing is signed over it).
        """
        with self._signing:
            with self.database.read() as reader:
                prepared = self.audit.prepare_signed_head(reader, now_ms(), max_rows)
            if prepared is None:
                return None
            signed, _ = prepared
            with self.database.write() as connection:
                audit.store_signed_head(connection, signed)
            return signed

    def publish_audit_head(self, reason: str) -> None:
        """Sign the committed chain head, then publish it to the security log, and to the head file if it continues it.

        A head that does not continue the last published one is logged but not written
        over it, so the head file keeps the evidence until the operator deals with it. A
        head that cannot be signed (a row that does not verify) is a security event; the
        unsigned head is still published.
        """
        try:
            self.sign_audit_head(_SHUTDOWN_SIGNING_MAX_ROWS if reason == "shutdown" else None)
        except (DataLoss, FailedPrecondition, Unavailable) as refused:  # Unavailable: the storage failed
            security_log.error(
                "the audit chain head was not signed",
                extra={"event": "audit_head_not_signed", "problem": refused.message},
            )
        consistent = self._holds_published_head()
        try:
            with self.database.read() as reader:
                audit.publish_head(reader, self.audit_head_file if consistent else None, reason)
        except OSError as exc:  # e.g. a read-only filesystem: the security log line went out, the file did not
            security_log.error(
                "the audit chain head could not be written to the head file",
                extra={"event": "audit_head_write_failed", "error": exc.strerror or type(exc).__name__},
            )

    def state_reading(self) -> StateReading:
        """The state gauges' values now."""
        with self.database.read() as reader:
            head = audit.read_head(reader)
        return StateReading(
            sessions_open=self.sessions.count_all(now_ms()),
            database_size_bytes=self.database.size_bytes(),
            audit_chain_rows=head.seq if head else 0,
            policy_version=self.policy.version,
            policy_file_refused=self.policy_file_refusal is not None,
        )

    def readiness(self) -> Readiness:
        """Whether the guardian can serve: the database open and writable, the audit trail, a policy."""
        database = self.database.probe_write()
        if database == "ok" and self.audit.last_append_failed:
            audit_state = "the last audit row could not be written; requests fail closed until one is"
        else:
            audit_state = "ok" if database == "ok" else "cannot be written while the database cannot"
        return Readiness(
            {
                "database": database,
                "audit": audit_state,
                "policy": "ok" if self.policy.version else "no policy loaded",
            },
            # Serving on the last policy in force is ready; the refused file is what the operator must fix.
            # /readyz has no authentication: why the file is refused (it can quote the policy) stays on the
            # admin socket (guardianctl status) and in the security log.
            warnings={"policy_file": _FILE_REFUSED_WARNING} if self.policy_file_refusal else {},
        )

    @property
    def policy(self) -> Policy:
        """The policy in force now."""
        return self.in_force.current

    def _startup_policy(self) -> Policy:
        try:
            file_policy = load_policy(self.config.policy)
        except ConfigError as refused:
            return self._start_on_last_policy(refused)
        with self.database.write() as connection:
            last_from_file = policy_history.latest(connection, "file")
            newest = policy_history.latest(connection)
            if last_from_file is None or last_from_file.version != file_policy.version or newest is None:
                self._record_file_policy(connection, file_policy, file_policy, "policy.load")
                return _loaded(file_policy, "file")
        if newest.version == file_policy.version:
            return _loaded(file_policy, "file")
        try:
            policy = compile_policy(newest.text, f"policy {newest.version[:12]} from the history")
        except ConfigError as error:
            security_log.error(
                "the newest applied policy no longer compiles; starting with the policy file",
                extra={"event": "policy_history_invalid", "error": error.message},
            )
            with self.database.write() as connection:
                self._record_file_policy(connection, file_policy, file_policy, "policy.load")
            return _loaded(file_policy, "file")
        # The file is unchanged since it was last loaded: an apply or a rollback since then stays in force.
        return _loaded(policy, newest.source)

    def _start_on_last_policy(self, refused: ConfigError) -> Policy:
        """The policy to start on when the policy file is refused: the last one in force, from the history.

        An unrelated restart must not take every agent's memory away because a bad file was
        left on disk (a reload already refused it). The refusal is logged, written to the
        security log and the audit trail, kept for readiness, metrics and ``guardianctl
        status``. With no history (a first start), there is nothing to fall back on: the
        start fails with the file's error.
        """
        with self.database.read() as reader:
            newest = policy_history.latest(reader)
        if newest is None:
            raise refused
        try:
            policy = compile_policy(newest.text, f"policy {newest.version[:12]} from the history")
        except ConfigError as error:
            raise ConfigError(
                f"{refused.message}; and the last policy in force no longer compiles ({error.message})"
            ) from None
        self.policy_file_refusal = refused.message
        security_log.error(
            "the policy file is refused; starting on the last policy in force until it is fixed",
            extra={"event": "policy_file_refused", "error": refused.message, "policy_version": policy.version},
        )
        log.error(
            "the policy file is refused (%s); starting on the last policy in force, %s",
            refused.message,
            policy.version[:12],
        )
        self._audit_refused_file("policy.load", refused, policy)
        return policy

    def _audit_refused_file(self, operation: str, refused: ConfigError, running: Policy) -> None:
        """The audit row of a policy file the guardian refused (at start or on reload)."""
        with self.database.write() as connection:
            self.audit.record(
                connection,
                ts_ms=now_ms(),
                agent=FILE_APPLIER,
                operation=operation,
                decision="deny",
                reason=f"invalid_argument: {refused.message}"[:200],
                policy_version=running.version,
            )

    def _record_file_policy(self, connection: Connection, policy: Policy, deciding: Policy, operation: str) -> None:
        """Record that the policy file put policy in force; deciding: the policy running (itself at start)."""
        at = now_ms()
        PolicyInForce.record(connection, policy, at_ms=at, by=FILE_APPLIER, source="file")
        self.audit.record(
            connection,
            ts_ms=at,
            agent=FILE_APPLIER,
            operation=operation,
            object_id=policy.version,
            decision="allow",
            reason="ok: policy in force (file)",
            policy_version=deciding.version,
        )

    def swap_policy(self, policy: Policy, *, by: str, source: policy_history.Source) -> None:
        """Put policy in force once the caller's record of it committed (PolicyInForce), and its alerts."""
        self.in_force.swap(policy, by=by, source=source)
        self._configure_alerts(policy)

    def reload_policy_file(self) -> Policy | None:
        """SIGHUP: load the policy file and put it in force; on failure the running policy stays.

        Both outcomes are recorded (history and audit trail on success; audit trail and
        security log on failure). Returns the new policy, or None if it was refused.
        """
        try:
            policy = load_policy(self.config.policy)
        except ConfigError as error:
            security_log.error(
                "policy reload refused; the running policy stays",
                extra={"event": "policy_reload_failed", "error": error.message},
            )
            self.policy_file_refusal = error.message
            self._audit_refused_file("policy.reload", error, self.policy)
            return None
        with self.database.write() as connection:
            self._record_file_policy(connection, policy, self.policy, "policy.reload")
        self.swap_policy(policy, by=FILE_APPLIER, source="file")
        self.policy_file_refusal = None
        return policy

    def _configure_alerts(self, policy: Policy) -> None:
        current = self._alerter
        if current is not None and policy.webhook_url == current.url:
            return
        self._alerter = (
            WebhookAlerter(policy.webhook_url, timeout_s=policy.webhook_timeout_ms / 1000)
            if policy.webhook_url
            else None
        )
        if current is not None:
            current.close(timeout_s=1.0)

    def _alert(self, event: AnomalyEvent) -> None:
        alerter = self._alerter
        if alerter is not None:
            alerter(event)

    def close(self) -> None:
        """Stop the alerter, close the database and let go of the state dir."""
        if self._alerter is not None:
            self._alerter.close()
        if self.memories.vectors is not None:
            self.memories.vectors.model.close()
        self.database.close()
        if self._state_lock is not None:
            os.close(self._state_lock)
            self._state_lock = None
