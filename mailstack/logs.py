"""Logging set-up for every mailstack process, through the standard logging module."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    """One JSON object per line with time, level, logger, message and any extra fields."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._standard and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Send log records of ``level`` and above to standard error in ``fmt`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd logs every protocol line at INFO under "mail.log": show those lines
    # only when the root level is DEBUG.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level) if root.level > logging.DEBUG else logging.DEBUG)


class RepeatLimiter:
    """Decide whether to log one more event of a kind that a client can repeat at will.

    The first ``burst`` events of a key in each ``interval`` (seconds) are logged.
    The rest are counted, and the next logged event of that key reports how many
    were suppressed, so a flood of refused connections cannot fill the log.
    """

    def __init__(self, *, burst: int = 5, interval: float = 60.0, max_keys: int = 10_000, clock=None) -> None:
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock or time.monotonic
        # key -> [window start, events logged in the window, events suppressed]
        self._windows: dict[str, list[float]] = {}

    def allow(self, key: str) -> tuple[bool, int]:
        """Return whether to log this event, and how many earlier ones were suppressed."""
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            suppressed = int(window[2]) if window is not None else 0
            if window is None and len(self._windows) >= self.max_keys:
                # Forget the oldest window rather than grow without bound.
                self._windows.pop(next(iter(self._windows)))
            self._windows[key] = [now, 1, 0]
            return True, suppressed
        if window[1] < self.burst:
            window[1] += 1
            return True, 0
        window[2] += 1
        return False, 0
