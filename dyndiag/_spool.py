"""The record spool: every step appended to a file with one ``write()`` before SQLite sees it.

Private to :mod:`dyndiag.records` (which documents the store) and :mod:`dyndiag._sqlite`
(which moves the spool into the database). Standard library only: the ingest process
runs this file's sibling ``_sqlite.py`` as a script, without importing the package.

Layout: ``<log_dir>/records.spool.NNNNNN`` segment files, each a sequence of frames
``magic(2) kind(1) length(u32) crc32(u32) payload``, little-endian:

``N``  names: JSON ``[[id, probe, metric, key], ...]``. A segment starts with every
       name known so far, so it can be read without the segments before it.
``S``  one step: ``step(i64) wall_time(f64) rewind(i64, -1: none) n(u32) m(u32)``,
       then ``n`` name ids (u32), ``n`` values (f64), ``m`` times ``(id u32,
       length u64)`` and the ``m`` ``.npy`` blobs.
``R``  the segment is finished; the next one holds what follows.
``E``  the writer closed.

A frame is valid when it is complete and its CRC matches; reading stops at the first
frame that is not (a write torn by a crash), so a reader sees whole steps only.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "records.spool."
MAGIC = b"dS"
HEADER = struct.Struct("<2scII")
STEP = struct.Struct("<qdqII")
ARRAY = struct.Struct("<IQ")
SEGMENT_BYTES = 64 << 20  # a new segment after this many bytes (the ingested ones are deleted)
OFFSET_BITS = 40  # a spool position is segment << 40 | offset: one integer in the meta table


def segment_path(log_dir: Path, seg: int) -> Path:
    return log_dir / f"{PREFIX}{seg:06d}"


def segments(log_dir: Path) -> list[int]:
    """Segment numbers present in ``log_dir``, ascending."""
    found = []
    for path in log_dir.glob(PREFIX + "*"):
        suffix = path.name[len(PREFIX):]
        if suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def pack_pos(seg: int, offset: int) -> int:
    return seg << OFFSET_BITS | offset


def unpack_pos(pos: int) -> tuple[int, int]:
    return pos >> OFFSET_BITS, pos & ((1 << OFFSET_BITS) - 1)


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, kind, len(payload), zlib.crc32(payload)) + payload


def names_frame(names: dict) -> bytes:
    """``names``: ``{(probe, metric, key): id}``."""
    return frame(b"N", json.dumps([[i, *k] for k, i in names.items()], separators=(",", ":")).encode())


_STEP_N: dict[int, struct.Struct] = {}  # the step header with n scalars, by n


def step_frame(step: int, wall_time: float, rewind: int | None, ids: list, values: list, arrays: list) -> bytes:
    """``arrays``: ``[(id, npy bytes), ...]``."""
    n = len(ids)
    packer = _STEP_N.get(n)
    if packer is None:
        packer = _STEP_N[n] = struct.Struct(STEP.format + f"{n}I{n}d")
    payload = packer.pack(step, wall_time, -1 if rewind is None else rewind, n, len(arrays), *ids, *values)
    if arrays:
        payload = b"".join([payload, *(ARRAY.pack(i, len(blob)) for i, blob in arrays), *(b for _, b in arrays)])
    return HEADER.pack(MAGIC, b"S", len(payload), zlib.crc32(payload)) + payload


END = frame(b"E")
ROTATE = frame(b"R")


@dataclass
class Step:
    """One decoded ``S`` frame; ``end`` is the file offset just after it."""

    step: int
    wall_time: float
    rewind: int | None
    scalars: list = field(default_factory=list)  # [(probe, metric, key, value)]
    arrays: list = field(default_factory=list)  # [(probe, metric, key, npy bytes)]
    end: int = 0


def parse(data: bytes | memoryview, start: int, names: dict, base: int = 0):
    """Frames of ``data`` (the bytes of a segment from file offset ``base``).

    Yields ``(kind, item, end)``: ``N`` frames update ``names`` (id -> (probe,
    metric, key)) and yield ``None``; ``S`` frames at file offsets ``>= start`` yield
    a :class:`Step` (earlier ones are skipped undecoded); ``R``/``E`` yield ``None``.
    ``end`` is the file offset after the frame. Stops at the first incomplete or
    corrupt frame.
    """
    view = memoryview(data)
    at = 0
    while at + HEADER.size <= len(view):
        magic, kind, length, crc = HEADER.unpack_from(view, at)
        body = at + HEADER.size
        if magic != MAGIC or body + length > len(view):
            return
        payload = view[body : body + length]
        if zlib.crc32(payload) != crc:
            return
        end = base + body + length
        if kind == b"N":
            for i, p, m, k in json.loads(bytes(payload)):
                names[i] = (p, m, k)
            yield kind, None, end
        elif kind == b"S":
            yield kind, (_decode_step(payload, names, end) if base + at >= start else None), end
        else:
            yield kind, None, end
        at = body + length


def _decode_step(payload: memoryview, names: dict, end: int) -> Step:
    step, wall_time, rewind, n, m = STEP.unpack_from(payload, 0)
    at = STEP.size
    flat = struct.unpack_from(f"<{n}I{n}d", payload, at)
    at += 12 * n
    out = Step(step, wall_time, None if rewind < 0 else rewind, end=end)
    out.scalars = [(*names[i], v) for i, v in zip(flat[:n], flat[n:])]
    heads = [ARRAY.unpack_from(payload, at + ARRAY.size * j) for j in range(m)]
    at += ARRAY.size * m
    for i, length in heads:
        out.arrays.append((*names[i], bytes(payload[at : at + length])))
        at += length
    return out


def read_tail(log_dir: Path, pos: int) -> list[Step] | None:
    """The steps spooled at or after ``pos`` (what SQLite does not hold yet).

    Follows ``R`` frames into later segments. ``None`` when a segment is missing:
    either the writer closed (and removed its spool once SQLite held all of it) or
    the segment was ingested and deleted since ``pos`` was read; the caller reads
    ``pos`` again and retries, and an unchanged ``pos`` means no tail.
    """
    seg, offset = unpack_pos(pos)
    out: list[Step] = []
    while True:
        try:
            with open(segment_path(log_dir, seg), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        names: dict = {}
        rotated = False
        for kind, item, _ in parse(data, offset, names):
            if kind == b"S" and item is not None:
                out.append(item)
            elif kind == b"R":
                rotated = True
        if not rotated:
            return out
        seg, offset = seg + 1, 0


def write_all(fd: int, data: bytes, size: int) -> int:
    """Append ``data`` to the spool file ``fd`` of ``size`` bytes; returns the new size.

    A write that fails part-way is cut off again, so a later frame never follows a
    torn one.
    """
    try:
        written = os.write(fd, data)
        if written != len(data):  # rare for a regular file; finish or fail
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(fd, view):]
    except BaseException:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise
    return size + len(data)
