"""Group commit (guardian/store/database.py): concurrent writers share one transaction and one commit;
a job that fails rolls back alone; a commit that fails fails every job in it."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path
from typing import Any

import pytest

from guardian.store.database import Database


@pytest.fixture
def database(tmp_path: Path) -> Any:
    db = Database(tmp_path / "g.db", secrets.token_hex(32))
    with db.write() as connection:
        connection.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, who TEXT)")
    yield db
    db.close()


def count(db: Database) -> int:
    with db.read() as reader:
        return int(reader.execute("SELECT count(*) FROM t").fetchone()[0])


def test_a_job_returns_its_result_after_its_commit(database: Database) -> None:
    assert database.submit(lambda c: c.execute("INSERT INTO t (who) VALUES ('a')").lastrowid) == 1
    assert count(database) == 1  # visible to another connection: committed


def test_a_failing_job_rolls_back_alone_in_a_shared_transaction(database: Database) -> None:
    gate = threading.Event()
    results: dict[str, Any] = {}

    def slow_first(connection: Any) -> None:
        connection.execute("INSERT INTO t (who) VALUES ('first')")
        gate.wait(5)  # holds the writer while the others queue up behind it

    def failing(connection: Any) -> None:
        connection.execute("INSERT INTO t (who) VALUES ('failing')")
        raise ValueError("this job fails")

    def run(name: str, work: Any) -> None:
        try:
            results[name] = database.submit(work)
        except ValueError as error:
            results[name] = error

    first = threading.Thread(target=run, args=("first", slow_first))
    first.start()
    while not database._write_lock.locked():
        pass
    others = [
        threading.Thread(
            target=run,
            args=(f"ok{i}", lambda c, i=i: c.execute("INSERT INTO t (who) VALUES (?)", (f"ok{i}",)).lastrowid),
        )
        for i in range(8)
    ] + [threading.Thread(target=run, args=("failing", failing))]
    for thread in others:
        thread.start()
    while len(database._queue) < len(others):
        pass
    gate.set()
    for thread in [first, *others]:
        thread.join(10)
    assert isinstance(results["failing"], ValueError)
    with database.read() as reader:
        names = {row[0] for row in reader.execute("SELECT who FROM t").fetchall()}
    assert names == {"first", *(f"ok{i}" for i in range(8))}
    assert all(isinstance(results[f"ok{i}"], int) for i in range(8))


def test_a_commit_that_fails_fails_every_job_in_it(database: Database) -> None:
    with database.write() as connection:
        # A deferred foreign key is checked at COMMIT: the statement succeeds, the commit fails.
        connection.execute("CREATE TABLE child (parent INTEGER REFERENCES t(n) DEFERRABLE INITIALLY DEFERRED)")
    gate = threading.Event()
    outcomes: dict[str, Any] = {}

    def run(name: str, work: Any) -> None:
        try:
            outcomes[name] = database.submit(work)
        except Exception as error:
            outcomes[name] = error

    def hold(connection: Any) -> None:
        connection.execute("INSERT INTO t (who) VALUES ('held')")
        gate.wait(5)

    first = threading.Thread(target=run, args=("held", hold))
    first.start()
    while not database._write_lock.locked():
        pass
    queued = [
        threading.Thread(target=run, args=("good", lambda c: c.execute("INSERT INTO t (who) VALUES ('good')"))),
        threading.Thread(target=run, args=("orphan", lambda c: c.execute("INSERT INTO child VALUES (999)"))),
    ]
    for thread in queued:
        thread.start()
    while len(database._queue) < len(queued):
        pass
    gate.set()
    for thread in [first, *queued]:
        thread.join(10)
    assert outcomes["held"] is None  # its own group committed before the others queued
    assert all("FOREIGN KEY" in str(outcomes[name]) for name in ("good", "orphan")), outcomes
    with database.read() as reader:
        assert [row[0] for row in reader.execute("SELECT who FROM t").fetchall()] == ["held"]
    assert database.submit(lambda c: c.execute("INSERT INTO t (who) VALUES ('after')").lastrowid) == 2


def test_many_threads_each_get_their_own_row(database: Database) -> None:
    ids: list[int] = []
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(25):
            rowid = database.submit(lambda c: c.execute("INSERT INTO t (who) VALUES ('x')").lastrowid)
            with lock:
                ids.append(rowid)

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(ids) == list(range(1, 401)) and count(database) == 400
