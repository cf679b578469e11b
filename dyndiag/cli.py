"""The ``dyndiag`` command line: ``demo``, ``analyze``, ``plot``, ``tensorboard``, ``landscape``.

Errors are one line on stderr (``dyndiag: error: ...``) with a non-zero exit and
no traceback unless ``--debug``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import click

__all__ = ["main"]


class _Group(click.Group):
    """One-line errors without a traceback unless ``--debug``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as err:  # bad options: one line too, naming the option
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"dyndiag: error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except Exception as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"dyndiag: error: {err}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="dyndiag")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """dyndiag: training-dynamics diagnostics for PyTorch."""
    ctx.obj = {"debug": debug}


@main.command()
@click.option("--out", default="dyndiag-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for records and figures.")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=0),
              help="SGD steps before the curvature is measured.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for data split, init and batches.")
def demo(out: str, steps: int, seed: int) -> None:
    """Train an MLP on scikit-learn's digits under a Monitor with every probe.

    Records go to OUT/records (read them with dyndiag.load_records). Then prints
    the top-5 eigenvalues (Lanczos), the trace (Hutch++) and the spectral
    density's trace estimate (SLQ) with Hessian-vector-product counts and times,
    and writes curvature.json and figures (spectrum, 2-D landscape,
    edge_of_stability, layer_rotation, coherence, gradients, dynamics, scores;
    PNG and PDF) to OUT.
    """
    from .demo import run_demo

    run_demo(out=out, steps=steps, seed=seed, echo=click.echo)



# -- offline analysis ------------------------------------------------------------

LOSSES = {"cross_entropy": "CrossEntropyLoss", "mse": "MSELoss", "nll": "NLLLoss", "bce_logits": "BCEWithLogitsLoss"}
DEFAULT_PROBES = "hessian_spectrum,gradient_norm,layer_rotation,softmax_collapse"


def _probe_table(data, top_k: int, density: bool) -> dict:
    from . import probes as P

    return {
        "hessian_spectrum": lambda: P.HessianSpectrum(k=top_k, density=density),
        "edge_of_stability": lambda: P.EdgeOfStability(),
        "subspace_overlap": lambda: P.SubspaceOverlap(k=top_k),
        "gradient_norm": lambda: P.GradientNorm(per_layer=True),
        "gradient_coherence": lambda: P.GradientCoherence(),
        "layer_rotation": lambda: P.LayerRotation(),
        "softmax_collapse": lambda: P.SoftmaxCollapse(),
        "data_scores": lambda: P.DataScores(data),
        "directional_sharpness": lambda: P.DirectionalSharpness(),
        "safe_step_radius": lambda: P.SafeStepRadius(),
    }


#: The probes `analyze --probes` takes, by record name (keys of _probe_table).
PROBE_NAMES = (
    "hessian_spectrum", "edge_of_stability", "subspace_overlap", "gradient_norm", "gradient_coherence",
    "layer_rotation", "softmax_collapse", "data_scores", "directional_sharpness", "safe_step_radius",
)


def _loss(spec: str):
    from torch import nn

    from ._imports import resolve

    if spec in LOSSES:
        return getattr(nn, LOSSES[spec])()
    if ":" not in spec:
        raise ValueError(f"--loss must be one of {sorted(LOSSES)} or MODULE:NAME, got {spec!r}")
    obj = resolve(spec, "--loss")
    if isinstance(obj, type):  # a criterion class such as mypkg:FocalLoss
        obj = obj()
    if not callable(obj):
        raise ValueError(f"--loss: {spec!r} is not callable")
    return obj


def _model_factory(spec: str):
    from torch import nn

    from ._imports import resolve
    from .evaluation import unwrap

    factory = resolve(spec, "--model")
    if isinstance(factory, nn.Module):
        raise ValueError(f"--model must name a factory returning a fresh model, not a module instance ({spec!r})")
    if not callable(factory):
        raise ValueError(f"--model: {spec!r} is not callable")

    def build():
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model: {spec}() returned a {type(model).__name__}, not a torch.nn.Module")
        return unwrap(model)  # checkpoints load into the module inside torch.compile/DDP

    return build


def _data(spec: str):
    from ._imports import resolve

    fn = resolve(spec, "--data")
    data = fn() if callable(fn) else fn
    if data is None:
        raise ValueError(f"--data: {spec} returned None; it must return a batch (inputs, targets) or a list of batches")
    return data


