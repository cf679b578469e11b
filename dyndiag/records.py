"""Append-only record store: one SQLite file per log dir, readable while training writes.

What is stored
--------------
``<log_dir>/records.sqlite`` (stdlib ``sqlite3``, WAL journal) holds three tables:

``records(step, probe, metric, key, value, wall_time)``
    One row per scalar, long format. ``key`` is always a string (``""`` for a plain
    scalar). ``value`` is a float64 stored exactly, inf and ``-0.0`` included; SQLite
    stores NaN as NULL, and the readers turn NULL back into NaN (nothing else is
    ever stored as NULL).
``arrays(step, probe, metric, key, wall_time, npy)``
    One ``.npy`` blob per array (``np.save`` without pickle: dtype, shape and byte
    order come back exactly), at most one per ``(probe, metric, key, step)``.
``meta(name, value)``
    ``schema_version``, and ``next_step``: the step after the last one written,
    updated in the same transaction as that step's rows.

Each :meth:`RecordWriter.write_step` is one transaction: a step is stored whole or
not at all. The writer runs ``synchronous=NORMAL``: a commit is a ``write()`` to the
WAL file without ``fsync``, so every committed step survives a crash of the process
(SIGKILL included), while the last steps may be lost if the operating system
crashes or the power fails (the file stays consistent). Checkpoints (copying the
WAL into the database, with fsyncs) run on a background thread. Readers open the
file read-only, see whole steps only and never block the writer; SQLite may leave
empty ``-wal``/``-shm`` files next to it, which the next writer removes.

Neither the writer nor the readers import torch; only :func:`load_records` imports
pandas, so a training loop's hot path never loads it.
"""

from __future__ import annotations

import gc
import io
import math
import operator
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _sqlite
from ._sqlite import DB_NAME, SCHEMA_VERSION

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["RecordWriter", "load_records", "load_arrays", "is_writer", "DB_NAME", "SCHEMA_VERSION"]

COLUMNS = ("step", "probe", "metric", "key", "value", "wall_time")

Scalar = tuple[str, str, str, float]
Array = tuple[str, str, str, Any]


