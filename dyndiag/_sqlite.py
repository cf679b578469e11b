"""SQLite plumbing of the record store (:mod:`dyndiag.records`): schema, connections,
checkpoints, and the ingest that moves the spool (:mod:`dyndiag._spool`) into the database.

Private: :mod:`dyndiag.records` documents what is stored and is the only user. Standard
library only: ``python -S _sqlite.py LOG_DIR BATCH`` is the writer's ingest process
(:func:`main`), started without importing the package (or torch).
"""

from __future__ import annotations

import os
import select
import sqlite3
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

try:
    from . import _spool
except ImportError:  # run as the ingest process's script: this file's folder is sys.path[0]
    import _spool  # type: ignore[no-redef]

DB_NAME = "records.sqlite"
SCHEMA_VERSION = 2  # 2: the spool (meta 'spool_pos'); a version-1 store is upgraded on open
TIMEOUT = 10.0  # seconds a connection waits for a lock before raising
#: Offset of a spool position that means "closed": SQLite holds everything of that
#: segment and its files are gone.
CLOSED = (1 << _spool.OFFSET_BITS) - 1
T = TypeVar("T")

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


def open_writer(log_dir: Path) -> sqlite3.Connection:
    """Create (or open) the store in ``log_dir``; returns the connection."""
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
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('spool_pos', 0)")
                meta = dict(conn.execute("SELECT name, value FROM meta"))
                _check_version(meta, path)
                if meta["schema_version"] < SCHEMA_VERSION:  # readers before version 2 would miss the spool
                    conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (SCHEMA_VERSION,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"log_dir: {path} is not a readable record store ({exc})") from None
    except BaseException:
        conn.close()
        raise
    return conn


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
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=TIMEOUT, isolation_level=None)
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


def read(log_dir: object, query: Callable[[sqlite3.Connection], T]) -> tuple[T | None, list[_spool.Step]]:
    """``query(conn)`` in one read snapshot of the database, and the spooled steps it lacked.

    The spool tail is what the writer has written (and a SIGKILL would keep) but its
    ingest had not committed when the snapshot was taken; each step in it is whole.
    ``(None, [])`` while the store's schema is uncommitted.
    """
    log_dir = check_dir(log_dir)
    last = None
    for _ in range(100):
        with open_reader(log_dir) as conn:
            if conn is None:
                return None, []
            conn.execute("BEGIN")
            try:
                pos = conn.execute("SELECT value FROM meta WHERE name = 'spool_pos'").fetchone()
                result = query(conn)
            finally:
                conn.execute("COMMIT")
        if pos is None or _spool.unpack_pos(pos[0])[1] == CLOSED:
            return result, []
        tail = _spool.read_tail(log_dir, pos[0])
        # A missing segment: an ingest moved on since the snapshot (read again), or
        # the files were removed by hand (the position stays; nothing to add).
        if tail is not None or pos[0] == last:
            return result, tail or []
        last = pos[0]
    raise RuntimeError(f"{log_dir}: the record spool kept moving; could not take a consistent snapshot")


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


