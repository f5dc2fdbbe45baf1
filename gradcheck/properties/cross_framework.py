"""The cross-framework property: one spec, built in PyTorch and in Keras with the same
weights, gives the same losses and the same gradients.

Both builds start from the spec's framework-neutral weights
(:mod:`gradcheck.architectures.weights`); each framework lays them out its own way
(torch's ``Linear.weight`` is the transposed kernel, an LSTM's gates are stacked
differently, torch splits an RNN bias in two). Every layout map is a *gather*: each
framework entry is one neutral entry (or a constant zero). The gradient with respect
to the neutral weights is the adjoint of that gather, a scatter-add, computed exactly
by pushing index arrays through the same functions the builders use
(``torch_params``, ``keras_weights``): whatever a builder does, the comparison
follows, and there is no second copy of the layouts to drift.

Compared, loss by loss (each head and the regularization term): its value, and its
gradient with respect to every neutral parameter, elementwise. Comparing per loss
rather than the total names the head whose definition differs (a Huber delta, a
clipping epsilon, a reduction).

Tolerance: both sides are the frameworks' own arithmetic in the same dtype, each off
from the exact value by its rounding, so the elementwise bound is
``ROUNDING_SIGMAS * rho * (|a| + |b| + FLOOR * max)`` as in the linearity check, with
``rho`` the dtype's gradient rounding. Two Keras float64 activations are not exact
(measured in tests/test_architectures.py): gelu goes through TF's erfc (5e-9 off)
and leaky_relu's slope is cast through float32 (1.2e-8 relative); models using them
get ``rho = 1e-7`` in float64, and so does the regularization term (Keras keeps
``L1L2``'s factors in float32: 0.01 becomes 0.0099999998), and the report says so.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradcheck.architectures import random_batch, tensor_layout
from gradcheck.architectures.spec import REGULARIZATION, ModelSpec
from gradcheck.architectures.weights import parameters
from gradcheck.backends import open_session
from gradcheck.errors import FrameworkNotInstalledError, UnsupportedInputError
from gradcheck.numeric import tolerance as tl
from gradcheck.properties.linearity import FLOOR
from gradcheck.result import CheckReport, Location, TensorResult

__all__ = ["INEXACT_KERAS_FLOAT64", "run"]

#: activations Keras computes with float32-grade error even in float64 (see above)
INEXACT_KERAS_FLOAT64 = {"gelu": 5e-9, "leaky_relu": 1.2e-8}
INEXACT_RHO = 1e-7


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise FrameworkNotInstalledError(
            f"the cross-framework check builds the spec in PyTorch and in Keras; "
            f"{' and '.join(missing)} not installed (pip install 'gradcheck[torch,"
            "tensorflow]')."
        )


def run(
    spec: ModelSpec,
    batch: Mapping[str, Any] | None,
    *,
    dtype: str,
    seed: int,
    rtol: float | None = None,
    builders: tuple[Any, Any] | None = None,
) -> CheckReport:
    """``builders``: (torch builder, Keras builder) replacing ``build_torch`` and
    ``build_keras`` (the audit plants bugs this way)."""
    started = time.perf_counter()
    if not isinstance(spec, ModelSpec):
        raise UnsupportedInputError(
            "check_cross_framework takes a gradcheck.architectures.ModelSpec (one "
            f"description both frameworks build); got {type(spec).__name__}."
        )
    _require("torch", "tensorflow", "keras")
    spec.validate()
    from gradcheck.architectures import build_keras, build_torch

    build_t, build_k = builders or (build_torch, build_keras)
    if batch is None:
        batch = random_batch(spec, 8, seed=seed)
    sides = {}
    noises: dict[str, dict[str, dict[str, float]]] = {}
    cost = {"forward": 0, "backward": 0}
    for fw, build in (("torch", build_t), ("keras", build_k)):
        built = build(spec, dtype)
        fns = built.loss_fns(batch)
        values, grads, noise = {}, {}, {}
        with open_session(fns[next(iter(fns))], (), built.model) as session:
            for name, fn in fns.items():
                label = f"{fw} loss '{name}'"
                v, g = session.value_and_grads(fn, label)
                values[name] = v
                grads[name] = _to_neutral(spec, fw, built.model, session.specs, g)
                noise[name] = _noise(spec, fw, built, session, fn, label, grads[name])
            cost["forward"] += session.forward_count
            cost["backward"] += session.backward_count
        sides[fw] = (values, grads)
        noises[fw] = noise

    inexact = sorted(
        {
            layer.activation
            for _, layer, _ in spec.layers()
            if layer.activation in INEXACT_KERAS_FLOAT64
        }
    )
    (tv, tg), (kv, kg) = sides["torch"], sides["keras"]
    losses = list(tv)
    base = tl.gradient_rounding(dtype, rtol)
    rhos = {n: base for n in losses}
    if dtype == "float64" and rtol is None:
        # Keras float64 is float32-grade in these places (measured; see docstring)
        for n in losses:
            if inexact or n == REGULARIZATION:
                rhos[n] = max(base, INEXACT_RHO)
    tensors: list[TensorResult] = []
    worst = (-1.0, None)
    for name in losses:
        a, b = tv[name], kv[name]
        tol = tl.ROUNDING_SIGMAS * rhos[name] * (abs(a) + abs(b))
        r = _ratio(abs(a - b), tol)
        if r > worst[0]:
            worst = (
                r,
                Location(
                    tensor=name,
                    numerical=b,
                    analytical=a,
                    error=abs(a - b),
                    tolerance=tol,
                    quantity="value (numerical = Keras, analytical = torch)",
                    head=name,
                ),
            )
    for key in tg[losses[0]]:
        worst_t = (-1.0, None)
        for name in losses:
            ga, gb = tg[name][key], kg[name][key]
            mag = np.abs(ga) + np.abs(gb)
            tol = tl.ROUNDING_SIGMAS * rhos[name] * (mag + FLOOR * float(np.max(mag)))
            tol = tol + tl.ROUNDING_SIGMAS * (
                noises["torch"][name][key] + noises["keras"][name][key]
            )
            err = np.abs(ga - gb)
            ratios = np.where(
                tol > 0, err / np.maximum(tol, 1e-300), np.where(err > 0, np.inf, 0.0)
            )
            k = int(np.argmax(ratios))
            r = float(ratios.reshape(-1)[k])
            if r > worst_t[0]:
                idx = tuple(int(i) for i in np.unravel_index(k, ga.shape))
                worst_t = (
                    r,
                    Location(
                        tensor=key,
                        index=idx,
                        numerical=float(gb.reshape(-1)[k]),
                        analytical=float(ga.reshape(-1)[k]),
                        error=float(err.reshape(-1)[k]),
                        tolerance=float(tol.reshape(-1)[k]),
                        quantity="gradient (numerical = Keras, analytical = torch)",
                        head=name,
                    ),
                )
        r, loc = worst_t
        total = sum(spec.weights.get(n, 1.0) * tg[n][key] for n in losses)
        tensors.append(
            TensorResult(
                name=key,
                shape=tuple(tg[losses[0]][key].shape),
                dtype=dtype,
                device="cpu",
                kind="parameter",
                grad_norm=float(np.linalg.norm(total)),
                analytical=loc.analytical,
                numerical=loc.numerical,
                error=loc.error,
                tolerance=loc.tolerance,
                status="passed" if r <= 1 else "mismatch",
            )
        )
        if r > worst[0]:
            worst = (r, loc)
    ratio, loc = worst
    report = CheckReport(
        property="cross_framework",
        status="passed" if ratio <= 1 else "mismatch",
        framework="torch vs keras",
        device="cpu",
        dtype=dtype,
        seed=seed,
        mode="analytic",
        error=loc.error or 0.0,
        tolerance=loc.tolerance or 0.0,
        tolerance_reason=(
            f"per element and loss: {tl.ROUNDING_SIGMAS:g} x gradient rounding ("
            + ", ".join(f"'{n}' {r:.0e}" for n, r in rhos.items())
            + f") x (|torch| + |Keras| + {FLOOR:g} x the tensor's largest)"
            + (
                "; Keras float64 is float32-grade for "
                + ", ".join(
                    inexact + ["regularizer factors"] * (REGULARIZATION in losses)
                )
                if any(r > base for r in rhos.values())
                else ""
            )
        ),
        tensors=tensors,
        location=None if ratio <= 1 else loc,
        notes=[
            f"losses compared: {', '.join(losses)}; gradients mapped to the spec's "
            "neutral weight layout (layer/param)."
        ],
        cost={**cost, "seconds": time.perf_counter() - started},
    )
    if not report.passed:
        report.notes.append(
            f"the '{loc.head}' loss differs between the frameworks at "
            f"{loc.describe()}: torch {loc.analytical:.9e}, Keras {loc.numerical:.9e}. "
            "Either the two builds are not the same model (a layer's definition, an "
            "epsilon, a reduction) or one framework computes it wrong; the spec's "
            "code (spec.to_code('torch') / to_code('keras')) reproduces both."
        )
    return report


#: loss scales for the rounding measurement (see linearity.rounding_noise)
NOISE_SCALES = (0.7, 1.3)


def _noise(
    spec: ModelSpec,
    fw: str,
    built: Any,
    session: Any,
    fn: Any,
    label: str,
    base: dict[str, np.ndarray],
) -> dict[str, float]:
    """Per neutral tensor: the largest change of this loss's gradient when the loss
    is scaled by c and the gradient divided by c again (exact in real arithmetic;
    the spread is the backward's rounding at the scale of the cotangents inside
    it). A constant L1 penalty on a softmax has a gradient of pure rounding,
    ~1e-11 in float32, which no tolerance scaled by the gradients themselves
    covers (found by benchmarks/false_alarms.py)."""
    out = dict.fromkeys(base, 0.0)
    for c in NOISE_SCALES:
        _, g = session.value_and_grads(lambda fn=fn, c=c: fn() * c, label)
        scaled = _to_neutral(spec, fw, built.model, session.specs, g)
        for key, g0 in base.items():
            spread = np.abs(scaled[key] / c - g0)
            out[key] = max(out[key], float(np.max(spread, initial=0.0)))
    return out


def _ratio(err: float, tol: float) -> float:
    if tol > 0:
        return err / tol
    return math.inf if err > 0 else 0.0


def _index_maps(
    spec: ModelSpec, framework: str, model: Any
) -> dict[str, tuple[str, np.ndarray]]:
    """Framework tensor name -> (layer, int array of 1-based indices into the
    layer's flattened neutral parameters; 0 where the entry is a constant)."""
    kinds = {name: layer.kind for name, layer, _ in spec.layers()}
    by_layer: dict[str, list] = {}
    for p in parameters(spec):
        by_layer.setdefault(p.layer, []).append(p)
    out: dict[str, tuple[str, np.ndarray]] = {}
    for layer, params in by_layer.items():
        neutral, offset = {}, 1
        for p in params:
            size = int(np.prod(p.shape, dtype=np.int64))
            neutral[p.name] = np.arange(
                offset, offset + size, dtype=np.float64
            ).reshape(p.shape)
            offset += size
        for name, idx in tensor_layout(framework, model, layer, kinds[layer], neutral):
            out[name] = (layer, np.asarray(idx).astype(np.int64))
    return out


def _to_neutral(
    spec: ModelSpec,
    framework: str,
    model: Any,
    specs: list[Any],
    grads: list[np.ndarray | None],
) -> dict[str, np.ndarray]:
    """Per-framework gradients -> ``{"layer/param": gradient}`` in neutral layout."""
    maps = _index_maps(spec, framework, model)
    sizes: dict[str, list] = {}
    for p in parameters(spec):
        sizes.setdefault(p.layer, []).append(p)
    flat = {
        layer: np.zeros(sum(int(np.prod(p.shape, dtype=np.int64)) for p in ps))
        for layer, ps in sizes.items()
    }
    for s, g in zip(specs, grads, strict=True):
        if s.name not in maps:
            raise UnsupportedInputError(
                f"{framework} model has a tensor '{s.name}' the spec does not describe."
            )
        if g is None:
            continue
        layer, idx = maps[s.name]
        mask = idx.reshape(-1) > 0
        np.add.at(flat[layer], idx.reshape(-1)[mask] - 1, g.reshape(-1)[mask])
    out: dict[str, np.ndarray] = {}
    for layer, ps in sizes.items():
        offset = 0
        for p in ps:
            size = int(np.prod(p.shape, dtype=np.int64))
            out[p.key] = flat[layer][offset : offset + size].reshape(p.shape)
            offset += size
    return out
