"""The record store: round trips, append/rewind, errors, crash safety, concurrent readers, the lock."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

import dyndiag as dd
from dyndiag.records import DB_NAME, SCHEMA_VERSION, RecordWriter, is_writer, load_arrays, load_records

COLUMNS = ["step", "probe", "metric", "key", "value", "wall_time", "run"]

# A training-like writer: ROWS scalars and one array per step, each completed step
# printed (flushed) only after write_step returned, i.e. after its commit.
WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from dyndiag.records import RecordWriter
    log_dir, n, pause, rows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    with RecordWriter(log_dir) as w:
        for _ in range(n):
            s = w.next_step
            w.write_step(s, [("train", f"m{j}", "", s * 100.0 + j) for j in range(rows)],
                         [("train", "scores", "", np.full(5, s, dtype=np.int64))])
            print(s, flush=True)
            time.sleep(pause)
    """
)
ROWS = 7


def _start_writer(tmp_path, n, pause):
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    log_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(log_dir), str(n), str(pause), str(ROWS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, log_dir


def _check_complete(df: pd.DataFrame) -> list[int]:
    """Steps 0..k, each with all ROWS rows of the writer script and their values; returns the steps."""
    steps = sorted(set(df["step"]))
    assert steps == list(range(len(steps)))
    counts = df.groupby("step").size()
    assert (counts == ROWS).all(), counts[counts != ROWS]
    expected = df["step"] * 100.0 + df["metric"].str[1:].astype(int)
    assert np.array_equal(df["value"].to_numpy(), expected.to_numpy())
    return steps


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).view(np.int64)


# ---------------------------------------------------------------- round trips


def test_scalars_round_trip_bit_for_bit_with_columns_dtypes_and_order(tmp_path):
    values = [1.5, float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -3.25, 5e-324, 1.7976931348623157e308]
    others = [3, True, np.float32(0.1), np.int64(-7), np.array(2.5),
              torch.tensor(-0.0), torch.tensor(4, dtype=torch.int32)]
    with RecordWriter(tmp_path) as w:
        w.write_step(0, [("p", "v", str(i), v) for i, v in enumerate(values)], wall_time=123.5)
        # Insertion order within a step is kept (not sorted by name).
        w.write_step(1, [("z", "b", "", 1.0), ("a", "a", "", 2.0)]
                     + [("q", "o", str(i), v) for i, v in enumerate(others)])
    df = load_records(tmp_path)
    assert list(df.columns) == COLUMNS
    assert df["step"].dtype == np.int64
    for col in ("probe", "metric", "key"):
        assert pd.api.types.is_string_dtype(df[col]) and all(type(x) is str for x in df[col]), col
    assert df["value"].dtype == np.float64 and df["wall_time"].dtype == np.float64
    s0 = df[df["step"] == 0]
    # Bit-for-bit: NaN (stored as NULL) comes back NaN, -0.0 keeps its sign.
    assert np.array_equal(_bits(s0["value"]), _bits(values))
    assert math.copysign(1.0, s0["value"].iloc[4]) == -1.0
    assert (s0["wall_time"] == 123.5).all()
    assert list(s0["key"]) == [str(i) for i in range(len(values))]
    s1 = df[df["step"] == 1]
    assert list(s1["probe"][:2]) == ["z", "a"]
    expected = [float(np.asarray(v)) if not isinstance(v, torch.Tensor) else v.item() for v in others]
    assert np.array_equal(_bits(s1["value"][2:]), _bits(expected))
    assert math.copysign(1.0, s1["value"].iloc[2 + 5]) == -1.0  # tensor(-0.0)
    assert abs(s1["wall_time"].iloc[0] - time.time()) < 60


def test_empty_store_gives_empty_frame_with_columns_and_dtypes(tmp_path):
    RecordWriter(tmp_path).close()
    df = load_records(tmp_path)
    assert list(df.columns) == COLUMNS and len(df) == 0
    assert df["step"].dtype == np.int64 and df["value"].dtype == np.float64 and df["wall_time"].dtype == np.float64
    assert all(pd.api.types.is_string_dtype(df[c]) for c in ("probe", "metric", "key"))


