"""Append-only record store: one SQLite file per log dir, written inline, readable while training writes.

``<log_dir>/records.sqlite`` (stdlib ``sqlite3``, WAL journal) holds ``records(step,
probe, metric, key, value, wall_time, run)``, one row per scalar (``key`` ``""`` for a
plain scalar; ``value`` a float64 stored exactly, inf and ``-0.0`` included, NaN as
NULL, which readers turn back into NaN; ``run`` the run segment); ``arrays(step, probe,
metric, key, wall_time, npy)``, one ``.npy`` blob per array (no pickle: dtype, shape and
byte order come back exactly); and ``meta(name, value)``: ``schema_version``,
``next_step``, the step after the last one written, and ``next_run``, the segment the
next writer that writes stores its rows under.

Run segments: each writer that writes is a new segment (0 for the first), so two
runs logged into one directory stay apart even where their steps continue each
other (a notebook cell run twice), and figures do not join their lines.

:meth:`RecordWriter.write_step` runs one transaction on the calling thread: the step's
rows and ``next_step`` are stored whole or not at all. In WAL mode with
``synchronous=NORMAL`` a commit is a ``write()`` to the WAL without an fsync: once
``write_step`` returns the step is in the operating system's file cache and survives a
crash of the process (SIGKILL included), not necessarily one of the operating system.
SQLite copies the WAL into the database inside a commit, every ~1000 pages. No
thread, no helper process, no memory mapping. Readers open the file read-only, in one
snapshot: they see whole steps only and never block the writer. Neither side imports
torch; only :func:`load_records` imports pandas.
"""

from __future__ import annotations

import io
import math
import operator
import os
import sqlite3
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .arrays import to_numpy
from .distributed import is_distributed, is_writer

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["RecordWriter", "load_records", "load_arrays", "recorded_probes", "is_writer", "DB_NAME",
           "SCHEMA_VERSION"]

DB_NAME = "records.sqlite"
LOCK_NAME = "records.lock"
# Versions 1 and 2 lack records.run (their rows read as run 0); a writer adds it.
SCHEMA_VERSION = 3
TIMEOUT = 10.0  # seconds a connection waits for a lock before raising
COLUMNS = ("step", "probe", "metric", "key", "value", "wall_time", "run")
# `value` has no declared type on purpose: a REAL column stores integral floats as
# integers on disk and loses the sign of -0.0. `records` has no index: rows arrive
# in step order (steps only grow; a rewind first deletes every row at or after its
# step; only an amend adds rows to an earlier step, and readers sort then), so
# rowid order is step order and the rare rewind or amend can afford a scan.
RUN_COLUMN = "run INTEGER NOT NULL DEFAULT 0"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS records (step INTEGER NOT NULL, probe TEXT NOT NULL,"
    f" metric TEXT NOT NULL, key TEXT NOT NULL, value, wall_time REAL NOT NULL, {RUN_COLUMN})",
    "CREATE TABLE IF NOT EXISTS arrays (step INTEGER NOT NULL, probe TEXT NOT NULL,"
    " metric TEXT NOT NULL, key TEXT NOT NULL, wall_time REAL NOT NULL, npy BLOB NOT NULL,"
    " UNIQUE (probe, metric, key, step))",
)


