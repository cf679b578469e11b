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
    ``schema_version`` (2), ``next_step``: the step after the last one stored,
    updated in the same transaction as that step's rows, and ``spool_pos``: how far
    the spool has been moved into the database.

Writing goes through a spool: :meth:`RecordWriter.write_step` appends the whole
step as one frame to ``<log_dir>/records.spool.NNNNNN`` — stored into a memory
mapping of a segment whose disk blocks were reserved up front (POSIX), or with a
single ``write()`` elsewhere — and an ingest (by default a small process of its own, see ``ingest=``)
moves each spooled step into SQLite in one transaction: a step is stored whole or
not at all. A step is safe from a crash of the training process (SIGKILL included)
once ``write_step`` returns — it is in the operating system's file cache — and the
ingest process finishes the spool even after the training process died; a spool
left behind by a crash (the ingest killed too) is read by the readers and moved
into the database by the next writer. Neither the spool nor SQLite
(``synchronous=NORMAL``, WAL) fsyncs per step: the last steps may be lost if the
operating system crashes or the power fails. Readers open the database read-only
in one snapshot and add the spooled steps it does not hold yet, so they see whole
steps only, never block the writer, and see a step as soon as it is spooled. A
clean close removes the spool; SQLite may leave empty ``-wal``/``-shm`` files, and
``records.lock`` (the one-writer lock) stays.

