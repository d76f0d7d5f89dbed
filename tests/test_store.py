"""The SQLite store: WAL, overrides and their endings, idempotency keys, the audit log."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from siteagent.agent.api.overrides import AuditRecord, Ending, Override
from siteagent.agent.api.store import (
    Store,
    StoreError,
    backup_store,
    backups,
    keep_backups,
    restore_backup,
)
from siteagent.agent.control.inventory_store import InventoryStore


def ov(i: int, **kw: object) -> Override:
    base: dict[str, object] = {
        "id": f"ovr-{i}",
        "kind": "cap",
        "actor": "alice",
        "reason": "r",
        "created_at_unix_s": 1000.0 + i,
        "expires_at_unix_s": 2000.0 + i,
        "cap_w": 5000.0,
        "replaces": ("ovr-0",),
    }
    base.update(kw)
    return Override(**base)  # type: ignore[arg-type]


def test_wal_and_round_trip(tmp_path: Path) -> None:
    s = Store.in_dir(tmp_path / "state")
    assert s.journal_mode == "wal"
    s.insert_override(ov(1, idempotency_key="k1"))
    s.close()
    s = Store.in_dir(tmp_path / "state")
    got = s.get_override("ovr-1")
    assert got == ov(1, idempotency_key="k1")
    assert got is not None and got.replaces == ("ovr-0",)
    assert s.by_idempotency_key("alice", "k1") == got
    assert s.by_idempotency_key("bob", "k1") is None
    assert s.get_override("ovr-none") is None


def test_endings_and_open_overrides(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.db")
    for i in (1, 2, 3):
        s.insert_override(ov(i))
    s.insert_override(ov(4), [Ending("ovr-1", "replaced", "root", 1500.0)])
    s.end_overrides([Ending("ovr-2", "cancelled", "bob", 1600.0)])
    # An ending is final: a later one does not overwrite it.
    s.end_overrides([Ending("ovr-2", "expired", "siteagent", 1700.0)])
    assert [o.id for o in s.open_overrides()] == ["ovr-3", "ovr-4"]
    two = s.get_override("ovr-2")
    assert two is not None and (two.end_state, two.ended_by, two.ended_at_unix_s) == (
        "cancelled",
        "bob",
        1600.0,
    )
    assert two.state(0.0) == "cancelled"
    assert [o.id for o in s.recent_overrides(2)] == ["ovr-4", "ovr-3"]


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.db")
    s.insert_override(ov(1, idempotency_key="k"))
    with pytest.raises(sqlite3.IntegrityError):
        s.insert_override(ov(2, idempotency_key="k"), [Ending("ovr-1", "replaced", "x", 1.0)])
    assert s.get_override("ovr-2") is None
    one = s.get_override("ovr-1")
    assert one is not None and one.end_state is None


def test_audit_append_and_page(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.db")
    seqs = [
        s.append_audit(
            AuditRecord(
                float(i),
                "alice",
                "10.0.0.1",
                "POST /v1/overrides",
                "x" * (10_000 if i == 3 else 5),
                201,
                "ok",
                f"ovr-{i}",
            )
        )
        for i in range(5)
    ]
    assert seqs == sorted(seqs)
    newest = s.audit(2)
    assert [r.seq for r in newest] == seqs[:-3:-1]
    older = s.audit(10, before_seq=newest[-1].seq)
    assert [r.override_id for r in older] == ["ovr-2", "ovr-1", "ovr-0"]
    long = next(r for r in s.audit(10) if r.override_id == "ovr-3")
    assert long.request.endswith("...(cut)") and len(long.request) < 4200


def test_unusable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StoreError, match="file"):
        Store.in_dir(blocker / "state")


# -- a store that is there but unusable is never taken for a new one ------------------


def drop_wal_transactions(wal: Path, n: int) -> None:
    """Damage the first frame of the last ``n`` transactions in a WAL, as a torn write does.

    SQLite stops reading a WAL at the first frame whose checksum fails, silently: the
    transactions from there on are gone although they were committed.
    """
    data = bytearray(wal.read_bytes())
    page_size = int.from_bytes(data[8:12], "big")
    frame = 24 + page_size
    frames = (len(data) - 32) // frame
    commits = [i for i in range(frames) if int.from_bytes(data[32 + i * frame + 4 :][:4], "big")]
    assert len(commits) > n, f"only {len(commits)} transactions in {wal}"
    first = commits[-n - 1] + 1  # the frame after the last commit that stays
    data[32 + first * frame + 24 + page_size // 2] ^= 0xFF
    wal.write_bytes(bytes(data))


def crash_copy(state: Path, to: Path) -> None:
    """The state directory's files as a kill -9 leaves them (the store still open)."""
    to.mkdir()
    for f in state.iterdir():
        if f.is_file():
            (to / f.name).write_bytes(f.read_bytes())


