"""Collect every warning a piece of code emits: Python warnings, and log records at WARNING or above from any logger
(transformers' own logger does not propagate to the root logger, so it is watched as well)."""

import contextlib
import logging
import warnings
from collections.abc import Iterator


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name} {record.levelname}: {record.getMessage()}")


@contextlib.contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Yields a list that holds, once the block is done, one line per warning emitted inside it."""
    collector = _Collector()
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(collector)
    found: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        for logger in loggers:
            logger.removeHandler(collector)
    found.extend(collector.messages)
    found.extend(f"{warning.category.__name__}: {warning.message}" for warning in caught)
