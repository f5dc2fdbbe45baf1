"""CI's slice of the `hf:*` sweep (reports/models.md): a fixed, diverse subset of
ten transformers model types must pass outright; and benchmarks/model_sweep.py
turns sweep rows into the report.

The subset: an encoder (bert), decoders (gpt2, llama), encoder-decoders (t5,
bart), vision (vit, and bit: a convolutional ResNet-v2), a mixture of experts
(mixtral), audio (wav2vec2, whisper). Each is checked in this process (no worker)
on fd, linearity and locality in float32 and fd in float64: CI's budget (the
sweep runs all three in both dtypes; float64 linearity and locality cost the
most and pass in it for all ten). resnet and mobilenet_v2 pass too since the
build sets batch-norm statistics from the inputs (before, at the initial
statistics, a few ReLU units sat exactly on their kink and fd was
``nondifferentiable``); they are not here to keep CI's time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gradcheck import models

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]

#: model type -> (kind, the input it is given)
SUBSET = {
    "bert": ("encoder", "input_ids"),
    "gpt2": ("decoder", "input_ids"),
    "llama": ("decoder", "input_ids"),
    "t5": ("encoder-decoder", "decoder_input_ids"),
    "bart": ("encoder-decoder", "decoder_input_ids"),
    "vit": ("vision", "pixel_values"),
    "bit": ("vision, convolutional (ResNet-v2)", "pixel_values"),
    "mixtral": ("mixture of experts", "input_ids"),
    "wav2vec2": ("audio", "input_values"),
    "whisper": ("audio encoder-decoder", "input_features"),
}


@pytest.mark.parametrize("model_type", list(SUBSET))
def test_subset_type_passes_every_check(model_type):
    checker = models.Checker(f"hf:{model_type}")
    checker.build()
    _, inputs = checker._built
    assert SUBSET[model_type][1] in inputs, sorted(inputs)
    assert 1_000 < checker.parameters < 2_000_000  # shrunk
    jobs = [(p, "float32") for p in models.PROPERTIES] + [("fd", "float64")]
    reports = [checker.run(p, d) for p, d in jobs]
    failed = {r.label: r.message() for r in reports if r.status != "passed"}
    assert not failed, failed


# ---------------------------------------------------------------- the report
def _sweep():
    spec = importlib.util.spec_from_file_location(
        "model_sweep", ROOT / "benchmarks" / "model_sweep.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows():
    rows = []
    for model, bad in (("hf:bert", None), ("hf:led", ("fd", "float64", "error"))):
        for d in models.DTYPES:
            for p in models.PROPERTIES:
                status = bad[2] if bad and (p, d) == bad[:2] else "passed"
                rows.append(
                    {
                        "model": model,
                        "property": p,
                        "dtype": d,
                        "status": status,
                        "seconds": 0.5,
                        "parameters": 1234,
                        "message": "the output is NaN at the point to check"
                        if status != "passed"
                        else "gradcheck: check passed",
                    }
                )
    return rows


def test_report_has_one_row_per_model_totals_and_every_failure_explained():
    sweep = _sweep()
    text = sweep.render(
        _rows(), command="gradcheck check-model 'hf:*'", wall_seconds=3725, cpu="X"
    )
    assert "- command: `gradcheck check-model 'hf:*'`" in text
    assert "- machine: X," in text and "wall time: 1:02:05 for 2 models" in text
    assert "| float64 | 6 | 5 (83.3%) | 0 | 0 | 0 | 1 | 0 | 0 |" in text
    assert "| float32 | 6 | 6 (100.0%) |" in text
    assert "Models with every check passed: 1 of 2 (50.0%)" in text
    assert "| bert | 1,234 | passed | passed |" in text
    assert "| led | 1,234 | passed | passed | passed | **error** |" in text
    (line,) = [x for x in text.splitlines() if x.startswith("- **led**")]
    assert "(fd float64) error: the output is NaN" in line
    assert "Without the" not in text  # no type transformers itself cannot build
    assert "Partial run" not in text
    partial = sweep.render(_rows(), command="c", wall_seconds=None, partial="why")
    assert "> **Partial run.** why" in partial


def test_report_counts_the_goal_without_types_transformers_cannot_build():
    own = {
        "model": "hf:timm_wrapper",
        "property": "fd",
        "dtype": "float32",
        "status": "unbuildable",
        "seconds": 0.1,
        "parameters": 0,
        "message": "transformers 5.25.0 cannot build timm_wrapper from its default "
        "config either (not gradcheck's shrink): ImportError: timm",
    }
    text = _sweep().render([*_rows(), own], command="c", wall_seconds=1.0)
    assert "| float32 | 7 | 6 (85.7%) |" in text  # every row
    assert "Without the 1 types transformers cannot build" in text
    assert "| float32 | 6 | 6 (100.0%) |" in text  # the goal's rows
    assert "Checks passed outright: 11 of 12 (91.7%)" in text
    assert "Mismatches: 0 checks on 0 models. 0 of them" in text
    assert "## Not in `hf:*`" not in text
    left = _sweep().render(
        _rows(), command="c", wall_seconds=1.0, excluded={"bark": "no forward"}
    )
    assert "## Not in `hf:*`" in left and "- **bark**: no forward" in left
    tail = text.split("## Types transformers cannot build")[1]
    assert "- **timm_wrapper**: transformers 5.25.0 cannot build" in tail
    assert "timm_wrapper" not in text.split("## Not passed")[1].split("## Types")[0]


def test_report_reads_the_printed_lines_of_a_stopped_run(capsys):
    from gradcheck.cli import main

    main(
        [
            "check-model",
            "tests.test_check_model:correct_mlp",
            "hf:not_a_model",
            "--properties",
            "fd",
            "--timeout",
            "0",
        ]
    )
    rows = _sweep().parse_lines(capsys.readouterr().out)
    assert [(r["model"], r["status"]) for r in rows] == [
        ("tests.test_check_model:correct_mlp", "passed"),
        ("hf:not_a_model", "unbuildable"),
    ]
    assert rows[0]["parameters"] == 6 * 12 + 12 + 12 * 12 + 12 + 12 * 3 + 3
    assert "has no model type 'not_a_model'" in rows[1]["message"]
    assert not rows[1]["message"].endswith("]")  # the [n/N] counter is not kept


def test_report_explains_a_kink_from_the_message_notes():
    message = (
        "gradcheck: finite-difference check FAILED (nondifferentiable) at 'a.b'[0]\n"
        "  partial derivative w.r.t. 'a.b'[0]:\n"
        "  note: one-sided derivatives differ at x: the function is not "
        "differentiable at x. Checked again at a nearby point: every tensor moved "
        "(seed 3), the gradient matches finite differences: the framework's "
        "gradient is right where the function is differentiable. At x, 4 unit(s) "
        "sit exactly on a kink: encoder.act 4/16384. To check at x itself, move it."
    )
    text = _sweep().explain(
        "hf:resnet", {"status": "nondifferentiable", "message": message}
    )
    assert text == (
        "gradcheck: finite-difference check FAILED (nondifferentiable) at 'a.b'[0]; "
        "re-checked at a nearby point: the gradient matches there; At x, 4 unit(s) "
        "sit exactly on a kink: encoder.act 4/16384"
    )


def test_report_html_is_the_models_table(tmp_path):
    path = tmp_path / "models.html"
    _sweep().write_models_html(_rows(), path, command="c")
    html = path.read_text()
    assert "<h2>Models</h2>" in html and "hf:led" in html
    assert 'class="badge s-error"' in html and len(html) < 200_000
