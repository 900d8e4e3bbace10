"""What the command line says besides its result, and where: `-v` counts to log levels.

stdout carries only a command's result (tables, `--json`); every log record
and warning goes to stderr. Without `-v` only dlngraph's own warnings and the
libraries' errors show; `-v` adds dlngraph's progress and the libraries'
warnings (Python warnings included); `-vv` shows everything at debug level.
"""

from __future__ import annotations

import logging
import os
import sys

# (dlngraph's own loggers, every other logger) per -v count.
_LEVELS = ((logging.WARNING, logging.ERROR), (logging.INFO, logging.WARNING), (logging.DEBUG, logging.DEBUG))
# litellm's own handler writes records below WARNING to stdout, and the one it
# creates at import reads its level from LITELLM_LOG; its records still reach
# the stderr handler below by propagation.
_LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


def configure(verbose: int) -> None:
    """Route logs and warnings to stderr at the levels `verbose` (the -v count) asks for."""
    own, libraries = _LEVELS[min(max(verbose, 0), len(_LEVELS) - 1)]
    root = logging.getLogger()
    if not root.handlers:  # a program (or pytest) that calls main() keeps its own handlers
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(libraries)
    logging.getLogger("dlngraph").setLevel(own)
    logging.captureWarnings(True)  # as records of `py.warnings`: shown from -v on
    level_name = logging.getLevelName(libraries).lower()
    # transformers and huggingface_hub keep a stderr handler of their own and
    # read their level from these variables when first imported.
    os.environ["TRANSFORMERS_VERBOSITY"] = level_name
    os.environ["HF_HUB_VERBOSITY"] = level_name
    os.environ["LITELLM_LOG"] = "CRITICAL"
    for name in _LITELLM_LOGGERS:  # litellm imported before this call (a program embedding main())
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