def test_arrays_round_trip_dtype_shape_and_values(tmp_path):
    arrays = {
        "f32": np.linspace(-1, 1, 7, dtype=np.float32),
        "f64_2d": np.array([[np.nan, np.inf], [-0.0, 1e-300], [3.0, -2.0]]),
        "i64": np.arange(-3, 4, dtype=np.int64),
        "scalar0d": np.array(2.5),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "bigendian": np.arange(4, dtype=">f8"),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "strided": np.arange(10.0)[::3],
    }
    t32 = torch.randn(3, 2)
    tbf16 = torch.tensor([1.5, -2.0], dtype=torch.bfloat16, requires_grad=True)
    with RecordWriter(tmp_path) as w:
        w.write_step(0, arrays=[("a", name, "", a) for name, a in arrays.items()]
                     + [("t", "t32", "", t32), ("t", "bf16", "", tbf16 * 1)])
        w.write_step(4, arrays=[("a", "i64", "", arrays["i64"] * 2)])
    for name, a in arrays.items():
        got = load_arrays(tmp_path, "a", name)
        assert list(got) == ([0, 4] if name == "i64" else [0])
        b = got[0]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert b.tobytes() == a.tobytes(), name  # bit for bit: NaN, -0.0, byte order
    assert np.array_equal(load_arrays(tmp_path, "a", "i64", step=4)[4], arrays["i64"] * 2)
    assert load_arrays(tmp_path, "a", "i64", step=2) == {}
    t = load_arrays(tmp_path, "t", "t32")[0]
    assert t.dtype == np.float32 and np.array_equal(t, t32.numpy())
    bf = load_arrays(tmp_path, "t", "bf16")[0]
    assert bf.dtype == np.float32 and np.array_equal(bf, [1.5, -2.0])


def test_load_arrays_keys_and_missing_names(tmp_path):
    with RecordWriter(tmp_path) as w:
        w.write_step(0, arrays=[("eig", "vectors", "0", np.ones(3)), ("eig", "vectors", "1", np.zeros(3))])
        w.write_step(1, arrays=[("eig", "vectors", "0", 2 * np.ones(3))])
    with pytest.raises(ValueError, match=r"several keys \['0', '1'\].*key="):
        load_arrays(tmp_path, "eig", "vectors")
    got = load_arrays(tmp_path, "eig", "vectors", key="0")
    assert list(got) == [0, 1] and np.array_equal(got[1], 2 * np.ones(3))
    assert list(load_arrays(tmp_path, "eig", "vectors", key="1")) == [0]
    with pytest.raises(ValueError, match=r"no arrays with probe='eig', metric='values'.*\('eig', 'vectors', '0'\)"):
        load_arrays(tmp_path, "eig", "values")
    with pytest.raises(ValueError, match="key='7'"):
        load_arrays(tmp_path, "eig", "vectors", key="7")
    with pytest.raises(TypeError, match="probe"):
        load_arrays(tmp_path, 1, "vectors")
    with pytest.raises(TypeError, match="key"):
        load_arrays(tmp_path, "eig", "vectors", key=0)


# ---------------------------------------------------------------- counter: append, rewind


def test_reopening_appends_from_the_stored_counter(tmp_path):
    with RecordWriter(tmp_path) as w:
        assert w.next_step == 0
        for s in range(3):
            w.write_step(s, [("p", "m", "", float(s))])
        w.write_step(5)  # a step with nothing to store still moves the counter; gaps are fine
        assert w.next_step == 6
        with pytest.raises(ValueError, match="next_step=6"):
            w.write_step(5, [("p", "m", "", 0.0)])
    with RecordWriter(tmp_path) as w:
        assert w.next_step == 6
        w.write_step(w.next_step, [("p", "m", "", 6.0)])
    df = load_records(tmp_path)
    assert list(df["step"]) == [0, 1, 2, 6] and list(df["value"]) == [0.0, 1.0, 2.0, 6.0]


