"""The ``dyndiag`` command line."""

from __future__ import annotations

import sys

import click

__all__ = ["main"]


class _Group(click.Group):
    """One-line errors without a traceback unless ``--debug``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
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
    edge_of_stability, layer_rotation, gradients, scores; PNG and PDF) to OUT.
    """
    from .demo import run_demo

    run_demo(out=out, steps=steps, seed=seed, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
