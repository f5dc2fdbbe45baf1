"""Silence the framework noise gradcheck itself causes, inside its own scope only.

gradcheck makes TensorFlow and PyTorch say things the user did not ask for:

* its float64 reference for float32 Keras models turns on TensorFlow's dtype
  promotion, and TensorFlow then logs "The new dtype semantics do not support ...
  Falling back to old semantics." for every Keras op it cannot promote (thousands
  of lines in an audit);
* the audit builds, compiles and traces one Keras model per generated example, and
  TensorFlow logs "triggered tf.function retracing" about the functions of those
  fresh models;
* the audit's generated models include Conv1d with padding="same" and an even
  kernel (a model users write; Keras pads it the same way), for which PyTorch warns
  that it "may require a zero-padded copy of the input".

:func:`quiet` drops exactly those messages (a :class:`logging.Filter` on the
``tensorflow`` logger and ``warnings`` filters matched on the message), and only
for the duration of the block: the logger's filters and the warning filters are
restored afterwards, so the user's own warnings, before, after and outside
gradcheck's calls, still show.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType

#: TensorFlow log messages caused by the float64 reference's dtype promotion
PROMOTION = ("The new dtype semantics do not support",)
#: TensorFlow log messages about tracing the audit's fresh models
RETRACING = ("triggered tf.function retracing",)
#: (message regex, category) of Python warnings the audit's generated models cause
GENERATED_MODEL_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (
        r"Using padding='same' with even kernel lengths and odd dilation",
        UserWarning,
    ),
)
#: the logger TensorFlow's Python side writes to (tf.get_logger())
TF_LOGGER = "tensorflow"


class _DropMessages(logging.Filter):
    """Drops records whose message contains one of ``needles``; counts them."""

    def __init__(self, needles: Sequence[str]) -> None:
        super().__init__()
        self.needles = tuple(needles)
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        if any(n in message for n in self.needles):
            self.dropped += 1
            return False
        return True


@contextlib.contextmanager
def quiet(
    tf_messages: Sequence[str] = PROMOTION + RETRACING,
    python_warnings: Sequence[tuple[str, type[Warning]]] = GENERATED_MODEL_WARNINGS,
) -> Iterator[_DropMessages]:
    """Within the block, drop TensorFlow log records containing one of
    ``tf_messages`` and Python warnings matching one of ``python_warnings``
    (message regex, category). Everything else passes; both are restored on exit.
    Nests. Yields the log filter (``.dropped`` counts what it dropped)."""
    drop = _DropMessages(tf_messages)
    logger = logging.getLogger(TF_LOGGER)
    logger.addFilter(drop)
    try:
        with contextlib.ExitStack() as stack:
            if python_warnings:  # catch_warnings restores the filters on exit
                stack.enter_context(warnings.catch_warnings())
                for pattern, category in python_warnings:
                    warnings.filterwarnings(
                        "ignore", message=pattern, category=category
                    )
            yield drop
    finally:
        logger.removeFilter(drop)


def promotion_quiet() -> contextlib.AbstractContextManager[_DropMessages]:
    """:func:`quiet` for the float64 reference's dtype promotion only: what any
    check of a float32 Keras model causes, the user's model or the audit's."""
    return quiet(PROMOTION, ())


#: what TensorFlow's C++ side writes to stderr while it is imported, before
#: TF_CPP_MIN_LOG_LEVEL applies (absl logs everything until it is initialised)
IMPORT_BANNER = (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are "
    r"written to STDERR$",
    r"^I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\.",
)


def import_quietly(name: str, banner: Sequence[str] = IMPORT_BANNER) -> ModuleType:
    """``import name`` with the lines matching ``banner`` dropped from what the
    import writes to file descriptor 2 (a C++ library logs there, not through
    ``sys.stderr``); every other line is written back to it. Used by the CLI, whose
    process is gradcheck's own, for the frameworks it audits."""
    if name in sys.modules:
        return sys.modules[name]
    fd = 2
    try:
        saved = os.dup(fd)
    except OSError:  # no stderr descriptor: nothing to filter
        return importlib.import_module(name)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            return importlib.import_module(name)
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            kept = [
                line
                for line in text.splitlines(keepends=True)
                if not any(re.search(p, line.rstrip("\n")) for p in banner)
            ]
            if kept:
                os.write(fd, "".join(kept).encode("utf-8"))
