"""The report document and its HTML: charts, escaping, no network, atomic writes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

import gradcheck
from gradcheck import report as gc_report
from gradcheck.report import svg
from gradcheck.result import (
    CheckReport,
    FlowMatrix,
    Location,
    StepEstimate,
    TensorResult,
)

EVIL = "<script>alert(1)</script>"


def _tensor(name, **kw):
    kw.setdefault("grad_norm", 0.5)
    return TensorResult(name, (4, 3), "float32", "cpu", "parameter", **kw)


def linearity_report() -> CheckReport:
    """A detached auxiliary head: the trunk never sees the 'aux' loss."""
    return CheckReport(
        property="linearity",
        status="mismatch",
        framework="torch",
        device="cpu",
        dtype="float32",
        seed=0,
        mode="analytic",
        error=0.0116,
        tolerance=5.9e-7,
        tolerance_reason="per element: 4 x gradient rounding (float32 4e-06)",
        location=Location(
            "trunk.0.bias", (15,), 0.00683, -0.00479, 0.0116, 5.9e-7, "gradient", "aux"
        ),
        tensors=[
            _tensor(
                "trunk.0.weight", error=0.0149, tolerance=1.1e-6, status="mismatch"
            ),
            _tensor("trunk.0.bias", error=0.0116, tolerance=5.9e-7, status="mismatch"),
            _tensor("heads.main.weight", error=0.0, tolerance=3.1e-6, status="passed"),
            _tensor(
                "heads.aux.weight", error=1.7e-9, tolerance=1.2e-7, status="passed"
            ),
        ],
        flow=FlowMatrix(
            tensors=[
                "trunk.0.weight",
                "trunk.0.bias",
                "heads.main.weight",
                "heads.aux.weight",
            ],
            losses=["main", "aux"],
            weights=[1.0, 0.3],
            norms=[[0.745, 0.0713], [0.104, 0.0416], [0.775, 0.0], [0.0, 0.119]],
            reaches=[[True, True], [True, True], [True, False], [False, True]],
            total_norms=[0.745, 0.104, 0.775, 0.119],
            effective_weights=[[1.0, -1e-17], [1.0, 3e-17], [1.0, None], [None, 0.3]],
        ),
        notes=["in 'trunk.0.bias' the total's gradient carries 'aux' not at all."],
    )


def directional_report() -> CheckReport:
    return CheckReport(
        property="finite_difference",
        status="mismatch",
        framework="torch",
        device="cpu",
        dtype="float32",
        seed=0,
        mode="directional",
        error=0.00787,
        tolerance=3.24e-5,
        tolerance_reason="3 x estimated finite-difference error 1.16e-07 + ...",
        tolerance_terms={"finite_difference": 3.5e-7, "analytical_rounding": 3.2e-5},
        reference_dtype="float64",
        location=Location("trunk.weight", (0, 0), -0.04338, -0.04342, 4.3e-5, 1e-6),
        tensors=[
            _tensor("trunk.weight", analytical=3.62),
            _tensor(EVIL, analytical=4.26, grad_norm=0.31),
        ],
        steps=[
            StepEstimate(2.95e-8, 15.515126696, 3.1e-10),
            StepEstimate(5.90e-8, 15.515126697, 1.25e-9),
            StepEstimate(1.18e-7, 15.515126699, 5.0e-9),
        ],
        notes=[f"a note with markup {EVIL}"],
    )


def full_report() -> CheckReport:
    return CheckReport(
        property="finite_difference",
        status="passed",
        framework="tensorflow",
        device="cpu",
        dtype="float64",
        seed=7,
        mode="full",
        error=1.35e-11,
        tolerance=2.46e-9,
        tolerance_reason="per element: 3 x estimated finite-difference error",
        reference_dtype="float64",
        tensors=[
            TensorResult(
                "inputs[0]",
                (3, 4),
                "float64",
                "cpu",
                "input",
                3.37,
                error=1.8e-11,
                tolerance=2.46e-9,
                status="passed",
            )
        ],
        steps=[
            StepEstimate(3.4e-6, -0.8440196840, None),
            StepEstimate(2.8e-5, -0.8440196838, None),
            StepEstimate(4.4e-4, -0.8440196285, None),
        ],
    )


@pytest.fixture
def document():
    records = [
        {
            "id": "tests/test_heads.py::test_detached_aux[float32]",
            "report": linearity_report(),
        },
        {"id": EVIL, "report": directional_report().to_dict()},
        {"id": "tests/test_tf.py::test_dense", "report": full_report().to_dict()},
    ]
    env = gc_report.environment(seed=0, device=f"cpu {EVIL}")
    return gc_report.build_document(records, env, title=f"gradcheck {EVIL}")


def test_document_shape(document):
    assert document["schema"] == gc_report.SCHEMA
    assert [c["outcome"] for c in document["checks"]] == ["failed", "failed", "ok"]
    s = document["summary"]
    assert (s["checks"], s["ok"], s["failed"]) == (3, 1, 2)
    assert s["by_status"]["mismatch"] == 2 and s["by_status"]["passed"] == 1
    assert s["frameworks"] == ["tensorflow", "torch"]
    assert s["dtypes"] == ["float32", "float64"] and s["seeds"] == [0, 7]
    assert s["failed_ids"][1] == EVIL
    assert "python" in document["environment"] and "numpy" in document["environment"]


def test_html_has_charts_labels_and_escapes_text(document):
    html = gc_report.render_html(document)
    assert html.count("<svg") >= 6  # bars, heatmap, curves
    assert 'aria-label="gradient-flow matrix"' in html
    assert 'aria-label="error vs step"' in html  # directional: log-log deviation
    assert 'aria-label="estimate vs step"' in html  # full: deviation is null
    assert 'aria-label="error vs tolerance per tensor"' in html
    assert 'aria-label="gradient norm per tensor"' in html
    for label in ("trunk.0.weight", "heads.aux.weight", "aux (w=0.3)", "main (w=1)"):
        assert label in html
    assert "not reached" in html and "wrong weight" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html  # not the test id, not the tensor, not the note
    assert "http://" not in html and "https://" not in html  # nothing fetched
    assert "trunk.weight" in html and "-0.04342" in html  # the blamed element


def test_svg_functions_escape_and_skip_undrawable_points():
    bars = svg.svg_bars([svg.Bar("<b>", 1.0, 2.0), svg.Bar("z", 0.0)], title="<t>")
    assert "&lt;b&gt;" in bars and "<b>" not in bars and "&lt;t&gt;" in bars
    heat = svg.svg_heatmap(["<r>"], ['"c"'], [[1.0]], title="h", uid="x")
    assert "&lt;r&gt;" in heat and "&#34;c&#34;" in heat
    assert (
        svg.svg_curve([(0.0, 1.0), (1e-3, None)], title="c", xlabel="x", ylabel="y")
        == ""
    )
    assert svg.svg_bars([], title="none") == ""


def test_linear_axis_has_round_ticks():
    bars = svg.svg_bars([svg.Bar("a", 0.77), svg.Bar("b", 1.0)], title="t")
    assert ">0.5<" in bars and ">1<" in bars


def test_write_html_is_atomic(tmp_path, document, monkeypatch):
    path = tmp_path / "sub" / "report.html"
    assert gc_report.write_html(path, document) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]
    before = path.read_text()
    assert before.startswith("<!DOCTYPE html>")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        gc_report.write_html(path, document)
    assert path.read_text() == before  # the old report is intact
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp


def test_from_audit_makes_the_same_document():
    audit = {
        "gradcheck_version": gradcheck.__version__,
        "environment": {"python": "3.11", "torch": "2.13.0"},
        "skipped": {"tensorflow": "tensorflow is not installed"},
        "seconds": 1.5,
        "cases": [
            {
                "name": "torch/float32/linearity/planted",
                "ok": True,
                "expected": "caught",
                "report": linearity_report().to_dict(),
                "error": None,
            },
            {
                "name": "torch/float64/fd/correct",
                "ok": False,
                "expected": "passed",
                "report": None,
                "error": "NonFiniteError: NaN",
            },
            {
                "name": "torch/float32/devices: correct models",
                "ok": True,
                "expected": "passed",
                "report": None,
                "error": None,
                "skip": "no GPU visible to torch on this machine",
            },
        ],
    }
    doc = gc_report.from_audit(audit)
    assert doc["title"] == "gradcheck audit"
    assert [c["outcome"] for c in doc["checks"]] == ["ok", "failed", "skipped"]
    assert (doc["summary"]["ok"], doc["summary"]["failed"]) == (1, 1)
    assert doc["summary"]["skipped"] == 1
    assert doc["summary"]["by_status"]["skipped"] == 1
    assert doc["checks"][0]["expected"] == "caught"
    assert doc["checks"][1]["error"] == "NonFiniteError: NaN"
    assert doc["summary"]["by_status"]["error"] == 1
    assert doc["environment"]["skipped tensorflow"]
    html = gc_report.render_html(doc)
    assert "NonFiniteError: NaN" in html and "expected: caught" in html
    assert "Skipped: <span" in html and "1 skipped" in html


def test_bad_records_are_rejected():
    with pytest.raises(ValueError, match="outcome"):
        gc_report.build_document([{"id": "x", "outcome": "maybe", "report": None}])
    with pytest.raises(TypeError, match="report"):
        gc_report.build_document([{"id": "x", "report": 3}])


def test_empty_document_renders():
    html = gc_report.render_html(gc_report.build_document([]))
    assert "No gradient checks were run" in html


def test_missing_jinja2_names_the_extra(monkeypatch, document):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(
        gradcheck.FrameworkNotInstalledError, match=r"gradcheck\[report\]"
    ):
        gc_report.render_html(document)


def test_real_reports_render():
    torch = pytest.importorskip("torch")
    x = torch.linspace(-1, 1, 5, dtype=torch.float64).requires_grad_()
    full = gradcheck.check_gradients(lambda x: (x.sin() * x).sum(), (x,), mode="full")
    directional = gradcheck.check_gradients(
        lambda x: x.tanh().sum(), (x,), mode="directional", label=EVIL
    )
    html = gc_report.render_html(
        gc_report.build_document(
            [
                {"id": "full", "report": full},
                {"id": "directional", "report": directional},
            ]
        )
    )
    assert "&lt;script&gt;" in html and "<script" not in html
    assert html.count("<svg") >= 4


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_chromium_renders_a_nontrivial_png(tmp_path, document):
    page = gc_report.write_html(tmp_path / "report.html", document)
    png = tmp_path / "report.png"
    subprocess.run(
        [
            shutil.which("chromium"),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,2400",
            f"--screenshot={png}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=90,
        check=True,
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 50_000  # a blank page is a few kB


def test_heatmap_flags_wrong_weights_only_where_the_check_failed_and_fit():
    """Effective weights are a least-squares fit: a passing check's deviations are
    within tolerance, and a tensor with fewer elements than reaching losses has no
    determined fit; neither is outlined as a wrong weight."""
    from gradcheck.report.render import _flow_figure

    failed = linearity_report().to_dict()
    assert "instead of 0.3" in _flow_figure(failed, "a")["svg"]
    passed = dict(failed, passed=True, status="passed")
    assert "instead of" not in _flow_figure(passed, "b")["svg"]
    scalar = linearity_report().to_dict()
    for tr in scalar["tensors"]:
        tr["shape"] = [1]  # one element, two losses reach the trunk tensors
    svg = _flow_figure(scalar, "c")["svg"]
    assert "instead of" not in svg and "eff. w n/a" in svg


def _variant_and_distributed_reports() -> list[CheckReport]:
    common = dict(framework="torch", device="cpu", dtype="float32", seed=0)
    variants = CheckReport(
        property="variants",
        status="mismatch",
        mode="variants",
        error=0.2,
        tolerance=0.01,
        tolerance_reason="per tensor: measured spread",
        tensors=[
            TensorResult(
                "autocast:bfloat16/" + EVIL,
                (3,),
                "bfloat16",
                "cpu",
                "parameter",
                grad_norm=1.0,
                error=0.2,
                tolerance=0.01,
                status="mismatch",
            ),
            TensorResult(
                "compile/lin.bias",
                (3,),
                "float32",
                "cpu",
                "parameter",
                grad_norm=1.0,
                error=1e-8,
                tolerance=1e-6,
                status="passed",
            ),
        ],
        **common,
    )
    skipped = CheckReport(
        property="variants",
        status="skipped",
        mode="skipped",
        error=0.0,
        tolerance=0.0,
        tolerance_reason="no variant could run here; nothing was compared.",
        notes=["SKIPPED: no requested variant can run on this machine."],
        **common,
    )
    distributed = CheckReport(
        property="distributed",
        status="passed",
        mode="fsdp",
        error=1e-9,
        tolerance=1e-7,
        tolerance_reason="per tensor: measured rounding",
        tensors=[_tensor("lin.weight", error=1e-9, tolerance=1e-7, status="passed")],
        cost={
            "seconds": 1.5,
            "spawn_seconds": 3.25,
            "world_size": 2,
            "rank_seconds[0]": 0.0123,
            "rank_seconds[1]": 0.0456,
        },
        **common,
    )
    return [variants, skipped, distributed]


def test_variants_and_ranks_tables_and_the_skipped_status():
    reports = _variant_and_distributed_reports()
    doc = gc_report.build_document(
        [
            {"id": r.property + str(i), "report": r.to_dict()}
            for i, r in enumerate(reports)
        ]
    )
    assert [c["outcome"] for c in doc["checks"]] == ["failed", "skipped", "ok"]
    assert doc["summary"]["by_status"]["skipped"] == 1
    assert doc["summary"]["failed"] == 1 and doc["summary"]["skipped"] == 1
    html = gc_report.render_html(doc)
    assert "<h3>Variants</h3>" in html
    assert "autocast:bfloat16" in html and "compile" in html and "lin.bias" in html
    assert EVIL not in html  # tensor names escaped in the table too
    assert "Ranks (world size 2, wrap fsdp, start 3.25 s, check 1.50 s)" in html
    assert "rank 1" in html and "0.0456" in html
    assert reports[1].headline() == "gradcheck: variants check skipped"
    assert "SKIPPED" in reports[1].message()


def test_order_and_autodiff_mode_are_shown():
    """The JSON carries order and ad; the HTML names a second-order or forward-mode
    check (issue 13) and says nothing for a plain one."""
    import dataclasses

    second = dataclasses.replace(linearity_report(), order=2, ad="forward")
    plain = linearity_report()
    assert second.to_dict()["order"] == 2 and second.to_dict()["ad"] == "forward"
    doc = gc_report.build_document(
        [
            {"id": "second", "report": second.to_dict()},
            {"id": "plain", "report": plain.to_dict()},
        ]
    )
    html = gc_report.render_html(doc)
    assert html.count("(second derivatives)") == 1
    assert html.count("forward mode</div>") == 1
