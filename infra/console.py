"""What a person or a log shipper sees of long work: log lines and progress.

``setup_logging`` configures the root logger as text or as one JSON object per line
(``--log-format json`` / ``log.format``). ``Progress`` shows a tqdm bar when stderr is a
terminal and plain periodic lines otherwise (a bar's carriage returns make a log file
unreadable); in JSON mode those lines are JSON objects too.

The JSON formatter is written here rather than taken from python-json-logger: it is a dozen
lines, and the one library that would do it is not among the project's pinned dependencies.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any, TextIO

_FORMAT = {"format": "text"}
_RESERVED = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO-8601 UTC), level, logger, message, and exc (the
    traceback as one string) plus any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(fmt: str = "text", level: int | str = logging.WARNING) -> None:
    """The root logger's one handler (stderr), as text or JSON lines."""
    _FORMAT["format"] = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def emit(line: str, stream: TextIO | None = None, level: str = "INFO", **fields: Any) -> None:
    """A status line on stderr: text, or a JSON object (``setup_logging("json")``)."""
    stream = stream or sys.stderr
    if _FORMAT["format"] == "json":
        line = json.dumps({"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                           "level": level, "logger": "streamrec", "message": line, **fields},
                          default=str, ensure_ascii=False)
    print(line, file=stream, flush=True)


class Progress:
    """Progress of one piece of long work (``total`` units, or open-ended when None).

    ``update(n)`` adds done units, ``set(done)`` sets them; ``note`` is free text shown beside
    (a loss, what is behind). On a terminal: a tqdm bar. Otherwise a line every ``every_s``
    seconds and one at the end: "<desc>: <done>/<total> <unit> (<rate>/s) <note>"."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "events", every_s: float = 5.0,
                 stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.note = ""
        self._t0 = time.monotonic()
        self._last = self._t0
        interactive = self.stream.isatty() if tty is None else tty
        self._bar = None
        self._shown = -1  # units done at the last plain line
        self._closed = False
        if interactive and _FORMAT["format"] != "json":
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", unit_scale=True, file=self.stream,
                             dynamic_ncols=True, leave=True)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.set(self.done + n, note)

    def set(self, done: int, note: str | None = None) -> None:
        delta, self.done = done - self.done, done
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.update(delta)
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._line()

    def _line(self, final: bool = False) -> None:
        self._shown = self.done
        seconds = time.monotonic() - self._t0
        rate = self.done / seconds if seconds > 0 else 0.0
        of = f"/{self.total:,}" if self.total is not None else ""
        tail = f" {self.note}" if self.note else ""
        emit(f"{self.desc}: {self.done:,}{of} {self.unit} ({rate:,.0f}/s){' done' if final else ''}{tail}",
             self.stream, done=self.done, total=self.total, unit=self.unit, rate_per_s=round(rate, 1))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._shown != self.done:
            self._line(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["JsonFormatter", "Progress", "emit", "setup_logging"]
