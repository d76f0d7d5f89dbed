"""Durable state: operator overrides and the audit log, in SQLite (WAL) in the state directory.

Every write is one transaction committed with ``synchronous=FULL`` before the
caller goes on, so what the API acknowledged survives ``kill -9`` and power
loss. Writes are rare (operator actions) and small, so they run on the event
loop's thread: no request can interleave between checking an override and
recording it.

A store that is there but unusable is never taken for a first start. At open
the file is checked (empty, not a database, failing SQLite's integrity check,
not our schema) and compared with a small mark of what it acknowledged
(``siteagent.db.acknowledged``, rewritten atomically after each committed
write): SQLite drops WAL frames after a bad checksum without an error, so a
store that holds less than it acknowledged lost committed writes. Either way
the agent refuses to start and says what to do; ``siteagent run
--restore-backup`` starts from the newest good copy (the store itself if it
still reads whole, else a backup from ``backups/``) and names what that copy
lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from siteagent.agent.api.events import GridEvent, event_from_json, event_to_json
from siteagent.agent.api.overrides import SYSTEM_ACTOR, AuditRecord, Ending, Override

log = logging.getLogger("siteagent.store")

DB_NAME = "siteagent.db"
# What the store acknowledged: counts that only grow, and the open overrides by id.
MARK_SUFFIX = ".acknowledged"
BACKUP_DIR = "backups"
BACKUP_PREFIX = "siteagent-"
_STAMP = "%Y%m%dT%H%M%SZ"
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
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    start_unix_s REAL NOT NULL,
    end_unix_s REAL NOT NULL,
    cancelled_unix_s REAL,
    modified_seq INTEGER NOT NULL,
    body TEXT NOT NULL
);
"""


# Read with every override; end_reason came after schema 1 (added at open, NULL for old rows).
_OVERRIDE_COLUMNS = "body, ended_at_unix_s, end_state, ended_by, end_reason"


class StoreError(Exception):
    """The state database cannot be used."""


class _Damaged(Exception):
    """A database file that cannot serve as the store (the reason, without the path)."""


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """What a store holds, in numbers that only grow, and its open overrides."""

    overrides: int = 0
    ended: int = 0
    audit_seq: int = 0
    # (id, description) of each override not yet ended.
    open_overrides: tuple[tuple[str, str], ...] = ()

    @property
    def order(self) -> tuple[int, int, int]:
        """How far along the store's history this is (copies of one store compare)."""
        return (self.audit_seq, self.overrides, self.ended)


def _what(ov: Override) -> str:
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ov.expires_at_unix_s))
    return f"{ov.describe()} by {ov.actor}, until {until}"


def _what_to_do(path: Path) -> str:
    return (
        "to start from the newest good copy (this file if it still reads whole, else the "
        f"newest backup in {path.parent / BACKUP_DIR}), run `siteagent run --restore-backup`: "
        "it keeps this file aside and says which overrides the copy lacks; or, after checking "
        f"the file yourself, move {path.name}* aside (see systemd/README.md)"
    )


def _override_from_row(
    body: str, ended_at: float | None, end: str | None, by: str | None, why: str | None = None
) -> Override:
    data: dict[str, Any] = json.loads(body)
    data["replaces"] = tuple(data.get("replaces", ()))
    data.update(ended_at_unix_s=ended_at, end_state=end, ended_by=by, end_reason=why)
    return Override(**data)


