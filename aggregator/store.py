"""Durable state: one SQLite database (WAL, synchronous=FULL) plus a folder of safetensors blobs.

Blobs are written atomically and fsynced before the database row that names them is committed, so after a crash
every committed row points to a complete blob; a blob without a row is an unacknowledged upload the device retries,
removed at the next start (:meth:`Store.remove_orphan_blobs`).
An upload the database refuses (a replay, a conflict, a round that closed meanwhile) removes its blob again, so
no request leaves a file behind.

Rounds go ``open`` -> ``aggregating`` -> ``closed``, or -> ``failed`` when their uploads could not be aggregated
(the reason is kept in ``failure``); the admin retries a failed round (back to ``aggregating``) or closes it
(``closed_at`` set, the next round opens on the same global version).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from device_sdk.federated.secrets import new_secret

from .blobs import atomic_write, sha256

log = logging.getLogger(__name__)

#: SQLite integers are signed 64-bit: a larger round or version number can name no row.
_INT64_MAX = 2**63 - 1

ROUNDS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('open', 'aggregating', 'closed', 'failed')),
    base_version INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    closed_at REAL,
    summary TEXT,
    failure TEXT
);
"""
_ROUND_COLUMNS = "round, status, base_version, opened_at, deadline, closed_at, summary, failure"
_DEVICE_COLUMNS = "id, name, capabilities, retired_at"

SCHEMA = """
CREATE TABLE IF NOT EXISTS federation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    config TEXT NOT NULL,
    spec TEXT,
    enroll_secret_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    capabilities TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    retired_at REAL  -- set when the admin retires the device: its token stops working, rounds stop waiting for it
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    device_id INTEGER NOT NULL,
    sha256 TEXT NOT NULL,  -- content digest (aggregate.content_digest); raw SHA-256 in databases made before it
    path TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (round, device_id)
);
CREATE TABLE IF NOT EXISTS globals (
    version INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL
);
""" + ROUNDS_TABLE.format(name="rounds")


def _int64(number: int) -> bool:
    """Whether ``number`` fits an SQLite integer (larger ones can name no row; binding them raises)."""
    return -_INT64_MAX - 1 <= number <= _INT64_MAX


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(nbytes: int = 32) -> str:
    """A random URL-safe secret (:func:`device_sdk.federated.secrets.new_secret`)."""
    return new_secret(nbytes)


@dataclass(frozen=True)
class Device:
    id: int
    name: str
    capabilities: dict
    retired_at: float | None = None


@dataclass(frozen=True)
class Round:
    """One round. ``failure``: why its aggregation failed (status ``failed``); a failed round with ``closed_at``
    set was closed by the admin without a new global version."""

    round: int
    status: str
    base_version: int
    opened_at: float
    deadline: float
    closed_at: float | None
    summary: dict | None
    failure: str | None = None


class Added(enum.Enum):
    """What :meth:`Store.insert_update` did with an upload."""

    ADDED = "added"
    DUPLICATE = "duplicate"  # the device's stored upload for the round has the same content digest
    CONFLICT = "conflict"  # the device already uploaded other content for the round
    NOT_OPEN = "not_open"  # the round is not open (any more)


@dataclass(frozen=True)
class DeviceActivity:
    """A device with its enrollment time and its latest upload (``None`` before its first one)."""

    device: Device
    enrolled_at: float
    last_round: int | None
    last_upload_at: float | None


@dataclass(frozen=True)
class Update:
    round: int
    device_id: int
    sha256: str
    path: Path
    tokens: int
    metrics: dict