def overrides_in(state: Path) -> list[str]:
    s = Store.in_dir(state)
    try:
        return [o.id for o in s.recent_overrides(1000)][::-1]
    finally:
        s.close()


def test_a_truncated_store_is_refused_naming_the_file_and_what_to_do(tmp_path: Path) -> None:
    s = Store.in_dir(tmp_path)
    s.insert_override(ov(1))
    s.close()
    (tmp_path / "siteagent.db").write_bytes(b"")
    with pytest.raises(StoreError) as e:
        Store.in_dir(tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / 'siteagent.db'} is empty (0 bytes)" in msg
    assert "siteagent run --restore-backup" in msg
    assert (tmp_path / "siteagent.db").stat().st_size == 0  # left as found


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("garbage", "cannot be read (file is not a database)"),
        ("foreign", "holds no siteagent store"),
        ("missing", "is missing, but this state directory has held a store"),
        ("version", "has schema version 7, expected 1"),
        ("page", "fails SQLite's integrity check"),
    ],
)
def test_a_damaged_store_is_refused(tmp_path: Path, damage: str, says: str) -> None:
    s = Store.in_dir(tmp_path)
    for i in range(60):
        s.insert_override(ov(i, reason="r" * 500))
    s.close()
    db = tmp_path / "siteagent.db"
    if damage == "garbage":
        db.write_bytes(b"not a database " * 500)
    elif damage == "foreign":
        db.unlink()
        other = sqlite3.connect(db)
        other.execute("CREATE TABLE t (x)")
        other.commit()
        other.close()
    elif damage == "missing":
        db.unlink()
    elif damage == "version":
        other = sqlite3.connect(db)
        other.execute("PRAGMA user_version=7")
        other.close()
    else:
        data = bytearray(db.read_bytes())
        assert len(data) >= 4 * 4096
        data[2 * 4096 + 8 : 2 * 4096 + 40] = b"\xff" * 32  # a b-tree page's cells, scrambled
        db.write_bytes(bytes(data))
    with pytest.raises(StoreError) as e:
        Store.in_dir(tmp_path)
    assert str(db) in str(e.value) and says in str(e.value)
    assert "--restore-backup" in str(e.value)


def test_a_wal_that_lost_a_committed_override_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    s = Store.in_dir(state)
    for i in range(1, 32):
        s.insert_override(ov(i))
    crash_copy(state, tmp_path / "crashed")
    s.close()
    drop_wal_transactions(tmp_path / "crashed" / "siteagent.db-wal", 1)
    with pytest.raises(StoreError) as e:
        Store.in_dir(tmp_path / "crashed")
    msg = str(e.value)
    assert "it holds 30 override(s)" in msg and "but 31 override(s)" in msg
    assert "ovr-31 (cap site 5000 W by alice, until 1970-01-01 00:33:51 UTC)" in msg
    assert "--restore-backup" in msg
    # Checking it left the damaged WAL as found (no checkpoint on close).
    assert (tmp_path / "crashed" / "siteagent.db-wal").stat().st_size > 0


def test_an_unreadable_mark_is_refused(tmp_path: Path) -> None:
    Store.in_dir(tmp_path).close()
    (tmp_path / "siteagent.db.acknowledged").write_text("{")
    with pytest.raises(StoreError, match=r"siteagent\.db\.acknowledged .* cannot be read"):
        Store.in_dir(tmp_path)


def test_a_first_start_and_a_store_from_before_the_mark_start(tmp_path: Path) -> None:
    s = Store.in_dir(tmp_path)
    s.insert_override(ov(1))
    s.close()
    (tmp_path / "siteagent.db.acknowledged").unlink()  # as a store written before the mark
    s = Store.in_dir(tmp_path)
    assert s.counts.overrides == 1 and s.counts.open_overrides[0][0] == "ovr-1"
    s.close()
    assert (tmp_path / "siteagent.db.acknowledged").exists()


# -- backups and restore --------------------------------------------------------------