def is_writer() -> bool:
    """Whether this process writes records: ``True`` without a process group, or on rank 0.

    torch is consulted only when it is already imported (no process group can exist
    otherwise), so this never imports torch.
    """
    if "torch" not in sys.modules:
        return True
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class RecordWriter:
    """Writes a run's records into ``<log_dir>/records.sqlite``, one transaction per step.

    Parameters
    ----------
    log_dir
        Directory of the run, created if missing. A ``ValueError`` if it is a file or
        holds a ``records.sqlite`` that is not a store or has a newer schema.
    start_step
        ``None`` (default): a new store starts at step 0, and a store that already
        holds records is *appended to*, from its stored counter. An explicit value
        sets :attr:`next_step`; if it is below the stored counter, the first
        :meth:`write_step` deletes every stored record and array with ``step >=
        start_step`` in its own transaction (a run resumed from an earlier checkpoint
        supersedes what the crashed run logged after it, like TensorBoard's
        ``purge_step``); opening alone deletes nothing.
    commit_every
        Steps per transaction (default 1: every completed step is in the file when
        :meth:`write_step` returns, and survives a SIGKILL). ``n > 1`` keeps up to
        ``n - 1`` steps in memory and commits them together — a SIGKILL then loses
        at most those — for runs where the per-step commit (~0.1 ms) is too much of
        a tiny step. :meth:`flush` and :meth:`close` commit what is pending.

    Attributes
    ----------
    log_dir, path : pathlib.Path
        The directory and the database file.
    enabled : bool
        Whether this process writes (:func:`is_writer`).

    Notes
    -----
    Under ``torch.distributed`` only rank 0 touches the file. On other ranks the
    writer validates and counts steps exactly as on rank 0 but stores nothing. When a
    process group of several ranks is initialised and ``start_step`` is ``None``, the
    constructor is a collective: rank 0 broadcasts its stored counter
    (``broadcast_object_list``; with NCCL on the current CUDA device), so every rank
    has the same :attr:`next_step` and schedules probes alike. Construct it on every
    rank (as the Monitor does), never on rank 0 alone.

    One writer per log dir: a step is refused with a ``RuntimeError`` if another
    writer changed the stored counter since this one last wrote.

    Checkpoints (copying the WAL into the database file, which fsyncs) run on a
    daemon thread, so they never stall :meth:`write_step`.
    """

    def __init__(
        self, log_dir: str | os.PathLike, *, start_step: int | None = None, commit_every: int = 1
    ) -> None:
        if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every < 1:
            raise ValueError(f"commit_every must be an int >= 1, got {commit_every!r}")
        self.commit_every = commit_every
        self._pending: tuple[int, list, list] | None = None  # (last step, rows, blobs) not yet committed
        self._pending_steps = 0
        self.log_dir = _sqlite.check_dir(log_dir, "log_dir")
        self.path = self.log_dir / DB_NAME
        if start_step is not None:
            start_step = _check_step(start_step, "start_step")
        self.enabled = is_writer()
        self._conn = None
        self._checkpointer: _sqlite.Checkpointer | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._rewind: int | None = None
        stored, error = 0, None
        if self.enabled:
            try:
                self._conn, stored = _sqlite.open_writer(self.log_dir)
            except Exception as exc:  # raised below, once the other ranks have heard of it
                error = exc
        if self._conn is not None:
            self._checkpointer = _sqlite.Checkpointer(self.path)
            # Closes the file and stops the checkpoint thread also when the writer is
            # garbage-collected or the interpreter exits without close().
            self._release = weakref.finalize(self, _release, self._conn, self._checkpointer)
        try:
            if start_step is None:
                stored = _broadcast_counter(stored, error)
        except BaseException:
            self.close()
            raise
        if error is not None:
            raise error
        self._stored = stored  # the file's counter as this writer last saw it
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
        scalars: Iterable[Scalar] = (),
        arrays: Iterable[Array] = (),
        *,
        wall_time: float | None = None,
    ) -> None:
        """Store everything of one step in one transaction; afterwards ``next_step == step + 1``.

        Parameters
        ----------
        step
            Int, at least :attr:`next_step` (steps are written in increasing order;
            gaps are allowed). A step with nothing to store still advances the stored
            counter.
        scalars
            ``(probe, metric, key, value)`` tuples: three ``str`` (probe and metric
            non-empty, key ``""`` for a plain scalar), and a real number (float, int,
            bool, numpy scalar, 0-d array or tensor) stored as float64 as it is, NaN
            and inf included.
        arrays
            ``(probe, metric, key, array)`` tuples: anything ``np.asarray`` takes, or a
            tensor (detached and copied to the CPU; bfloat16, which numpy lacks, is
            stored as float32). Object arrays are refused.
        wall_time
            Seconds since the epoch, stored with every row of the step; default now.

        Raises
        ------
        ValueError
            A negative, non-finite or too small ``step``, an empty probe or metric
            name, a ``(probe, metric, key)`` repeated within the step, or a closed
            writer. Nothing of the step is stored.
        TypeError
            A name that is not a ``str``, a value that is not a real number, an item
            that is not a 4-tuple.
        RuntimeError
            Another writer wrote this log dir since this one last did.
        """
        step = _check_step(step, "step")
        if self._closed:
            raise ValueError(f"write_step on a closed RecordWriter ({self.path})")
        if step < self._next_step:
            raise ValueError(
                f"step must be >= next_step={self._next_step} (steps are written in increasing "
                f"order; open a writer with start_step= to rewind), got {step}"
            )
        t = time.time() if wall_time is None else _check_real(wall_time, "wall_time")
        if not math.isfinite(t):
            raise ValueError(f"wall_time must be finite, got {t}")
        rows = _scalar_rows(step, _iterable(scalars, "scalars"), t)
        # Other ranks store nothing: they check names but skip serialising.
        blobs = [(step, *_check_names(item, "arrays", i), t, _npy(item[3], f"arrays[{i}]") if self.enabled else b"")
                 for i, item in enumerate(_iterable(arrays, "arrays"))]
        for kind, items in (("scalars", rows), ("arrays", blobs)):
            if len({item[1:4] for item in items}) != len(items):
                raise ValueError(f"{kind} of step {step} repeat a (probe, metric, key): {_repeated(items)}")
        if self.enabled:
            if self._pending is None:
                self._pending = (step, rows, blobs)
            else:  # extended in place: concatenating would copy the whole buffer every step
                self._pending[1].extend(rows)
                self._pending[2].extend(blobs)
                self._pending = (step, self._pending[1], self._pending[2])
            self._pending_steps += 1
            if self._pending_steps >= self.commit_every:
                self.flush()
        self._next_step = step + 1

    def flush(self) -> None:
        """Commit the steps kept in memory (``commit_every > 1``); a no-op otherwise."""
        if self._pending is None:
            return
        step, rows, blobs = self._pending
        # Dropped also when the commit fails: its error reaches the caller once, and
        # those steps are not stored (as for a failed single-step write).
        self._pending, self._pending_steps = None, 0
        with self._lock:
            if self._conn is None:  # closed from another thread meanwhile
                raise ValueError(f"write_step on a closed RecordWriter ({self.path})")
            self._commit(step, rows, blobs)
        self._checkpointer.notify(sum(len(b[-1]) for b in blobs) + 64 * len(rows))

    def _commit(self, step: int, rows: list, blobs: list) -> None:
        c = self._conn
        # BEGIN IMMEDIATE takes the write lock first, so no other writer can move the
        # counter between the check below and COMMIT.
        c.execute("BEGIN IMMEDIATE")
        try:
            # Moving the counter only from the value this writer last saw detects a
            # second writer in the same statement (rowcount 0), without a SELECT.
            moved = c.execute(
                "UPDATE meta SET value = ? WHERE name = 'next_step' AND value = ?", (step + 1, self._stored)
            ).rowcount
            if moved != 1:
                stored = c.execute("SELECT value FROM meta WHERE name = 'next_step'").fetchone()[0]
                raise RuntimeError(
                    f"{self.path} was written by another writer (its step counter moved from "
                    f"{self._stored} to {stored}); only one writer may write a log dir"
                )
            if self._rewind is not None:
                c.execute("DELETE FROM records WHERE step >= ?", (self._rewind,))
                c.execute("DELETE FROM arrays WHERE step >= ?", (self._rewind,))
            _insert(c, "records", rows)
            _insert(c, "arrays", blobs)
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # a failed COMMIT may have ended it already
                c.execute("ROLLBACK")
            raise
        self._stored = step + 1
        self._rewind = None

    def close(self) -> None:
        """Commit pending steps, stop the checkpoint thread and close the file (idempotent)."""
        try:
            if self._pending is not None and self._conn is not None and not self._closed:
                self.flush()
        finally:
            self._close()

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._release()  # the last connection to close checkpoints and removes the WAL
                self._conn = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("writing" if self.enabled else "not rank 0: stores nothing")
        return f"RecordWriter({str(self.log_dir)!r}, next_step={self._next_step}, {state})"


