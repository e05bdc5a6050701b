"""Route a stage's logging, progress bars and uncaught exceptions to its Snakemake log file."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

__all__ = ["configure_logging"]


def configure_logging(log_path: str | None, level: int = logging.INFO) -> logging.Logger:
    """Send logging and stderr (tqdm bars) to log_path; uncaught errors to the log AND the console.

    The console keeps the one-line error so a failed job explains itself without opening the log.
    """
    console = sys.__stderr__
    handlers: list[logging.Handler] = [logging.StreamHandler(console)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
        sys.stderr = stream
        handlers.append(logging.StreamHandler(stream))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)

    def excepthook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        if sys.stderr is not console:
            sys.stderr.write(text)
            sys.stderr.flush()
        console.write(f"ERROR {exc_type.__name__}: {exc}\n")

    sys.excepthook = excepthook
    return logging.getLogger("dnc")
