"""What a user sees of a run beyond the log lines: the cause of a failure as the last lines printed,
a progress bar on a terminal, and a summary when training ends."""

from __future__ import annotations

import logging
import sys
import traceback
from types import TracebackType

from monai.bundle.config_item import ConfigItem
from monai.bundle.utils import ID_SEP_KEY

logger = logging.getLogger(__name__)

# messages of the wrappers MONAI puts around an error: the cause is the first error that is not one
WRAPPER_MESSAGES = ("Failed to evaluate", "Failed to instantiate", "applying transform")


def _chain(error: BaseException) -> list[BaseException]:
    errors = []
    while error is not None and error not in errors:
        errors.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return errors


def error_summary(error: BaseException) -> str:
    """Two lines that say what went wrong: the config item being resolved (the innermost one in the
    traceback) and the first error of the chain that is not a wrapper of MONAI's config resolver or
    transforms, whose message names the key and the fix."""
    chain = _chain(error)
    item = None
    for e in chain:
        for frame, _ in traceback.walk_tb(e.__traceback__):
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigItem):
                item = owner.get_id().replace(ID_SEP_KEY, "#")
    cause = next(
        (e for e in chain if not (isinstance(e, RuntimeError) and str(e).startswith(WRAPPER_MESSAGES))), chain[-1]
    )
    where = f" (while resolving config item '{item}')" if item else ""
    return f"Error{where}:\n  {type(cause).__name__}: {cause}"


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    _previous_hook(kind, error, tb)
    if not isinstance(error, (KeyboardInterrupt, SystemExit)):
        print(f"\n{error_summary(error)}", file=sys.stderr, flush=True)


_previous_hook = sys.excepthook


def report_errors() -> None:
    """Print :func:`error_summary` after the traceback of an error that ends the run, so that the last
    lines a user sees name the cause rather than MONAI's final "Failed to evaluate ConfigExpression".
    Called first in a config's ``initialize``."""
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