def load_records(log_dir: str | os.PathLike) -> pd.DataFrame:
    """Every scalar record of a run, as a long DataFrame.

    Safe while a writer is writing: the file is opened read-only and read in one
    snapshot, so every step in the result is complete.

    Parameters
    ----------
    log_dir
        Directory a :class:`RecordWriter` (or a Monitor) wrote.

    Returns
    -------
    pandas.DataFrame
        Columns ``step`` (int64), ``probe``, ``metric``, ``key`` (pandas' string
        dtype: ``str`` in pandas 3, ``object`` before), ``value`` and ``wall_time``
        (float64; stored NaN comes back as NaN), sorted by step, then in the order
        written. A store with no records yet gives an empty frame with these columns
        and dtypes.

    Raises
    ------
    ValueError
        ``log_dir`` holds no store (or is a file), or the store has a newer schema.
    """
    import pandas as pd

    # Millions of small tuples: the cyclic GC would rescan them over and over (3x
    # slower), and none of them can form a cycle.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        with _sqlite.open_reader(log_dir) as conn:
            # rowid order is step order: steps only grow, and a rewind deletes every
            # row at or after its step before writing (checked below all the same).
            rows = [] if conn is None else conn.execute(
                "SELECT step, probe, metric, key, value, wall_time FROM records ORDER BY rowid").fetchall()
        cols = list(zip(*rows)) if rows else [()] * len(COLUMNS)
        del rows
    finally:
        if gc_was_on:
            gc.enable()
    df = pd.DataFrame({
        "step": np.array(cols[0], dtype=np.int64),
        "probe": pd.Series(cols[1], dtype=str),
        "metric": pd.Series(cols[2], dtype=str),
        "key": pd.Series(cols[3], dtype=str),
        "value": np.array(cols[4], dtype=np.float64),  # None (a stored NaN) -> NaN
        "wall_time": np.array(cols[5], dtype=np.float64),
    })
    if len(df) and np.any(np.diff(df["step"].to_numpy()) < 0):
        df = df.sort_values("step", kind="stable", ignore_index=True)
    return df