class Ingestor:
    """Moves spooled steps into the database, ``batch`` step frames per transaction.

    Several may run on one store (the writer's ingest process, and the writer itself
    at close or after a crash): each transaction moves the stored spool position only
    from the value this ingestor read (``UPDATE ... WHERE value = ?``), so every frame
    is applied once, whoever gets there first.
    """

    def __init__(self, conn: sqlite3.Connection, log_dir: Path, batch: int = 1) -> None:
        self.conn, self.log_dir, self.batch = conn, log_dir, batch
        self.pos = self._stored_pos()
        self._open(self.pos)

    def _stored_pos(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE name = 'spool_pos'").fetchone()[0])

    def _open(self, pos: int) -> None:
        self.close()
        self.seg = _spool.unpack_pos(pos)[0]
        self._at = 0  # file offset of the next frame to parse
        self._names: dict = {}

    def _read(self) -> bool:
        """Map the segment (again, if it grew); False if it does not exist (yet, or any more)."""
        if self._file is None:
            try:
                self._file = open(_spool.segment_path(self.log_dir, self.seg), "rb")
            except FileNotFoundError:
                return False
        # fstat on the open file: ~1 us against ~15 us for a stat by path, and it still
        # works once another ingestor has deleted the file (what is mapped stays readable).
        size = os.fstat(self._file.fileno()).st_size
        if self._data is None or size != len(self._data):
            _spool.close_segment(self._data)
            self._data = None
            self._data = _spool.map_file(self._file, size)
        return True

    def close(self) -> None:
        """Let go of the segment it follows."""
        _spool.close_segment(getattr(self, "_data", None))
        self._data = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
        self._file = None

    def advance(self) -> tuple[int, bool]:
        """Apply every complete step spooled so far; returns (steps applied, whether the writer closed)."""
        applied = 0
        while True:
            seg, offset = _spool.unpack_pos(self.pos)
            if offset == CLOSED:
                return applied, True
            if seg != self.seg:
                self._open(self.pos)
            if not self._read():  # not created yet, or ingested and removed by another
                return applied, False
            batch: list = []
            end = self._at
            lost = False  # another ingestor moved the position: re-read from where it is
            for kind, item, end in _spool.parse(self._data, offset, self._names, self._at):
                if kind == b"S":
                    if item is None:  # applied before
                        continue
                    batch.append(item)
                    if len(batch) < self.batch:
                        continue
                elif kind == b"N":
                    continue
                done = self._apply(batch)
                lost, applied, batch = done < 0, applied + max(done, 0), []
                if lost:
                    break
                if kind == b"E":
                    return applied, True
                if kind == b"R":  # on to the next segment, then drop this one
                    if self._move(_spool.pack_pos(self.seg + 1, 0)):
                        self.close()
                        _spool.segment_path(self.log_dir, self.seg).unlink(missing_ok=True)
                    else:
                        lost = True
                    break
            else:
                done = self._apply(batch)
                if done >= 0:
                    self._at = end
                    return applied + done, False
                lost = True
            if lost:
                self._open(self.pos)

    def _apply(self, steps: list) -> int:
        """Commit ``steps`` in one transaction: how many, or -1 if another ingestor got there first."""
        if not steps:
            return 0
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if not self._moved(c, _spool.pack_pos(self.seg, steps[-1].end), steps[-1].step + 1):
                c.execute("ROLLBACK")
                return -1
            rows: list = []
            blobs: list = []
            for s in steps:
                if s.rewind is not None:
                    insert_rows(c, rows, blobs)
                    rows, blobs = [], []
                    c.execute("DELETE FROM records WHERE step >= ?", (s.rewind,))
                    c.execute("DELETE FROM arrays WHERE step >= ?", (s.rewind,))
                rows += [(s.step, p, m, k, v, s.wall_time) for p, m, k, v in s.scalars]
                blobs += [(s.step, p, m, k, s.wall_time, b) for p, m, k, b in s.arrays]
            insert_rows(c, rows, blobs)
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return len(steps)

    def _move(self, pos: int) -> bool:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            ok = self._moved(c, pos)
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return ok

    def _moved(self, c: sqlite3.Connection, pos: int, next_step: int | None = None) -> bool:
        """Move the stored position from ``self.pos`` to ``pos`` (inside a transaction),
        and set ``next_step`` with it when given.

        False if another ingestor moved it first (nothing is changed that the caller
        does not roll back): then ``self.pos`` follows it.
        """
        if next_step is None:
            moved = c.execute(_MOVE, (pos, self.pos)).rowcount == 1
        else:  # one statement for both rows: a statement is ~20 % of a step's ingest
            moved = c.execute(_MOVE_AND_COUNT, (pos, next_step, self.pos)).rowcount == 2
        if moved:
            self.pos = pos
            return True
        self.pos = self._stored_pos()
        return False


_MOVE = "UPDATE meta SET value = ? WHERE name = 'spool_pos' AND value = ?"
_MOVE_AND_COUNT = (
    "UPDATE meta SET value = CASE name WHEN 'spool_pos' THEN ?1 ELSE ?2 END"
    " WHERE name = 'next_step' OR (name = 'spool_pos' AND value = ?3)"
)


#: Rows per INSERT statement: 6 columns each stay under SQLite's oldest variable
#: limit (999); one multi-row statement is ~2x cheaper than executemany for a step.
INSERT_ROWS = 150


def insert_rows(c: sqlite3.Connection, rows: list, blobs: list) -> None:
    for table, items in (("records", rows), ("arrays", blobs)):
        for start in range(0, len(items), INSERT_ROWS):
            part = items[start : start + INSERT_ROWS]
            values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(part))
            c.execute(f"INSERT INTO {table} VALUES {values}", [x for row in part for x in row])


POLL = 0.05  # seconds between the ingest process's passes over the spool


def main(argv: list[str]) -> int:
    """The ingest process: ``LOG_DIR BATCH``; follows the spool until the writer closes or dies.

    Its standard input is a pipe from the writer, used only as a bell: a byte wakes
    it, end-of-file (the writer closed it, or died) makes it ingest what is left and
    exit. It ingests what was spooled every ``POLL`` seconds.
    """
    log_dir, batch = Path(argv[0]), int(argv[1])
    parent = os.getppid()
    # Behind training for CPU time: readers merge the spool, so nothing waits for the
    # database, and a training run using every core should not lose any to it.
    try:
        os.nice(10)
    except (AttributeError, OSError):
        pass
    conn = sqlite3.connect(log_dir / DB_NAME, timeout=TIMEOUT, isolation_level=None)
    ingestor = None
    try:
        conn.execute("PRAGMA synchronous = NORMAL")
        ingestor = Ingestor(conn, log_dir, batch)
        while True:
            _, closed = ingestor.advance()
            if closed:
                return 0
            # A pass every POLL seconds, not after every step: a wake-up and an empty pass
            # cost about as much CPU as a step's transaction, and nothing waits for the
            # database (readers merge the spool; the writer's close ingests the rest).
            ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL)
            if (ready and not os.read(sys.stdin.fileno(), 4096)) or os.getppid() != parent:
                ingestor.advance()  # the writer is gone: what it spooled, then stop
                return 0
    finally:
        if ingestor is not None:
            ingestor.close()
        conn.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
