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