def test_start_step_overrides_and_rewinds_on_first_write(tmp_path):
    with RecordWriter(tmp_path) as w:
        for s in range(10):
            w.write_step(s, [("p", "m", "", float(s))], [("p", "a", "", np.full(2, s))])
    with RecordWriter(tmp_path, start_step=20) as w:  # ahead of the counter: nothing deleted
        assert w.next_step == 20
    assert RecordWriter(tmp_path).next_step == 10  # opening wrote nothing, not even the counter
    w = RecordWriter(tmp_path, start_step=4)
    assert w.next_step == 4
    assert load_records(tmp_path)["step"].max() == 9  # opening alone deletes nothing
    w.write_step(4, [("p", "m", "", -4.0)], [("p", "a", "", np.full(2, -4))])
    w.close()
    df = load_records(tmp_path)
    assert list(df["step"]) == [0, 1, 2, 3, 4] and df["value"].iloc[-1] == -4.0
    arrays = load_arrays(tmp_path, "p", "a")
    assert list(arrays) == [0, 1, 2, 3, 4] and arrays[4][0] == -4
    assert RecordWriter(tmp_path).next_step == 5
    with RecordWriter(tmp_path / "fresh", start_step=100) as w:
        w.write_step(100, [("p", "m", "", 1.0)])
    assert list(load_records(tmp_path / "fresh")["step"]) == [100]


def test_a_second_writer_on_the_same_dir_is_refused(tmp_path):
    a = RecordWriter(tmp_path)
    a.write_step(0, [("p", "m", "", 1.0)])
    with pytest.raises(RuntimeError, match="another writer"):
        RecordWriter(tmp_path)
    a.write_step(1)
    a.close()
    with RecordWriter(tmp_path) as b:  # the lock goes with the first writer
        assert b.next_step == 2
    assert list(load_records(tmp_path)["value"]) == [1.0]


# ---------------------------------------------------------------- errors


def test_bad_arguments_name_the_argument_and_store_nothing(tmp_path):
    with RecordWriter(tmp_path) as w:
        bad_steps = [(float("nan"), ValueError), (float("inf"), ValueError), (1.0, TypeError), (-1, ValueError),
                     (True, TypeError), ("3", TypeError), (None, TypeError)]
        for step, exc in bad_steps:
            with pytest.raises(exc, match="step"):
                w.write_step(step, [("p", "m", "", 1.0)])
        bad_rows = [
            (("p", "m", 0, 1.0), TypeError, r"scalars\[0\] key"),
            ((1, "m", "", 1.0), TypeError, r"scalars\[0\] probe"),
            (("p", b"m", "", 1.0), TypeError, r"scalars\[0\] metric"),
            (("", "m", "", 1.0), ValueError, r"scalars\[0\] probe must be a non-empty"),
            (("p", "m", "", "1.0"), TypeError, "value must be a real number"),
            (("p", "m", "", None), TypeError, "value must be a real number"),
            (("p", "m", "", 1j), TypeError, "value must be a real number"),
            (("p", "m", "", np.complex128(1)), TypeError, "value must be a real number"),
            (("p", "m", "", np.ones(1)), TypeError, "value must be a real number"),
            (("p", "m", "", torch.ones(2)), TypeError, "value must be a real number"),
            (("p", "m", ""), TypeError, r"scalars\[0\] must be a \(probe, metric, key, value\)"),
        ]
        for row, exc, match in bad_rows:
            with pytest.raises(exc, match=match):
                w.write_step(0, [row])
        with pytest.raises(TypeError, match="scalars must be an iterable"):
            w.write_step(0, 5)
        with pytest.raises(TypeError, match=r"arrays\[0\] must be a numeric array"):
            w.write_step(0, arrays=[("p", "a", "", np.array([{}, 1], dtype=object))])
        with pytest.raises(ValueError, match=r"scalars of step 0 repeat .*\('p', 'm', ''\)"):
            w.write_step(0, [("p", "m", "", 1.0), ("q", "m", "", 1.0), ("p", "m", "", 2.0)])
        with pytest.raises(ValueError, match="arrays of step 0 repeat"):
            w.write_step(0, arrays=[("p", "a", "k", np.ones(1)), ("p", "a", "k", np.ones(1))])
        with pytest.raises(ValueError, match="fit a float64"):
            w.write_step(0, [("p", "m", "", 10**400)])
        with pytest.raises(TypeError, match="wall_time"):
            w.write_step(0, wall_time="now")
        with pytest.raises(ValueError, match="wall_time"):
            w.write_step(0, wall_time=float("nan"))
        assert w.next_step == 0
    assert len(load_records(tmp_path)) == 0 and RecordWriter(tmp_path).next_step == 0
    with pytest.raises(ValueError, match="closed"):
        w.write_step(0)
    w.close()  # idempotent
    with pytest.raises(ValueError, match="start_step"):
        RecordWriter(tmp_path, start_step=-1)
    with pytest.raises(TypeError, match="start_step"):
        RecordWriter(tmp_path, start_step=2.0)