def test_backups_are_whole_files_and_the_oldest_are_pruned(tmp_path: Path) -> None:
    s = Store.in_dir(tmp_path)
    made = []
    for i in range(1, 4):
        s.insert_override(ov(i))
        made.append(backup_store(tmp_path, kept=2, now_unix_s=1_700_000_000.0 + i))
    s.close()
    assert backups(tmp_path) == made[:0:-1]
    assert made[-1].name == "siteagent-20231114T221323Z.db"
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == [p.name for p in made[1:]]
    one = sqlite3.connect(made[1])
    assert one.execute("SELECT count(*) FROM overrides").fetchone() == (2,)
    assert one.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    one.close()


def test_restore_starts_from_the_newest_good_backup_and_names_what_it_lacks(
    tmp_path: Path,
) -> None:
    s = Store.in_dir(tmp_path)
    for i in (1, 2):
        s.insert_override(ov(i))
    good = backup_store(tmp_path, kept=5, now_unix_s=1_700_000_000.0)
    s.insert_override(ov(3, expires_at_unix_s=1_800_000_000.0))
    s.close()
    # A newer backup that does not pass its check is passed over, not used.
    (tmp_path / "backups" / "siteagent-20240101T000000Z.db").write_bytes(b"\0" * 4096)
    (tmp_path / "siteagent.db").write_bytes(b"")
    message = restore_backup(tmp_path, now_unix_s=1_700_000_100.0)
    assert message is not None
    assert f"from backup {good} (taken 2023-11-14 22:13:20 UTC)" in message
    assert "ovr-3 (cap site 5000 W by alice, until 2027-01-15 08:00:00 UTC)" in message
    assert overrides_in(tmp_path) == ["ovr-1", "ovr-2"]
    aside = tmp_path / "siteagent.db.damaged-20231114T221500Z"
    assert aside.exists() and aside.stat().st_size == 0
    s = Store.in_dir(tmp_path)
    audit = s.audit(1)[0]
    s.close()
    assert (audit.action, audit.actor, audit.result) == ("restore-backup", "siteagent", message)


def test_restore_keeps_the_store_as_found_when_it_is_further_along(tmp_path: Path) -> None:
    state = tmp_path / "state"
    s = Store.in_dir(state)
    backup_store(state, kept=5, now_unix_s=1_700_000_000.0)  # empty, older
    for i in range(1, 32):
        s.insert_override(ov(i))
    crash_copy(state, tmp_path / "crashed")
    s.close()
    drop_wal_transactions(tmp_path / "crashed" / "siteagent.db-wal", 1)
    message = restore_backup(tmp_path / "crashed", now_unix_s=1_700_000_100.0)
    assert message is not None and "from the store as found" in message
    assert "ovr-31 (cap site 5000 W" in message
    assert overrides_in(tmp_path / "crashed") == [f"ovr-{i}" for i in range(1, 31)]
    assert (tmp_path / "crashed" / "siteagent.db.damaged-20231114T221500Z-wal").exists()


def test_restore_on_a_sound_store_does_nothing(tmp_path: Path) -> None:
    s = Store.in_dir(tmp_path)
    s.insert_override(ov(1))
    s.close()
    backup_store(tmp_path, kept=5)
    assert restore_backup(tmp_path) is None
    assert overrides_in(tmp_path) == ["ovr-1"]
    assert not list(tmp_path.glob("*.damaged-*"))


def test_no_good_backup_is_a_clear_error(tmp_path: Path) -> None:
    Store.in_dir(tmp_path).close()
    (tmp_path / "siteagent.db").write_bytes(b"")
    with pytest.raises(StoreError, match=r"no good backup in .*backups"):
        restore_backup(tmp_path)
    assert (tmp_path / "siteagent.db").exists()  # nothing moved when nothing replaces it


async def test_backups_run_on_a_schedule(tmp_path: Path) -> None:
    Store.in_dir(tmp_path).close()
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await keep_backups(tmp_path, 600.0, 24, sleep=sleep)
    assert sleeps == [600.0] * 3
    assert len(backups(tmp_path)) == 1  # two runs in one second: one file, the newer


# -- the inventory: losing it costs a re-identification, not a refusal -----------------


@pytest.mark.parametrize("content", [b"", b"not a database " * 500])
def test_a_damaged_inventory_is_moved_aside_with_a_warning(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "inventory.sqlite"
    path.write_bytes(content)
    inv = InventoryStore(path, clock=lambda: 1_700_000_000.0)
    assert inv.miners() == []
    inv.close()
    aside = tmp_path / "inventory.sqlite.damaged-20231114T221320Z"
    assert aside.read_bytes() == content
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"inventory {path} is damaged" in warnings[0]
    assert "identified again" in warnings[0]
