"""Shared test set-up: hypothesis profiles and framework availability.

Profiles: ``ci`` (default, small) and ``thorough`` (large); pick one with
HYPOTHESIS_PROFILE=thorough. Framework tests skip cleanly when torch/TensorFlow
are not installed.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# pytester's in-process runs (test_plugin, test_check_model, test_repro) drop the
# modules first imported inside them, and torch's dynamo (imported by the first
# torch.manual_seed) registers a TORCH_LIBRARY that cannot be registered twice: a
# later test importing it again fails. Loaded here, before any inner session.
try:
    import torch._dynamo  # noqa: F401
except ImportError:  # torch absent: its tests skip themselves
    pass

# The same drop splits gradcheck itself in two: a gradcheck module first imported
# inside an inner session is imported afresh by the next test, while objects made
# by the dropped copy live on (CI failed once on it: pickle refused the distributed
# backend's batch class, "not the same object as ...torch_distributed._Leaf").
# Every gradcheck module is imported here, once per worker, except those that
# import TensorFlow (3-5 s, and backends are picked from sys.modules: a test must
# not find TensorFlow loaded by this file).
_TF_MODULE_WORDS = ("tensorflow", "keras", "mirrored")


def _import_gradcheck_modules() -> None:
    import importlib
    import pkgutil
    import sys

    import gradcheck

    had_tf = "tensorflow" in sys.modules
    for info in pkgutil.walk_packages(gradcheck.__path__, "gradcheck."):
        if any(word in info.name for word in _TF_MODULE_WORDS):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # its framework is absent: its tests skip themselves
            pass
    if "tensorflow" in sys.modules and not had_tf:
        raise RuntimeError(
            "tests/conftest.py imported TensorFlow through a gradcheck module whose "
            "name does not say so: add a word of its name to _TF_MODULE_WORDS"
        )


_import_gradcheck_modules()
