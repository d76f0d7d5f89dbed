"""Durable state: operator overrides and the audit log, in SQLite (WAL) in the state directory.

Every write is one transaction committed with ``synchronous=FULL`` before the
caller goes on, so what the API acknowledged survives ``kill -9`` and power
loss. Writes are rare (operator actions) and small, so they run on the event
loop's thread: no request can interleave between checking an override and
recording it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.overrides import AuditRecord, Ending, Override

DB_NAME = "siteagent.db"
SCHEMA_VERSION = 1
# Audit rows keep at most this much of a request body; the rest is cut, never the row.
MAX_AUDIT_REQUEST_CHARS = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS overrides (
    id TEXT PRIMARY KEY,
    actor TEXT NOT NULL,
    idempotency_key TEXT,
    created_at_unix_s REAL NOT NULL,
    expires_at_unix_s REAL NOT NULL,
    ended_at_unix_s REAL,
    end_state TEXT,
    ended_by TEXT,
    body TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS overrides_idempotency
    ON overrides (actor, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS overrides_open ON overrides (end_state, expires_at_unix_s);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time_unix_s REAL NOT NULL,
    actor TEXT NOT NULL,
    client TEXT NOT NULL,
    action TEXT NOT NULL,
    request TEXT NOT NULL,
    status INTEGER NOT NULL,
    result TEXT NOT NULL,
    override_id TEXT
);
"""


class StoreError(Exception):
    """The state database cannot be used."""


def _override_from_row(
    body: str, ended_at: float | None, end: str | None, by: str | None
) -> Override:
    data: dict[str, Any] = json.loads(body)
    data["replaces"] = tuple(data.get("replaces", ()))
    data.update(ended_at_unix_s=ended_at, end_state=end, ended_by=by)
    return Override(**data)


class Store:
    """Overrides and the audit log in one SQLite database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{self.path}: {e}") from e

    @classmethod
    def read_only(cls, path: str | Path) -> Store:
        """Open an existing database for reading only: no schema, no journal change, no writes."""
        store = cls.__new__(cls)
        store.path = Path(path)
        try:
            store._db = sqlite3.connect(f"{store.path.resolve().as_uri()}?mode=ro", uri=True)
            store._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as e:
            raise StoreError(f"{store.path}: {e}") from e
        return store

    @classmethod
    def in_dir(cls, state_dir: str | Path) -> Store:
        """Open (creating if needed) the database in a state directory."""
        return cls(Path(state_dir) / DB_NAME)

    def close(self) -> None:
        """Close the database; WAL contents stay valid for the next open."""
        self._db.close()

    @property
    def journal_mode(self) -> str:
        """SQLite's journal mode (``wal``)."""
        row = self._db.execute("PRAGMA journal_mode").fetchone()
        return str(row[0])

    # -- overrides ---------------------------------------------------------------

    def insert_override(self, ov: Override, endings: Iterable[Ending] = ()) -> None:
        """Record a new override, and end those it replaces, in one transaction."""
        body = asdict(ov)
        for key in ("ended_at_unix_s", "end_state", "ended_by"):
            body.pop(key)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO overrides (id, actor, idempotency_key, created_at_unix_s,"
                " expires_at_unix_s, body) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    ov.id,
                    ov.actor,
                    ov.idempotency_key,
                    ov.created_at_unix_s,
                    ov.expires_at_unix_s,
                    json.dumps(body),
                ),
            )
            self._end(db, endings)

    def end_overrides(self, endings: Iterable[Ending]) -> None:
        """Mark overrides ended (cancelled, expired, ...) in one transaction."""
        with self._transaction() as db:
            self._end(db, endings)

    @staticmethod
    def _end(db: sqlite3.Connection, endings: Iterable[Ending]) -> None:
        db.executemany(
            "UPDATE overrides SET ended_at_unix_s = ?, end_state = ?, ended_by = ?"
            " WHERE id = ? AND end_state IS NULL",
            [(e.ended_at_unix_s, e.end_state, e.ended_by, e.override_id) for e in endings],
        )

    def get_override(self, override_id: str) -> Override | None:
        """One override by id, or None."""
        row = self._db.execute(
            "SELECT body, ended_at_unix_s, end_state, ended_by FROM overrides WHERE id = ?",
            (override_id,),
        ).fetchone()
        return None if row is None else _override_from_row(*row)

    def by_idempotency_key(self, actor: str, key: str) -> Override | None:
        """The override an actor created under an idempotency key, or None."""
        row = self._db.execute(
            "SELECT body, ended_at_unix_s, end_state, ended_by FROM overrides"
            " WHERE actor = ? AND idempotency_key = ?",
            (actor, key),
        ).fetchone()
        return None if row is None else _override_from_row(*row)

    def open_overrides(self) -> list[Override]:
        """Overrides not ended by a write, oldest first (some may have expired by now)."""
        rows = self._db.execute(
            "SELECT body, ended_at_unix_s, end_state, ended_by FROM overrides"
            " WHERE end_state IS NULL ORDER BY created_at_unix_s, id"
        ).fetchall()
        return [_override_from_row(*r) for r in rows]

    def recent_overrides(self, limit: int) -> list[Override]:
        """The newest overrides, any state, newest first."""
        rows = self._db.execute(
            "SELECT body, ended_at_unix_s, end_state, ended_by FROM overrides"
            " ORDER BY created_at_unix_s DESC, id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [_override_from_row(*r) for r in rows]

    # -- audit -------------------------------------------------------------------

    def append_audit(self, record: AuditRecord) -> int:
        """Append one audit record; returns its sequence number."""
        request = record.request
        if len(request) > MAX_AUDIT_REQUEST_CHARS:
            request = request[:MAX_AUDIT_REQUEST_CHARS] + "...(cut)"
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO audit (time_unix_s, actor, client, action, request, status,"
                " result, override_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.time_unix_s,
                    record.actor,
                    record.client,
                    record.action,
                    request,
                    record.status,
                    record.result,
                    record.override_id,
                ),
            )
            seq = cur.lastrowid
        assert seq is not None
        return seq

    def audit(self, limit: int, before_seq: int | None = None) -> list[AuditRecord]:
        """The newest audit records (before a sequence number, if given), newest first."""
        rows: Sequence[tuple[Any, ...]] = self._db.execute(
            "SELECT seq, time_unix_s, actor, client, action, request, status, result,"
            " override_id FROM audit WHERE seq < ? ORDER BY seq DESC LIMIT ?",
            (before_seq if before_seq is not None else 2**62, limit),
        ).fetchall()
        return [
            AuditRecord(
                seq=r[0],
                time_unix_s=r[1],
                actor=r[2],
                client=r[3],
                action=r[4],
                request=r[5],
                status=r[6],
                result=r[7],
                override_id=r[8],
            )
            for r in rows
        ]

    # -- plumbing ----------------------------------------------------------------

    def _transaction(self) -> _Tx:
        return _Tx(self._db)


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
