"""Log lines from Ray's worker and task processes, which start with bare logging."""
from __future__ import annotations

import logging


def log_to_stderr() -> None:
    """Show dino_ray's INFO lines on stderr (they reach the driver's terminal and ``ray job logs``)."""
    logger = logging.getLogger("dino_ray")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
