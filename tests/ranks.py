"""Run a test body on 2 gloo ranks (CPU processes) and collect what each rank saved."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, out_dir: str, body, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.save(body(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks past their last collective before either tears gloo down: without
        # it a rank's exit while the other's last transfer completes can abort (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def on_ranks(body, tmp_path, *args, world: int = 2) -> list:
    """``[body(rank, *args) for each rank]``, each run in its own process of a gloo
    group (``body`` must be a module-level function; its result is saved with torch)."""
    # Forked, not spawned: a spawned child imports torch and dyndiag again, which on a
    # busy machine took longer than the test's work.
    mp.start_processes(
        _entry, args=(world, str(tmp_path / "init"), str(tmp_path), body, args), nprocs=world, join=True,
        start_method="fork",
    )
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