class Store:
    """All persistent state of one federation. Thread-safe (one connection behind a lock)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.data_dir / "aggregator.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._migrate_rounds()
        self._migrate_devices()

    def _migrate_rounds(self) -> None:
        """Give a database created before failed rounds existed the current ``rounds`` table.

        SQLite cannot change a CHECK constraint in place: the table is copied into a new one and swapped, in one
        transaction (a crash leaves the old table or the new one, never neither).
        """
        row = self._one("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'rounds'")
        if row is None or "'failed'" in row[0]:
            return
        log.warning("migrating the rounds table of %s to allow failed rounds", self.data_dir)
        old_columns = "round, status, base_version, opened_at, deadline, closed_at, summary"
        with self._tx() as db:
            db.execute("DROP TABLE IF EXISTS rounds_migrating")
            db.execute(ROUNDS_TABLE.format(name="rounds_migrating"))
            db.execute(f"INSERT INTO rounds_migrating ({old_columns}) SELECT {old_columns} FROM rounds")
            db.execute("DROP TABLE rounds")
            db.execute("ALTER TABLE rounds_migrating RENAME TO rounds")

    def _migrate_devices(self) -> None:
        """Give a database created before devices could be retired the ``retired_at`` column (NULL: active)."""
        columns = [row[1] for row in self._all("PRAGMA table_info(devices)")]
        if "retired_at" not in columns:
            log.warning("migrating the devices table of %s to allow retired devices", self.data_dir)
            with self._tx() as db:
                db.execute("ALTER TABLE devices ADD COLUMN retired_at REAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        """A write transaction (BEGIN IMMEDIATE ... COMMIT) under the store lock."""
        store = self

        class _Tx:
            def __enter__(self):
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self, exc_type, exc, tb):
                try:
                    store._db.execute("ROLLBACK" if exc_type else "COMMIT")
                finally:
                    store._lock.release()
                return False

        return _Tx()

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # federation -------------------------------------------------------------------------------------------------
    def federation(self) -> tuple[dict, dict | None] | None:
        """``(config, spec)`` or ``None`` before the admin created the federation."""
        row = self._one("SELECT config, spec FROM federation WHERE id = 1")
        return None if row is None else (json.loads(row[0]), json.loads(row[1]) if row[1] else None)

    def create_federation(self, config: dict, enroll_secret: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO federation (id, config, enroll_secret_hash, created_at) VALUES (1, ?, ?, ?)",
                       (json.dumps(config), token_hash(enroll_secret), time.time()))

    def check_enroll_secret(self, secret: str) -> bool:
        row = self._one("SELECT enroll_secret_hash FROM federation WHERE id = 1")
        return row is not None and secrets.compare_digest(row[0], token_hash(secret))

    def set_initial_global(self, payload: bytes, spec: dict, deadline_s: float) -> None:
        """Store global version 0 and open round 1 (one transaction after the blob is durable)."""
        path = self.blob_dir / "globals" / "v000000.safetensors"
        atomic_write(path, payload)
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE federation SET spec = ? WHERE id = 1", (json.dumps(spec),))
            db.execute("INSERT INTO globals (version, path, sha256, created_at) VALUES (0, ?, ?, ?)",
                       (str(path.relative_to(self.data_dir)), sha256(payload), now))
            db.execute("INSERT INTO rounds (round, status, base_version, opened_at, deadline) "
                       "VALUES (1, 'open', 0, ?, ?)", (now, now + deadline_s))

    # devices ----------------------------------------------------------------------------------------------------
    def add_device(self, name: str, capabilities: dict, token: str | None = None) -> tuple[Device, str, bool]:
        """Enroll a device with ``token`` (``None``: a new random one).

        Returns:
            ``(device, token, added)``; ``added`` is False when a device already holds ``token`` (that device is
            returned, whatever its name and capabilities: the caller compares them).
        """
        token = token or new_token(32)
        with self._tx() as db:
            row = db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE token_hash = ?",
                             (token_hash(token),)).fetchone()
            if row is not None:
                return self._device(row), token, False
            cur = db.execute("INSERT INTO devices (name, token_hash, capabilities, enrolled_at) VALUES (?, ?, ?, ?)",
                             (name, token_hash(token), json.dumps(capabilities), time.time()))
            return Device(int(cur.lastrowid), name, capabilities), token, True

    @staticmethod
    def _device(row: tuple) -> Device:
        """A :class:`Device` from a row of :data:`_DEVICE_COLUMNS`."""
        return Device(row[0], row[1], json.loads(row[2]), row[3])

    def device_for_token(self, token: str, retired: bool = False) -> Device | None:
        """The active device holding ``token`` (``retired``: a retired one too; else a retired device's token names
        none)."""
        row = self._one(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE token_hash = ?"
                        + ("" if retired else " AND retired_at IS NULL"), (token_hash(token),))
        return None if row is None else self._device(row)

    def count_devices(self) -> int:
        """The active devices (a round closes early once all of them reported)."""
        return self._one("SELECT COUNT(*) FROM devices WHERE retired_at IS NULL")[0]

    def devices(self) -> list[Device]:
        """Every device ever enrolled, retired ones included (their uploads stay part of their rounds)."""
        return [self._device(r) for r in self._all(f"SELECT {_DEVICE_COLUMNS} FROM devices")]

    def retire_device(self, device_id: int) -> Device | None:
        """Retire device ``device_id`` (once: retiring it again changes nothing); ``None`` if there is none."""
        if not _int64(device_id):
            return None
        with self._tx() as db:
            db.execute("UPDATE devices SET retired_at = ? WHERE id = ? AND retired_at IS NULL",
                       (time.time(), device_id))
            row = db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,)).fetchone()
        return None if row is None else self._device(row)

    def device_activity(self) -> list[DeviceActivity]:
        """Every device (by id) with its enrollment time and its latest upload: round and time received."""
        # SQLite takes the bare column u.received_at from the row holding MAX(u.round).
        rows = self._all("SELECT d.id, d.name, d.capabilities, d.retired_at, d.enrolled_at, MAX(u.round), "
                         "u.received_at FROM devices d LEFT JOIN updates u ON u.device_id = d.id GROUP BY d.id "
                         "ORDER BY d.id")
        return [DeviceActivity(self._device(r[:4]), r[4], r[5], r[6]) for r in rows]

    # rounds -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _round(row: tuple) -> Round:
        return Round(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]) if row[6] else None, row[7])

    def round(self, number: int) -> Round | None:
        """Round ``number``, or ``None`` if there is none (any integer, however large, is a valid question)."""
        if not _int64(number):
            return None
        row = self._one(f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE round = ?", (number,))
        return None if row is None else self._round(row)

    def current_round(self) -> Round | None:
        row = self._one(f"SELECT {_ROUND_COLUMNS} FROM rounds ORDER BY round DESC LIMIT 1")
        return None if row is None else self._round(row)

    def rounds(self, status: str | None = None) -> list[Round]:
        if status is None:
            return [self._round(r) for r in self._all(f"SELECT {_ROUND_COLUMNS} FROM rounds ORDER BY round")]
        return [self._round(r) for r in self._all(f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE status = ? "
                                                  "ORDER BY round", (status,))]

    def mark_aggregating(self, number: int) -> bool:
        """Move an open round to ``aggregating``; False if it was not open (someone else closes it)."""
        with self._tx() as db:
            cur = db.execute("UPDATE rounds SET status = 'aggregating' WHERE round = ? AND status = 'open'", (number,))
            return cur.rowcount == 1

    def close_round(self, number: int, payload: bytes, summary: dict, deadline_s: float) -> None:
        """Store the new global version (= round number), close the round and open the next, atomically."""
        path = self.blob_dir / "globals" / f"v{number:06d}.safetensors"
        atomic_write(path, payload)
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO globals (version, path, sha256, created_at) VALUES (?, ?, ?, ?)",
                       (number, str(path.relative_to(self.data_dir)), sha256(payload), now))
            db.execute("UPDATE rounds SET status = 'closed', closed_at = ?, summary = ? WHERE round = ?",
                       (now, json.dumps(summary), number))
            db.execute("INSERT INTO rounds (round, status, base_version, opened_at, deadline) "
                       "VALUES (?, 'open', ?, ?, ?)", (number + 1, number, now, now + deadline_s))

    def fail_round(self, number: int, reason: str, summary: dict) -> None:
        """Move a round from ``aggregating`` to ``failed`` with its reason; it stays the current round."""
        with self._tx() as db:
            db.execute("UPDATE rounds SET status = 'failed', failure = ?, summary = ? "
                       "WHERE round = ? AND status = 'aggregating'", (reason, json.dumps(summary), number))

    def retry_round(self, number: int) -> bool:
        """Move a failed round the admin has not closed back to ``aggregating``; False if it is not such a round."""
        if not _int64(number):
            return False
        with self._tx() as db:
            cur = db.execute("UPDATE rounds SET status = 'aggregating', failure = NULL "
                             "WHERE round = ? AND status = 'failed' AND closed_at IS NULL", (number,))
            return cur.rowcount == 1

    def close_failed_round(self, number: int, deadline_s: float) -> bool:
        """Close a failed round without a new global version and open the next one on the same base version.

        Returns:
            False (nothing changed) unless ``number`` is the current round, failed and not closed yet.
        """
        if not _int64(number):
            return False
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT base_version FROM rounds WHERE round = ? AND status = 'failed' AND closed_at IS "
                             "NULL AND round = (SELECT MAX(round) FROM rounds)", (number,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE rounds SET closed_at = ?, failure = failure || ? WHERE round = ?",
                       (now, " (closed by the admin without a new global version)", number))
            db.execute("INSERT INTO rounds (round, status, base_version, opened_at, deadline) "
                       "VALUES (?, 'open', ?, ?, ?)", (number + 1, row[0], now, now + deadline_s))
            return True

    # updates ----------------------------------------------------------------------------------------------------
    def update(self, number: int, device_id: int) -> Update | None:
        if not (_int64(number) and _int64(device_id)):
            return None
        row = self._one("SELECT round, device_id, sha256, path, tokens, metrics FROM updates "
                        "WHERE round = ? AND device_id = ?", (number, device_id))
        return None if row is None else Update(row[0], row[1], row[2], self.data_dir / row[3], row[4],
                                               json.loads(row[5]))

    def count_updates(self, number: int, active_only: bool = False) -> int:
        """Uploads of round ``number`` (``active_only``: of devices not retired, what a round waits for)."""
        if not _int64(number):
            return 0
        if active_only:
            return self._one("SELECT COUNT(*) FROM updates u JOIN devices d ON d.id = u.device_id "
                             "WHERE u.round = ? AND d.retired_at IS NULL", (number,))[0]
        return self._one("SELECT COUNT(*) FROM updates WHERE round = ?", (number,))[0]

    def updates(self, number: int) -> list[Update]:
        if not _int64(number):
            return []
        rows = self._all("SELECT round, device_id, sha256, path, tokens, metrics FROM updates WHERE round = ? "
                         "ORDER BY device_id", (number,))
        return [Update(r[0], r[1], r[2], self.data_dir / r[3], r[4], json.loads(r[5])) for r in rows]

    def participation(self) -> dict[int, tuple[list[int], int]]:
        """``{round: (device ids in order, tokens reported)}`` for every round with uploads, in one query."""
        out: dict[int, tuple[list[int], int]] = {}
        for number, device_id, tokens in self._all("SELECT round, device_id, tokens FROM updates "
                                                   "ORDER BY round, device_id"):
            devices, total = out.get(number, ([], 0))
            devices.append(device_id)
            out[number] = devices, total + tokens
        return out

    def remove_orphan_blobs(self) -> list[Path]:
        """Remove upload blobs (and temporary files) that no row names: what a crash between a blob's write and its
        row's commit leaves (the device never got an answer and uploads again). Call only while no upload is being
        accepted (at start-up). Returns the removed files."""
        named = {self.data_dir / row[0] for row in self._all("SELECT path FROM updates")}
        removed = []
        for path in sorted((self.blob_dir / "updates").rglob("*")):
            if path.is_file() and path not in named:
                path.unlink()
                removed.append(path)
        return removed

    def write_update_blob(self, number: int, device_id: int, digest: str, payload: bytes) -> Path:
        """Write an upload's blob durably, before its row exists (no lock held: uploads write in parallel). Pass the
        path to :meth:`insert_update`, which removes the file again unless a row names it.

        Args:
            digest: the upload's content digest (:func:`aggregator.aggregate.content_digest`); it names the file.
        """
        path = self.blob_dir / "updates" / f"r{number:06d}" / f"d{device_id:06d}-{digest}.safetensors"
        atomic_write(path, payload)
        return path

    def insert_update(self, number: int, device_id: int, digest: str, path: Path, tokens: int,
                      metrics: dict) -> tuple[Added, Update | None]:
        """Record an already validated upload whose blob :meth:`write_update_blob` wrote, unless the device already
        has one for the round or the round is not open. The check and the insert are one transaction, so two
        requests racing for one (round, device) get one row; a blob left without a row is removed before this
        returns (or raises).

        Returns:
            ``(what happened, the device's stored upload for the round where one existed)``.
        """
        outcome, existing = Added.NOT_OPEN, None
        try:
            with self._tx() as db:
                row = db.execute("SELECT round, device_id, sha256, path, tokens, metrics FROM updates "
                                 "WHERE round = ? AND device_id = ?", (number, device_id)).fetchone()
                if row is not None:
                    existing = Update(row[0], row[1], row[2], self.data_dir / row[3], row[4], json.loads(row[5]))
                    outcome = Added.DUPLICATE if existing.sha256 == digest else Added.CONFLICT
                else:
                    status = db.execute("SELECT status FROM rounds WHERE round = ?", (number,)).fetchone()
                    if status is not None and status[0] == "open":
                        db.execute("INSERT INTO updates (round, device_id, sha256, path, tokens, metrics, received_at) "
                                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                   (number, device_id, digest, str(path.relative_to(self.data_dir)), tokens,
                                    json.dumps(metrics), time.time()))
                        outcome = Added.ADDED
        finally:
            if outcome is not Added.ADDED and (existing is None or existing.path != path):
                path.unlink(missing_ok=True)  # no row names this blob (a duplicate's row may name this very file)
        return outcome, existing

    def global_blob(self, version: int) -> tuple[Path, str] | None:
        if not _int64(version):
            return None
        row = self._one("SELECT path, sha256 FROM globals WHERE version = ?", (version,))
        return None if row is None else (self.data_dir / row[0], row[1])

    def latest_global_version(self) -> int | None:
        row = self._one("SELECT MAX(version) FROM globals")
        return None if row is None else row[0]
