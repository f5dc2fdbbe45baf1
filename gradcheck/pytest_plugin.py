"""gradcheck's pytest plugin: record every gradient check a test runs, report them.

Registered as the ``pytest11`` entry point ``gradcheck`` (active once gradcheck is
installed, e.g. ``pip install -e .``); without installing, ``-p
gradcheck.pytest_plugin``. Loading it imports neither torch nor TensorFlow.

* Every ``check_*``/``assert_*`` call during a test is recorded under the test's
  node id (the report's ``label`` becomes the node id unless it has one).
* ``--gradcheck-json PATH`` / ``--gradcheck-report PATH``: the records as the report
  document (:mod:`gradcheck.report`) in JSON / self-contained HTML, written
  atomically at the end of the session; under pytest-xdist by the controller only.
* ``--gradcheck-seed S``: the default seed of every check (``$GRADCHECK_SEED``);
  ``--gradcheck-device auto|cpu|cuda|all``: the devices the ``gradcheck`` fixture
  selects (``.device``, ``.devices()``, ``.check_devices``);
  ``--gradcheck-profile ci|thorough``: a Hypothesis settings profile to load (the
  project's own under that name, else gradcheck's).
* ``--gradcheck-repro-dir DIR``: every failing check a test runs (``check_*`` /
  ``assert_*`` of gradients, the fixture's, ``--gradcheck-model`` tests) writes a
  repro bundle to DIR (:mod:`gradcheck.repro`); the failure message and the
  reports name it, ``gradcheck replay BUNDLE`` reruns it.
* ``@pytest.mark.gradcheck(rtol=, mode=, seed=, step=)``: defaults for checks run
  through the ``gradcheck`` fixture.

Each option has an ini twin (``gradcheck_json = reports/gradcheck.json``); the
command line wins.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gradcheck import api
from gradcheck.result import CheckReport

__all__ = ["GradcheckFixture", "GradcheckSession"]

MARKER_KEYS = ("rtol", "mode", "seed", "step", "order", "ad")
MODES = ("auto", "directional", "full")
DEVICES = ("auto", "cpu", "cuda", "all")
PROFILES = ("ci", "thorough")
#: the Hypothesis profiles --gradcheck-profile loads when no profile is registered
#: under that name (the project's conftest, or Hypothesis' built-in "ci", which is
#: derandomized with no deadline, come first): ci small and reproducible (no
#: deadline: a framework's first call traces or compiles), thorough large
DEFAULT_PROFILES: dict[str, dict[str, Any]] = {
    "ci": {"max_examples": 10, "deadline": None, "derandomize": True},
    "thorough": {"max_examples": 200, "deadline": None},
}
MARKER_DOC = (
    "gradcheck(rtol=None, mode=None, seed=None, step=None): defaults for the "
    "checks this test runs through the gradcheck fixture"
)

#: the checks one test ran, as records {"id": node id, "report": report dict}
_RECORDS = pytest.StashKey[list[dict[str, Any]]]()
#: the validated @pytest.mark.gradcheck defaults of one test
_DEFAULTS = pytest.StashKey[dict[str, Any]]()
_WORKER_KEY = "gradcheck_records"
_PLUGIN_NAME = "gradcheck-session"
#: failing checks the terminal summary lists without -v
_SHOW_FAILED = 20


# ------------------------------------------------------------------ options
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", "gradcheck: gradient checks")
    group.addoption(
        "--gradcheck-report",
        metavar="PATH",
        default=None,
        help="write an HTML report of every gradient check to PATH at the end of "
        "the session. Default: the gradcheck_report ini value, else none",
    )
    group.addoption(
        "--gradcheck-json",
        metavar="PATH",
        default=None,
        help="write the same report as JSON to PATH. Default: the gradcheck_json "
        "ini value, else none",
    )
    group.addoption(
        "--gradcheck-seed",
        metavar="S",
        default=None,
        help="default seed (a non-negative integer) of every check whose seed is "
        "not given; sets $GRADCHECK_SEED for the session. Default: gradcheck_seed "
        f"ini value, else $GRADCHECK_SEED, else {api.DEFAULT_SEED}",
    )
    group.addoption(
        "--gradcheck-device",
        choices=DEVICES,
        default=None,
        help="the devices the gradcheck fixture selects (gradcheck.device, "
        "gradcheck.devices(), gradcheck.check_devices): auto = every available "
        "one (a GPU when there is one, else the CPU), cpu, cuda (a GPU must "
        "exist), all (CPU and every GPU; a GPU must exist). Default: "
        "gradcheck_device ini value, else auto",
    )
    group.addoption(
        "--gradcheck-profile",
        choices=PROFILES,
        default=None,
        help="load this Hypothesis settings profile: the one registered under "
        "that name (your conftest.py's; Hypothesis ships a 'ci' profile), else "
        "gradcheck's (ci: 10 examples, derandomized; thorough: 200, no deadline). "
        "Default: gradcheck_profile ini value, else none",
    )
    group.addoption(
        "--gradcheck-model",
        action="append",
        default=None,
        metavar="SPEC",
        help="check a model by name, no test file needed: one test per model x "
        "property x dtype (hf:bert, hf:*, keras:MobileNetV3Small, "
        "package.module:callable). Repeatable. Default: gradcheck_models ini value",
    )
    group.addoption(
        "--gradcheck-model-dtype",
        metavar="DTYPES",
        default=None,
        help="dtypes of the --gradcheck-model tests, comma-separated. Default: "
        "gradcheck_model_dtype ini value, else float32,float64",
    )
    group.addoption(
        "--gradcheck-model-properties",
        metavar="PROPS",
        default=None,
        help="properties of the --gradcheck-model tests (fd, linearity, locality), "
        "comma-separated. Default: gradcheck_model_properties ini value, else all",
    )
    group.addoption(
        "--gradcheck-model-timeout",
        metavar="S",
        default=None,
        help="seconds per --gradcheck-model test: each then runs in a worker "
        "process, killed at the limit (the test is skipped as a timeout). Default: "
        "gradcheck_model_timeout ini value, else no limit (in this process)",
    )
    group.addoption(
        "--gradcheck-repro-dir",
        metavar="DIR",
        default=None,
        help="write a repro bundle to DIR for every failing gradient check (rerun "
        "one with 'gradcheck replay BUNDLE'). Default: gradcheck_repro_dir ini "
        "value, else none",
    )
    parser.addini(
        "gradcheck_models",
        help="model specs to check, one per line or space-separated "
        "(like --gradcheck-model)",
        type="linelist",
        default=[],
    )
    for name, what in (
        ("model_dtype", "dtypes of the model tests (like --gradcheck-model-dtype)"),
        ("model_timeout", "seconds per model test (like --gradcheck-model-timeout)"),
        (
            "model_properties",
            "properties of the model tests (like --gradcheck-model-properties)",
        ),
        ("report", "path of the HTML report (like --gradcheck-report)"),
        ("json", "path of the JSON report (like --gradcheck-json)"),
        (
            "repro_dir",
            "where failing checks write repro bundles (like --gradcheck-repro-dir)",
        ),
        ("seed", "default seed of checks (like --gradcheck-seed)"),
        ("device", f"devices the fixture selects, one of {DEVICES} (auto)"),
        ("profile", f"Hypothesis profile to load, one of {PROFILES}"),
    ):
        parser.addini(f"gradcheck_{name}", help=what, type="string", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_DOC)
    session = GradcheckSession(config)  # raises UsageError on bad values
    config.pluginmanager.register(session, _PLUGIN_NAME)
    session.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.pluginmanager.get_plugin(_PLUGIN_NAME)
    if session is not None:
        session.stop()
        config.pluginmanager.unregister(session, _PLUGIN_NAME)


def _setting(config: pytest.Config, name: str) -> tuple[str | None, Path]:
    """The option's value (command line first, then ini) and the folder a relative
    path in it is relative to."""
    value = config.getoption(f"gradcheck_{name}")
    if value is not None:
        return str(value), config.invocation_params.dir
    value = str(config.getini(f"gradcheck_{name}")).strip() or None
    base = config.inipath.parent if config.inipath else config.rootpath
    return value, base


def _path(config: pytest.Config, name: str) -> Path | None:
    value, base = _setting(config, name)
    return None if value is None else base / value


def _choice(config: pytest.Config, name: str, choices: tuple[str, ...]) -> str | None:
    value, _ = _setting(config, name)
    if value is not None and value not in choices:
        raise pytest.UsageError(
            f"gradcheck_{name} = {value!r}: expected one of {', '.join(choices)}"
        )
    return value


def _seed_setting(config: pytest.Config) -> int | None:
    value, _ = _setting(config, "seed")
    if value is None:
        return None
    try:
        seed = int(value)
    except ValueError:
        seed = -1
    if seed < 0:
        raise pytest.UsageError(
            f"--gradcheck-seed / gradcheck_seed: expected a non-negative integer, "
            f"got {value!r}"
        )
    return seed


# ------------------------------------------------------------------ session
class GradcheckSession:
    """Session state: settings, the records of every test, the report files."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.html_path = _path(config, "report")
        self.json_path = _path(config, "json")
        self.repro_dir = _path(config, "repro_dir")
        self._saved_repro: Any = None
        self.seed = _seed_setting(config)
        self.device = _choice(config, "device", DEVICES) or "auto"
        self.profile = _choice(config, "profile", PROFILES)
        self.records: list[dict[str, Any]] = []
        self.from_workers = False
        self.failed_tests: set[str] = set()
        self.written: list[tuple[str, Path]] = []
        self._saved_env: str | None = None
        self._saved_profile: str | None = None
        self.profile_source = "already registered: the project's or Hypothesis' own"
        if self.html_path is not None and importlib.util.find_spec("jinja2") is None:
            raise pytest.UsageError(
                '--gradcheck-report needs Jinja2: pip install "gradcheck[report]"'
            )

    @property
    def is_worker(self) -> bool:
        return hasattr(self.config, "workerinput")

    def start(self) -> None:
        if self.repro_dir is not None:
            from gradcheck import repro

            self._saved_repro = repro.session_dir()
            repro.set_session_dir(self.repro_dir)
        if self.seed is not None:
            self._saved_env = os.environ.get("GRADCHECK_SEED")
            os.environ["GRADCHECK_SEED"] = str(self.seed)
        if self.profile is not None:
            self._load_profile(self.profile)

    def stop(self) -> None:
        if self.repro_dir is not None:
            from gradcheck import repro

            repro.set_session_dir(self._saved_repro)
            self.repro_dir = None
        if self.seed is not None:
            if self._saved_env is None:
                os.environ.pop("GRADCHECK_SEED", None)
            else:
                os.environ["GRADCHECK_SEED"] = self._saved_env
            self.seed = None
        if self._saved_profile is not None:
            from hypothesis import settings

            settings.load_profile(self._saved_profile)
            self._saved_profile = None

    def _load_profile(self, name: str) -> None:
        if importlib.util.find_spec("hypothesis") is None:
            raise pytest.UsageError(
                f"--gradcheck-profile {name}: Hypothesis is not installed "
                "(pip install hypothesis)"
            )
        from hypothesis import settings

        try:
            settings.get_profile(name)
        except Exception:  # hypothesis.errors.InvalidArgument: not registered
            # the project did not define it: gradcheck's own (a team's conftest
            # registration wins, as it is already there)
            settings.register_profile(name, **DEFAULT_PROFILES[name])
            self.profile_source = "gradcheck's default"
        current = getattr(settings, "get_current_profile_name", None)
        self._saved_profile = (
            current() if current else getattr(settings, "_current_profile", "default")
        )
        settings.load_profile(name)

    # ---------------------------------------------------------- collection
    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(
        self, collector: pytest.Collector
    ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        """A bad ``@pytest.mark.gradcheck`` makes its module (or class) a collection
        error: reported as such, also by pytest-xdist workers, never a silent pass."""
        report = yield
        if not report.passed:
            return report
        problems = []
        for node in report.result:
            if isinstance(node, pytest.Item):
                try:
                    node.stash[_DEFAULTS] = marker_defaults(node)
                except ValueError as exc:
                    problems.append(f"{node.nodeid}: {exc}")
        if problems:
            report.outcome = "failed"
            report.longrepr = "invalid @pytest.mark.gradcheck:\n  " + "\n  ".join(
                problems
            )
            report.result = []
        return report

    # ---------------------------------------------------------- model tests
    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[Any]
    ) -> None:
        """``--gradcheck-model`` / ``gradcheck_models``: one test per model x
        property x dtype, appended to the collected tests (before -k/-m select)."""
        texts = list(config.getoption("gradcheck_model") or [])
        if not texts:
            for line in config.getini("gradcheck_models"):
                texts.extend(str(line).split())
        if not texts:
            return
        from gradcheck import models

        try:
            dtypes = models._as_tuple(
                self._model_setting("dtype") or "float32,float64",
                "dtype",
                models.DTYPES,
            )
            props = models._as_tuple(
                self._model_setting("properties") or ",".join(models.PROPERTIES),
                "property",
                models.PROPERTIES,
            )
            specs = models.expand_specs(texts)
        except models.GradcheckError as exc:
            raise pytest.UsageError(f"--gradcheck-model: {exc}") from None
        timeout = self._model_setting("timeout")
        try:
            seconds = float(timeout) if timeout is not None else None
        except ValueError:
            seconds = -1.0
        if seconds is not None and not seconds > 0:
            raise pytest.UsageError(
                f"--gradcheck-model-timeout: expected positive seconds, got {timeout!r}"
            )
        node = ModelChecks.from_parent(session, name="gradcheck-models")
        node.timeout = seconds
        for spec in dict.fromkeys(specs):
            for dtype in dtypes:
                for prop in props:
                    items.append(
                        ModelCheckItem.from_parent(
                            node,
                            name=f"{spec.text}[{prop}-{dtype}]",
                            spec=spec,
                            prop=prop,
                            dtype=dtype,
                        )
                    )
                    node.remaining[spec] = node.remaining.get(spec, 0) + 1

    def _model_setting(self, name: str) -> str | None:
        value = self.config.getoption(f"gradcheck_model_{name}")
        if value is None:
            value = str(self.config.getini(f"gradcheck_model_{name}")).strip() or None
        return value

    # ---------------------------------------------------------- recording
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        records = item.stash.setdefault(_RECORDS, [])
        worker = getattr(self.config, "workerinput", {}).get("workerid")

        def record(report: CheckReport) -> None:
            if report.label is None:
                report.label = item.nodeid
            # the report itself until the test ends: a repro bundle written after
            # the check published it (check_model's) is then in the record too
            rec: dict[str, Any] = {"id": item.nodeid, "report": report}
            if worker:
                rec["worker"] = worker
            records.append(rec)

        api._listeners.append(record)
        try:
            return (yield)
        finally:
            api._listeners.remove(record)
            for rec in records:
                if isinstance(rec["report"], CheckReport):
                    rec["report"] = rec["report"].to_dict()
            self.records.extend(records)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:  # under xdist the controller sees every worker's too
            self.failed_tests.add(report.nodeid)

    # ---------------------------------------------------------- xdist
    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        data = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
        if data:
            self.records.extend(json.loads(data))
            self.from_workers = True

    # ---------------------------------------------------------- reports
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.is_worker:  # the controller writes the files
            self.config.workeroutput[_WORKER_KEY] = json.dumps(self.records)  # type: ignore[attr-defined]
            return
        if self.from_workers:  # arrival order is the workers' race: sort by test
            self.records.sort(key=lambda r: r["id"])
        if self.json_path is None and self.html_path is None:
            return
        from gradcheck.report import build_document, environment

        doc = build_document(
            self.records,
            environment(**self.environment()),
            title=f"gradcheck: {self.config.rootpath.name}",
        )
        if self.json_path is not None:
            from gradcheck.cli import write_json

            write_json(self.json_path, doc)
            self.written.append(("JSON", self.json_path))
        if self.html_path is not None:
            from gradcheck.report import write_html

            write_html(self.html_path, doc)
            self.written.append(("HTML", self.html_path))

    def environment(self) -> dict[str, Any]:
        env_seed = os.environ.get("GRADCHECK_SEED")
        return {
            "pytest": pytest.__version__,
            "default seed": env_seed or f"{api.DEFAULT_SEED} (library default)",
            "device (fixture)": self.device,
            "hypothesis profile": (
                f"{self.profile} ({self.profile_source})" if self.profile else "—"
            ),
        }

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.is_worker or not (self.records or self.written):
            return
        tr = terminalreporter
        tr.write_sep("=", "gradcheck")
        failed = [
            r
            for r in self.records
            if not r["report"].get("passed") and r["report"].get("status") != "skipped"
        ]
        skipped = sum(r["report"].get("status") == "skipped" for r in self.records)
        shown = failed if tr.config.option.verbose > 0 else failed[:_SHOW_FAILED]
        for rec in shown:
            # a check can fail inside a test that passes (a planted bug caught)
            note = "" if rec["id"] in self.failed_tests else "  [test passed]"
            headline = rec["report"].get("headline", "")
            tr.line(f"FAILED {rec['id']}: {headline}{note}", red=True)
        if len(shown) < len(failed):
            tr.line(f"... and {len(failed) - len(shown)} more failing checks (-v)")
        statuses: dict[str, int] = {}
        for rec in self.records:
            status = str(rec["report"].get("status"))
            statuses[status] = statuses.get(status, 0) + 1
        tests = len({r["id"] for r in self.records})
        detail = ", ".join(f"{s} {n}" for s, n in sorted(statuses.items()))
        tr.line(
            f"{len(self.records)} gradient checks in {tests} tests: "
            f"{len(self.records) - len(failed) - skipped} passed, {len(failed)} failed"
            + (f", {skipped} skipped" if skipped else "")
            + (f" ({detail})" if detail else ""),
            bold=True,
            red=bool(failed),
            green=not failed,
        )
        for kind, path in self.written:
            tr.line(f"{kind} report: {path}")


