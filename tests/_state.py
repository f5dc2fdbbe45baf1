"""The global random-number states a check must leave exactly as it found them.

``rng_state()`` captures every global generator a user's code may draw from:
NumPy's legacy ``np.random`` (the whole MT19937 state: key array, position,
cached Gaussian), Python's ``random`` and, where torch is imported, torch's CPU
generator and every CUDA generator. ``assert_same_rng(before)`` compares the
current state with a captured one.

NumPy's key array alone is not enough: it changes once every 624 draws, so a
check that forgot to restore ``np.random`` after a few draws would keep the key
array and only move the position. The position is compared too.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "numpy": (name, np.array(keys, copy=True), int(pos), int(has_gauss), cached),
        "python": random.getstate(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.get_rng_state().clone()
        if torch.cuda.is_available():
            state["torch_cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def assert_same_rng(before: dict[str, Any], after: dict[str, Any] | None = None):
    """Every generator in ``before`` is where it was (``after``: now, by default)."""
    after = rng_state() if after is None else after
    name, keys, pos, has_gauss, cached = before["numpy"]
    name2, keys2, pos2, has_gauss2, cached2 = after["numpy"]
    assert name == name2, "np.random's bit generator changed"
    assert np.array_equal(keys, keys2), "np.random's state (key array) changed"
    assert pos == pos2, f"np.random's position moved: {pos} -> {pos2}"
    assert (has_gauss, cached) == (has_gauss2, cached2), (
        "np.random's cached Gaussian changed"
    )
    assert before["python"] == after["python"], "Python's random state changed"
    if "torch" in before:
        import torch

        assert torch.equal(before["torch"], after["torch"]), "torch's RNG changed"
        for i, (a, b) in enumerate(
            zip(before.get("torch_cuda", []), after.get("torch_cuda", []), strict=True)
        ):
            assert torch.equal(a, b), f"torch's cuda:{i} RNG changed"