class Store:
    """Overrides and the audit log in one SQLite database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.mark_path = _mark_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            found, acked = check_store(self.path)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            _add_end_reason(self._db)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{self.path}: {e}") from e
        self._overrides = found.overrides
        self._ended = found.ended
        self._audit_seq = found.audit_seq
        self._open = dict(found.open_overrides)
        self._mark_failing = False
        if acked is None or acked != self.counts:
            self._save_mark()

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
        for key in ("ended_at_unix_s", "end_state", "ended_by", "end_reason"):
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
            ended = self._end(db, endings)
        self._overrides += 1
        self._open[ov.id] = _what(ov)
        self._ended_now(endings, ended)

    def end_overrides(self, endings: Iterable[Ending]) -> None:
        """Mark overrides ended (cancelled, expired, ...) in one transaction."""
        endings = list(endings)
        with self._transaction() as db:
            ended = self._end(db, endings)
        if ended:
            self._ended_now(endings, ended)

    @staticmethod
    def _end(db: sqlite3.Connection, endings: Iterable[Ending]) -> int:
        cur = db.executemany(
            "UPDATE overrides SET ended_at_unix_s = ?, end_state = ?, ended_by = ?,"
            " end_reason = ? WHERE id = ? AND end_state IS NULL",
            [
                (e.ended_at_unix_s, e.end_state, e.ended_by, e.reason, e.override_id)
                for e in endings
            ],
        )
        return max(0, cur.rowcount)

    def _ended_now(self, endings: Iterable[Ending], ended: int) -> None:
        self._ended += ended
        for e in endings:
            self._open.pop(e.override_id, None)
        self._save_mark()

    def get_override(self, override_id: str) -> Override | None:
        """One override by id, or None."""
        row = self._db.execute(
            f"SELECT {_OVERRIDE_COLUMNS} FROM overrides WHERE id = ?",
            (override_id,),
        ).fetchone()
        return None if row is None else _override_from_row(*row)

    def by_idempotency_key(self, actor: str, key: str) -> Override | None:
        """The override an actor created under an idempotency key, or None."""
        row = self._db.execute(
            f"SELECT {_OVERRIDE_COLUMNS} FROM overrides WHERE actor = ? AND idempotency_key = ?",
            (actor, key),
        ).fetchone()
        return None if row is None else _override_from_row(*row)

    def open_overrides(self) -> list[Override]:
        """Overrides not ended by a write, oldest first (some may have expired by now)."""
        rows = self._db.execute(
            f"SELECT {_OVERRIDE_COLUMNS} FROM overrides"
            " WHERE end_state IS NULL ORDER BY created_at_unix_s, id"
        ).fetchall()
        return [_override_from_row(*r) for r in rows]

    def recent_overrides(self, limit: int) -> list[Override]:
        """The newest overrides, any state, newest first."""
        rows = self._db.execute(
            f"SELECT {_OVERRIDE_COLUMNS} FROM overrides"
            " ORDER BY created_at_unix_s DESC, id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [_override_from_row(*r) for r in rows]

    # -- grid events -------------------------------------------------------------

    def write_event(self, event: GridEvent, record: AuditRecord) -> int:
        """Insert or replace one grid event with its audit record, in one transaction.

        One transaction: the audit sequence number in the acknowledged-writes mark
        then covers the event, so a store that lost the event's write is refused.
        """
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO events (id, start_unix_s, end_unix_s, cancelled_unix_s,"
                " modified_seq, body) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    event.id,
                    event.start_unix_s,
                    event.end_unix_s,
                    event.cancelled_unix_s,
                    event.modified_seq,
                    event_to_json(event),
                ),
            )
            seq = self._insert_audit(db, record)
        self._audit_seq = seq
        self._save_mark()
        return seq

    def get_event(self, event_id: str) -> GridEvent | None:
        """One grid event by id, or None."""
        if not self._has_events():
            return None
        row = self._db.execute("SELECT body FROM events WHERE id = ?", (event_id,)).fetchone()
        return None if row is None else event_from_json(row[0])

    def events(self) -> list[GridEvent]:
        """Every grid event stored, any state, by start."""
        if not self._has_events():
            return []
        rows = self._db.execute("SELECT body FROM events ORDER BY start_unix_s, id").fetchall()
        return [event_from_json(r[0]) for r in rows]

    def _has_events(self) -> bool:
        # A store made before events, opened read-only (``plan --dry-run``), has no table.
        found = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
        ).fetchone()
        return found is not None

    # -- audit -------------------------------------------------------------------

    def append_audit(self, record: AuditRecord) -> int:
        """Append one audit record; returns its sequence number."""
        with self._transaction() as db:
            seq = self._insert_audit(db, record)
        self._audit_seq = seq
        self._save_mark()
        return seq

    @staticmethod
    def _insert_audit(db: sqlite3.Connection, record: AuditRecord) -> int:
        request = record.request
        if len(request) > MAX_AUDIT_REQUEST_CHARS:
            request = request[:MAX_AUDIT_REQUEST_CHARS] + "...(cut)"
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

    @property
    def counts(self) -> StoreCounts:
        """What the store holds now (and has acknowledged)."""
        return StoreCounts(
            self._overrides, self._ended, self._audit_seq, tuple(sorted(self._open.items()))
        )

    def _save_mark(self) -> None:
        # After the commit: a crash between the two leaves the mark behind the store,
        # never ahead of it, so the check at open cannot raise a false alarm.
        try:
            _write_mark(self.mark_path, self.counts)
        except OSError as e:
            # The write itself is committed; only the check at the next start is weaker.
            if not self._mark_failing:
                log.warning("cannot record acknowledged writes in %s: %s", self.mark_path, e)
            self._mark_failing = True
            return
        if self._mark_failing:
            log.info("recording acknowledged writes in %s again", self.mark_path)
            self._mark_failing = False

    def _transaction(self) -> _Tx:
        return _Tx(self._db)


def _add_end_reason(db: sqlite3.Connection) -> None:
    """Add the end_reason column to a database made before it existed (old rows keep NULL)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(overrides)")}
    if "end_reason" not in columns:
        db.execute("ALTER TABLE overrides ADD COLUMN end_reason TEXT")


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


