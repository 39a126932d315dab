"""Anomaly detectors, their locks, and the alert webhook (against a real local HTTP server)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from guardian.checks.alerts import WebhookAlerter
from guardian.checks.anomaly import (
    ANOMALY_KINDS,
    ANOMALY_RESPONSES,
    AnomalyEvent,
    AnomalyKind,
    AnomalyMonitor,
    AnomalyResponse,
    AnomalySpec,
    DetectorSpec,
)
from shared.errors import PermissionDenied
from shared.jsonlog import JsonFormatter

SESSION = "ses_secret-session-key-aaaaaaaaaaaaaaaaaaaa"
OTHER_SESSION = "ses_secret-session-key-bbbbbbbbbbbbbbbbbbbb"
REF = "0123456789abcdef"
T0 = 1_700_000_000_000


def detector(
    kind: AnomalyKind = "denials",
    *,
    threshold: int = 3,
    window_ms: int = 1000,
    response: AnomalyResponse = "log",
    lock_ms: int = 0,
) -> AnomalySpec:
    return AnomalySpec((DetectorSpec(kind, threshold, window_ms, response, lock_ms),))


def record(
    monitor: AnomalyMonitor,
    spec: AnomalySpec,
    at_ms: int,
    *,
    kind: AnomalyKind = "denials",
    agent: str = "bot",
    session_key: str | None = SESSION,
) -> AnomalyEvent | None:
    return monitor.record(
        kind, agent=agent, session_key=session_key, session_ref=REF if session_key else "", now_ms=at_ms, spec=spec
    )


def fired_at(monitor: AnomalyMonitor, spec: AnomalySpec, offsets: list[int]) -> list[int]:
    """The indexes of the events (at T0 + offset) that fired the detector."""
    return [index for index, offset in enumerate(offsets) if record(monitor, spec, T0 + offset) is not None]


# -- windows --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offsets", "fires"),
    [
        ([0, 500, 999], [2]),  # three within 1000 ms
        ([0, 600, 1200], []),  # the first left the window before the third
        ([0, 0, 1000], []),  # exactly window_ms apart is outside
        ([0, 600, 1200, 1300], [3]),  # 600, 1200, 1300 are within
        ([0, 1, 2, 3, 4, 5], [2, 5]),  # fires once, then again only after threshold more
        ([0, 1, 2, 3, 4, 2000, 2001], [2]),  # cleared after firing; 3 and 4 had expired by 2000
    ],
)
def test_threshold_within_window(offsets: list[int], fires: list[int]) -> None:
    monitor = AnomalyMonitor()
    assert fired_at(monitor, detector(threshold=3, window_ms=1000), offsets) == fires


def test_a_kind_without_a_detector_is_not_counted() -> None:
    monitor = AnomalyMonitor()
    spec = detector("denials", threshold=1)
    assert record(monitor, spec, T0, kind="burst") is None
    assert record(monitor, AnomalySpec(()), T0) is None


def test_windows_are_per_agent_not_per_session() -> None:
    monitor = AnomalyMonitor()
    spec = detector(threshold=3)
    assert record(monitor, spec, T0, session_key="ses_1") is None
    assert record(monitor, spec, T0 + 1, session_key="ses_2") is None
    assert record(monitor, spec, T0 + 2, agent="other") is None
    event = record(monitor, spec, T0 + 3, session_key="ses_3")
    assert event is not None
    assert event.count == 3


def test_each_kind_has_its_own_window() -> None:
    monitor = AnomalyMonitor()
    spec = AnomalySpec(
        (DetectorSpec("burst", 2, 1000, "log", 0), DetectorSpec("unknown_ids", 2, 1000, "log", 0)),
    )
    assert record(monitor, spec, T0, kind="burst") is None
    assert record(monitor, spec, T0, kind="unknown_ids") is None
    event = record(monitor, spec, T0 + 1, kind="unknown_ids")
    assert event is not None
    assert event.kind == "unknown_ids"


def test_a_new_threshold_keeps_recent_events() -> None:
    monitor = AnomalyMonitor()
    assert fired_at(monitor, detector(threshold=5), [0, 1, 2]) == []
    assert record(monitor, detector(threshold=4), T0 + 3) is not None


# -- responses and locks --------------------------------------------------------------------------


@dataclass
class ResponseCase:
    response: AnomalyResponse
    session_key: str | None
    applied: AnomalyResponse
    #: Which (session_key) checks are refused afterwards.
    refused: list[str | None] = field(default_factory=list)
    allowed: list[str | None] = field(default_factory=list)


@pytest.mark.parametrize(
    "case",
    [
        ResponseCase("log", SESSION, "log", refused=[], allowed=[SESSION, OTHER_SESSION, None]),
        ResponseCase("lock_session", SESSION, "lock_session", refused=[SESSION], allowed=[OTHER_SESSION, None]),
        # No session to lock (e.g. OpenSession): the agent is locked instead.
        ResponseCase("lock_session", None, "lock_agent", refused=[SESSION, OTHER_SESSION, None]),
        ResponseCase("lock_agent", SESSION, "lock_agent", refused=[SESSION, OTHER_SESSION, None]),
    ],
    ids=lambda case: f"{case.response}-{'session' if case.session_key else 'no-session'}",
)
def test_responses(case: ResponseCase) -> None:
    monitor = AnomalyMonitor()
    spec = detector(threshold=1, response=case.response, lock_ms=0 if case.response == "log" else 60_000)
    event = record(monitor, spec, T0, session_key=case.session_key)
    assert event is not None
    assert event.response == case.applied
    assert event.locked_until_ms == (0 if case.applied == "log" else T0 + 60_000)
    for session_key in case.refused:
        with pytest.raises(PermissionDenied):
            monitor.check_locked(agent="bot", session_key=session_key, now_ms=T0 + 1)
    for session_key in case.allowed:
        monitor.check_locked(agent="bot", session_key=session_key, now_ms=T0 + 1)
    monitor.check_locked(agent="other", session_key=OTHER_SESSION, now_ms=T0 + 1)


@pytest.mark.parametrize(
    ("response", "scope"),
    [("lock_agent", "agent"), ("lock_session", "session")],
)
def test_check_locked_says_how_long_and_how_to_unlock(response: AnomalyResponse, scope: str) -> None:
    monitor = AnomalyMonitor()
    record(monitor, detector(threshold=1, response=response, lock_ms=90_000), T0)
    with pytest.raises(PermissionDenied) as refused:
        monitor.check_locked(agent="bot", session_key=SESSION, now_ms=T0 + 30_500)
    assert str(refused.value) == (
        f"this {scope} is locked by the anomaly detector for another 60 s; "
        "the security team can unlock it (guardianctl agents unlock bot)"
    )
    assert SESSION not in str(refused.value)
    with pytest.raises(PermissionDenied, match="another 1 s"):
        monitor.check_locked(agent="bot", session_key=SESSION, now_ms=T0 + 89_999)


@pytest.mark.parametrize("response", ["lock_agent", "lock_session"])
def test_a_lock_expires(response: AnomalyResponse) -> None:
    monitor = AnomalyMonitor()
    record(monitor, detector(threshold=1, response=response, lock_ms=5000), T0)
    with pytest.raises(PermissionDenied):
        monitor.check_locked(agent="bot", session_key=SESSION, now_ms=T0 + 4999)
    monitor.check_locked(agent="bot", session_key=SESSION, now_ms=T0 + 5000)
    assert monitor.locks(T0 + 5000) == []


def test_a_running_lock_is_extended_never_shortened() -> None:
    monitor = AnomalyMonitor()
    record(monitor, detector(threshold=1, response="lock_agent", lock_ms=60_000), T0)
    event = record(monitor, detector(threshold=1, response="lock_agent", lock_ms=1000), T0 + 10)
    assert event is not None
    assert event.locked_until_ms == T0 + 60_000


def test_unlock_agent() -> None:
    monitor = AnomalyMonitor()
    lock_agent = detector("filter_hits", threshold=1, response="lock_agent", lock_ms=60_000)
    lock_session = detector("denials", threshold=3, response="lock_session", lock_ms=60_000)
    record(monitor, lock_agent, T0, kind="filter_hits")
    fired_at(monitor, lock_session, [0, 1, 2])
    record(monitor, lock_agent, T0, kind="filter_hits", agent="other")
    fired_at(monitor, lock_session, [3, 4])  # two of three toward the next detection

    assert monitor.unlock_agent("bot") is True
    monitor.check_locked(agent="bot", session_key=SESSION, now_ms=T0 + 10)
    assert monitor.unlock_agent("bot") is False
    with pytest.raises(PermissionDenied):
        monitor.check_locked(agent="other", session_key=None, now_ms=T0 + 10)
    # The windows were cleared too: one more denial does not lock the session again.
    assert record(monitor, lock_session, T0 + 5) is None


def test_locks_listing_names_agents_never_sessions() -> None:
    monitor = AnomalyMonitor()
    record(monitor, detector(threshold=1, response="lock_session", lock_ms=10_000), T0, agent="bot")
    record(monitor, detector(threshold=1, response="lock_agent", lock_ms=20_000), T0, agent="zed")
    record(monitor, detector(threshold=1, response="lock_agent", lock_ms=10), T0, agent="gone")
    listing = monitor.locks(T0 + 100)
    assert listing == [("agent", "zed", T0 + 20_000), ("session", "bot", T0 + 10_000)]
    assert SESSION not in repr(listing)


def test_forget_session_drops_its_lock() -> None:
    monitor = AnomalyMonitor()
    record(monitor, detector(threshold=1, response="lock_session", lock_ms=10_000), T0)
    monitor.forget_session(SESSION)
    monitor.check_locked(agent="bot", session_key=SESSION, now_ms=T0 + 1)


# -- reporting ------------------------------------------------------------------------------------


def test_a_detection_is_logged_and_alerted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent_guardian.security")
    alerts: list[AnomalyEvent] = []
    monitor = AnomalyMonitor(alert=alerts.append)
    spec = detector("unknown_ids", threshold=2, window_ms=60_000, response="lock_session", lock_ms=300_000)
    assert record(monitor, spec, T0, kind="unknown_ids") is None
    assert alerts == []
    event = record(monitor, spec, T0 + 1, kind="unknown_ids")
    assert alerts == [event]
    assert event == AnomalyEvent("unknown_ids", "bot", REF, 2, 60_000, "lock_session", T0 + 300_001)

    lines = [r for r in caplog.records if getattr(r, "event", None) == "anomaly"]
    assert len(lines) == 1
    line = json.loads(JsonFormatter().format(lines[0]))
    assert line["logger"] == "agent_guardian.security"
    assert {key: line[key] for key in AnomalyEvent.__dataclass_fields__} == {
        "kind": "unknown_ids",
        "agent": "bot",
        "session_ref": REF,
        "count": 2,
        "window_ms": 60_000,
        "response": "lock_session",
        "locked_until_ms": T0 + 300_001,
    }
    assert all(SESSION not in JsonFormatter().format(r) for r in caplog.records)


def test_a_failing_alert_callback_never_breaks_the_request_path(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: AnomalyEvent) -> None:
        raise RuntimeError("receiver down")

    monitor = AnomalyMonitor(alert=broken)
    with caplog.at_level(logging.ERROR, logger="agent_guardian"):
        event = record(monitor, detector(threshold=1, response="lock_agent", lock_ms=1000), T0)
    assert event is not None
    assert any("alert callback failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(PermissionDenied):  # the lock was applied all the same
        monitor.check_locked(agent="bot", session_key=None, now_ms=T0)


# -- memory bound ---------------------------------------------------------------------------------


def test_sweep_drops_expired_locks_and_stale_windows() -> None:
    monitor = AnomalyMonitor()
    spec = AnomalySpec(
        (
            DetectorSpec("denials", 1, 1000, "lock_session", 5000),
            DetectorSpec("burst", 10, 1000, "log", 0),
            DetectorSpec("filter_hits", 1, 1000, "lock_agent", 20_000),
        )
    )
    record(monitor, spec, T0)  # a session lock (its window is emptied by firing)
    record(monitor, spec, T0, kind="burst")  # a window holding one event
    record(monitor, spec, T0, kind="filter_hits", agent="other")  # an agent lock
    assert monitor.sweep(T0 + 999) == 2  # the two emptied windows
    assert monitor.sweep(T0 + 1000) == 1  # the burst window's event left it
    assert monitor.sweep(T0 + 5000) == 1  # the session lock
    assert monitor.sweep(T0 + 20_000) == 1  # the agent lock
    assert monitor.sweep(T0 + 99_999) == 0


def test_a_full_table_stops_counting_new_agents_but_never_drops_a_lock(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent_guardian.security")
    monitor = AnomalyMonitor(max_keys=2)
    counting = detector(threshold=2)
    record(monitor, counting, T0, agent="a")
    record(monitor, counting, T0, agent="b")
    assert record(monitor, counting, T0, agent="c") is None
    assert record(monitor, counting, T0 + 1, agent="c") is None  # not counted: no room for its window
    full_lines = [r for r in caplog.records if getattr(r, "event", None) == "anomaly_table_full"]
    assert len(full_lines) == 1

    # Known agents still count; a session lock with no room becomes an agent lock.
    locking = detector(threshold=2, response="lock_session", lock_ms=10_000)
    event = record(monitor, locking, T0 + 2, agent="a")
    assert event is not None
    assert event.response == "lock_agent"
    with pytest.raises(PermissionDenied):
        monitor.check_locked(agent="a", session_key=OTHER_SESSION, now_ms=T0 + 3)

    assert monitor.sweep(T0 + 5000) == 2  # both windows are stale
    assert record(monitor, counting, T0 + 5000, agent="c") is None
    assert record(monitor, counting, T0 + 5001, agent="c") is not None


# -- validation -----------------------------------------------------------------------------------


def test_the_kind_and_response_sets() -> None:
    assert frozenset({"denials", "filter_hits", "burst", "unknown_ids", "outside_hours"}) == ANOMALY_KINDS
    assert frozenset({"log", "lock_session", "lock_agent"}) == ANOMALY_RESPONSES


@pytest.mark.parametrize(
    "build",
    [
        lambda: DetectorSpec("denials", 0, 1000, "log", 0),
        lambda: DetectorSpec("denials", 1, 0, "log", 0),
        lambda: DetectorSpec("denials", 1, 1000, "lock_agent", 0),
        lambda: DetectorSpec("denials", 1, 1000, "log", -1),
        lambda: DetectorSpec("nonsense", 1, 1000, "log", 0),  # type: ignore[arg-type]
        lambda: DetectorSpec("denials", 1, 1000, "ban", 0),  # type: ignore[arg-type]
        lambda: AnomalySpec((DetectorSpec("burst", 1, 1, "log", 0), DetectorSpec("burst", 2, 2, "log", 0))),
        lambda: AnomalyMonitor(max_keys=0),
    ],
)
def test_invalid_specs_are_refused(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


def test_concurrent_events_fire_once_per_threshold() -> None:
    fired: list[AnomalyEvent] = []
    monitor = AnomalyMonitor(alert=fired.append)
    spec = detector("burst", threshold=100, window_ms=10**9)

    def hammer() -> None:
        for offset in range(250):
            record(monitor, spec, T0 + offset, kind="burst")

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fired) == 20  # 2000 events, threshold 100


# -- the webhook ----------------------------------------------------------------------------------

EVENT = AnomalyEvent("denials", "bot", REF, 20, 60_000, "lock_session", T0 + 300_000)


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 recording what it is sent."""

    url: str
    requests: list[tuple[str, dict[str, str], bytes]]
    status: list[int]
    #: Set by the server when a request arrives; the server then waits for release.
    arrived: threading.Event
    release: threading.Event


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def receiver(no_proxy: None) -> Iterator[Receiver]:
    requests: list[tuple[str, dict[str, str], bytes]] = []
    status = [204]
    arrived, release = threading.Event(), threading.Event()
    release.set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            requests.append((self.path, dict(self.headers.items()), body))
            arrived.set()
            release.wait(10)
            self.send_response(status[0])
            if status[0] in (301, 302, 307):
                self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Receiver(f"http://127.0.0.1:{server.server_address[1]}", requests, status, arrived, release)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_webhook_posts_the_event_as_json(receiver: Receiver) -> None:
    alerter = WebhookAlerter(f"{receiver.url}/hooks/guardian?channel=sec")
    alerter(EVENT)
    alerter.close()
    assert (alerter.sent, alerter.failed, alerter.dropped) == (1, 0, 0)
    [(path, headers, body)] = receiver.requests
    assert path == "/hooks/guardian?channel=sec"
    assert headers["Content-Type"] == "application/json"
    assert "Authorization" not in headers
    assert json.loads(body) == {
        "source": "agent-guardian",
        "event": "anomaly",
        "kind": "denials",
        "agent": "bot",
        "session_ref": REF,
        "count": 20,
        "window_ms": 60_000,
        "response": "lock_session",
        "locked_until_ms": T0 + 300_000,
    }