def _checkpoint_paths(checkpoints: tuple[str, ...]) -> list[Path]:
    if not checkpoints:
        raise click.UsageError("give at least one CHECKPOINT")
    return [Path(c) for c in checkpoints]  # missing files are reported one by one, the rest go on


common_model_options = [
    click.option("--model", "model_spec", required=True, metavar="MOD:FACTORY",
                 help="Import string of a function returning a fresh model, e.g. mypkg.models:make_model "
                      "or models.py:make_model."),
    click.option("--data", "data_spec", required=True, metavar="MOD:FN",
                 help="Import string of a function returning the data to measure on: a batch (inputs, "
                      "targets) or a list/DataLoader of batches."),
    click.option("--loss", "loss_spec", default="cross_entropy", show_default=True,
                 help=f"Criterion: one of {', '.join(sorted(LOSSES))}, or MOD:NAME of a criterion (class or callable)."),
    click.option("--trust-checkpoint", is_flag=True,
                 help="Allow checkpoints that hold arbitrary pickled objects (unpickling can run code: "
                      "only for files you trust). By default they load with weights_only=True."),
]


def _with(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@main.command()
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=str))
@_with(common_model_options)
@click.option("--probes", "probe_spec", default=DEFAULT_PROBES, show_default=True,
              help=f"Comma-separated probe names (record names): {', '.join(PROBE_NAMES)}.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder: records go to OUT/records (dyndiag.load_records); a re-run computes only the "
                   "probes a checkpoint has no records of.")
@click.option("--optimizer", "opt_name", type=click.Choice(["sgd", "adam", "adamw"]), default="sgd",
              show_default=True,
              help="The run's optimizer, for edge_of_stability's threshold (and Adam's preconditioned "
                   "sharpness). A checkpoint's own optimizer state is used when it carries one.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate of the run, for checkpoints without optimizer state (edge_of_stability "
                   "needs it there).")
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="SGD's momentum, for checkpoints without optimizer state (threshold (2+2*momentum)/lr) "
                   "[default: 0].")
@click.option("--nesterov", is_flag=True,
              help="SGD with Nesterov momentum, for checkpoints without optimizer state (needs --momentum).")
@click.option("--dampening", type=click.FloatRange(0, 1), default=None,
              help="SGD's momentum dampening, for checkpoints without optimizer state [default: 0].")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
              help="The optimizer's weight decay, for checkpoints without optimizer state [default: 0]; "
                   "SGD's lowers the threshold by it.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Eigenvalues for hessian_spectrum; eigenspace size for subspace_overlap.")
@click.option("--density", is_flag=True, help="hessian_spectrum also records its SLQ spectral density.")
@click.option("--train-mode", is_flag=True,
              help="Evaluate in train mode (BatchNorm batch statistics) instead of eval mode.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def analyze(checkpoints, model_spec, data_spec, loss_spec, trust_checkpoint, probe_spec, out, opt_name, lr,
            momentum, nesterov, dampening, weight_decay, top_k, density, train_mode, progress) -> None:
    """Run probes on saved checkpoints and write their records.

    CHECKPOINT is a state_dict file, a training checkpoint holding one under
    state_dict / model_state_dict / model (Lightning's .ckpt included; wrapper
    prefixes such as model. or module. are stripped), or a Hugging Face
    checkpoint-N/ directory. Its step is the last integer in its name
    (model_step_120.pt -> 120), else its position. A checkpoint's optimizer
    state (Lightning's, a training dict's, a Hugging Face optimizer.pt) gives
    edge_of_stability the run's learning rate and Adam's moments; without one,
    --lr (and --optimizer, --momentum, --nesterov, --dampening, --weight-decay)
    must say them. Update probes
    (directional_sharpness, safe_step_radius) use the displacement to the next
    checkpoint. A checkpoint that fails is reported and the others go on (exit
    status 1 at the end). A re-run into the same OUT computes the probes a
    checkpoint has no records of (other --probes, new checkpoints) and keeps
    the rest.
    """
    from .analysis import OptimizerStateMissing
    from .analysis import analyze as run_analysis

    paths = _checkpoint_paths(checkpoints)
    optimizer = _optimizer(opt_name, lr, momentum, nesterov, dampening, weight_decay)
    names = [n.strip() for n in probe_spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROBE_NAMES]
    if unknown or not names:
        raise click.BadParameter(f"unknown probe {unknown[0] if unknown else probe_spec!r}; choose from "
                                 f"{', '.join(PROBE_NAMES)}", param_hint="'--probes'")
    build = _model_factory(model_spec)
    data = _data(data_spec)
    loss_fn = _loss(loss_spec)
    table = _probe_table(data, top_k, density)
    probes = [table[n]() for n in names]
    if lr is None and "edge_of_stability" not in names:
        optimizer = None  # only edge_of_stability reads it
    failures = []

    def report(path, err):
        failures.append(path)
        if isinstance(err, OptimizerStateMissing):  # the class given without --lr
            click.echo(f"dyndiag: checkpoint {str(path)!r} skipped: --lr is required for edge_of_stability on "
                       f"checkpoints without optimizer state (--lr and --optimizer, --momentum, ... give the "
                       "run's)", err=True)
            return
        click.echo(f"dyndiag: checkpoint {str(path)!r} skipped: {type(err).__name__}: {err}", err=True)

    result = run_analysis(paths, build, probes, data, Path(out) / "records", loss_fn, optimizer=optimizer,
                          train_mode=train_mode, trust=trust_checkpoint, progress=progress, on_error=report)
    click.echo(f"analysed {len(result['analysed'])} checkpoint(s), skipped {len(result['skipped'])} already "
               f"analysed, {len(result['failed'])} failed; records in {result.log_dir}")
    if result["analysed"]:
        _summary(result.log_dir, result["analysed"])
    if failures:
        raise click.ClickException(f"{len(failures)} of {len(paths)} checkpoints failed (see above)")