Neither the writer nor the readers import torch; only :func:`load_records` imports
pandas, so a training loop's hot path never loads it.
"""

from __future__ import annotations

import gc
import io
import math
import operator
import os
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _spool, _sqlite
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
    """Writes a run's records into ``<log_dir>``: a spool append per step, SQLite behind it.

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
        Spooled steps per SQLite transaction (default 1: one transaction per step).
        Every step is in the spool, readable and safe from a SIGKILL, as soon as
        :meth:`write_step` returns, whatever this is; ``n > 1`` only makes the
        database catch up in fewer, larger transactions.
    ingest
        Who moves the spool into SQLite. ``"process"``: a small ingest process
        (standard library only, started at the first write, one per writer, at a
        lower CPU priority), so the training thread pays only for the spool append
        (~10-15 us a step inside a training step, instead of ~0.1 ms for a
        transaction); it finishes what was spooled even if the training process is
        killed. ``"inline"``: this thread, right after each append (every
        ``commit_every`` steps). ``"auto"`` (default): ``"process"`` on POSIX
        systems, ``"inline"`` elsewhere.

    Attributes
    ----------
    log_dir, path : pathlib.Path
        The directory and the database file.
    enabled : bool
        Whether this process writes (:func:`is_writer`).

    Notes
    -----
    Under ``torch.distributed`` only rank 0 touches the files. On other ranks the
    writer validates and counts steps exactly as on rank 0 but stores nothing. When a
    process group of several ranks is initialised and ``start_step`` is ``None``, the
    constructor is a collective: rank 0 broadcasts its stored counter
    (``broadcast_object_list``; with NCCL on the current CUDA device), so every rank
    has the same :attr:`next_step` and schedules probes alike. Construct it on every
    rank (as the Monitor does), never on rank 0 alone.

    One writer per log dir: a second one is refused with a ``RuntimeError`` while the
    first is open (a lock on ``<log_dir>/records.lock``, released when the process
    ends, whatever way).

    A writer opened on a dir whose previous writer died first moves what that one
    spooled into the database (so its steps count for :attr:`next_step`).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        start_step: int | None = None,
        commit_every: int = 1,
        ingest: str = "auto",
    ) -> None:
        if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every < 1:
            raise ValueError(f"commit_every must be an int >= 1, got {commit_every!r}")
        if ingest not in ("auto", "process", "inline"):
            raise ValueError(f"ingest must be 'auto', 'process' or 'inline', got {ingest!r}")
        if ingest == "auto":
            ingest = "process" if os.name == "posix" and sys.executable else "inline"
        self.commit_every = commit_every
        self.log_dir = _sqlite.check_dir(log_dir, "log_dir")
        self.path = self.log_dir / DB_NAME
        if start_step is not None:
            start_step = _check_step(start_step, "start_step")
        self.enabled = is_writer()
        self._session: _Session | None = None
        self._closed = False
        self._rewind: int | None = None
        self._names: dict[tuple[str, str, str], int] = {}
        stored, error = 0, None
        if self.enabled:
            try:
                self._session = _Session(self.log_dir, commit_every, ingest)
                stored = self._session.next_step
            except Exception as exc:  # raised below, once the other ranks have heard of it
                error = exc
        if self._session is not None:
            # Ingests, removes the spool and closes the files also when the writer is
            # garbage-collected or the interpreter exits without close().
            self._release = weakref.finalize(self, self._session.close)
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
        scalars: Iterable[Scalar] = (),
        arrays: Iterable[Array] = (),
        *,
        wall_time: float | None = None,
    ) -> None:
        """Store everything of one step, whole; afterwards ``next_step == step + 1``.

        When it returns, the step is in the spool: readers see it, and it survives a
        SIGKILL of this process. The database holds it once the ingest has run
        (:meth:`flush` waits for that).

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
        OSError
            The spool could not be written (a full disk); nothing of the step is stored.
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
        names = self._names
        new: dict[tuple[str, str, str], int] = {}
        ids, values = _scalar_ids(_iterable(scalars, "scalars"), names, new)
        array_ids = []
        # Other ranks store nothing: they check names but skip serialising.
        for i, item in enumerate(_iterable(arrays, "arrays")):
            triple = _check_names(item, "arrays", i)
            blob = _npy(item[3], f"arrays[{i}]") if self.enabled else b""
            array_ids.append((_name_id(triple, names, new), blob))
        for kind, used in (("scalars", ids), ("arrays", [i for i, _ in array_ids])):
            if len(set(used)) != len(used):
                raise ValueError(f"{kind} of step {step} repeat a (probe, metric, key): {_repeated(used, names, new)}")
        if self._session is not None:
            self._session.append(step, t, self._rewind, ids, values, array_ids, new, names)
        names.update(new)
        self._rewind = None
        self._next_step = step + 1

    def _write_rows(self, step: int, scalars: list, arrays: list) -> None:
        """:meth:`write_step` for rows made by the Monitor, on the training thread's budget.

        The Monitor's rows are already checked (``flatten_result`` makes ``(str, str,
        str, float)`` tuples with unique names within a step), so when every name is
        known and there is no array, the step is packed straight into the spool;
        anything else takes :meth:`write_step`.
        """
        if arrays or self._session is None or self._closed or step < self._next_step:
            return self.write_step(step, scalars, arrays)
        if not self._session.append_rows(step, self._rewind, scalars, self._names):
            return self.write_step(step, scalars, arrays)  # a name new to this writer: registered there
        self._rewind = None
        self._next_step = step + 1

    def flush(self) -> None:
        """Bring the database up to date with the spool (readers do not need it: they read both)."""
        if self._session is not None and not self._closed:
            self._session.flush()

    def close(self) -> None:
        """Ingest what is spooled, remove the spool and close the files (idempotent).

        The spool is kept (and read by readers, and by the next writer) if the
        database cannot take it, e.g. on a full disk; the error is raised.
        """
        self._closed = True
        if self._session is not None:
            self._release()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("writing" if self.enabled else "not rank 0: stores nothing")
        return f"RecordWriter({str(self.log_dir)!r}, next_step={self._next_step}, {state})"


class _Session:
    """The writing end of a store: lock, database connection, spool file and ingest."""

    #: Steps between checks that the ingest process is still alive.
    CHECK_EVERY = 64

    def __init__(self, log_dir, commit_every: int, ingest: str) -> None:
        self.log_dir = log_dir
        self.commit_every = commit_every
        self.mode = ingest
        self.conn = None
        self.spool: _spool.Segment | None = None
        self.proc: subprocess.Popen | None = None
        self.closed = False
        self.forked = False  # a forked child's copy: it must neither write nor finish the parent's spool
        self._lock = threading.Lock()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.lock_fd = _lock(log_dir / LOCK_NAME)
        try:
            self.conn = _sqlite.open_writer(log_dir)
            self.ingestor = _sqlite.Ingestor(self.conn, log_dir, commit_every)
            # What a writer that died spooled: into the database, then a new segment.
            while True:
                self.ingestor.advance()
                last = max([self.ingestor.seg, *_spool.segments(log_dir)])
                self.seg = last + 1
                if self.ingestor._move(_spool.pack_pos(self.seg, 0)):
                    break
            for old in _spool.segments(log_dir):
                if old < self.seg:
                    _spool.segment_path(log_dir, old).unlink(missing_ok=True)
            self.next_step = int(self.conn.execute("SELECT value FROM meta WHERE name = 'next_step'").fetchone()[0])
            self.checkpointer = _sqlite.Checkpointer(log_dir / DB_NAME)
            self.spool = _spool.Segment(log_dir, self.seg, {})
        except BaseException:
            self.close()
            raise
        self._writes = 0
        _SESSIONS.add(self)

    def append(self, step, t, rewind, ids, values, array_ids, new, names) -> None:
        with self._lock:
            self._check_open()
            data = _spool.step_frame(step, t, rewind, ids, values, array_ids)
            if new:
                data = _spool.names_frame(new) + data
            if not self.spool.fits(len(data)):
                self._rotate({**names, **new}, len(data))
            self.spool.append(data)
            self._writes += 1
            self._wrote()

    def append_rows(self, step, rewind, rows, names) -> bool:
        """:meth:`append` for checked ``(probe, metric, key, float)`` rows whose names are all
        in ``names`` (the Monitor's usual step); False, storing nothing, if one is not.

        The training thread's hot path: each Python operation here costs about 0.5 us
        with the caches as a training step leaves them.
        """
        try:
            ids = [names[row[:3]] for row in rows]
        except KeyError:
            return False
        values = [row[3] for row in rows]
        t = time.time()
        with self._lock:
            if self.closed or self.forked:
                self._check_open()
            if not self.spool.append_step(step, t, rewind, ids, values):
                self._rotate(names, _spool.HEADER.size + _spool.step_packer(len(ids)).size)
                self.spool.append_step(step, t, rewind, ids, values)
            self._writes += 1
            if self.proc is None or self._writes % self.CHECK_EVERY == 0:  # inline, or a check due
                self._wrote()
        return True

    def _check_open(self) -> None:
        if self.forked:
            raise ValueError(f"this RecordWriter ({self.log_dir / DB_NAME}) belongs to the process it was "
                             "created in; a forked child cannot write with it")
        if self.closed:
            raise ValueError(f"write_step on a closed RecordWriter ({self.log_dir / DB_NAME})")

    def _wrote(self) -> None:
        """After a step is spooled (and counted): ingest it inline, or look after the ingest process."""
        if self.mode == "inline":
            if self._writes % self.commit_every == 0:
                self._ingest()
        elif self.proc is None:
            self._start()
        elif self._writes % self.CHECK_EVERY == 0 and self.proc.poll() is not None:
            self._lost_process()

    def _rotate(self, names: dict, need: int) -> None:
        old = self.spool
        # The next segment exists before the old one says so, so a reader never misses it.
        self.spool = _spool.Segment(self.log_dir, old.seg + 1, names, need)
        self.seg = self.spool.seg
        old.append(_spool.ROTATE)
        old.close()

    def _start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", _sqlite.__file__, str(self.log_dir), str(self.commit_every)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                # Its own session: a Ctrl-C meant for training does not stop it before it has finished.
                start_new_session=True,
            )
        except OSError as exc:
            warnings.warn(f"records: the ingest process could not start ({exc}); ingesting on this thread",
                          RuntimeWarning, stacklevel=4)
            self.mode = "inline"
            self._ingest()

    def _lost_process(self) -> None:
        err = self.proc.stderr.read().decode(errors="replace").strip().splitlines() if self.proc.stderr else []
        warnings.warn(f"records: the ingest process exited with code {self.proc.returncode}"
                      f"{': ' + err[-1] if err else ''}; ingesting on this thread", RuntimeWarning, stacklevel=4)
        self._let_go()
        self.mode = "inline"
        self._ingest()

    def _let_go(self) -> None:
        """Close the ingest process's pipes (end-of-file: it ingests what is left and exits).

        Not waited for: whoever lets go ingests the spool itself next (the two never
        apply a step twice), and subprocess reaps the process later.
        """
        proc, self.proc = self.proc, None
        if proc is not None:
            for pipe in (proc.stdin, proc.stderr):
                try:
                    pipe.close()
                except OSError:
                    pass

    def _ingest(self) -> None:
        applied, _ = self.ingestor.advance()
        if applied:
            self.checkpointer.notify(64 * applied)

    def flush(self) -> None:
        with self._lock:
            if not self.closed:
                self._ingest()

    def close(self) -> None:
        """Finish the ingest, remove the spool once the database holds it, close everything."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.forked:
                return
            try:
                if self.spool is not None:
                    self.spool.append(_spool.END)
                self._let_go()
                if self.conn is not None and self.spool is not None:
                    if not self.ingestor.advance()[1]:
                        raise RuntimeError(f"{self.log_dir}: the record spool ends before the writer's "
                                           "end mark (were its files removed?); kept as it is")
                    if self.ingestor._move(_spool.pack_pos(self.seg, _sqlite.CLOSED)):
                        self.ingestor.close()  # no open handle on it (Windows cannot delete one)
                        self.spool.close()
                        _spool.segment_path(self.log_dir, self.seg).unlink(missing_ok=True)
            finally:
                if getattr(self, "ingestor", None) is not None:
                    self.ingestor.close()
                if self.spool is not None:
                    self.spool.close()
                    self.spool = None
                if self.conn is not None:
                    if getattr(self, "checkpointer", None) is not None:
                        self.checkpointer.close()
                    self.conn.close()  # the last connection to close checkpoints and removes the WAL
                    self.conn = None
                _unlock(self.lock_fd)


#: Every open session of this process, so a forked child can disown its copies.
_SESSIONS: weakref.WeakSet = weakref.WeakSet()


def _disown_after_fork() -> None:
    for session in list(_SESSIONS):
        session.forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_after_fork)


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
        # rowid order is step order: steps only grow, and a rewind deletes every row
        # at or after its step before writing (checked below all the same).
        rows, tail = _sqlite.read(log_dir, lambda conn: conn.execute(
            "SELECT step, probe, metric, key, value, wall_time FROM records ORDER BY rowid").fetchall())
        rows = _with_tail(rows or [], tail, lambda s: [(s.step, p, m, k, v, s.wall_time) for p, m, k, v in s.scalars])
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
    def query(conn):
        stored = conn.execute("SELECT DISTINCT probe, metric, key FROM arrays").fetchall()
        return stored, conn.execute("SELECT step, key, npy FROM arrays WHERE probe = ? AND metric = ? ORDER BY step",
                                    (probe, metric)).fetchall()

    result, tail = _sqlite.read(log_dir, query)
    stored, found = (set(result[0]), result[1]) if result is not None else (set(), [])
    stored |= {(p, m, k) for s in tail for p, m, k, _ in s.arrays}
    found = _with_tail(found, tail, lambda s: [(s.step, k, b) for p, m, k, b in s.arrays if (p, m) == (probe, metric)])
    keys = sorted({k for p, m, k in stored if p == probe and m == metric})
    if key is None and len(keys) > 1:
        raise ValueError(f"probe={probe!r}, metric={metric!r} has arrays under several keys {keys}; "
                         f"pass key= to choose one")
    if not keys or (key is not None and key not in keys):
        asked = f"probe={probe!r}, metric={metric!r}" + ("" if key is None else f", key={key!r}")
        raise ValueError(f"no arrays with {asked} in {str(log_dir)!r}; stored (probe, metric, key): {sorted(stored)}")
    chosen = keys[0] if key is None else key
    found = [(s, blob) for s, k, blob in found if k == chosen and (step is None or s == step)]
    return {s: np.load(io.BytesIO(blob), allow_pickle=False) for s, blob in found}


