"""First contact: gradcheck's own framework noise stays inside its scope, the CLI's
--version/--help/python -m entry points, progress lines in logs, per-job seconds,
and the core dependencies a user's install gets."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import gradcheck
from gradcheck import _quiet, audit, cli
from gradcheck.result import CheckReport

ROOT = Path(__file__).resolve().parent.parent
PROMOTION_MESSAGE = (
    "The new dtype semantics do not support tensorflow.python.ops.array_ops."
    "reshape(<class 'keras.src.backend.Variable'>). Falling back to old semantics."
)
RETRACING_MESSAGE = (
    "5 out of the last 5 calls to <function one_step_on_data> triggered "
    "tf.function retracing. Tracing is expensive ..."
)
CONV_MESSAGE = (
    "Using padding='same' with even kernel lengths and odd dilation may require a "
    "zero-padded copy of the input be created"
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def tf_log():
    """What reaches the handlers of the ``tensorflow`` logger (no TF needed)."""
    logger = logging.getLogger(_quiet.TF_LOGGER)
    handler = _Records()
    logger.addHandler(handler)
    filters = list(logger.filters)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        assert logger.filters == filters  # nothing left behind


def _noise_and_users_own() -> None:
    logger = logging.getLogger(_quiet.TF_LOGGER)
    logger.warning(PROMOTION_MESSAGE)
    logger.warning(RETRACING_MESSAGE)
    logger.warning("the user's own TensorFlow message")
    warnings.warn(CONV_MESSAGE, UserWarning, stacklevel=1)
    warnings.warn("the user's own warning", UserWarning, stacklevel=1)


def test_quiet_drops_gradchecks_noise_and_nothing_else(tf_log):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet.quiet() as drop:
            _noise_and_users_own()
        assert drop.dropped == 2
        inside = [str(w.message) for w in caught]
        assert tf_log == ["the user's own TensorFlow message"]
        assert inside == ["the user's own warning"]
        # outside the scope the same messages show again: nothing silenced globally
        tf_log.clear()
        _noise_and_users_own()
        assert tf_log == [
            PROMOTION_MESSAGE,
            RETRACING_MESSAGE,
            "the user's own TensorFlow message",
        ]
        outside = [str(w.message) for w in caught[len(inside) :]]
        assert outside == [CONV_MESSAGE, "the user's own warning"]


def test_quiet_restores_on_error_and_nests(tf_log):
    logger = logging.getLogger(_quiet.TF_LOGGER)
    before = list(warnings.filters)
    with pytest.raises(RuntimeError), _quiet.quiet():
        with _quiet.promotion_quiet():
            logger.warning(PROMOTION_MESSAGE)
        logger.warning(RETRACING_MESSAGE)  # the outer scope still drops it
        raise RuntimeError("a check that raises")
    assert warnings.filters == before
    assert tf_log == []
    logger.warning(RETRACING_MESSAGE)
    assert tf_log == [RETRACING_MESSAGE]


def test_promotion_quiet_leaves_retracing_and_warnings_alone(tf_log):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet.promotion_quiet():
            _noise_and_users_own()
    assert tf_log == [RETRACING_MESSAGE, "the user's own TensorFlow message"]
    assert [str(w.message) for w in caught] == [CONV_MESSAGE, "the user's own warning"]


def _passing_report() -> CheckReport:
    return CheckReport(
        "linearity", "passed", "torch", "cpu", "float64", 0, "analytic", 0, 1, ""
    )


def test_the_audits_job_runner_is_quiet_and_the_users_warnings_show(tf_log):
    """Inside run_job (the generated models are gradcheck's), its noise is dropped;
    the same code's other warnings show, and after the job everything shows."""

    def check(spec, batch, seed):
        _noise_and_users_own()
        return _passing_report()

    job = audit.Job(
        "torch", "linearity", "float64", None, check, audit._specs(max_heads=1)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = audit.run_job(job, 2, 0)
        assert out.verdict == "holds" and out.examples == 2
        assert out.seconds >= 0 and out.cpu_seconds >= 0
        assert tf_log == ["the user's own TensorFlow message"] * 2
        assert [str(w.message) for w in caught] == ["the user's own warning"] * 2
        warnings.warn(CONV_MESSAGE, UserWarning, stacklevel=1)
        assert str(caught[-1].message) == CONV_MESSAGE


def test_import_quietly_drops_the_import_banner_only(tmp_path, monkeypatch, capfd):
    """TensorFlow's C++ side writes a banner to the stderr descriptor on import."""
    (tmp_path / "noisy_framework.py").write_text(
        textwrap.dedent(
            """
            import os
            os.write(2, b"WARNING: All log messages before absl::InitializeLog() "
                        b"is called are written to STDERR\\n")
            os.write(2, b"I0000 00:00:1796430612.306743    5383 port.cc:153] oneDNN "
                        b"custom operations are on. You may see slightly different "
                        b"numerical results\\n")
            os.write(2, b"a real problem while importing\\n")
            LOADED = True
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "noisy_framework", raising=False)
    module = _quiet.import_quietly("noisy_framework")
    assert module.LOADED
    err = capfd.readouterr().err
    assert err == "a real problem while importing\n"
    assert _quiet.import_quietly("noisy_framework") is module  # imported once


# ------------------------------------------------------------------ the CLI
def test_version_and_python_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "gradcheck", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"gradcheck {gradcheck.__version__}"


def test_audit_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["audit", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    options = [
        a
        for a in cli.parser()._subparsers._group_actions[0].choices["audit"]._actions
        if a.option_strings and a.dest != "help"
    ]
    assert len(options) >= 8
    for action in options:
        flag = action.option_strings[-1]
        start = text.index(f" {flag} ", text.index("options:"))
        entry = text[start : start + 400]
        nxt = [text.find(f" {o.option_strings[-1]} ", start + 1) for o in options]
        end = min([n for n in nxt if n > start] or [len(text)])
        assert "Default:" in text[start:end], (flag, entry)
        if action.default is not None:
            assert f"Default: {action.default}" in text[start:end], (flag, entry)


def test_without_a_terminal_one_line_per_finished_job_with_its_time(
    tmp_path, monkeypatch, capsys
):
    pytest.importorskip("torch")
    monkeypatch.setattr(audit, "jobs", _linearity_float64_of(audit.jobs))
    out = tmp_path / "audit.json"
    code = cli.main(
        [
            "audit",
            "--framework",
            "torch",
            "--examples",
            "1",
            "--json",
            str(out),
            "--report",
            str(tmp_path / "audit.html"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = [line for line in printed.splitlines() if line.startswith("ok")]
    assert len(lines) == 2, printed  # correct models, planted bug
    for n, line in enumerate(lines, 1):
        assert f"[{n}] torch/float64/linearity: " in line
        assert line.endswith(" s") and ", 1 models, " in line
    assert "0:00:" not in printed  # no progress bar (elapsed time) in a log
    data = json.loads(out.read_text())
    assert data["environment"]["intra-op threads"].startswith(
        f"torch {audit.DEFAULT_THREADS} (was "
    )
    assert data["cpu_seconds"] > 0
    for case in data["cases"]:
        assert case["seconds"] > 0 and case["cpu_seconds"] > 0
    # the HTML report gives each job's seconds too
    page = (tmp_path / "audit.html").read_text()
    assert page.count(" s CPU)") == 2, page
    # the summary table has a seconds column with each job's time
    assert " s " in printed.split("gradcheck audit", 1)[1]


def _linearity_float64_of(real):
    def jobs(frameworks, seed, device="auto"):
        for job in real(frameworks, seed, device):
            if job.property == "linearity" and job.dtype == "float64":
                yield job

    return jobs


def test_the_audit_restores_torchs_thread_count():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    seen = []
    with audit._intra_op_threads(["torch"], 1) as used:
        seen.append(torch.get_num_threads())
    assert seen == [1] and used == f"torch 1 (was {before})"
    assert torch.get_num_threads() == before
    with audit._intra_op_threads(["torch"], None) as used:
        assert torch.get_num_threads() == before and used == ""


def test_a_users_install_gets_what_every_front_door_needs():
    """hypothesis (the audit), jinja2 (reports), rich (progress) are core
    dependencies; frameworks stay extras."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].strip().lower() for d in meta["dependencies"]}
    assert {"hypothesis", "jinja2", "rich", "numpy"} <= core
    assert not core & {"torch", "tensorflow", "keras"}
    assert "torch" in meta["optional-dependencies"]
    assert "tensorflow" in meta["optional-dependencies"]


# ------------------------------------------------------------------ side by side
def _verdicts(result):
    return [
        (o.job.name, o.verdict, o.examples, o.statuses, o.shrink_steps)
        for o in result.outcomes
    ]


def test_jobs_side_by_side_have_the_outcomes_of_one_process():
    """Two processes (this one and a spawned helper that rebuilds the plan) give
    every job the outcome one process gives it, in plan order, with each job's
    callbacks."""
    pytest.importorskip("torch")
    alone = audit.run(["torch"], 1, 0, workers=1)
    seen: dict[str, list[str]] = {}
    both = audit.run(
        ["torch"],
        1,
        0,
        workers=2,
        on_start=lambda job, n: seen.setdefault(job.name, []).append("start"),
        on_example=lambda job: seen[job.name].append("example"),
        on_outcome=lambda o: seen[o.job.name].append(o.verdict),
    )
    assert both.environment["worker processes"] == 2
    assert "worker processes" not in alone.environment
    assert _verdicts(both) == _verdicts(alone)
    assert both.ok and len(both.outcomes) == len(alone.outcomes) >= 14
    for o in both.outcomes:
        expected = ["start"] + ["example"] * o.examples + [o.verdict]
        assert seen[o.job.name] == expected, o.job.name
    assert both.cpu_seconds > 0
    per_process = both.environment["CPU seconds per process"].split(", ")
    assert len(per_process) == 2 and all(float(c) > 0 for c in per_process)


def test_a_replaced_planner_runs_in_this_process(monkeypatch):
    """A plan a fresh process cannot rebuild (a replaced jobs(), as tests do) runs
    here, one job at a time, whatever workers says."""
    pytest.importorskip("torch")
    monkeypatch.setattr(audit, "jobs", _linearity_float64_of(audit.jobs))
    result = audit.run(["torch"], 1, 0, workers=2)
    assert "worker processes" not in result.environment
    assert [o.verdict for o in result.outcomes] == ["holds", "caught"]


def test_workers_option(capsys):
    assert cli.parser().parse_args(["audit", "--workers", "3"]).workers == 3
    auto = cli.parser().parse_args(["audit"]).workers
    assert 1 <= auto <= cli.MAX_AUTO_WORKERS
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["audit", "--workers", "0"])


@pytest.mark.tensorflow
def test_a_float32_keras_check_is_quiet_about_its_promotion(monkeypatch, tf_log):
    """check_gradients on a float32 Keras model runs its reference in float64 under
    TensorFlow's dtype promotion, which logs each op it cannot promote: dropped
    inside the check; the user's own TensorFlow messages in fn still show."""
    import contextlib

    pytest.importorskip("tensorflow")
    import keras
    import numpy as np
    import tensorflow as tf

    from gradcheck.backends import _keras64

    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 3))
    h = keras.layers.LayerNormalization()(keras.layers.LSTM(3)(inp))
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 4, 3)), tf.float32)

    def fn():
        tf.get_logger().warning("the user's own TensorFlow message")
        return tf.reduce_mean(model(x) ** 2)

    def promotion_messages():
        return sum("dtype semantics" in m for m in tf_log)

    report = gradcheck.check_gradients(fn, params=model)
    assert report.passed and report.reference_dtype == "float64", report.message()
    assert promotion_messages() == 0
    users = tf_log.count("the user's own TensorFlow message")
    assert users >= 2  # every call of fn: the check's own and the reference's
    # the same check without the quiet scope: the model does trigger them
    monkeypatch.setattr(_keras64, "promotion_quiet", contextlib.nullcontext)
    gradcheck.check_gradients(fn, params=model)
    assert promotion_messages() > 0
    assert tf_log.count("the user's own TensorFlow message") == 2 * users
