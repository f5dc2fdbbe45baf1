"""Speed paths of the engine (issues 12 and 17): one host BLAS thread during a
check, float64 shadows of a model kept across checks until its parameters change,
and the probe direction built with fewer full-size temporaries. Each must leave
verdicts, determinism per seed and the user's state exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest

import gradcheck
from gradcheck import _blas


def test_blas_single_threaded_inside_and_restored_after():
    before = _blas.threads()
    if before is None:
        pytest.skip("NumPy loaded no OpenBLAS here")
    with _blas.single_threaded():
        assert _blas.threads() == 1
        with _blas.single_threaded():  # nested: the outer block's count survives
            assert _blas.threads() == 1
        assert _blas.threads() == 1
    assert _blas.threads() == before


def test_blas_count_restored_when_the_block_raises():
    before = _blas.threads()
    if before is None:
        pytest.skip("NumPy loaded no OpenBLAS here")
    with pytest.raises(RuntimeError), _blas.single_threaded():
        raise RuntimeError("boom")
    assert _blas.threads() == before


def test_a_check_runs_with_one_blas_thread_and_restores_the_count():
    torch = pytest.importorskip("torch")
    before = _blas.threads()
    if before is None:
        pytest.skip("NumPy loaded no OpenBLAS here")
    seen = []
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))

    def fn():
        seen.append(_blas.threads())
        return (w.sin() ** 2).sum()

    assert gradcheck.check_gradients(fn, params=[w]).passed
    assert seen and set(seen) == {1}
    assert _blas.threads() == before
    np.dot(np.ones(3), np.ones(3))  # NumPy still works after the restore
