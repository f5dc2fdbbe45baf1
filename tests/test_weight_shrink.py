"""check_model's loss-weight shrinking: a failing check's weights are shrunk by
Hypothesis to the simplest set that still fails, and the report says so.

The planted bug sits on the ``main`` head's path only: the model's output has a
block ``(p - q) * h`` that is exactly 0 at its weights (p == q), behind an
identity whose backward scales the gradient by 1.01. The ``aux`` head (the mean
square of the output) sends exactly 0 into that block (2 * 0 / n), so only a
non-zero ``main`` weight carries the bug: the shrink must end on main != 0,
aux = 0, and that set must fail again when checked with those weights.
"""

from __future__ import annotations

import json
import time

import pytest

from gradcheck import models
from gradcheck.cli import main
from tests._state import assert_same_rng, rng_state

torch = pytest.importorskip("torch")

HERE = "tests.test_weight_shrink"


class ScaledBackward(torch.autograd.Function):
    """The identity; its backward scales the gradient by 1.01 (the planted bug)."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


class MainPathBug(torch.nn.Module):
    def __init__(self, planted: bool = True):
        super().__init__()
        self.body = torch.nn.Linear(4, 6)
        self.p = torch.nn.Parameter(torch.ones(6))
        self.q = torch.nn.Parameter(torch.ones(6))
        self.planted = planted

    def forward(self, x):
        h = torch.tanh(self.body(x))
        block = (self.p - self.q) * h  # 0 here: aux's gradient into it is 0
        if self.planted:
            block = ScaledBackward.apply(block)
        return torch.cat([h, block], dim=-1)


def _build(planted: bool):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MainPathBug(planted), torch.randn(5, 4)


class NonlinearBackward(torch.autograd.Function):
    """The identity; its backward adds 0.1 |g|: positively homogeneous, so one
    head alone (any weight >= 0) is self-consistent, but not additive: the
    gradient of a sum of two heads is not the sum of their gradients."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g + 0.1 * g.abs()


class MixingBug(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 6)

    def forward(self, x):
        return NonlinearBackward.apply(torch.tanh(self.body(x)))


def mixing_bug():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MixingBug(), torch.randn(5, 4)


def planted_main_path():
    return _build(True)


def correct_main_path():
    return _build(False)


def test_a_planted_bug_is_shrunk_to_main_alone_and_the_shrunk_set_fails_again():
    before = rng_state()
    (fd,) = models.check_model(f"{HERE}:planted_main_path", properties="fd")
    assert_same_rng(before)  # Hypothesis' search leaves the user's RNGs alone
    assert fd.status == "mismatch", fd.message()
    drawn = models.draw_weights(0)
    assert drawn["aux"] != 0
    (note,) = [n for n in fd.notes if n.startswith("fails with weights")]
    assert note.startswith("fails with weights main=1.0, aux=0.0 (shrunk from ")
    assert f"main={drawn['main']!r}, aux={drawn['aux']!r}" in note
    assert "the 'main' head alone fails" in note
    assert "aux alone passes (main=0.0, aux=1.0)" in note
    assert "the error shows through main's head only" in note
    checks = fd.cost["shrink_checks"]
    assert 1 <= checks <= models.SHRINK_MAX_CHECKS
    assert f"in {int(checks)} checks" in note
    # carried like every other fact: the message, the row, the JSON
    assert note in fd.message()
    assert note in models.row(fd)["message"]
    assert note in json.dumps(fd.to_dict())

    # the printed set, replayed with those weights, fails again; with main off
    # (aux alone) it passes: the note's claims are what the checks say
    (again,) = models.check_model(
        f"{HERE}:planted_main_path",
        properties="fd",
        weights={"main": 1.0, "aux": 0.0},
        shrink=False,
    )
    assert again.status == "mismatch", again.message()
    assert not any(n.startswith("fails with weights") for n in again.notes)
    (aux_alone,) = models.check_model(
        f"{HERE}:planted_main_path",
        properties="fd",
        weights={"main": 0.0, "aux": 1.0},
    )
    assert aux_alone.status == "passed", aux_alone.message()


def test_a_linearity_bug_that_needs_both_heads_shrinks_to_both_at_1():
    (lin,) = models.check_model(f"{HERE}:mixing_bug", properties="linearity")
    assert lin.status == "mismatch", lin.message()
    (note,) = [n for n in lin.notes if n.startswith("fails with weights")]
    assert note.startswith("fails with weights main=1.0, aux=1.0 (shrunk from ")
    # what each head alone did, where the shrink ran it: both passed
    assert "each head alone passes (main=" in note
    assert "it fails only with the heads together" in note
    (again,) = models.check_model(
        f"{HERE}:mixing_bug",
        properties="linearity",
        weights={"main": 1.0, "aux": 1.0},
        shrink=False,
    )
    assert again.status == "mismatch"
    for alone in ({"main": 2.0, "aux": 0.0}, {"main": 0.0, "aux": 0.5}):
        (one,) = models.check_model(
            f"{HERE}:mixing_bug", properties="linearity", weights=alone
        )
        assert one.passed, one.message()


