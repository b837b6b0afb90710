"""engine's log lines (start-up facts such as the KV cache size) go to stderr at INFO by
default, as vLLM does; ENGINE_CONFIGURE_LOGGING=0 leaves logging to the application."""

import logging
import os
import sys


def configure_logging() -> None:
    logger = logging.getLogger("engine")
    if os.environ.get("ENGINE_CONFIGURE_LOGGING", "1") == "0" or logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