def test_bad_log_dirs(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for call in (RecordWriter, load_records, lambda d: load_arrays(d, "p", "m")):
        with pytest.raises(ValueError, match="log_dir must be a directory"):
            call(a_file)
        with pytest.raises(TypeError, match="log_dir"):
            call(None)
    for missing in (tmp_path / "nope", tmp_path):
        with pytest.raises(ValueError, match="no records in log_dir"):
            load_records(missing)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / DB_NAME).write_bytes(b"not a database at all" * 100)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    c = sqlite3.connect(foreign / DB_NAME)
    c.execute("CREATE TABLE t (x)")
    c.commit(), c.close()
    for d, match in ((tmp_path / "junk", "not a readable record store"), (foreign, "not a dyndiag record store")):
        with pytest.raises(ValueError, match=match):
            RecordWriter(d)
        with pytest.raises(ValueError, match=match):
            load_records(d)


def test_newer_schema_is_refused_by_writer_and_readers(tmp_path):
    with RecordWriter(tmp_path) as w:
        w.write_step(0, [("p", "m", "", 1.0)])
    con = sqlite3.connect(tmp_path / DB_NAME)
    con.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (SCHEMA_VERSION + 1,))
    con.commit(), con.close()
    for call in (RecordWriter, load_records, lambda d: load_arrays(d, "p", "m")):
        with pytest.raises(ValueError, match=f"schema version {SCHEMA_VERSION + 1}.*newer dyndiag"):
            call(tmp_path)


# ---------------------------------------------------------------- durability and concurrency


def test_sigkilled_writer_keeps_every_completed_step_and_a_new_writer_appends(tmp_path):
    proc, log_dir = _start_writer(tmp_path, n=100_000, pause=0.005)
    reported = []
    try:
        while len(reported) < 20:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            reported.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    reported += [int(x) for x in rest.split()]  # lines already in the pipe
    assert (log_dir / f"{DB_NAME}-wal").exists()  # killed: the WAL was never checkpointed away
    steps = _check_complete(load_records(log_dir))
    assert set(reported) <= set(steps)
    assert steps[-1] <= reported[-1] + 1  # at most the step committed but not yet printed
    arrays = load_arrays(log_dir, "train", "scores")
    assert sorted(arrays) == steps and all(np.array_equal(a, np.full(5, s)) for s, a in arrays.items())
    with RecordWriter(log_dir) as w:
        assert w.next_step == steps[-1] + 1
        w.write_step(w.next_step, [("train", f"m{j}", "", w.next_step * 100.0 + j) for j in range(ROWS)])
    assert _check_complete(load_records(log_dir)) == steps + [steps[-1] + 1]