class RecordWriter:
    """Writes a run's records into ``<log_dir>``, one SQLite transaction per step.

    Parameters
    ----------
    log_dir
        Directory of the run, created if missing. A ``ValueError`` if it is a file or
        holds a ``records.sqlite`` that is not a store or has a newer schema.
    start_step
        ``None`` (default): continue from the stored counter (0 for a new store). A
        value sets :attr:`next_step`; if it is below the stored counter, the first
        :meth:`write_step` deletes every record and array with ``step >= start_step``
        in its own transaction (a run resumed from an earlier checkpoint supersedes
        what it logged after it); opening alone deletes nothing.

    Attributes
    ----------
    run
        The run segment this writer's rows are stored under: one more than the
        last segment that wrote to ``log_dir`` (0 for a new store). A writer that
        writes nothing leaves the next one the same number.

    Notes
    -----
    One writer per log dir, in this process or another: a second one raises a
    ``RuntimeError`` while the first is open. The lock is a POSIX record lock
    (``fcntl.lockf``) on ``<log_dir>/records.lock``, released by :meth:`close` or
    when the process ends; forked children (DataLoader workers) do not hold it, and a
    child's copy of a writer refuses to write and closes nothing. On Windows (no
    fork) it is ``msvcrt.locking`` on that file.

    Under ``torch.distributed`` only rank 0 (``enabled``, :func:`is_writer`) touches
    the files; other ranks validate and count steps alike. With several ranks and
    ``start_step=None`` the constructor is a collective (rank 0 broadcasts its
    counter): construct it on every rank.
    """

    def __init__(self, log_dir: str | os.PathLike, *, start_step: int | None = None) -> None:
        self.log_dir = _check_dir(log_dir)
        self.path = self.log_dir / DB_NAME
        if start_step is not None:
            start_step = _check_step(start_step, "start_step")
        self.enabled = is_writer()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._closed = False
        self._rewind: int | None = None
        self._new_run = True  # the first write_step claims `run` in the store
        self.run = 0
        stored, error = 0, None
        if self.enabled:
            try:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                lock = _lock(self.log_dir)
                try:
                    self._conn, stored, self.run = _open_store(self.path)
                except BaseException:
                    _release(None, *lock, self._pid)
                    raise
                # Closes the store and releases the lock also for a writer that is
                # garbage-collected, or left open when the interpreter exits.
                self._finalize = weakref.finalize(self, _release, self._conn, *lock, self._pid)
            except Exception as exc:  # raised below, once the other ranks have heard of it
                error = exc
        try:
            if start_step is None:
                stored = _broadcast_counter(stored, error)
        except BaseException:
            self.close()
            raise
        if error is not None:
            raise error
        self._next_step = stored if start_step is None else start_step
        if start_step is not None and start_step < stored:
            self._rewind = start_step

    @property
    def next_step(self) -> int:
        """The step after the last one written: the first step this writer may write."""
        return self._next_step

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def write_step(
        self,
        step: int,
        scalars: Iterable[tuple] = (),
        arrays: Iterable[tuple] = (),
        *,
        wall_time: float | None = None,
        amend: bool = False,
    ) -> None:
        """Store one step in one transaction; afterwards ``next_step == max(next_step, step + 1)``.

        When it returns the step is committed: readers see it and it survives a
        SIGKILL. A step with nothing to store still advances the stored counter.

        ``step``: an int, at least :attr:`next_step` (gaps allowed); with
        ``amend=True`` any step: the rows are added to those the step holds
        (offline analysis adding probes to analysed checkpoints), and a ``(probe,
        metric, key)`` the step already holds is refused. ``scalars``:
        ``(probe, metric, key, value)`` tuples, three ``str`` (probe and metric
        non-empty) and a real number (float, int, bool, numpy scalar, 0-d array or
        tensor) stored as float64, NaN and inf included. ``arrays``: ``(probe,
        metric, key, array)`` tuples, anything ``np.asarray`` takes but object
        arrays, or a tensor (copied to the CPU; bfloat16 stored as float32).
        ``wall_time``: seconds since the epoch for every row of the step (default now).

        Raises ``ValueError`` (a negative, non-finite or too small ``step``, an empty
        name, a ``(probe, metric, key)`` repeated within the step or, amending,
        already stored at it, a closed writer or a forked child's copy) or
        ``TypeError`` (a name that is not a ``str``, a value that is not a real
        number, an item that is not a 4-tuple) before storing anything, and
        ``sqlite3.Error`` if the transaction failed (a full disk) and was rolled back.
        """
        step = _check_step(step, "step")
        if self._closed:
            raise ValueError(f"write_step on a closed RecordWriter ({self.path})")
        if os.getpid() != self._pid:
            raise ValueError(f"this RecordWriter ({self.path}) belongs to the process it was created in; "
                             "a forked child cannot write with it")
        if not isinstance(amend, bool):
            raise TypeError(f"amend must be a bool, got {type(amend).__name__}")
        if step < self._next_step and not amend:
            raise ValueError(f"step must be >= next_step={self._next_step} (steps are written in increasing "
                             f"order; open a writer with start_step= to rewind), got {step}")
        t = time.time() if wall_time is None else _check_real(wall_time, "wall_time")
        if not math.isfinite(t):
            raise ValueError(f"wall_time must be finite, got {t}")
        run = self.run
        rows = [(step, *_check_item(item, "scalars", i, True), t, run)
                for i, item in enumerate(_iterable(scalars, "scalars"))]
        # Other ranks store nothing: they check names but skip serialising.
        blobs = [(step, *_check_item(item, "arrays", i, False), t,
                  _npy(item[3], f"arrays[{i}]") if self.enabled else b"")
                 for i, item in enumerate(_iterable(arrays, "arrays"))]
        for kind, items in (("scalars", rows), ("arrays", blobs)):
            names = [r[1:4] for r in items]
            if len(set(names)) != len(names):
                repeated = next(n for i, n in enumerate(names) if n in names[:i])
                raise ValueError(f"{kind} of step {step} repeat a (probe, metric, key): {repeated}")
        if self._conn is not None:
            with self._conn as c:  # COMMIT, or ROLLBACK on any exception
                c.execute("BEGIN IMMEDIATE")
                if self._rewind is not None:
                    c.execute("DELETE FROM records WHERE step >= ?", (self._rewind,))
                    c.execute("DELETE FROM arrays WHERE step >= ?", (self._rewind,))
                if step < self._next_step:
                    _check_amend(c, step, rows, blobs)
                if rows:
                    c.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                if blobs:
                    c.executemany("INSERT INTO arrays VALUES (?, ?, ?, ?, ?, ?)", blobs)
                c.execute("UPDATE meta SET value = ? WHERE name = 'next_step'", (max(step + 1, self._next_step),))
                if self._new_run:
                    c.execute("UPDATE meta SET value = ? WHERE name = 'next_run'", (run + 1,))
        self._rewind = None
        self._new_run = False
        self._next_step = max(step + 1, self._next_step)

    def close(self) -> None:
        """Close the database and release the log dir's lock (idempotent)."""
        self._closed = True
        if self._conn is not None:
            self._conn = None
            self._finalize()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("writing" if self.enabled else "not rank 0: stores nothing")
        return f"RecordWriter({str(self.log_dir)!r}, next_step={self._next_step}, {state})"


