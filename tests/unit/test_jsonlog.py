"""shared/jsonlog.py on real files, without logrotate: reopening after a rename, and where each log goes.

tests/integration/test_logrotate.py runs the same behaviour with the real logrotate against a running guardian.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import jsonlog
from shared.jsonlog import SECURITY_LOGGER, configure_logging

main_log = logging.getLogger("agent_guardian.test_jsonlog")
security_log = logging.getLogger(SECURITY_LOGGER)


@pytest.fixture(autouse=True)
def isolated_logging() -> Iterator[None]:
    """configure_logging rewires the process-wide loggers: put pytest's handlers back afterwards."""
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved_security = (list(security_log.handlers), security_log.propagate)
    try:
        yield
    finally:
        for logger in (root, security_log):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                if handler not in saved_root[0] and handler not in saved_security[0]:
                    handler.close()  # the files configure_logging opened
        for handler in saved_root[0]:
            root.addHandler(handler)
        root.setLevel(saved_root[1])
        for handler in saved_security[0]:
            security_log.addHandler(handler)
        security_log.propagate = saved_security[1]


def lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects in a log file, failing on any line that is not one."""
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), f"{path.name} ends in a partial line"
    entries = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(entry, dict) for entry in entries)
    return entries


def events(path: Path) -> list[str]:
    return [entry.get("event", "") for entry in lines(path)]


@pytest.fixture
def no_recreate_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Create a missing log path at once instead of leaving logrotate a few seconds to create it."""
    monkeypatch.setattr(jsonlog, "_RECREATE_AFTER_S", 0.0)


def test_lines_stay_in_the_renamed_file_until_logrotate_creates_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "guardian.log"
    configure_logging("info", log_file=path)
    main_log.info("before the rotation", extra={"event": "first"})
    rotated = tmp_path / "guardian.log.1"
    path.rename(rotated)
    main_log.info("between the rename and the create", extra={"event": "second"})
    assert not path.exists(), "the handler must not create the path logrotate is about to create"
    assert events(rotated) == ["first", "second"]
    path.touch()  # logrotate's create
    main_log.info("after the create", extra={"event": "third"})
    assert events(path) == ["third"]
    assert events(rotated) == ["first", "second"]


@pytest.mark.usefixtures("no_recreate_grace")
def test_a_renamed_file_keeps_its_lines_and_the_next_line_goes_to_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "guardian.log"
    configure_logging("info", log_file=path)
    main_log.info("before the rotation", extra={"event": "first"})
    rotated = tmp_path / "guardian.log.1"
    path.rename(rotated)  # what logrotate's rotation does, with no create after it in time
    main_log.info("after the rotation", extra={"event": "second"})
    assert events(rotated) == ["first"]
    assert events(path) == ["second"]
    assert os.stat(path).st_ino != os.stat(rotated).st_ino
    main_log.info("and the next", extra={"event": "third"})
    assert events(path) == ["second", "third"]
    assert events(rotated) == ["first"]


def test_a_rename_just_after_the_check_does_not_make_the_handler_create_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # logrotate renames the file in the instant after the handler stat'ed the path: the line goes to
    # the renamed file and the path is left for logrotate's create (a handler that stat'ed the path a
    # second time would create it, and logrotate would move that file aside as NAME-DATE.backup).
    path = tmp_path / "guardian.log"
    rotated = tmp_path / "guardian.log.1"
    configure_logging("info", log_file=path)
    main_log.info("before the rotation", extra={"event": "first"})
    real_stat = os.stat
    renamed: list[bool] = []

    def stat_then_rename(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_stat(target, *args, **kwargs)
        if str(target) == str(path) and not renamed:
            renamed.append(True)
            os.rename(path, rotated)
        return result

    monkeypatch.setattr(os, "stat", stat_then_rename)
    main_log.info("in the instant of the rename", extra={"event": "second"})
    monkeypatch.setattr(os, "stat", real_stat)
    assert not path.exists(), "the handler created the path logrotate is about to create"
    assert events(rotated) == ["first", "second"]


def test_the_new_file_is_the_one_logrotate_created_when_it_exists(tmp_path: Path) -> None:
    path = tmp_path / "guardian.log"
    configure_logging("info", log_file=path)
    main_log.info("before", extra={"event": "first"})
    path.rename(tmp_path / "guardian.log.1")
    path.touch(mode=0o640)  # logrotate's `create`
    created = os.stat(path).st_ino
    main_log.info("after", extra={"event": "second"})
    assert os.stat(path).st_ino == created
    assert events(path) == ["second"]


@pytest.mark.usefixtures("no_recreate_grace")
def test_a_file_the_handler_creates_is_0640_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "guardian.log"
    previous = os.umask(0)
    try:
        configure_logging("info", log_file=path)
        main_log.info("first line", extra={"event": "first"})
        path.rename(tmp_path / "guardian.log.1")
        main_log.info("after a rotation", extra={"event": "second"})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "guardian.log.1").st_mode) == 0o640


def test_security_lines_go_only_to_the_security_file_and_main_lines_only_to_the_main_file(tmp_path: Path) -> None:
    main_path, security_path = tmp_path / "guardian.log", tmp_path / "security.log"
    configure_logging("info", log_file=main_path, security_file=security_path)
    main_log.info("serving", extra={"event": "serving"})
    security_log.info("request denied", extra={"event": "denied", "reason": "unauthenticated"})
    main_log.warning("still serving", extra={"event": "serving_again"})
    assert events(main_path) == ["serving", "serving_again"]
    assert [entry["logger"] for entry in lines(main_path)] == [main_log.name] * 2
    (denied,) = lines(security_path)
    assert denied["event"] == "denied" and denied["logger"] == SECURITY_LOGGER
    assert denied["reason"] == "unauthenticated" and denied["level"] == "info"


def test_without_a_security_file_security_lines_go_to_the_main_file(tmp_path: Path) -> None:
    main_path = tmp_path / "guardian.log"
    configure_logging("info", log_file=main_path)
    security_log.info("request denied", extra={"event": "denied"})
    main_log.info("serving", extra={"event": "serving"})
    assert events(main_path) == ["denied", "serving"]


@pytest.mark.usefixtures("no_recreate_grace")
def test_the_security_file_is_reopened_after_a_rename_too(tmp_path: Path) -> None:
    main_path, security_path = tmp_path / "guardian.log", tmp_path / "security.log"
    configure_logging("info", log_file=main_path, security_file=security_path)
    security_log.info("request denied", extra={"event": "denied"})
    security_path.rename(tmp_path / "security.log.1")
    security_log.info("request denied", extra={"event": "denied_again"})
    assert events(tmp_path / "security.log.1") == ["denied"]
    assert events(security_path) == ["denied_again"]
    assert lines(main_path) == []