def test_readers_see_whole_steps_while_a_writer_writes(tmp_path):
    n = 120
    proc, log_dir = _start_writer(tmp_path, n=n, pause=0.003)
    partial = 0
    try:
        assert proc.stdout.readline(), proc.stderr.read()  # the store exists, step 0 is in
        while proc.poll() is None:
            steps = _check_complete(load_records(log_dir))
            partial += 0 < len(steps) < n
            arrays = load_arrays(log_dir, "train", "scores")
            assert sorted(arrays) == list(range(len(arrays)))
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert partial >= 3  # the reads did overlap the writes
    assert _check_complete(load_records(log_dir)) == list(range(n))


def test_writer_hot_path_does_not_import_pandas_or_torch(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from dyndiag.records import RecordWriter
        with RecordWriter({str(tmp_path)!r}) as w:
            w.write_step(0, [("p", "m", "", 1.0)], [("p", "a", "", np.ones(3))])
        print(sorted(m for m in ("pandas", "torch") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_wal_mode_synchronous_normal_and_a_clean_close(tmp_path):
    w = RecordWriter(tmp_path)
    assert w._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: no fsync per commit
    c = sqlite3.connect(tmp_path / DB_NAME)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.close()
    for s in range(100):
        w.write_step(s, [("p", "m", str(j), float(j)) for j in range(20)])
    closer = threading.Thread(target=w.close)  # closing from another thread is fine
    closer.start(), closer.join()
    assert w.closed and not (tmp_path / f"{DB_NAME}-wal").exists()  # a clean close checkpoints the WAL away
    assert len(load_records(tmp_path)) == 2000


def test_repr_and_is_writer_without_a_process_group(tmp_path):
    assert is_writer()
    with RecordWriter(tmp_path) as w:
        assert w.enabled and "next_step=0" in repr(w)
    assert "closed" in repr(w)


def _distributed_worker(rank: int, world: int, init_file: str, log_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        w = RecordWriter(log_dir)  # a collective: rank 0's counter on every rank
        result = [is_writer(), w.enabled, w.next_step]
        w.write_step(w.next_step, [("rank", "value", "", float(rank))])
        result.append(w.next_step)
        w.close()
        dist.barrier()
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(repr(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_only_rank_0_writes_and_every_rank_gets_its_counter(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    log_dir = tmp_path / "run"
    with RecordWriter(log_dir) as w:
        w.write_step(2)
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(log_dir), str(tmp_path)), nprocs=2, join=True)
    results = [eval((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    assert results == [[True, True, 3, 4], [False, False, 3, 4]]
    df = load_records(log_dir)
    assert list(df["step"]) == [3] and list(df["value"]) == [0.0]


def test_a_forgotten_writer_is_released_when_collected(tmp_path):
    import gc

    w = RecordWriter(tmp_path)
    w.write_step(0, [("p", "m", "", 1.0)])
    del w
    gc.collect()
    assert not (tmp_path / f"{DB_NAME}-wal").exists()  # closed: the WAL is checkpointed away
    with RecordWriter(tmp_path) as w:  # the lock went with it
        assert w.next_step == 1
    assert load_records(tmp_path)["value"].tolist() == [1.0]


def test_amend_adds_to_an_earlier_step_never_replaces_and_readers_sort_by_step(tmp_path):
    with RecordWriter(tmp_path) as w:
        w.write_step(0, [("p", "m", "a", 0.0), ("p", "m", "b", 1.0)])
        w.write_step(2, [("p", "m", "", 2.0)], [("p", "x", "", np.arange(2))])
        w.write_step(1, [("p", "m", "", 1.5)], amend=True)  # a step the counter passed
        w.write_step(2, [("q", "m", "", 2.5)], [("q", "x", "", np.ones(1))], amend=True)
        assert w.next_step == 3  # amending never moves the counter back
        with pytest.raises(ValueError, match=r"step 2: \('p', 'm', ''\) is already stored"):
            w.write_step(2, [("p", "m", "", 9.0)], amend=True)
        with pytest.raises(ValueError, match=r"arrays of step 2: \('p', 'x', ''\)"):
            w.write_step(2, [], [("p", "x", "", np.ones(1))], amend=True)
        with pytest.raises(TypeError, match="amend"):
            w.write_step(3, amend=1)
        w.write_step(4, amend=True)  # at or after the counter: an ordinary write
        assert w.next_step == 5
    df = load_records(tmp_path)
    assert list(df["step"]) == [0, 0, 1, 2, 2] and list(df["key"][:2]) == ["a", "b"]
    assert list(df["value"]) == [0.0, 1.0, 1.5, 2.0, 2.5] and list(df.index) == [0, 1, 2, 3, 4]
    assert load_arrays(tmp_path, "p", "x")[2].tolist() == [0, 1]  # the refused amend stored nothing
    from dyndiag.records import recorded_probes

    assert recorded_probes(tmp_path) == {0: {"p"}, 1: {"p"}, 2: {"p", "q"}}


def test_each_writer_that_writes_is_a_new_run_segment(tmp_path):
    for values in ([0.0, 1.0], [], [2.0, 3.0]):  # the second writer writes nothing: no segment of its own
        with RecordWriter(tmp_path) as w:
            for v in values:
                w.write_step(w.next_step, [("p", "m", "", v)])
    with RecordWriter(tmp_path, start_step=3) as w:  # a rewind: a new segment from step 3 on
        assert w.run == 2
        w.write_step(3, [("p", "m", "", 9.0)])
    df = load_records(tmp_path)
    assert df["run"].dtype == np.int64
    assert list(zip(df["step"], df["run"], df["value"])) == [(0, 0, 0.0), (1, 0, 1.0), (2, 1, 2.0), (3, 2, 9.0)]


def test_a_failed_transaction_stores_nothing_of_the_step_and_the_writer_goes_on(tmp_path):
    w = RecordWriter(tmp_path)
    w.write_step(0, [("p", "m", "", 0.0)])
    c = sqlite3.connect(tmp_path / DB_NAME)  # a row that fails half-way through a step, as a full disk would
    c.execute("CREATE TRIGGER fail BEFORE INSERT ON records WHEN NEW.value = 13.0 "
              "BEGIN SELECT RAISE(ABORT, 'no space'); END")
    c.commit(), c.close()
    with pytest.raises(sqlite3.Error, match="no space"):
        w.write_step(1, [("p", "m", "", 1.0), ("p", "n", "", 13.0)], [("p", "a", "", np.ones(2))])
    assert w.next_step == 1
    w.write_step(2, [("p", "m", "", 2.0)])
    w.close()
    assert load_records(tmp_path)["step"].tolist() == [0, 2]
    with pytest.raises(ValueError, match="no arrays"):
        load_arrays(tmp_path, "p", "a")
    assert RecordWriter(tmp_path).next_step == 3


def test_a_version_1_store_is_read_migrated_and_appended_to(tmp_path):
    c = sqlite3.connect(tmp_path / DB_NAME)
    c.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    c.execute("CREATE TABLE records (step INTEGER NOT NULL, probe TEXT NOT NULL, metric TEXT NOT NULL,"
              " key TEXT NOT NULL, value, wall_time REAL NOT NULL)")
    c.execute("CREATE TABLE arrays (step INTEGER NOT NULL, probe TEXT NOT NULL, metric TEXT NOT NULL,"
              " key TEXT NOT NULL, wall_time REAL NOT NULL, npy BLOB NOT NULL, UNIQUE (probe, metric, key, step))")
    c.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", 1), ("next_step", 3)])
    c.execute("INSERT INTO records VALUES (2, 'p', 'm', '', 2.0, 0.0)")
    c.commit(), c.close()
    before = load_records(tmp_path)
    assert before["step"].tolist() == [2] and before["run"].tolist() == [0]  # rows from before segments: run 0
    with RecordWriter(tmp_path) as w:
        assert w.next_step == 3 and w.run == 1
        w.write_step(3, [("p", "m", "", 3.0)])
    df = load_records(tmp_path)
    assert df["step"].tolist() == [2, 3] and df["run"].tolist() == [0, 1]
    c = sqlite3.connect(tmp_path / DB_NAME)
    assert c.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0] == SCHEMA_VERSION
    c.close()


# ---------------------------------------------------------------- the one-writer lock and fork


def test_the_lock_refuses_another_process_and_names_the_dir(tmp_path):
    code = textwrap.dedent(f"""
        from dyndiag.records import RecordWriter
        try:
            RecordWriter({str(tmp_path)!r})
        except RuntimeError as err:
            print(err)
        """)
    with RecordWriter(tmp_path):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "another writer" in out and str(tmp_path) in out
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == ""  # released at close


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_holds_no_lock_and_leaves_the_parents_store_alone(tmp_path):
    w = RecordWriter(tmp_path)
    w.write_step(0, [("p", "m", "", 0.0)])
    go_on, child_done = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked worker: its copy refuses to write, closing it changes nothing
        code = 1
        try:
            try:
                w.write_step(1, [("p", "m", "", -1.0)])
            except ValueError as err:
                code = 0 if "forked child" in str(err) else 2
            w.close()
            os.read(go_on, 1)  # alive until the parent has reopened the dir
        finally:
            os._exit(code)
    try:
        w.write_step(1, [("p", "m", "", 1.0)])
        w.close()
        with RecordWriter(tmp_path) as again:  # while the child lives
            again.write_step(2, [("p", "m", "", 2.0)])
    finally:
        os.write(child_done, b"x")
        status = os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 0
    assert load_records(tmp_path)["value"].tolist() == [0.0, 1.0, 2.0]


def _train_step(model, opt, x, y):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_persistent_dataloader_workers_do_not_keep_the_log_dir_locked(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16, num_workers=2, persistent_workers=True,
                                         multiprocessing_context="fork")
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = dd.Monitor(model, opt, [dd.probes.GradientNorm()], log_dir=tmp_path)
    try:
        for x, y in loader:  # forks the workers while the Monitor's writer is open
            _train_step(model, opt, x, y)
        workers = loader._iterator._workers
        mon.close()
        assert len(workers) == 2 and all(p.is_alive() for p in workers)
        with dd.Monitor(model, opt, [dd.probes.GradientNorm()], log_dir=tmp_path) as mon:
            assert mon.step == 4 and all(p.is_alive() for p in workers)
            for x, y in loader:
                _train_step(model, opt, x, y)
        assert loader._iterator._workers == workers  # the same workers throughout
    finally:
        mon.close()
        loader._iterator._shutdown_workers()
    assert sorted(load_records(tmp_path)["step"].unique()) == list(range(8))


def _threads_and_children() -> tuple:
    """Python threads, OS threads and child processes of this process (Linux)."""
    me = str(os.getpid())
    children = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    children.add(int(pid))
        except (OSError, IndexError):
            pass
    return threading.active_count(), len(os.listdir("/proc/self/task")), children


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_monitor_with_a_log_dir_starts_no_process_and_no_thread(tmp_path):
    import multiprocessing

    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_step(model, opt, x, y)  # torch's own thread pools exist before counting
    before = _threads_and_children()
    kids = multiprocessing.active_children()
    mon = dd.Monitor(model, opt, [dd.probes.GradientNorm(), dd.probes.LayerRotation(), dd.probes.SoftmaxCollapse()],
                     log_dir=tmp_path)
    seen = [_threads_and_children()]
    for _ in range(5):
        _train_step(model, opt, x, y)
        seen.append(_threads_and_children())
    assert len(mon.records()) > 0
    mon.close()
    seen.append(_threads_and_children())
    assert all(s == before for s in seen), (before, seen)
    assert multiprocessing.active_children() == kids