# Lock files this process holds (real path -> pid). A POSIX record lock belongs to
# the process: a second lockf() here would succeed, and closing any descriptor of
# the file drops the lock, so a second writer is refused here before it opens one.
# An entry with another pid is a forked child's copy of its parent's: the lock decides.
_HELD: dict[str, int] = {}


def _lock(log_dir: Path) -> tuple[str, int]:
    """Take the log dir's writer lock: ``(lock path, descriptor)``, or a RuntimeError naming the dir."""
    path = os.path.realpath(log_dir / LOCK_NAME)
    busy = (f"{str(log_dir)!r} is being written by another writer; only one writer may write a log dir "
            "at a time (close the other one first)")
    if _HELD.get(path) == os.getpid():
        raise RuntimeError(busy)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.name == "nt":  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise RuntimeError(f"{busy} [{exc.strerror}]") from None
    _HELD[path] = os.getpid()
    return path, fd


def _release(conn: sqlite3.Connection | None, path: str, fd: int, pid: int) -> None:
    """Close ``conn``, then let go of the lock; nothing in a forked child (the files are its parent's)."""
    if os.getpid() != pid:
        return
    try:
        if conn is not None:
            conn.close()  # the last connection to close checkpoints the WAL into the database
    finally:
        _HELD.pop(path, None)
        os.close(fd)  # releases the lock


