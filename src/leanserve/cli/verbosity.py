"""What a command prints besides its own output: leanserve's log lines, and libraries' warnings only with ``-v``.

Libraries reach the terminal four ways, and each is closed here (or, for native code, where it runs):
- Python warnings: captured into logging (``py.warnings``), so the log's one rule decides;
- logging through the root logger's handler: without ``-v`` only leanserve's records and errors pass,
  whatever level a library set on its own logger (Flower sets DEBUG on import, torch resets its own);
- libraries with their own handlers, in this process and in those a command starts (servers, Flower's
  SuperLink, Ray actors): through the environment they read at import (``QUIET_ENV``);
- native code writing to the terminal (ONNX Runtime, ExecuTorch's cpuinfo): the runtime modules let it
  through only when the library's logger is on at INFO, as under ``-v``.
"""

from __future__ import annotations

import logging
import os
import warnings

# Loggers of libraries that talk at WARNING about things a user of leanserve cannot act on.
CHATTY_LOGGERS = ("flwr", "torch", "torchao", "cpuinfo", "onnxscript", "ray", "urllib3", "absl")
# Read at import by libraries that set up their own handlers; processes a command starts inherit them.
QUIET_ENV = {
    "PYTHONWARNINGS": "ignore",
    "TORCH_LOGS": "-all",  # torch resets its loggers to WARNING on import: only its own variable holds
    "FLWR_LOG_LEVEL": "ERROR",  # Flower's console handler (in-process, SuperLink, SuperNodes, Ray actors)
}
# Commands whose library log is their output: `federate-client` becomes a Flower SuperNode, and Flower's
# INFO lines (joined, each round's message) are the only sign it is working.
LIBRARY_IS_THE_OUTPUT = {"federate-client": ("FLWR_LOG_LEVEL",)}
OWN_LOGGERS = ("leanserve", "__main__")


def configure(verbose: bool, command: str | None = None) -> None:
    """Set up logging for one ``command``: INFO and every library's warnings with ``verbose``; otherwise
    leanserve's WARNING and above and other libraries' errors only. In a process of its own (the root
    logger has no handlers yet) the handler and the environment are the command's to set; embedded
    (an application, pytest) only Python warnings and the chatty loggers are quieted."""
    fresh = not logging.getLogger().handlers
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if fresh:
        logging.captureWarnings(True)
    if verbose:
        return
    warnings.simplefilter("ignore")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if fresh:
        logging.getLogger().handlers[0].addFilter(_ours_or_error)
        for name, value in QUIET_ENV.items():
            if name not in LIBRARY_IS_THE_OUTPUT.get(command or "", ()):
                os.environ.setdefault(name, value)


def _ours_or_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or record.name.partition(".")[0] in OWN_LOGGERS