def _optimizer(name: str, lr, momentum, nesterov, dampening, weight_decay):
    """What ``analyze(optimizer=)`` takes: a callable building the run's optimizer from the
    options (read, never stepped; a checkpoint's own state replaces its hyper-parameters),
    or without ``--lr`` the class, for checkpoints that carry their optimizer state."""
    import torch

    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    sgd_only = {"--momentum": momentum, "--nesterov": nesterov or None, "--dampening": dampening}
    given = [option for option, value in sgd_only.items() if value is not None]
    if name != "sgd" and given:
        raise click.UsageError(f"{given[0]} is an SGD option; the run's optimizer is --optimizer {name}")
    if nesterov and not (momentum or 0) > 0:
        raise click.UsageError("--nesterov needs --momentum > 0")
    if nesterov and dampening:
        raise click.UsageError("--nesterov needs --dampening 0 (torch's SGD refuses both)")
    if lr is None:
        given += ["--weight-decay"] * (weight_decay is not None)
        if given:
            raise click.UsageError(f"{given[0]} describes the run's optimizer with --lr, for checkpoints "
                                   "without optimizer state; give --lr too")
        return cls
    hyper = {"lr": lr, "weight_decay": weight_decay or 0.0}
    if name == "sgd":
        hyper.update(momentum=momentum or 0.0, dampening=dampening or 0.0, nesterov=bool(nesterov))
    return lambda params: cls(params, **hyper)


def _summary(log_dir: Path, steps: list[int]) -> None:
    from .records import load_records

    df = load_records(log_dir)
    df = df[df.step.isin(steps)]
    main_rows = df[(df.key == "") | (df.key == "0") | (df.key == "mean")]
    table = main_rows.pivot_table(index="step", columns="metric", values="value", aggfunc="first")
    if not table.empty:
        click.echo(table.to_string(float_format=lambda v: f"{v:.4g}"))


# -- figures -------------------------------------------------------------------------

@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the figures.")
@click.option("--format", "formats", default="pdf,png", show_default=True,
              help="Comma-separated file formats (pdf, png, svg, ...).")
@click.option("--style", "style_name", type=click.Choice(["paper", "talk", "notebook"]), default="paper",
              show_default=True, help="Figure style (sizes and fonts).")
