"""The numeric core on NumPy arrays: finite differences, directions, tolerance table;
and its imports (no framework). tests/test_numeric_array_api.py runs it on torch."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradcheck.numeric
from gradcheck.errors import InvalidArgumentError, NonFiniteError
from gradcheck.numeric import differences as fd
from gradcheck.numeric import directions as dirs
from gradcheck.numeric import tolerance as tl

EPS64 = tl.EPS["float64"]
NUMERIC = pathlib.Path(gradcheck.numeric.__file__).parent
FRAMEWORKS = ("torch", "tensorflow", "keras", "jax")


def phi_of(f):
    return lambda t: (np.float64(f(t)), np.float64(abs(f(t))))


@given(a=st.floats(-3, 3), b=st.floats(0.1, 3), c=st.floats(-2, 2))
def test_richardson_is_accurate_and_its_error_estimate_is_honest(a, b, c):
    def f(t):
        return np.sin(b * (t + a)) * np.exp(c * t)

    exact = b * np.cos(b * a)  # + c*sin(b a) * exp(0)
    exact = exact + c * np.sin(b * a)
    est = fd.richardson(phi_of(f), 1e-3, EPS64, 1e-12, ulps=16)
    assert abs(float(est.value) - exact) <= max(3 * float(est.error), 1e-13)
    assert abs(float(est.value) - exact) < 1e-8


def test_richardson_refines_when_truncation_dominates():
    f = phi_of(lambda t: np.exp(50 * t))
    est = fd.richardson(f, 1e-1, EPS64, 1e-9, ulps=16, max_refinements=6)
    assert abs(float(est.value) - 50.0) < 1e-6
    assert est.step < 1e-2
    assert len(est.curve) >= 3


def test_richardson_works_on_vectors():
    def f(t):
        v = np.array([np.exp(t), t**3, np.cos(t)])
        return v, np.abs(v)

    est = fd.richardson(f, 1e-3, EPS64, 1e-10, ulps=16)
    np.testing.assert_allclose(est.value, [1.0, 0.0, 0.0], atol=1e-9)


def test_richardson_error_is_honest_where_the_function_is_c1_but_not_c2():
    # x|x| (as in i1e at 0): the central difference's error is O(h), not O(h^2),
    # and the h^2 truncation estimate alone under-states it; the disagreement of
    # nested extrapolations covers it
    f = phi_of(lambda t: 0.5 * t - 0.5 * t * abs(t))
    est = fd.richardson(f, 1e-5, EPS64, 1e-14, ulps=16)
    assert abs(float(est.value) - 0.5) <= 3 * float(est.error)


def test_ladder_measures_float32_noise_and_finds_the_derivative():
    def f(t):
        v = np.float32(np.sin(np.float32(1.3) + np.float32(t)))
        return np.float64(v), np.float64(abs(v))

    est = fd.ladder(f, 1e-3)
    assert abs(float(est.value) - np.cos(1.3)) <= 3 * float(est.error) + 1e-6
    assert float(est.error) < 1e-3


def test_one_sided_derivatives_see_kinks():
    fwd, bwd, _ = fd.one_sided(phi_of(lambda t: abs(t) + 2 * t), 1e-4)
    assert float(fwd) == pytest.approx(3.0) and float(bwd) == pytest.approx(1.0)
    fwd, bwd, _ = fd.one_sided(phi_of(lambda t: t**2 + t), 1e-4)
    assert float(fwd) == pytest.approx(float(bwd), abs=1e-8)


def test_non_finite_points_raise():
    with (
        np.errstate(invalid="ignore", divide="ignore"),
        pytest.raises(NonFiniteError, match="domain"),
    ):
        fd.richardson(phi_of(lambda t: np.log(t)), 1e-3, EPS64, 1e-9, ulps=16)


def test_probe_direction_balances_tensors_and_aligns_with_gradient():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((30, 20)) * 1e3, rng.standard_normal(7) * 1e-3]
    d, norms = dirs.probe_direction(grads, rng)
    contrib = [float(np.vdot(g, dd)) for g, dd in zip(grads, d, strict=True)]
    # <g_t, d_t> = N(0,1) + 3 for every tensor with a gradient above the floor,
    # whatever its scale; tensors below the floor contribute proportionally less
    assert 0.5 < contrib[0] < 6
    assert norms[1] == pytest.approx(dirs.FLOOR * norms[0])
    assert all(dd.shape == g.shape for dd, g in zip(d, grads, strict=True))


def test_probe_direction_is_seeded():
    g = [np.ones((4, 4)), np.zeros(3)]
    a, _ = dirs.probe_direction(g, np.random.default_rng(5))
    b, _ = dirs.probe_direction(g, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_cotangents_are_one_for_scalars_and_unit_norm_otherwise():
    cot = dirs.cotangents([(), (1,), (10, 10)], np.random.default_rng(0))
    assert cot[0] == 1.0 and cot[1] == 1.0
    assert np.linalg.norm(cot[2]) == pytest.approx(1.0, rel=0.3)


def test_noise_level_of_long_tables_no_longer_overflows():
    # 1/C(2k, k) came from int64 factorial products, which overflow for k >= 11
    # (tables of 12 or more values): a negative "gamma", sqrt of it, a NaN level and
    # a RuntimeWarning. Python's integers stay exact.
    v = 1.0 + 1e-6 * np.random.default_rng(1).standard_normal(13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        level = fd.noise_level(v)
    assert level is not None and 2e-7 < level < 3e-6


@pytest.mark.parametrize(
    ("spelled", "canonical"),
    [
        ("torch.float32", "float32"),
        (np.float64, "float64"),
        ("<dtype: 'bfloat16'>", "bfloat16"),
        ("torch.half", "float16"),
        ("double", "float64"),
    ],
)
def test_canonical_dtype(spelled, canonical):
    assert tl.canonical_dtype(spelled) == canonical


def test_tolerance_table_is_ordered_by_precision_and_validates():
    order = ["float64", "float32", "float16", "bfloat16"]
    rho = [tl.gradient_rounding(d) for d in order]
    assert rho == sorted(rho)
    for d in order:
        assert tl.GRADIENT_ROUNDING[d] > 10 * tl.EPS[d] or d == "bfloat16"
    with pytest.raises(InvalidArgumentError, match="int32"):
        tl.eps("int32")
    with pytest.raises(InvalidArgumentError):
        tl.gradient_rounding("float32", override=-1.0)
    assert tl.gradient_rounding("float32", override=1e-3) == 1e-3


# ---------------------------------------------------------------------------------
# the numeric core is array-API code: no framework import in gradcheck/numeric


def _imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and (
            getattr(node.func, "attr", None) or getattr(node.func, "id", None)
        ) in ("import_module", "__import__"):
            roots |= {
                a.value.split(".")[0]
                for a in node.args
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            }
    return roots


def test_numeric_core_imports_no_framework():
    files = sorted(NUMERIC.glob("*.py"))
    assert {f.name for f in files} >= {"differences.py", "directions.py", "arrays.py"}
    found = {
        f.name: sorted(_imported_roots(f) & set(FRAMEWORKS))
        for f in files
        if _imported_roots(f) & set(FRAMEWORKS)
    }
    assert not found, f"framework imports in gradcheck/numeric: {found}"
    # what it does import: the standard library, NumPy, array-api-compat, itself
    allowed = {"__future__", "array_api_compat", "numpy", "gradcheck"}
    allowed |= set(sys.stdlib_module_names)
    extra = {f.name: _imported_roots(f) - allowed for f in files}
    assert not any(extra.values()), extra


def test_import_scanner_sees_framework_imports(tmp_path):
    # the static test above can fail: every spelling of a framework import is seen
    src = tmp_path / "bad.py"
    for line in (
        "import torch",
        "import torch.nn as nn",
        "from tensorflow import keras",
        "from jax.numpy import zeros",
        "import importlib\nimportlib.import_module('keras')",
        "__import__('torch')",
    ):
        src.write_text(line + "\n")
        assert _imported_roots(src) & set(FRAMEWORKS), line


def test_running_the_numeric_core_on_numpy_loads_no_framework():
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from gradcheck.numeric import arrays, differences as fd, directions as dirs\n"
        "phi = lambda t: (np.sin(1 + t) * np.ones(3), np.ones(3))\n"
        "fd.richardson(phi, 1e-3, 2.2e-16, 1e-9, ulps=16)\n"
        "fd.ladder(phi, 1e-3); fd.noise_level(np.arange(9.0) ** 2)\n"
        "rng = np.random.default_rng(0)\n"
        "dirs.probe_direction([np.ones((3, 2)), np.zeros(4)], rng)\n"
        "dirs.cotangents([(), (5,)], rng); arrays.vdot(np.ones(3), np.ones(3))\n"
        f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        # NumPy >= 2.1 is its own array-API namespace: array-api-compat's NumPy
        # wrapper (0.4 s of numpy.f2py and numpy.testing imports) stays unloaded
        "if np.lib.NumpyVersion(np.__version__) >= '2.1.0':\n"
        "    bad += [m for m in ('array_api_compat.numpy', 'numpy.f2py')\n"
        "            if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=NUMERIC.parent.parent,
    )
    assert out.returncode == 0, out.stdout + out.stderr
