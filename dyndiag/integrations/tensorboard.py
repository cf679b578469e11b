"""Export a dyndiag run's scalar records as TensorBoard scalars.

::

    from dyndiag.integrations.tensorboard import export_scalars
    export_scalars("runs/exp1")            # -> runs/exp1/tensorboard
    # tensorboard --logdir runs/exp1/tensorboard

Every scalar row becomes one TensorBoard scalar with tag ``probe/metric`` (or
``probe/metric/key`` for keyed rows: per-layer values, eigenvalue indices),
``global_step`` = the record's step and ``walltime`` = its ``wall_time``: the same
names the Lightning and Hugging Face callbacks log under. Arrays (densities,
per-example scores) are not exported.

Re-exporting replaces: the new event file is written completely first, then the
event files of earlier exports in that directory (named ``*.dyndiag``) are deleted,
so an export is idempotent (TensorBoard never shows a point twice) and an
interrupted export leaves the previous one readable. Other event files in the
directory are left alone. TensorBoard is imported only when this function runs.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["export_scalars"]

SUFFIX = ".dyndiag"


def export_scalars(log_dir: str | os.PathLike, tb_dir: str | os.PathLike | None = None) -> Path:
    """Write every scalar record of the run in ``log_dir`` as TensorBoard scalars.

    Parameters
    ----------
    log_dir:
        A run directory written by a Monitor or a callback (``records.sqlite``).
    tb_dir:
        Where the event file goes; default ``<log_dir>/tensorboard``. Created if missing.

    Returns
    -------
    pathlib.Path
        ``tb_dir``, the directory to point ``tensorboard --logdir`` at.

    Raises
    ------
    ImportError
        TensorBoard is not installed (``pip install dyndiag[tensorboard]``).
    ValueError
        ``log_dir`` holds no records store; ``tb_dir`` is a file.
    TypeError
        ``log_dir`` or ``tb_dir`` is not a path.
    """
    for value, name in ((log_dir, "log_dir"), (tb_dir, "tb_dir")):
        if not (value is None and name == "tb_dir") and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    SummaryWriter = _summary_writer()
    from ..records import load_records

    records = load_records(log_dir)  # ValueError when log_dir holds no store
    out = Path(log_dir) / "tensorboard" if tb_dir is None else Path(tb_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"tb_dir must be a directory, got the file {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    earlier = sorted(out.glob(f"events.out.tfevents.*{SUFFIX}"))
    writer = SummaryWriter(log_dir=str(out), filename_suffix=SUFFIX)
    try:
        columns = (records[c].tolist() for c in ("step", "probe", "metric", "key", "value", "wall_time"))
        for step, probe, metric, key, value, wall_time in zip(*columns):
            tag = f"{probe}/{metric}/{key}" if key else f"{probe}/{metric}"
            writer.add_scalar(tag, value, global_step=step, walltime=wall_time)
    finally:
        writer.close()
    for path in earlier:  # listed before the new file existed
        path.unlink(missing_ok=True)
    return out


def _summary_writer():
    """``torch.utils.tensorboard.SummaryWriter``, or an ImportError that says what to install."""
    try:
        import tensorboard  # noqa: F401  (torch's writer needs the package)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("export_scalars needs TensorBoard: pip install dyndiag[tensorboard]") from err
    return SummaryWriter