def test_userinfo_is_sent_as_basic_auth_and_kept_out_of_the_log(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent_guardian.security")
    receiver.status[0] = 500
    url = receiver.url.replace("http://", "http://alerts:s%40cret@") + "/hook?token=topsecret"
    alerter = WebhookAlerter(url)
    assert alerter.url == url
    alerter(EVENT)
    alerter.close()
    assert (alerter.sent, alerter.failed) == (0, 1)
    [(_, headers, _)] = receiver.requests
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"alerts:s@cret").decode()
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "alert_failed"]
    assert line.url == f"{receiver.url}/hook"  # type: ignore[attr-defined]
    assert line.error == "HTTP status 500"  # type: ignore[attr-defined]
    formatted = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert "cret" not in formatted
    assert "topsecret" not in formatted


def test_an_unreachable_webhook_counts_a_failure_and_never_raises(
    no_proxy: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent_guardian.security")
    alerter = WebhookAlerter(f"http://127.0.0.1:{free_port()}/hook?key=hidden", timeout_s=2.0)
    alerter(EVENT)
    alerter(EVENT)
    alerter.close()
    assert (alerter.sent, alerter.failed, alerter.dropped) == (0, 2, 0)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "alert_failed"]
    assert len(lines) == 2
    assert all("hidden" not in JsonFormatter().format(r) for r in lines)


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    receiver.status[0] = 302
    alerter = WebhookAlerter(receiver.url + "/hook")
    alerter(EVENT)
    alerter.close()
    assert (alerter.sent, alerter.failed) == (0, 1)
    assert [path for path, _, _ in receiver.requests] == ["/hook"]