@click.option("--dpi", type=click.IntRange(min=10), default=300, show_default=True, help="Resolution of raster formats.")
def plot(run_dir, out, formats, style_name, dpi) -> None:
    """Draw every figure a run's records support.

    RUN_DIR is a record folder (holding records.sqlite) or a run folder holding
    records/ (what `dyndiag demo` and `dyndiag analyze` write). Figures:
    edge_of_stability, spectrum, layer_rotation, coherence, gradients,
    dynamics, scores — those the records hold.
    """
    from . import plot as dplot
    from .plot.runs import run_figures

    records = _records_dir(Path(run_dir))
    fmts = _formats(formats)
    with dplot.style(style_name):
        figures = run_figures(records)
        if not figures:
            raise click.ClickException(f"{records} holds no records to draw")
        paths = [p for name, fig in figures.items() for p in dplot.save(fig, Path(out) / name, formats=fmts, dpi=dpi)]
    click.echo(f"wrote {len(paths)} file(s): {', '.join(str(p) for p in paths)}")


def _formats(formats: str) -> tuple[str, ...]:
    """``--format pdf,png`` as a tuple; at least one."""
    fmts = tuple(f.strip().lower() for f in formats.split(",") if f.strip())
    if not fmts:
        raise click.BadParameter("give at least one format", param_hint="'--format'")
    return fmts


def _records_dir(run_dir: Path) -> Path:
    for candidate in (run_dir, run_dir / "records"):
        if (candidate / "records.sqlite").is_file():
            return candidate
    raise click.BadParameter(f"{str(run_dir)!r} holds no records.sqlite (nor records/records.sqlite)",
                             param_hint="'RUN_DIR'")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="TensorBoard log folder [default: the record folder's tensorboard/].")
def tensorboard(run_dir, out) -> None:
    """Export a run's scalar records as TensorBoard scalars (tags probe/metric[/key]).

    RUN_DIR is a record folder or a run folder holding records/. Re-exporting
    replaces the previous export. Needs `pip install dyndiag[tensorboard]`.
    """
    from .integrations.tensorboard import export_scalars

    path = export_scalars(_records_dir(Path(run_dir)), out)
    click.echo(f"wrote TensorBoard scalars to {path} (view: tensorboard --logdir {path})")


# -- landscapes ------------------------------------------------------------------------

@main.command()
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=str))
@_with(common_model_options)
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for landscape.jsonl (resumable points), landscape.csv and the figure.")
@click.option("--directions", "kind", type=click.Choice(["random", "hessian", "trajectory"]), default="random",
              show_default=True,
              help="random: filter-normalised random directions; hessian: top eigenvectors of the Hessian on "
                   "--data; trajectory: PCA of the checkpoints' path (needs 3 or more for 2-D).")