def _open_store(path: Path) -> tuple[sqlite3.Connection, int, int]:
    """Create (or open, migrating an older schema) the store at ``path``: the
    writer's connection, the stored step counter and the writer's run segment."""
    # isolation_level=None: the writer issues BEGIN itself. check_same_thread=False: a
    # writer may be closed from another thread than the one that writes.
    conn = sqlite3.connect(path, timeout=TIMEOUT, isolation_level=None, check_same_thread=False)
    try:
        _check_store(conn, path)  # before creating tables in someone else's file
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":  # some network file systems; still correct, but readers may wait
            warnings.warn(f"{path}: SQLite cannot use WAL journaling here (got {mode!r})", stacklevel=4)
        conn.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: no fsync per commit
        # After a checkpoint the WAL is cut back to this size (a burst of large arrays
        # would otherwise keep it at its peak until close).
        conn.execute("PRAGMA journal_size_limit = 16777216")
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                conn.execute(statement)
            if not _has_run(conn):
                conn.execute(f"ALTER TABLE records ADD COLUMN {RUN_COLUMN}")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('next_step', 0)")
            # An older store that was written to holds run 0: this writer is the next one.
            conn.execute("INSERT OR IGNORE INTO meta SELECT 'next_run', value > 0 FROM meta WHERE name = 'next_step'")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            meta = _check_store(conn, path)
            return conn, int(meta["next_step"]), int(meta["next_run"])
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.DatabaseError):
            raise ValueError(f"log_dir: {path} is not a readable record store ({exc})") from None
        raise


