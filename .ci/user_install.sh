#!/usr/bin/env bash
# The user's path, as the README's users take it: the built wheel installed with the
# `torch` extra into a clean venv (no repository on sys.path, nothing of .venv), then
# `gradcheck audit --framework torch --examples 2` and a pytest run with
# `--gradcheck-report` on a tiny test file. Both must work.
#
# torch is held at the pinned CPU build by a constraint file (requirements/ci.txt's
# torch line): pip never resolves a bare torch, which would pull multi-GB CUDA wheels.
# pip reuses the local torch file where the machine has one (find-links, cache).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PY:-python3}
BUILD_PY=${BUILD_PY:-$repo/.venv/bin/python}
[ -x "$BUILD_PY" ] || BUILD_PY=$PY

work=$(mktemp -d "${TMPDIR:-/tmp}/gradcheck-user.XXXXXX")
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
step() { echo "user_install: $1 ($(($(date +%s) - t0)) s so far)"; }

# 1. the wheel, built as pip builds it for a user (isolated build environment)
"$BUILD_PY" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
wheel=$(ls "$work"/dist/gradcheck-*.whl)
step "built $(basename "$wheel")"

# 2. a clean venv with the wheel and the torch extra, torch held at the CPU pin
grep -E '^torch==' requirements/ci.txt >"$work/constraints.txt"
[ -s "$work/constraints.txt" ] || { echo "no torch pin in requirements/ci.txt" >&2; exit 1; }
"$PY" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check)
# --no-compile: no .pyc for torch's thousands of modules at install (the slow part)
"${pip[@]}" install -q --no-compile -c "$work/constraints.txt" "${wheel}[torch]"
# the user's tests need pytest; hold it at the tested version too
grep -E '^pytest==' requirements/ci.txt >>"$work/constraints.txt"
"${pip[@]}" install -q --no-compile -c "$work/constraints.txt" pytest
"$work/venv/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.version.cuda is None, f"a CUDA torch was installed: {torch.__version__}"
cuda = sorted(d.metadata["Name"] for d in md.distributions()
              if d.metadata["Name"].lower().startswith("nvidia"))
assert not cuda, f"CUDA wheels were installed: {cuda}"
for name in ("hypothesis", "jinja2", "rich", "array-api-compat"):  # core dependencies, not extras
    md.version(name)
import importlib.util
assert importlib.util.find_spec("tensorflow") is None  # the torch extra only
print("user_install: torch", torch.__version__, "(CPU build), no CUDA wheels")
EOF
step "installed the wheel with [torch] into a clean venv"

# 3. the audit, from outside the repository (the installed package, not ./gradcheck)
cd "$work"
"$work/venv/bin/gradcheck" --version
"$work/venv/bin/python" -m gradcheck --version
"$work/venv/bin/gradcheck" audit --framework torch --examples 2 \
    --json "$work/audit.json" --report "$work/audit.html"
"$work/venv/bin/python" - "$work/audit.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
assert data["summary"]["all_ok"], data["summary"]
assert data["summary"]["jobs"] >= 14, data["summary"]  # every torch job ran
EOF
test -s "$work/audit.html"
step "gradcheck audit --framework torch --examples 2: exit 0, reports written"

# 4. the pytest plugin (registered by the wheel's entry point) and its report
mkdir -p "$work/project"
cat >"$work/project/test_user_model.py" <<'EOF'
import torch

import gradcheck


def test_my_model_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)
    report = gradcheck.check_gradients(lambda: model(x).square().mean(), params=model)
    assert report.passed, report.message()


def test_through_the_fixture(gradcheck):
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    gradcheck.assert_gradients(lambda t: t.sin().sum(), (x,))
EOF
cd "$work/project"
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider test_user_model.py \
    --gradcheck-report "$work/plugin.html" --gradcheck-json "$work/plugin.json"
"$work/venv/bin/python" - "$work/plugin.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
assert data["summary"]["checks"] == 2 and data["summary"]["ok"] == 2, data["summary"]
EOF
grep -q "<!DOCTYPE html>" "$work/plugin.html"
step "pytest --gradcheck-report: 2 checks recorded, HTML written"
echo "user_install: OK in $(($(date +%s) - t0)) s"