def test_a_full_queue_drops_and_logs_once(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent_guardian.security")
    receiver.release.clear()
    alerter = WebhookAlerter(receiver.url, queue_size=1)
    alerter(EVENT)  # taken by the worker, which waits on the receiver
    assert receiver.arrived.wait(10)
    alerter(EVENT)  # queued
    for _ in range(3):
        alerter(EVENT)  # dropped: never blocks
    assert alerter.dropped == 3
    drop_lines = [r for r in caplog.records if getattr(r, "event", None) == "alert_dropped"]
    assert len(drop_lines) == 1
    receiver.release.set()
    alerter.close()
    assert (alerter.sent, alerter.failed, alerter.dropped) == (2, 0, 3)


def test_close_stops_the_worker_and_later_alerts_are_dropped(receiver: Receiver) -> None:
    before = set(threading.enumerate())
    alerter = WebhookAlerter(receiver.url)
    [worker] = [t for t in set(threading.enumerate()) - before if t.name == "guardian-alert-webhook"]
    assert worker.daemon
    alerter.close()
    assert not worker.is_alive()
    alerter(EVENT)
    assert (alerter.sent, alerter.dropped) == (0, 1)
    alerter.close()  # twice is harmless
    assert receiver.requests == []


def test_close_gives_up_after_its_timeout(receiver: Receiver) -> None:
    receiver.release.clear()
    alerter = WebhookAlerter(receiver.url, timeout_s=10.0)
    alerter(EVENT)
    assert receiver.arrived.wait(10)
    alerter(EVENT)
    alerter(EVENT)
    alerter.close(timeout_s=0.05)  # the first POST is stuck: the two behind it are dropped
    receiver.release.set()
    before = set(threading.enumerate())
    for thread in before:
        if thread.name == "guardian-alert-webhook":
            thread.join(10)
    assert (alerter.sent, alerter.dropped) == (1, 2)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://alerts.example/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "alerts.example/hook",
        "http://",
        "https://:443/hook",
        "http://alerts.example:99999/",
        "http://alerts.example/ho ok",
        "http://alerts.example/\r\nX-Injected: 1",
        "",
    ],
)
def test_only_http_and_https_urls_with_a_host_are_accepted(url: str) -> None:
    with pytest.raises(ValueError):
        WebhookAlerter(url)


@pytest.mark.parametrize("kwargs", [{"timeout_s": 0.0}, {"queue_size": 0}])
def test_invalid_alerter_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WebhookAlerter("https://alerts.example/hook", **kwargs)  # type: ignore[arg-type]
