"""Keep Flower's and Ray's log noise off the console unless --verbose is given.

Must run before flwr is imported: the environment variables also reach Ray workers.
"""

from __future__ import annotations

import logging
import os
import re
import warnings


def configure(verbose: bool = False) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        os.environ["FLWR_LOG_LEVEL"] = "INFO"
        return
    os.environ["FLWR_LOG_LEVEL"] = "ERROR"
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    # Our own server/client loggers too: rejections and refusals are in the audit log.
    for name in ("flwr", "ray", "alembic", "datasets", "opacus", "filelock", "server", "clients"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("flwr").propagate = False
    try:
        from flwr.common.logger import update_console_handler

        update_console_handler(level=logging.ERROR)
    except Exception:  # flwr not importable yet is fine: FLWR_LOG_LEVEL covers it
        pass


def ray_init_args(verbose: bool) -> dict:
    if verbose:
        return {}
    # Not include_dashboard=False: with it, Ray start-up took minutes here.
    return {"logging_level": "ERROR", "log_to_driver": False}


# Terminal colour and cursor codes, which Flower and Ray put in their messages.
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def without_terminal_codes(text: str) -> str:
    return _TERMINAL_CODES.sub("", text)