def load_arrays(
    log_dir: str | os.PathLike,
    probe: str,
    metric: str,
    step: int | None = None,
    key: str | None = None,
) -> dict[int, np.ndarray]:
    """The stored arrays of one ``(probe, metric)``, by step.

    Safe while a writer is writing (read-only, one snapshot).

    Parameters
    ----------
    log_dir
        Directory a :class:`RecordWriter` (or a Monitor) wrote.
    probe, metric
        Names the arrays were written under.
    step
        Only this step (``{}`` if it has none); default every step.
    key
        Which key. ``None`` (default) is allowed while ``(probe, metric)`` has arrays
        under a single key (at every stored step); with several, a ``ValueError``
        lists them and asks for ``key=``.

    Returns
    -------
    dict[int, numpy.ndarray]
        ``step -> array`` in increasing step order, each with its stored dtype and
        shape.

    Raises
    ------
    ValueError
        No array has this ``probe``/``metric`` (and ``key``): the message lists the
        stored ``(probe, metric, key)``; ``key=None`` is ambiguous; no store in
        ``log_dir``.
    """
    _check_name(probe, "probe")
    _check_name(metric, "metric")
    if key is not None:
        _check_name(key, "key", allow_empty=True)
    if step is not None:
        step = _check_step(step, "step")
    with _sqlite.open_reader(log_dir) as conn:
        keys = [] if conn is None else [k for (k,) in conn.execute(
            "SELECT DISTINCT key FROM arrays WHERE probe = ? AND metric = ? ORDER BY key", (probe, metric))]
        if key is None and len(keys) > 1:
            raise ValueError(f"probe={probe!r}, metric={metric!r} has arrays under several keys {keys}; "
                             f"pass key= to choose one")
        if not keys or (key is not None and key not in keys):
            stored = [] if conn is None else conn.execute(
                "SELECT DISTINCT probe, metric, key FROM arrays ORDER BY probe, metric, key").fetchall()
            asked = f"probe={probe!r}, metric={metric!r}" + ("" if key is None else f", key={key!r}")
            raise ValueError(f"no arrays with {asked} in {str(log_dir)!r}; stored (probe, metric, key): {stored}")
        sql = "SELECT step, npy FROM arrays WHERE probe = ? AND metric = ? AND key = ?"
        args: list = [probe, metric, keys[0] if key is None else key]
        if step is not None:
            sql += " AND step = ?"
            args.append(step)
        found = conn.execute(sql + " ORDER BY step", args).fetchall()
    return {s: np.load(io.BytesIO(blob), allow_pickle=False) for s, blob in found}