@click.option("--dims", type=click.IntRange(1, 2), default=2, show_default=True, help="1-D line or 2-D surface.")
@click.option("--extent", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Grid half-width in direction units [default: 1.0; trajectory: 1.2 x the path's reach].")
@click.option("--resolution", type=click.IntRange(min=2), default=21, show_default=True, help="Points per direction.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random directions.")
@click.option("--batch-points", default="auto", show_default=True,
              help="Grid points evaluated together: 'auto', a number, or 1 for one point at a time "
                   "(see surface(batch_points=) in docs/landscapes.md).")
@click.option("--format", "formats", default="pdf,png", show_default=True, help="Comma-separated figure formats.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the model runs; cuda: the current GPU, under torchrun the rank's (LOCAL_RANK).")
@click.option("--data-parallel", is_flag=True,
              help="Under torchrun: --data returns this rank's shard and every point's loss is averaged over "
                   "the shards of all ranks. Default: every rank gets the same --data and evaluates its share "
                   "of the grid points.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def landscape(checkpoints, model_spec, data_spec, loss_spec, trust_checkpoint, out, kind, dims, extent,
              resolution, seed, batch_points, formats, device, data_parallel, progress) -> None:
    """Loss landscape around the last CHECKPOINT (in step order).

    Grid points are stored in OUT/landscape.jsonl as they are evaluated; a re-run
    with the same settings resumes and skips finished points. Writes
    OUT/landscape.csv (x[, y], loss) and the figure (with the training path drawn
    on it for trajectory directions).

    Under torchrun (torchrun --nproc-per-node N -m dyndiag landscape ...) the
    ranks share the grid (or, with --data-parallel, the data) through a process
    group the command starts (gloo on the cpu, nccl with --device cuda); rank 0
    writes OUT and prints.
    """
    with _torchrun_group(device) as where:
        _landscape(checkpoints, model_spec, data_spec, loss_spec, trust_checkpoint, out, kind, dims, extent,
                   resolution, seed, batch_points, formats, where, data_parallel, progress)


@contextlib.contextmanager
def _torchrun_group(device: str) -> Iterator:
    """The ``torch.device`` to run on, inside a process group when torchrun started this
    process (its ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set and
    no group exists yet): nccl on ``cuda`` (this rank's GPU, ``LOCAL_RANK``), gloo on the
    cpu; destroyed on the way out."""
    import os

    import torch
    import torch.distributed as dist

    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available", param_hint="'--device'")
    launched = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    start = launched and dist.is_available() and not dist.is_initialized()
    if device == "cuda" and launched:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    where = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    if start:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        yield where
        if start:
            dist.barrier()  # every rank past its last collective before the group goes
    finally:
        if start:
            dist.destroy_process_group()


def _landscape(checkpoints, model_spec, data_spec, loss_spec, trust_checkpoint, out, kind, dims, extent,
               resolution, seed, batch_points, formats, device, data_parallel, progress) -> None:
    from . import plot as dplot
    from .checkpoints import load_checkpoint, match_state_dict, sort_checkpoints
    from .distributed import is_writer, world_size
    from .curvature.operators import HessianOperator
    from .landscape import eigen_directions, random_directions, surface, trajectory_directions

    paths = _checkpoint_paths(checkpoints)
    if kind == "trajectory" and len(paths) < dims + 1:
        raise click.BadParameter(f"trajectory directions in {dims}-D need at least {dims + 1} checkpoints, "
                                 f"got {len(paths)}", param_hint="'--directions'")
    fmts = _formats(formats)
    build = _model_factory(model_spec)
    data = _data(data_spec)
    loss_fn = _loss(loss_spec)
    ordered = sort_checkpoints(paths)
    model = build()
    model.eval()
    states = []
    for step, path in ordered if kind == "trajectory" else ordered[-1:]:
        states.append(match_state_dict(load_checkpoint(path, trust=trust_checkpoint).state_dict, model))
    model.load_state_dict(states[-1])
    model.to(device)
    trajectory = None
    if kind == "random":
        dirs = random_directions(model, n=dims, normalization="filter", seed=seed)
    elif kind == "hessian":
        dirs = eigen_directions(HessianOperator(model, loss_fn, data), k=dims, seed=seed)
    else:
        dirs = trajectory = trajectory_directions(states, n=dims, params_of=model)
        if is_writer():
            click.echo("trajectory PCA explained variance: "
                       + ", ".join(f"{v:.3f}" for v in trajectory.explained_variance))
    if extent is None:
        extent = trajectory.extent() if trajectory is not None else 1.0
    out = Path(out)
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
    if batch_points != "auto":
        try:
            batch_points = int(batch_points)
        except ValueError:
            raise click.BadParameter(f"must be 'auto' or a whole number, got {batch_points!r}",
                                     param_hint="--batch-points") from None
        if batch_points < 0:
            raise click.BadParameter(f"must be 'auto' or a whole number >= 0, got {batch_points}",
                                     param_hint="--batch-points")
    surf = surface(model, loss_fn, data, dirs, extent=extent, resolution=resolution, path=out / "landscape.jsonl",
                   batch_points=batch_points, data_parallel=data_parallel, progress=progress)
    if not is_writer():
        return
    surf.to_dataframe().to_csv(out / "landscape.csv", index=False)
    labels = {"random": ("random direction 1", "random direction 2"),
              "hessian": ("Hessian eigenvector 1", "Hessian eigenvector 2"),
              "trajectory": ("PC 1", "PC 2")}[kind]
    with dplot.style("paper"):
        fig = dplot.landscape(surf, trajectory=trajectory, labels=labels)  # 1-D: the label only
        saved = dplot.save(fig, out / "landscape", formats=fmts)
    how = {0: "all points read back from landscape.jsonl", 1: "one point at a time"}.get(
        surf.batch_points, f"{surf.batch_points} points at a time")
    if world_size() > 1:
        how += f"; {world_size()} ranks, " + ("data shards averaged" if data_parallel else "grid split")
    click.echo(f"{'x'.join([str(resolution)] * dims)} grid around step {ordered[-1][0]} ({how}): loss "
               f"{surf.values.min():.4g} .. {surf.values.max():.4g}; wrote {out / 'landscape.csv'}, "
               + ", ".join(str(p) for p in saved))


if __name__ == "__main__":  # pragma: no cover
    main()