def _check_store(conn: sqlite3.Connection, path: Path) -> dict | None:
    """The ``meta`` table as a dict, ``None`` for a file without tables; a ValueError for
    a foreign SQLite file or a newer schema."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return None
    if "meta" not in tables:
        raise ValueError(f"log_dir: {path} is an SQLite file but not a dyndiag record store "
                         f"(tables {sorted(tables)})")
    meta = dict(conn.execute("SELECT name, value FROM meta"))
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"log_dir: {path} has record schema version {version}, this dyndiag reads "
                         f"up to {SCHEMA_VERSION} (written by a newer dyndiag? upgrade it)")
    return meta


def _has_run(conn: sqlite3.Connection) -> bool:
    """Whether ``records`` has the ``run`` column (schema version 3 on)."""
    return any(row[1] == "run" for row in conn.execute("PRAGMA table_info(records)"))


def _check_amend(conn: sqlite3.Connection, step: int, rows: list, blobs: list) -> None:
    """A ValueError if ``step`` already holds one of the ``(probe, metric, key)`` to add."""
    for kind, items, table in (("scalars", rows, "records"), ("arrays", blobs, "arrays")):
        if items:
            held = set(conn.execute(f"SELECT probe, metric, key FROM {table} WHERE step = ?", (step,)))
            clash = sorted(held & {r[1:4] for r in items})
            if clash:
                raise ValueError(f"{kind} of step {step}: {clash[0]} is already stored there (amend adds, "
                                 "never replaces)")


def _read(log_dir: object, query: Callable[[sqlite3.Connection], Any]) -> Any:
    """``query(conn)`` in one read snapshot of the store; ``None`` while its schema is uncommitted."""
    log_dir = _check_dir(log_dir)
    path = log_dir / DB_NAME
    if not path.is_file():
        raise ValueError(f"no records in log_dir {str(log_dir)!r}: {DB_NAME} not found "
                         f"(is it the directory a Monitor or RecordWriter wrote?)")
    # mode=ro: a reader never writes the store nor checkpoints its WAL, so it
    # neither blocks nor changes what the writer does.
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=TIMEOUT, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one snapshot for every query
        return query(conn) if _check_store(conn, path) is not None else None
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"log_dir: {path} is not a readable record store ({exc})") from None
    finally:
        conn.close()


def load_records(log_dir: str | os.PathLike) -> pd.DataFrame:
    """Every scalar record of the run in ``log_dir``, as a long DataFrame.

    Columns ``step`` (int64), ``probe``, ``metric``, ``key`` (pandas' string dtype),
    ``value`` and ``wall_time`` (float64; a stored NaN comes back NaN) and ``run``
    (int64: the run segment, one per writer that wrote, 0 first; rows of a store
    written before segments existed are run 0), sorted by step, then in the order
    written; empty with these columns and dtypes while the store has no records.
    Safe while a writer writes (one snapshot: whole steps only). A ``ValueError``
    if ``log_dir`` holds no store or one with a newer schema.
    """
    import pandas as pd

    rows = _read(log_dir, lambda conn: conn.execute(
        f"SELECT step, probe, metric, key, value, wall_time, {'run' if _has_run(conn) else 0} FROM records "
        "ORDER BY rowid").fetchall())
    # float64 turns None (a stored NaN) back into NaN.
    df = pd.DataFrame(rows or [], columns=list(COLUMNS)).astype(
        {"step": np.int64, "probe": str, "metric": str, "key": str, "value": np.float64, "wall_time": np.float64,
         "run": np.int64})
    if len(df) and np.any(np.diff(df["step"].to_numpy()) < 0):  # rows another tool added
        df = df.sort_values("step", kind="stable", ignore_index=True)
    return df


def recorded_probes(log_dir: str | os.PathLike) -> dict[int, set[str]]:
    """``{step: {probe names}}``: the probes with a record or an array at each step
    (``{}`` while the store has none). A ``ValueError`` if ``log_dir`` holds no store."""
    found: dict[int, set[str]] = {}
    for step, probe in _read(log_dir, lambda conn: conn.execute(
            "SELECT DISTINCT step, probe FROM records UNION SELECT DISTINCT step, probe FROM arrays").fetchall()) or ():
        found.setdefault(step, set()).add(probe)
    return found


def load_arrays(
    log_dir: str | os.PathLike, probe: str, metric: str, step: int | None = None, key: str | None = None
) -> dict[int, np.ndarray]:
    """The arrays stored under ``(probe, metric)``: ``{step: array}`` in step order, with
    their stored dtype and shape (safe while a writer writes).

    ``step`` keeps only that step (``{}`` if it has none). ``key`` chooses the key;
    ``None`` (default) is allowed while ``(probe, metric)`` has a single one. A
    ``ValueError`` lists the stored ``(probe, metric, key)`` when none matches, asks
    for ``key=`` when several do, or says ``log_dir`` holds no store.
    """
    _check_name(probe, "probe")
    _check_name(metric, "metric")
    if key is not None:
        _check_name(key, "key", allow_empty=True)
    if step is not None:
        step = _check_step(step, "step")

    def query(conn):
        stored = set(conn.execute("SELECT DISTINCT probe, metric, key FROM arrays").fetchall())
        return stored, conn.execute("SELECT step, key, npy FROM arrays WHERE probe = ? AND metric = ? ORDER BY step",
                                    (probe, metric)).fetchall()

    stored, found = _read(log_dir, query) or (set(), [])
    keys = sorted({k for p, m, k in stored if p == probe and m == metric})
    if key is None and len(keys) > 1:
        raise ValueError(f"probe={probe!r}, metric={metric!r} has arrays under several keys {keys}; "
                         f"pass key= to choose one")
    if not keys or (key is not None and key not in keys):
        asked = f"probe={probe!r}, metric={metric!r}" + ("" if key is None else f", key={key!r}")
        raise ValueError(f"no arrays with {asked} in {str(log_dir)!r}; stored (probe, metric, key): {sorted(stored)}")
    chosen = keys[0] if key is None else key
    return {s: np.load(io.BytesIO(blob), allow_pickle=False)
            for s, k, blob in found if k == chosen and (step is None or s == step)}


def _broadcast_counter(stored: int, error: Exception | None) -> int:
    """Rank 0's counter on every rank: a collective when a process group of several ranks runs."""
    if not is_distributed():
        return stored
    import torch.distributed as dist

    # Rank 0 sends its error instead of a counter, so no rank goes on alone.
    payload: list = [stored if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        if error is None:
            raise RuntimeError(f"rank 0 could not open the record store: {payload[0]}")
        return stored
    return int(payload[0])


# ---------------------------------------------------------------- validation
# Cheap checks first: write_step runs on the training thread every logged step.


def _check_dir(log_dir: object) -> Path:
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a path (str or os.PathLike), got {type(log_dir).__name__}")
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"log_dir must be a directory, got the file {str(path)!r}")
    return path


def _check_step(step: object, name: str) -> int:
    if type(step) is int and step >= 0:
        return step
    if isinstance(step, float) and not math.isfinite(step):
        raise ValueError(f"{name} must be a finite int >= 0, got {step}")
    if isinstance(step, (bool, float)) or not hasattr(step, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(step).__name__} {step!r:.40}")
    value = operator.index(step)  # numpy and 0-d torch integers
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_item(item: Any, kind: str, i: int, scalar: bool) -> tuple:
    """``(probe, metric, key, float value)`` of a scalar item, ``(probe, metric, key)`` of an
    array item. The Monitor's rows, ``(str, str, str, float)`` tuples, pass at once."""
    if type(item) is tuple and len(item) == 4:
        p, m, k, v = item
        if type(p) is str and type(m) is str and type(k) is str and p and m:
            if not scalar:
                return p, m, k
            if type(v) is float:
                return item
    if not isinstance(item, (tuple, list)) or len(item) != 4:
        raise TypeError(f"{kind}[{i}] must be a (probe, metric, key, value) tuple, got {item!r:.80}")
    names = (_check_name(item[0], f"{kind}[{i}] probe"), _check_name(item[1], f"{kind}[{i}] metric"),
             _check_name(item[2], f"{kind}[{i}] key", allow_empty=True))
    return (*names, _check_real(item[3], f"{kind}[{i}] value")) if scalar else names


def _check_real(value: object, name: str) -> float:
    torch = sys.modules.get("torch")
    if isinstance(value, (float, int, np.integer, np.floating, np.bool_)):  # int includes bool
        ok = True
    elif isinstance(value, np.ndarray):
        ok = value.ndim == 0 and value.dtype.kind in "biuf"
    elif torch is not None and isinstance(value, torch.Tensor):
        ok = value.ndim == 0 and not value.is_complex()
    else:  # a str would parse, a complex lose its imaginary part
        ok = not isinstance(value, (str, bytes, complex, np.generic)) and hasattr(value, "__float__")
    if not ok:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r:.60}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float64
        raise ValueError(f"{name} does not fit a float64: {value!r:.60}") from None


def _check_name(value: object, name: str, allow_empty: bool = False) -> str:
    if type(value) is not str:
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r:.60}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must be a non-empty str")
    return value


def _iterable(items: object, name: str) -> Iterable:
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{name} must be an iterable of (probe, metric, key, value) tuples, "
                        f"got {type(items).__name__}")
    return items


def _npy(array: object, name: str) -> bytes:
    torch = sys.modules.get("torch")
    a = to_numpy(array) if torch is not None and isinstance(array, torch.Tensor) else np.asarray(array)
    if a.dtype.hasobject:
        raise TypeError(f"{name} must be a numeric array, got dtype {a.dtype}")
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()