def _with_tail(rows: list, tail: list, new_rows: Callable) -> list:
    """Database ``rows`` (step first) followed by the spooled steps' ``new_rows(step)``.

    A spooled step that rewinds drops every earlier row at or after its step first,
    as its ingest transaction will.
    """
    for s in tail:
        if s.rewind is not None:
            rows = [r for r in rows if r[0] < s.rewind]
        rows += new_rows(s)
    return rows


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


def _scalar_ids(scalars: Iterable, names: dict, new: dict) -> tuple[list[int], list[float]]:
    """Name ids and values of ``(probe, metric, key, value)`` items, each item checked.

    Items as the Monitor makes them (a 4-tuple of three non-empty-where-needed
    ``str`` and a ``float``) take the fast path; anything else goes through the
    full checks, whose messages name the item.
    """
    ids, values = [], []
    for i, item in enumerate(scalars):
        if type(item) is tuple and len(item) == 4:
            p, m, k, v = item
            if type(p) is str and type(m) is str and type(k) is str and type(v) is float and p and m:
                triple = (p, m, k)
                nid = names.get(triple)
                ids.append(_name_id(triple, names, new) if nid is None else nid)
                values.append(v)
                continue
        triple = _check_names(item, "scalars", i)
        values.append(_check_real(item[3], f"scalars[{i}] value"))
        ids.append(_name_id(triple, names, new))
    return ids, values


def _name_id(triple: tuple[str, str, str], names: dict, new: dict) -> int:
    nid = names.get(triple)
    if nid is None:
        nid = new.get(triple)
        if nid is None:
            nid = new[triple] = len(names) + len(new)
    return nid


# ---------------------------------------------------------------- the writer's lock
LOCK_NAME = "records.lock"


def _lock(path) -> int:
    """An exclusive lock on ``path`` held through the returned descriptor (released by the OS at exit)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.name == "nt":  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RuntimeError(f"{path.parent} is being written by another writer; only one writer may "
                           "write a log dir at a time (close the other one first)") from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


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


def _repeated(ids: list, names: dict, new: dict) -> tuple:
    by_id = {i: k for k, i in (*names.items(), *new.items())}
    seen = set()
    for i in ids:
        if i in seen:
            return by_id[i]
        seen.add(i)
    return ()