# -- checks at open ------------------------------------------------------------------


def _mark_path(path: Path) -> Path:
    return path.with_name(path.name + MARK_SUFFIX)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_mark(path: Path, counts: StoreCounts) -> None:
    """Replace the mark atomically: write a temporary file, fsync, rename, fsync the dir."""
    data = json.dumps(
        {
            "overrides": counts.overrides,
            "ended": counts.ended,
            "audit_seq": counts.audit_seq,
            "open": dict(counts.open_overrides),
        }
    ).encode()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_mark(path: Path) -> StoreCounts | None:
    """The acknowledged counts, None if no mark yet; StoreError if it cannot be read."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        return StoreCounts(
            int(data["overrides"]),
            int(data["ended"]),
            int(data["audit_seq"]),
            tuple(sorted((str(k), str(v)) for k, v in dict(data["open"]).items())),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(
            f"{path} (what the store acknowledged) cannot be read ({e!r}); it is written "
            "atomically, so the state directory's disk may be failing: check it, then run "
            "`siteagent run --restore-backup`, or remove this file to accept the store as it is"
        ) from e


def _connect_ro(path: Path) -> sqlite3.Connection:
    # Read-only: checking a store must not checkpoint (and so throw away) a damaged WAL.
    return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)


def _inspect(path: Path, ids: Iterable[str] = ()) -> tuple[StoreCounts, frozenset[str]]:
    """A store file's counts and which of ``ids`` it holds; _Damaged if it cannot serve."""
    try:
        if path.stat().st_size == 0:
            raise _Damaged("is empty (0 bytes)")
        db = _connect_ro(path)
    except (OSError, sqlite3.Error) as e:
        raise _Damaged(f"cannot be opened ({e})") from e
    try:
        problems = [str(r[0]) for r in db.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise _Damaged(f"fails SQLite's integrity check ({'; '.join(problems)})")
        tables = {str(r[0]) for r in db.execute("SELECT name FROM sqlite_master")}
        if not {"overrides", "audit"} <= tables:
            raise _Damaged("holds no siteagent store (no overrides and audit tables)")
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version != SCHEMA_VERSION:
            raise _Damaged(f"has schema version {version}, expected {SCHEMA_VERSION}")
        n, ended = db.execute("SELECT count(*), count(end_state) FROM overrides").fetchone()
        (seq,) = db.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()
        open_rows = db.execute(
            "SELECT body, ended_at_unix_s, end_state, ended_by FROM overrides"
            " WHERE end_state IS NULL"
        ).fetchall()
        opened = tuple(
            sorted((o.id, _what(o)) for o in (_override_from_row(*r) for r in open_rows))
        )
        wanted = list(ids)
        held = {
            str(r[0])
            for r in db.execute(
                f"SELECT id FROM overrides WHERE id IN ({','.join('?' * len(wanted))})", wanted
            )
        }
        return StoreCounts(int(n), int(ended), int(seq), opened), frozenset(held)
    except sqlite3.Error as e:
        raise _Damaged(f"cannot be read ({e})") from e
    finally:
        db.close()


def _shortfall(found: StoreCounts, held: frozenset[str], acked: StoreCounts) -> list[str]:
    """What was acknowledged and a copy of the store lacks, in words; empty if nothing."""
    lacks: list[str] = []
    if found.overrides < acked.overrides:
        lacks.append(f"{acked.overrides - found.overrides} override(s)")
    if found.ended < acked.ended:
        lacks.append(f"{acked.ended - found.ended} ending(s) of overrides")
    if found.audit_seq < acked.audit_seq:
        lacks.append(f"audit records {found.audit_seq + 1} to {acked.audit_seq}")
    if not lacks:
        return []
    counts = (
        f"it holds {found.overrides} override(s) and audit records up to {found.audit_seq}, "
        f"but {acked.overrides} override(s) and audit records up to {acked.audit_seq} were "
        f"acknowledged; it lacks {', '.join(lacks)}"
    )
    lost = [f"{i} ({what})" for i, what in acked.open_overrides if i not in held]
    if lost:
        counts += f"; override(s) in force that it lacks: {'; '.join(lost)}"
    return [counts]


def _create(path: Path) -> None:
    """A new, empty store, in place at once (a crash leaves no half-made file behind)."""
    tmp = path.with_name(path.name + ".new")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    finally:
        db.close()
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def check_store(path: Path) -> tuple[StoreCounts, StoreCounts | None]:
    """Check a store before use (creating it on a first start): (found, acknowledged).

    Raises StoreError naming the file and what to do when it is missing but the state
    directory has held one, empty, unreadable, not ours, or lacks acknowledged writes.
    """
    mark = _mark_path(path)
    acked = _read_mark(mark)
    if not path.exists():
        traces = [p.name for p in (mark, Path(f"{path}-wal")) if p.exists()]
        if traces:
            raise StoreError(
                f"{path} is missing, but this state directory has held a store (found "
                f"{', '.join(traces)}); not starting as new: " + _what_to_do(path)
            )
        _create(path)
        log.info("new store %s (first start)", path)
        return StoreCounts(), None
    ids = [i for i, _ in acked.open_overrides] if acked else []
    try:
        found, held = _inspect(path, ids)
    except _Damaged as e:
        raise StoreError(f"{path} {e}; not starting on it: " + _what_to_do(path)) from e
    if acked is not None and (short := _shortfall(found, held, acked)):
        raise StoreError(
            f"{path} lacks writes it acknowledged (recorded in {mark.name}): {short[0]}. "
            "Committed writes were lost, most likely a write-ahead log damaged in a crash; "
            "not starting on it: " + _what_to_do(path)
        )
    return found, acked


# -- backups -------------------------------------------------------------------------


def _stamp(now_unix_s: float) -> str:
    return time.strftime(_STAMP, time.gmtime(now_unix_s))


def backups(state_dir: str | Path) -> list[Path]:
    """The store's backups in a state directory, newest first."""
    directory = Path(state_dir) / BACKUP_DIR
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{BACKUP_PREFIX}*.db"), reverse=True)


def _copy(src: Path, dst: Path) -> None:
    """A consistent single-file copy of a store through SQLite's online backup, verified."""
    dst.unlink(missing_ok=True)
    source = _connect_ro(src)
    try:
        target = sqlite3.connect(dst, isolation_level=None)
        try:
            source.backup(target)
            # One self-contained file: no -wal beside a backup.
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            target.close()
    finally:
        source.close()
    try:
        _inspect(dst)
    except _Damaged as e:
        dst.unlink(missing_ok=True)
        raise StoreError(f"the copy of {src} at {dst} {e}") from e
    _fsync_file(dst)


def backup_store(state_dir: str | Path, kept: int, now_unix_s: float | None = None) -> Path:
    """Back the store up to ``backups/siteagent-<UTC time>.db``; keep the newest ``kept``."""
    src = Path(state_dir) / DB_NAME
    directory = Path(state_dir) / BACKUP_DIR
    directory.mkdir(exist_ok=True)
    stamp = _stamp(time.time() if now_unix_s is None else now_unix_s)
    final = directory / f"{BACKUP_PREFIX}{stamp}.db"
    tmp = directory / f"{BACKUP_PREFIX}{stamp}.db.tmp"
    try:
        _copy(src, tmp)
    except sqlite3.Error as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"backup of {src} to {final} failed: {e}") from e
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in backups(state_dir)[kept:]:
        old.unlink(missing_ok=True)
    return final