# ------------------------------------------------------------------ model tests
class ModelChecks(pytest.Collector):
    """The parent of the ``--gradcheck-model`` tests (no file behind them). Builds
    each model once, when its first test runs, and drops it after its last."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkers: dict[Any, Any] = {}
        self.remaining: dict[Any, int] = {}
        self.timeout: float | None = None

    def collect(self) -> list[Any]:  # its items are made by the session hook
        return []

    def run(self, spec: Any, prop: str, dtype: str) -> Any:
        """The report of one check: with a timeout in a worker process, else on
        the model built once for all its tests."""
        from gradcheck import models, repro

        seed = self.config.pluginmanager.get_plugin(_PLUGIN_NAME).seed or 0
        if self.timeout is not None:
            (report,) = models.check_model(
                spec, dtype=dtype, properties=prop, seed=seed, timeout=self.timeout
            )
            return report  # check_model wrote its bundle (the session's dir)
        if spec not in self.checkers:
            self.checkers[spec] = models.Checker(spec, seed=seed)
        checker = self.checkers[spec]
        report = checker.run(prop, dtype)
        repro.write_model_bundles(
            None, [report], spec, None, seed, checker.max_parameters, checker
        )
        return report

    def done(self, spec: Any) -> None:
        self.remaining[spec] = self.remaining.get(spec, 1) - 1
        if self.remaining[spec] <= 0:
            self.checkers.pop(spec, None)


class ModelCheckItem(pytest.Item):
    """One model x property x dtype: passes on ``passed``, fails on ``mismatch``
    (the report's message, no traceback), is skipped with the reason on any other
    status (unbuildable, timeout, error, nondifferentiable, nondeterministic)."""

    def __init__(self, *, spec: Any, prop: str, dtype: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec, self.prop, self.dtype = spec, prop, dtype

    def runtest(self) -> None:
        from gradcheck.errors import GradientMismatchError

        parent: ModelChecks = self.parent  # type: ignore[assignment]
        try:
            report = parent.run(self.spec, self.prop, self.dtype)
        finally:
            parent.done(self.spec)
        if report.status == "mismatch":
            raise GradientMismatchError(report)
        if not report.passed:
            reason = report.notes[0] if report.notes else ""
            pytest.skip(f"{report.headline()}: {reason}".splitlines()[0])

    def repr_failure(self, excinfo: Any, style: Any = None) -> Any:
        from gradcheck.errors import GradientMismatchError

        if isinstance(excinfo.value, GradientMismatchError):
            return excinfo.value.report.message()
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.config.rootpath, None, f"gradcheck model {self.name}"


# ------------------------------------------------------------------ marker
def marker_defaults(item: pytest.Item) -> dict[str, Any]:
    """The ``@pytest.mark.gradcheck`` values for ``item`` (the closest marker wins
    per keyword); ValueError names a bad one."""
    defaults: dict[str, Any] = {}
    for mark in item.iter_markers("gradcheck"):
        if mark.args:
            raise ValueError(
                f"takes keywords only ({', '.join(MARKER_KEYS)}); got positional "
                f"{mark.args!r}"
            )
        unknown = sorted(set(mark.kwargs) - set(MARKER_KEYS))
        if unknown:
            raise ValueError(
                f"unknown keyword(s) {', '.join(unknown)}; expected "
                f"{', '.join(MARKER_KEYS)}"
            )
        for key, value in mark.kwargs.items():
            if value is not None:
                _check_marker_value(key, value)
                defaults.setdefault(key, value)
    return defaults


def _check_marker_value(key: str, value: Any) -> None:
    if key == "mode":
        if value not in MODES:
            raise ValueError(f"mode={value!r}; expected one of {', '.join(MODES)}")
    elif key == "order":
        if isinstance(value, bool) or value not in (1, 2):
            raise ValueError(f"order={value!r}; expected 1 or 2")
    elif key == "ad":
        if value not in ("reverse", "forward", "both"):
            raise ValueError(f"ad={value!r}; expected reverse, forward or both")
    elif key == "seed":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"seed={value!r}; expected a non-negative int")
    else:  # rtol, step
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key}={value!r}; expected a positive number")


# ------------------------------------------------------------------ fixture
class GradcheckFixture:
    """What the ``gradcheck`` fixture gives a test: the library's check functions
    with the test's ``@pytest.mark.gradcheck`` values and the session seed as
    defaults (keywords passed here win), and the suggested ``device``."""

    def __init__(
        self, defaults: Mapping[str, Any], seed: int | None, requested_device: str
    ):
        self.defaults = dict(defaults)
        self.seed = seed
        self.requested_device = requested_device

    @property
    def device(self) -> str:
        """The one device to put a test's tensors on (torch spelling): a GPU when
        ``--gradcheck-device`` is cuda or all, or auto and a GPU is visible; else
        cpu. ``auto`` never imports torch: without torch imported it is cpu. cuda
        or all without a GPU raise DeviceUnavailableError (the test errors with
        that message instead of running on the CPU unnoticed)."""
        request = self.requested_device
        if request == "cpu":
            return "cpu"
        if request == "auto" and "torch" not in sys.modules:
            return "cpu"
        found = self.devices("torch")
        gpus = [d for d in found if d != "cpu"]
        return gpus[0] if gpus else "cpu"

    def devices(self, framework: str = "torch") -> list[str]:
        """Every device ``--gradcheck-device`` selects for ``framework`` ("torch" or
        "tensorflow"), CPU first, as :func:`gradcheck.devices.resolve` reads it
        (auto: every available device)."""
        from gradcheck.devices import resolve

        return resolve(framework, self.requested_device)

    def check_devices(
        self, loss_fn: Any, model: Any, batch: Any, **kwargs: Any
    ) -> CheckReport:
        """:func:`gradcheck.check_devices` over the session's devices (unless
        ``devices=`` is given), with this test's rtol and seed. Under
        ``--gradcheck-device auto`` on a machine with one device the test is
        *skipped* (a suite runs on CPU-only CI unchanged), and so is one whose
        report is "skipped" (a GPU it names is absent: ``"all"``, ``("cpu",
        "cuda:1")``); an explicit ``"cuda"`` without two GPUs, or one device alone,
        is DeviceUnavailableError."""
        from gradcheck.devices import available_devices
        from gradcheck.properties.devices import check_devices

        kw = self._kwargs(kwargs, ("rtol", "seed"))
        if "devices" not in kw:
            kw["devices"] = self.requested_device
            if self.requested_device == "auto":
                torch = sys.modules.get("torch")
                is_torch = torch is not None and isinstance(model, torch.nn.Module)
                found = available_devices("torch" if is_torch else "tensorflow")
                if len(found) < 2:
                    pytest.skip(
                        f"check_devices: only {found} here (--gradcheck-device "
                        "auto); it compares CPU and GPU"
                    )
        report = check_devices(loss_fn, model, batch, **kw)
        if report.status == "skipped":  # a GPU it asks for is absent here
            pytest.skip("check_devices: " + " ".join(report.notes))
        return report

    def check_variants(
        self, loss_fn: Any, model: Any, batch: Any, **kwargs: Any
    ) -> CheckReport:
        """:func:`gradcheck.check_variants` with this test's rtol and seed. When no
        requested variant can run here (GPU variants without a GPU) the test is
        *skipped*, not failed."""
        from gradcheck.properties.variants import check_variants

        report = check_variants(
            loss_fn, model, batch, **self._kwargs(kwargs, ("rtol", "seed"))
        )
        if report.status == "skipped":
            pytest.skip("check_variants: " + " ".join(report.notes[1:]))
        return report

    def assert_variants(
        self, loss_fn: Any, model: Any, batch: Any, **kwargs: Any
    ) -> CheckReport:
        """:meth:`check_variants`; raises GradientMismatchError on failure."""
        from gradcheck.errors import GradientMismatchError

        report = self.check_variants(loss_fn, model, batch, **kwargs)
        if not report.passed:
            raise GradientMismatchError(report)
        return report

    def check_distributed(
        self, build: Any, step: Any, batch: Any, **kwargs: Any
    ) -> CheckReport:
        """:func:`gradcheck.check_distributed` with this test's rtol and seed
        (``build``/``step`` must be importable: the ranks are processes of their
        own). A skipped report skips the test."""
        from gradcheck.properties.distributed import check_distributed

        report = check_distributed(
            build, step, batch, **self._kwargs(kwargs, ("rtol", "seed"))
        )
        if report.status == "skipped":
            pytest.skip("check_distributed: " + " ".join(report.notes))
        return report

    def assert_distributed(
        self, build: Any, step: Any, batch: Any, **kwargs: Any
    ) -> CheckReport:
        """:meth:`check_distributed`; raises GradientMismatchError on failure."""
        from gradcheck.errors import GradientMismatchError

        report = self.check_distributed(build, step, batch, **kwargs)
        if not report.passed:
            raise GradientMismatchError(report)
        return report

    def _kwargs(
        self, given: dict[str, Any], accepted: tuple[str, ...]
    ) -> dict[str, Any]:
        kwargs = {k: v for k, v in self.defaults.items() if k in accepted}
        if "seed" not in kwargs and self.seed is not None:
            kwargs["seed"] = self.seed
        kwargs.update(given)
        return kwargs

    def _gradients(
        self, f: Callable[..., CheckReport], fn: Any, inputs: Any, kw: Any
    ) -> CheckReport:
        return f(fn, inputs, **self._kwargs(kw, MARKER_KEYS))

    def check_gradients(self, fn: Any, inputs: Any = (), **kwargs: Any) -> CheckReport:
        """:func:`gradcheck.check_gradients` with this test's defaults."""
        return self._gradients(api.check_gradients, fn, inputs, kwargs)

    def assert_gradients(self, fn: Any, inputs: Any = (), **kwargs: Any) -> CheckReport:
        """:func:`gradcheck.assert_gradients` with this test's defaults."""
        return self._gradients(api.assert_gradients, fn, inputs, kwargs)

    def check_linearity(
        self,
        total_fn: Any,
        loss_fns: Any,
        weights: Any,
        inputs: Any = (),
        **kwargs: Any,
    ) -> CheckReport:
        """:func:`gradcheck.check_linearity` with this test's rtol and seed."""
        kw = self._kwargs(kwargs, ("rtol", "seed"))
        return api.check_linearity(total_fn, loss_fns, weights, inputs, **kw)

    def assert_linearity(
        self,
        total_fn: Any,
        loss_fns: Any,
        weights: Any,
        inputs: Any = (),
        **kwargs: Any,
    ) -> CheckReport:
        """:func:`gradcheck.assert_linearity` with this test's rtol and seed."""
        kw = self._kwargs(kwargs, ("rtol", "seed"))
        return api.assert_linearity(total_fn, loss_fns, weights, inputs, **kw)


@pytest.fixture(name="gradcheck")
def gradcheck_fixture(request: pytest.FixtureRequest) -> GradcheckFixture:
    """Gradient checks with this test's ``@pytest.mark.gradcheck`` defaults, the
    session's ``--gradcheck-seed``, and ``.device`` (``--gradcheck-device``)."""
    session: GradcheckSession = request.config.pluginmanager.get_plugin(_PLUGIN_NAME)
    node = request.node
    defaults = node.stash.get(_DEFAULTS, None)
    if defaults is None:  # not collected through the session's hook
        defaults = marker_defaults(node)
    return GradcheckFixture(defaults, session.seed, session.device)
