"""Durable state: one SQLite database (WAL, synchronous=FULL) plus a folder of safetensors blobs.

Blobs are written atomically and fsynced before the database row that names them is committed, so after a crash
every committed row points to a complete blob; a blob without a row is an unacknowledged upload the device retries.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .blobs import atomic_write, sha256

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
    enrolled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('open', 'aggregating', 'closed')),
    base_version INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    closed_at REAL,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    device_id INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
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
"""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(nbytes: int = 32) -> str:
    """A random URL-safe secret that never starts with ``-`` (command lines would read it as an option)."""
    while True:
        token = secrets.token_urlsafe(nbytes)
        if not token.startswith("-"):
            return token


@dataclass(frozen=True)
class Device:
    id: int
    name: str
    capabilities: dict


@dataclass(frozen=True)
class Round:
    round: int
    status: str
    base_version: int
    opened_at: float
    deadline: float
    closed_at: float | None
    summary: dict | None


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
    def add_device(self, name: str, capabilities: dict) -> tuple[int, str]:
        token = new_token(32)
        with self._tx() as db:
            cur = db.execute("INSERT INTO devices (name, token_hash, capabilities, enrolled_at) VALUES (?, ?, ?, ?)",
                             (name, token_hash(token), json.dumps(capabilities), time.time()))
            return int(cur.lastrowid), token

    def device_for_token(self, token: str) -> Device | None:
        row = self._one("SELECT id, name, capabilities FROM devices WHERE token_hash = ?", (token_hash(token),))
        return None if row is None else Device(row[0], row[1], json.loads(row[2]))

    def devices(self) -> list[Device]:
        return [Device(r[0], r[1], json.loads(r[2])) for r in self._all("SELECT id, name, capabilities FROM devices")]

    # rounds -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _round(row: tuple) -> Round:
        return Round(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]) if row[6] else None)

    def round(self, number: int) -> Round | None:
        row = self._one("SELECT * FROM rounds WHERE round = ?", (number,))
        return None if row is None else self._round(row)

    def current_round(self) -> Round | None:
        row = self._one("SELECT * FROM rounds ORDER BY round DESC LIMIT 1")
        return None if row is None else self._round(row)

    def rounds(self, status: str | None = None) -> list[Round]:
        if status is None:
            return [self._round(r) for r in self._all("SELECT * FROM rounds ORDER BY round")]
        return [self._round(r) for r in self._all("SELECT * FROM rounds WHERE status = ? ORDER BY round", (status,))]

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
            db.execute("INSERT INTO rounds (round, status, base_version, opened_at, deadline) VALUES (?, 'open', ?, ?, ?)",
                       (number + 1, number, now, now + deadline_s))

    # updates ----------------------------------------------------------------------------------------------------
    def update(self, number: int, device_id: int) -> Update | None:
        row = self._one("SELECT round, device_id, sha256, path, tokens, metrics FROM updates "
                        "WHERE round = ? AND device_id = ?", (number, device_id))
        return None if row is None else Update(row[0], row[1], row[2], self.data_dir / row[3], row[4],
                                               json.loads(row[5]))

    def count_updates(self, number: int) -> int:
        return self._one("SELECT COUNT(*) FROM updates WHERE round = ?", (number,))[0]

    def updates(self, number: int) -> list[Update]:
        rows = self._all("SELECT round, device_id, sha256, path, tokens, metrics FROM updates WHERE round = ? "
                         "ORDER BY device_id", (number,))
        return [Update(r[0], r[1], r[2], self.data_dir / r[3], r[4], json.loads(r[5])) for r in rows]

    def add_update(self, number: int, device_id: int, payload: bytes, tokens: int, metrics: dict) -> bool:
        """Store an already validated update for an open round. Returns False if the round stopped being open
        meanwhile (nothing is recorded then)."""
        digest = sha256(payload)
        path = self.blob_dir / "updates" / f"r{number:06d}" / f"d{device_id:06d}-{digest[:16]}.safetensors"
        atomic_write(path, payload)
        with self._tx() as db:
            status = db.execute("SELECT status FROM rounds WHERE round = ?", (number,)).fetchone()
            if status is None or status[0] != "open":
                return False
            db.execute("INSERT INTO updates (round, device_id, sha256, path, tokens, metrics, received_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (number, device_id, digest,
                                                        str(path.relative_to(self.data_dir)), tokens,
                                                        json.dumps(metrics), time.time()))
        return True

    def global_blob(self, version: int) -> tuple[Path, str] | None:
        row = self._one("SELECT path, sha256 FROM globals WHERE version = ?", (version,))
        return None if row is None else (self.data_dir / row[0], row[1])

    def latest_global_version(self) -> int | None:
        row = self._one("SELECT MAX(version) FROM globals")
        return None if row is None else row[0]