async def keep_backups(
    state_dir: str | Path,
    interval_s: float,
    kept: int,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Back the store up every ``interval_s`` until cancelled (off the event loop's thread)."""
    failing = False
    while True:
        await sleep(interval_s)
        try:
            path = await asyncio.to_thread(backup_store, state_dir, kept)
        except (OSError, sqlite3.Error, StoreError) as e:
            if not failing:
                log.warning("store backup failed (retrying every %.0f s): %s", interval_s, e)
            failing = True
            continue
        if failing:
            log.info("store backups work again (%s)", path.name)
        failing = False


# -- start and restore ---------------------------------------------------------------


def restore_backup(state_dir: str | Path, *, now_unix_s: float | None = None) -> str | None:
    """Start from the newest good copy of a damaged or missing store; what it did, or None.

    The damaged files are renamed ``siteagent.db.damaged-<UTC time>``, never deleted.
    Candidates: the store as found if it still reads whole (it lacks only lost WAL
    writes), and the newest backup that passes its check; the one further along wins.
    """
    directory = Path(state_dir)
    path = directory / DB_NAME
    kept = backups(directory)
    if path.exists() or not kept:
        try:
            Store(path).close()
        except StoreError as e:
            damage = str(e)
        else:
            log.info("--restore-backup: %s is sound; nothing to restore", path)
            return None
    else:
        damage = f"{path} is missing"
    try:
        acked = _read_mark(_mark_path(path))
    except StoreError:
        acked = None
    ids = [i for i, _ in acked.open_overrides] if acked else []
    candidates: list[tuple[Path, str, StoreCounts, frozenset[str]]] = []
    with contextlib.suppress(_Damaged):
        if path.exists():
            candidates.append(
                (path, "the store as found (it still reads whole)", *_inspect(path, ids))
            )
    for b in kept:
        try:
            found, held = _inspect(b, ids)
        except _Damaged as e:
            log.warning("backup %s is unusable: %s", b, e)
            continue
        taken = time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.strptime(b.stem[len(BACKUP_PREFIX) :], _STAMP)
        )
        candidates.append((b, f"backup {b} (taken {taken})", found, held))
        break
    if not candidates:
        raise StoreError(f"{damage}; and there is no good backup in {directory / BACKUP_DIR}")
    src, label, found, held = max(candidates, key=lambda c: c[2].order)
    now = time.time() if now_unix_s is None else now_unix_s
    staging = path.with_name(DB_NAME + ".restoring")
    _copy(src, staging)
    aside: list[str] = []
    for suffix in ("", "-wal", "-shm"):
        old = Path(f"{path}{suffix}")
        if old.exists():
            new = path.with_name(f"{DB_NAME}.damaged-{_stamp(now)}{suffix}")
            os.replace(old, new)
            aside.append(new.name)
    os.replace(staging, path)
    _fsync_dir(directory)
    if acked is None:
        lacks = "what the store acknowledged beyond it is unknown (no readable record of it)"
    else:
        short = _shortfall(found, held, acked)
        lacks = short[0] if short else "it holds every write the store acknowledged"
    message = (
        f"restored {path} from {label}: {lacks}; the damaged files are kept as "
        f"{', '.join(aside) or '(none: the store was missing)'}; re-create overrides that "
        "are still needed"
    )
    _write_mark(_mark_path(path), found)
    store = Store(path)
    try:
        store.append_audit(
            AuditRecord(
                time_unix_s=now,
                actor=SYSTEM_ACTOR,
                client="-",
                action="restore-backup",
                request=json.dumps({"from": str(src), "damaged": aside, "problem": damage}),
                status=200,
                result=message,
            )
        )
    finally:
        store.close()
    log.warning("%s", message)
    return message


def prepare_store(state_dir: str | Path, *, restore: bool, backups_kept: int) -> None:
    """At start: check the store (restoring the newest good copy if asked), then back it up."""
    if restore:
        restore_backup(state_dir)
    Store.in_dir(state_dir).close()
    try:
        backup_store(state_dir, backups_kept)
    except (OSError, sqlite3.Error, StoreError) as e:
        log.warning("store backup at start failed: %s", e)
