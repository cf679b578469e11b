"""SQLite plumbing of the record store (:mod:`dyndiag.records`): schema, connections, checkpoints.

Private: :mod:`dyndiag.records` documents what is stored and is the only user.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DB_NAME = "records.sqlite"
SCHEMA_VERSION = 1
TIMEOUT = 10.0  # seconds a connection waits for a lock before raising

# `value` has no declared type on purpose: a REAL column stores integral floats as
# integers on disk and loses the sign of -0.0. Only floats (and NULL for NaN, which
# SQLite cannot store) are ever bound to it. `records` has no index: an index costs
# ~60 us per 20-row step, and rows arrive in step order anyway (steps only grow,
# and a rewind first deletes every row at or after its step), so rowid order is
# step order and the rare rewind can afford a full scan.
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS records (step INTEGER NOT NULL, probe TEXT NOT NULL,"
    " metric TEXT NOT NULL, key TEXT NOT NULL, value, wall_time REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS arrays (step INTEGER NOT NULL, probe TEXT NOT NULL,"
    " metric TEXT NOT NULL, key TEXT NOT NULL, wall_time REAL NOT NULL, npy BLOB NOT NULL,"
    " UNIQUE (probe, metric, key, step))",
)


def check_dir(log_dir: object, name: str = "log_dir") -> Path:
    """``log_dir`` as a Path; a TypeError if it is no path, a ValueError if it is a file."""
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(log_dir).__name__}")
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} must be a directory, got the file {str(path)!r}")
    return path


def open_writer(log_dir: Path) -> tuple[sqlite3.Connection, int]:
    """Create (or open) the store in ``log_dir``; returns the connection and the stored counter."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / DB_NAME
    # isolation_level=None: no implicit transactions, the writer issues BEGIN/COMMIT.
    # check_same_thread=False: a writer may be closed from another thread (the
    # writer's lock serialises use).
    conn = sqlite3.connect(path, timeout=TIMEOUT, isolation_level=None, check_same_thread=False)
    try:
        try:
            _check_foreign(conn, path)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":  # some network file systems; still correct, but readers may wait
                warnings.warn(f"{path}: SQLite cannot use WAL journaling here (got {mode!r})", stacklevel=4)
            # NORMAL in WAL mode: a commit is a write() to the WAL, no fsync (durable
            # across a process crash, not necessarily across an OS crash).
            conn.execute("PRAGMA synchronous = NORMAL")
            # Checkpoints (copying the WAL into the database, with two fsyncs: ~20 ms
            # every few hundred steps) run on a background thread, see Checkpointer.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            # After a checkpoint has emptied it, the WAL is cut back to this size (a
            # burst of large arrays would otherwise keep it at its peak until close).
            conn.execute("PRAGMA journal_size_limit = 16777216")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('next_step', 0)")
                meta = dict(conn.execute("SELECT name, value FROM meta"))
                _check_version(meta, path)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"log_dir: {path} is not a readable record store ({exc})") from None
    except BaseException:
        conn.close()
        raise
    return conn, int(meta["next_step"])


@contextmanager
def open_reader(log_dir: object) -> Iterator[sqlite3.Connection | None]:
    """Read-only connection to the store in ``log_dir``; ``None`` while its schema is uncommitted."""
    log_dir = check_dir(log_dir)
    path = log_dir / DB_NAME
    if not path.is_file():
        raise ValueError(f"no records in log_dir {str(log_dir)!r}: {DB_NAME} not found "
                         f"(is it the directory a Monitor or RecordWriter wrote?)")
    # mode=ro: a reader never writes the store nor checkpoints its WAL, so it
    # neither blocks nor changes what the writer does.
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=TIMEOUT)
    try:
        try:
            _check_foreign(conn, path)
            ready = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'meta'").fetchone()[0]
            if ready:
                _check_version(dict(conn.execute("SELECT name, value FROM meta")), path)
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"log_dir: {path} is not a readable record store ({exc})") from None
        yield conn if ready else None
    finally:
        conn.close()


def _check_foreign(conn: sqlite3.Connection, path: Path) -> None:
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and "meta" not in tables:
        raise ValueError(f"log_dir: {path} is an SQLite file but not a dyndiag record store "
                         f"(tables {sorted(tables)})")


def _check_version(meta: dict, path: Path) -> None:
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"log_dir: {path} has record schema version {version}, this dyndiag reads "
                         f"up to {SCHEMA_VERSION} (written by a newer dyndiag? upgrade it)")


class Checkpointer:
    """Copies the WAL into the database on a daemon thread, off the training thread.

    SQLite's automatic checkpoint runs inside a commit and, with
    ``synchronous=NORMAL``, fsyncs twice: a ~20 ms stall every few hundred steps
    (~40 us per step on average). Here the writer calls :meth:`notify` after each
    commit with the bytes it wrote; every ``every_bytes`` a PASSIVE checkpoint
    (which never blocks the writer) runs on the thread's own connection.
    """

    def __init__(self, path: Path, every_bytes: int = 4 << 20) -> None:
        self.path = path
        self.every_bytes = every_bytes
        self._pending = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.count = 0  # checkpoints done (tests)

    def notify(self, nbytes: int) -> None:
        self._pending += nbytes + 4096  # at least a page per commit
        if self._pending >= self.every_bytes:
            self._pending = 0
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dyndiag-records-checkpoint", daemon=True)
                self._thread.start()
            self._wake.set()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=TIMEOUT, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous = NORMAL")
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stop:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.count += 1
                except sqlite3.Error:  # an optimisation only: closing checkpoints anyway
                    pass
        finally:
            conn.close()

    def close(self) -> None:
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join()
            self._thread = None