def _release(conn, checkpointer: _sqlite.Checkpointer) -> None:
    checkpointer.close()
    conn.close()


def _broadcast_counter(stored: int, error: Exception | None) -> int:
    """Rank 0's counter on every rank: a collective when a process group of several ranks runs."""
    if "torch" not in sys.modules:
        return stored
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stored
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


def _check_step(step: object, name: str) -> int:
    if type(step) is int and step >= 0:
        return step
    if isinstance(step, bool):
        raise TypeError(f"{name} must be an int, got bool")
    if isinstance(step, float):
        if not math.isfinite(step):
            raise ValueError(f"{name} must be a finite int >= 0, got {step}")
        raise TypeError(f"{name} must be an int, got float {step}")
    try:
        value = operator.index(step)  # numpy and 0-d torch integers
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(step).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


#: Rows per INSERT statement: 6 columns each stay under SQLite's oldest variable
#: limit (999); one multi-row statement is ~2x cheaper than executemany for a step.
INSERT_ROWS = 150


def _insert(c, table: str, rows: list) -> None:
    for start in range(0, len(rows), INSERT_ROWS):
        part = rows[start : start + INSERT_ROWS]
        values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(part))
        c.execute(f"INSERT INTO {table} VALUES {values}", [x for row in part for x in row])


def _scalar_rows(step: int, scalars: Iterable, t: float) -> list[tuple]:
    """``(step, probe, metric, key, value, t)`` rows, each item checked.

    Items as the Monitor makes them (a 4-tuple of three non-empty-where-needed
    ``str`` and a ``float``) take the fast path; anything else goes through the
    full checks, whose messages name the item.
    """
    rows = []
    for i, item in enumerate(scalars):
        if type(item) is tuple and len(item) == 4:
            p, m, k, v = item
            if type(p) is str and type(m) is str and type(k) is str and type(v) is float and p and m:
                rows.append((step, p, m, k, v, t))
                continue
        rows.append((step, *_check_names(item, "scalars", i), _check_real(item[3], f"scalars[{i}] value"), t))
    return rows


def _check_real(value: object, name: str) -> float:
    if type(value) is float:
        return value
    torch = sys.modules.get("torch")
    if isinstance(value, (int, np.integer, np.floating, np.bool_)):  # int includes bool
        ok = True
    elif isinstance(value, np.ndarray):
        ok = value.ndim == 0 and value.dtype.kind in "biuf"
    elif torch is not None and isinstance(value, torch.Tensor):
        ok = value.ndim == 0 and not value.is_complex()  # float() syncs a CUDA tensor
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


def _check_names(item: object, kind: str, i: int) -> tuple[str, str, str]:
    if not isinstance(item, (tuple, list)) or len(item) != 4:
        raise TypeError(f"{kind}[{i}] must be a (probe, metric, key, value) tuple, got {item!r:.80}")
    p, m, k = item[0], item[1], item[2]
    if type(p) is str and type(m) is str and type(k) is str and p and m:
        return p, m, k
    return (_check_name(p, f"{kind}[{i}] probe"), _check_name(m, f"{kind}[{i}] metric"),
            _check_name(k, f"{kind}[{i}] key", allow_empty=True))


def _iterable(items: object, name: str) -> Iterable:
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{name} must be an iterable of (probe, metric, key, value) tuples, "
                        f"got {type(items).__name__}")
    return items


def _npy(array: object, name: str) -> bytes:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(array, torch.Tensor):
        array = array.detach().cpu().resolve_conj().resolve_neg()
        array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    a = np.asarray(array)
    if a.dtype.hasobject:
        raise TypeError(f"{name} must be a numeric array, got dtype {a.dtype}")
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _repeated(items: list) -> tuple:
    seen = set()
    for item in items:
        if item[1:4] in seen:
            return item[1:4]
        seen.add(item[1:4])
    return ()