def test_a_user_model_is_bit_identical_after_a_failing_check_and_its_shrink():
    from tests.test_torch_state import assert_same, snapshot

    model, x = planted_main_path()
    model.train()
    model.body.training = False  # mixed flags come back as they were
    model.p.grad = torch.full_like(model.p, 7.0)  # a stale .grad stays
    torch.randn(3)  # the RNG somewhere in its stream
    before = snapshot(model)
    for dtype in ("float32", "float64"):
        (fd,) = models.check_model(model, inputs=x, properties="fd", dtype=dtype)
        assert fd.status == "mismatch" and fd.cost["shrink_checks"] >= 1, dtype
        assert_same(before, model)


def test_a_correct_model_never_shrinks(monkeypatch):
    calls = []
    real = models.shrink_weights
    monkeypatch.setattr(
        models, "shrink_weights", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    reports = models.check_model(
        f"{HERE}:correct_main_path", properties="fd,linearity,locality"
    )
    assert [r.status for r in reports] == ["passed"] * 3, reports[0].message()
    assert not calls
    for report in reports:
        assert "shrink_checks" not in report.cost
        assert not any("fails with weights" in n for n in report.notes)


def test_statuses_without_a_weight_verdict_do_not_shrink(monkeypatch):
    # an error (the model's forward raises in float64) reached no verdict
    calls = []
    monkeypatch.setattr(models, "shrink_weights", lambda *a, **k: calls.append(a))
    (err,) = models.check_model(
        "tests.test_check_model:float64_fails", properties="fd", dtype="float64"
    )
    assert err.status == "error" and not calls
    assert models.SHRINK_STATUSES == ("mismatch",)


def test_shrink_off_and_bad_weights():
    (fd,) = models.check_model(
        f"{HERE}:planted_main_path", properties="fd", shrink=False
    )
    assert fd.status == "mismatch" and "shrink_checks" not in fd.cost
    for bad in ({"main": 1.0}, {"main": 1.0, "aux": float("nan")}, [1.0, 0.0]):
        with pytest.raises(models.InvalidArgumentError, match="weights"):
            models.check_model(f"{HERE}:correct_main_path", weights=bad)


def test_a_printed_weight_set_parses_back():
    assert models.parse_weights("main=1.0, aux=0.0") == {"main": 1.0, "aux": 0.0}
    for bad in ("main=1", "main=1,aux=x", "main=1,main=2", "main=1,aux=0,x=2", "1,0"):
        with pytest.raises(models.InvalidArgumentError, match="weights"):
            models.parse_weights(bad)


def test_shrink_is_bounded_and_never_reruns_the_start_or_all_zeros():
    seen = []

    def always(w):
        seen.append(dict(w))
        time.sleep(0.01)
        return True

    start = {"main": 0.73, "aux": 2.1}
    got = models.shrink_weights(always, start, max_checks=1)
    assert got.checks == 1 == len(seen)
    assert got.simpler and got.stopped == "its cap of 1 checks"
    assert "stopped at its cap of 1 checks" in got.note()
    assert start not in seen and {"main": 0.0, "aux": 0.0} not in seen

    seen.clear()
    got = models.shrink_weights(always, start, seconds=0.0)
    assert got.checks == 0 and not got.simpler and not seen
    assert "(no simpler weight set was found to fail in 0 checks" in got.note()

    # a worker's timeout: no check that would end past it is started
    got = models.shrink_weights(always, start, deadline=time.monotonic() - 1)
    assert got.checks == 0 and got.stopped == "the check's timeout"
    # nor a first one expected (the failing check's own time) to end past it
    got = models.shrink_weights(
        always, start, deadline=time.monotonic() + 30, estimate=60
    )
    assert got.checks == 0 and got.stopped == "the check's timeout"


def test_a_bug_on_every_head_s_path_says_so():
    # fails whatever the weights (a bug in the model's shared body)
    got = models.shrink_weights(lambda w: True, {"main": 0.73, "aux": 2.1})
    assert got.weights == {"main": 0.0, "aux": 1.0}
    assert "and so does main alone" in got.note()
    assert "the error shows through every head alone" in got.note()


def test_cli_shrinks_in_the_worker_process_and_writes_the_note(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(
        [
            "check-model",
            f"{HERE}:planted_main_path",
            "--properties",
            "fd",
            "--timeout",
            "120",
            "--json",
            str(out),
            "--report",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1, printed
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "mismatch"
    assert "fails with weights main=1.0, aux=0.0 (shrunk from" in row["message"]
    page = (tmp_path / "check-model.html").read_text()
    assert "fails with weights main=1.0, aux=0.0 (shrunk from" in page


def test_cli_reruns_a_printed_weight_set(capsys):
    from gradcheck import cli

    try:
        cli.parser().parse_args(["check-model", "x:y", "--no-shrink"])
    except SystemExit:
        capsys.readouterr()
        pytest.skip("gradcheck check-model has no --weights/--no-shrink yet")
    argv = ["check-model", f"{HERE}:planted_main_path", "--properties", "fd"]
    code = main([*argv, "--timeout", "0", "--weights", "main=1.0,aux=0.0"])
    out = capsys.readouterr().out
    assert code == 1 and "x 1 + aux (its mean square) x 0; weights given" in out, out
    assert "  fails with weights main=1.0, aux=0.0 (no simpler weight set" in out
    code = main([*argv, "--timeout", "0", "--weights", "main=0,aux=1", "--no-shrink"])
    out = capsys.readouterr().out
    assert code == 0 and "fails with weights" not in out, out
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--weights", "main=1"])
    assert exit_.value.code == 2
    assert "expected each head once" in capsys.readouterr().err
