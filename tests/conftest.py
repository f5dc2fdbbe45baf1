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
