"""Examples run end to end and reproduce their qualitative findings."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_hessian_spectrum_has_c_minus_1_outliers_at_init_and_contracts(tmp_path):
    found = _load("hessian_spectrum").main(steps=400, out=str(tmp_path))  # the documented default
    assert found["initialisation"]["outliers"] == 9  # C - 1 for the 10 digit classes
    assert found["trained"]["top"][0] < found["initialisation"]["top"][0] / 3
    assert found["trained"]["trace"] < found["initialisation"]["trace"] / 3
    assert (tmp_path / "hessian_spectrum.png").stat().st_size > 10_000
