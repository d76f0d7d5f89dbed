"""The SQLite store: WAL, overrides and their endings, idempotency keys, the audit log."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.overrides import AuditRecord, Ending, Override
from agent.store import Store, StoreError


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
