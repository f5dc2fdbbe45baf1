"""keras.applications by name (``keras:<Application>``): ``weights=None``, 10
classes, the smallest square input the application accepts (32x32 where allowed).

Used by :mod:`gradcheck.models`; imports Keras only when called.
"""

from __future__ import annotations

import random
import re
from typing import Any

from gradcheck.errors import GradcheckError

__all__ = ["SIZES", "applications", "build"]

#: square input sizes tried, smallest first; an application's own error message
#: ("should be no smaller than 75") moves the search straight to its minimum
SIZES = (32, 64, 71, 75, 96, 128, 139, 224, 299, 331)
CLASSES = 10


def applications() -> dict[str, Any]:
    """{name: constructor} of every application in ``keras.applications``."""
    import keras

    found = {}
    for module_name in dir(keras.applications):
        module = getattr(keras.applications, module_name)
        if module_name[:1].isupper() and callable(module):
            found[module_name] = module
        elif not module_name.startswith("_") and hasattr(module, "__dict__"):
            for name, obj in vars(module).items():
                if name[:1].isupper() and callable(obj) and not isinstance(obj, type):
                    found.setdefault(name, obj)
    return found


def build(
    name: str, seed: int, max_parameters: int, dtype: str = "float32"
) -> tuple[Any, Any, int]:
    """(model, input batch of 2, parameter count). GradcheckError for an unknown
    name (with the known ones); the last ValueError when no size fits."""
    import keras
    import numpy as np

    apps = applications()
    if name not in apps:
        import difflib

        close = difflib.get_close_matches(name, apps, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise GradcheckError(
            f"keras.applications has no {name!r}.{hint} Known: "
            f"{', '.join(sorted(apps))}."
        )
    ctor = apps[name]
    saved = random.getstate(), np.random.get_state()
    policy = keras.config.dtype_policy()
    last: Exception | None = None
    sizes = list(SIZES)
    try:
        if dtype != "float32":
            keras.config.set_dtype_policy(dtype)
        while sizes:
            size = sizes.pop(0)
            keras.utils.set_random_seed(seed)
            try:
                model = ctor(weights=None, input_shape=(size, size, 3), classes=CLASSES)
            except ValueError as exc:
                last = exc
                floor = [int(n) for n in re.findall(r"\b(\d{2,3})\b", str(exc))]
                bigger = [n for n in floor if n > size]
                if bigger:
                    sizes = [s for s in sizes if s >= min(bigger)] or [min(bigger)]
                    if min(bigger) not in sizes:
                        sizes.insert(0, min(bigger))
                continue
            n = int(sum(np.prod(w.shape) for w in model.weights))
            if n > max_parameters:
                raise MemoryError(
                    f"keras:{name} has {n:,} weights at {size}x{size} with "
                    f"{CLASSES} classes, over the limit of {max_parameters:,}; raise "
                    "max_parameters to check it anyway."
                )
            rng = np.random.default_rng(seed)
            x = rng.standard_normal((2, size, size, 3)).astype(dtype)
            return model, x, n
    finally:
        keras.config.set_dtype_policy(policy)
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    raise ValueError(f"keras:{name} accepts none of the input sizes {SIZES}: {last}")
