"""ssmc's logging: every module logs under the `ssmc` logger, its level set from `$SSMC_LOG`.

`SSMC_LOG=info` (or debug, warning, error; a number works too) shows what ssmc does
that takes time or decides something: renders and compiles, cache hits, misses and
rebuilds, loads, the planner's choice, benchmark steps. The default is WARNING.
`ssmc/__init__` calls `configure()` once; the CLI calls it again with `--log`.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "SSMC_LOG"
FORMAT = "ssmc: %(levelname)s: %(name)s: %(message)s"
_HANDLER_FLAG = "_ssmc_handler"


def parse_level(text: str | int | None) -> int:
    """A logging level from `info`, `DEBUG`, `20`...; ValueError naming the choices otherwise."""
    if text is None or text == "":
        return logging.WARNING
    if isinstance(text, int):
        return text
    name = text.strip().upper()
    if name.isdigit():
        return int(name)
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(
            f"unknown log level {text!r}; use debug, info, warning, error or critical"
        )
    return level


def configure(level: str | int | None = None) -> logging.Logger:
    """Set the `ssmc` logger's level: `level`, else `$SSMC_LOG`, else WARNING.

    When a level is asked for (argument or `$SSMC_LOG`), a stderr handler is attached to
    the `ssmc` logger, once, and records stop there (no duplicates through the root
    logger); otherwise records propagate as usual (to the application's handlers, or
    Python's last-resort stderr handler for warnings). A bad `$SSMC_LOG` value falls
    back to WARNING with a message, never an exception at import time.
    """
    logger = logging.getLogger("ssmc")
    source = level if level is not None else os.environ.get(ENV)
    try:
        logger.setLevel(parse_level(source))
    except ValueError as err:
        logger.setLevel(logging.WARNING)
        print(f"ssmc: warning: ${ENV}: {err}", file=sys.stderr)
        return logger
    asked = source is not None and source != ""
    if asked and not any(getattr(h, _HANDLER_FLAG, False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        setattr(handler, _HANDLER_FLAG, True)
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (`ssmc.load`...): a child of the configured `ssmc` logger."""
    return logging.getLogger(name)
