"""Loaders: public dataset files -> ``Click`` events in event-time order.

Every loader returns clicks sorted by timestamp (Unix **milliseconds**); the sort is stable,
so clicks with equal timestamps keep file order. Ids are taken from the file as they are and
must match ``ID_PATTERN``: nothing is rewritten, a bad id is an error. Event ids are derived
from the content, so loading the same file twice gives the same ids (unique per user).

Errors are ``DatasetError`` with a one-line message ``<file>:<line>: <what was wrong>``.
Bad arguments (an unknown format, a negative limit) are ``ConfigError``.

Formats:

* MovieLens ratings: ``ratings.csv`` (``userId,movieId,rating,timestamp`` with header), the
  ML-1M/10M ``ratings.dat`` (``user::item::rating::timestamp``) and ML-100K ``u.data``
  (tab-separated); timestamps in Unix seconds.
* MovieLens catalog: ``movies.csv`` (``movieId,title,genres``) or ``movies.dat``.
* SASRec-style sequences: ``user item`` per line, chronological, no timestamps.
* Session logs: ``session,item,time`` (``,``, ``;`` or tab separated, optional header), time in
  Unix seconds, Unix milliseconds or ISO-8601, detected per value.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from pathlib import Path
from typing import IO, Final

from streamrec.models.errors import ConfigError, StreamrecError
from streamrec.models.events import ID_PATTERN, MAX_TIMESTAMP_MS, Click, Item

__all__ = [
    "FORMATS",
    "MOVIELENS_CATALOG_TIME_MS",
    "DatasetError",
    "detect_format",
    "load_any",
    "load_movielens",
    "load_movielens_items",
    "load_sasrec",
    "load_sessions",
]

# Catalog records carry no time; 1990-01-01T00:00:00Z is the earliest time validation accepts,
# so catalog events sort before every rating (MovieLens starts in 1995).
MOVIELENS_CATALOG_TIME_MS: Final = 631_152_000_000

# Numbers below this are Unix seconds (up to year 5138), at or above it Unix milliseconds
# (from 1973-03-03 on): real logs never fall in the ambiguous range.
_SECONDS_BELOW: Final = 100_000_000_000

_ID: Final = re.compile(ID_PATTERN)
_DECIMAL: Final = re.compile(r"(\d+)\.(\d*)")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_MAX_ID_LEN: Final = 128
_NO_GENRES: Final = "(no genres listed)"
_by_time: Final = attrgetter("timestamp")

PathLike = str | os.PathLike[str]


class DatasetError(StreamrecError):
    """A dataset file that cannot be loaded as given: missing, unreadable or malformed."""


def _show(value: str, limit: int = 40) -> str:
    """A value for an error message: quoted, on one line, truncated."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Source:
    """Names the file in errors and remembers which ids were already checked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ok_ids: set[str] = set()
        self.event_ids: set[str] = set()

    def error(self, line: int, what: str) -> DatasetError:
        return DatasetError(f"{self.path}:{line}: {what}")

    def check_id(self, value: str, line: int, field: str) -> None:
        if value not in self.ok_ids:
            if _ID.fullmatch(value) is None:
                raise self.error(
                    line,
                    f"{field} {_show(value)} is not a valid id (1-128 chars of [A-Za-z0-9._~@:+=/-])",
                )
            self.ok_ids.add(value)

    def event_id(self, base: str, line: int) -> str:
        """``base``, or ``base~<line>`` if it was already used (e.g. a repeated rating)."""
        eid = base if base not in self.event_ids else f"{base}~{line}"
        if eid in self.event_ids or len(eid) > _MAX_ID_LEN:
            raise self.error(
                line, f"cannot derive a unique event id of <= 128 chars from {_show(base)}"
            )
        self.event_ids.add(eid)
        return eid

    def check_time(self, ts_ms: int, line: int, raw: str) -> None:
        if not 0 <= ts_ms <= MAX_TIMESTAMP_MS:
            raise self.error(line, f"timestamp {_show(raw)} is outside 1970..2100")


@contextmanager
def _open(path: PathLike, encoding: str = "utf-8-sig") -> Iterator[tuple[_Source, IO[str]]]:
    """Open a text file for the loaders; UTF-8 by default, tolerating a byte-order mark."""
    p = Path(path)
    try:
        f = open(p, encoding=encoding, newline="")  # noqa: SIM115 - closed by the `with f` below
    except FileNotFoundError:
        raise DatasetError(f"{p}: not found") from None
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read: {exc.strerror or exc}") from None
    source = _Source(p)
    with f:
        try:
            yield source, f
        except UnicodeDecodeError as exc:
            label = "utf-8" if encoding.startswith("utf-8") else encoding
            raise DatasetError(f"{p}: not {label} text (byte {exc.start} of a line)") from None


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")


def _first_line(f: IO[str]) -> tuple[int, str]:
    """(line number, text without line ending) of the first non-blank line; rewinds the file.

    ``(0, "")`` for a blank file.
    """
    for lineno, line in enumerate(f, 1):
        if line.strip():
            f.seek(0)
            return lineno, line.rstrip("\r\n")
    f.seek(0)
    return 0, ""


def _parse_time_ms(raw: str) -> int | None:
    """Unix seconds, Unix milliseconds (by magnitude), decimal seconds or ISO-8601 -> ms.

    ISO times without a zone are taken as UTC. Returns None if ``raw`` is none of these.
    """
    if raw.isascii() and raw.isdigit():
        value = int(raw)
        return value * 1000 if value < _SECONDS_BELOW else value
    m = _DECIMAL.fullmatch(raw)
    if m is not None:  # decimal seconds, exact to the millisecond (truncated)
        return int(m.group(1)) * 1000 + int((m.group(2) + "000")[:3])
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS


# --- MovieLens -----------------------------------------------------------------------------

_USER_COLS: Final = ("userid", "user_id", "user")
_ITEM_COLS: Final = ("movieid", "movie_id", "itemid", "item_id", "item")
_RATING_COLS: Final = ("rating",)
_TIME_COLS: Final = ("timestamp", "time", "ts")
_HEADER_NAMES: Final = frozenset(_USER_COLS + _ITEM_COLS + _RATING_COLS + _TIME_COLS)


def _column(
    header: list[str], names: tuple[str, ...], source: _Source, line: int, what: str
) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise source.error(line, f"header {_show(','.join(header), 80)} has no {what} column")


def _movielens_rows(source: _Source, f: IO[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, [user, item, rating, timestamp]) for each data row, any MovieLens layout."""
    _, first = _first_line(f)
    if "::" in first:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line:
                yield lineno, line.split("::")
        return
    delimiter = "\t" if "\t" in first and "," not in first else ","
    reader = csv.reader(f, delimiter=delimiter)
    cols = (0, 1, 2, 3)
    width = 4
    first_row = True
    for row in reader:
        if not row:
            continue
        if first_row:
            first_row = False
            if _HEADER_NAMES & {h.strip().lower() for h in row}:
                at = reader.line_num
                cols = (
                    _column(row, _USER_COLS, source, at, "user"),
                    _column(row, _ITEM_COLS, source, at, "movie"),
                    _column(row, _RATING_COLS, source, at, "rating"),
                    _column(row, _TIME_COLS, source, at, "timestamp"),
                )
                width = len(row)
                continue
        if len(row) != width:
            raise source.error(reader.line_num, f"expected {width} fields, got {len(row)}")
        if cols == (0, 1, 2, 3) and width == 4:
            yield reader.line_num, row
        else:
            yield reader.line_num, [row[c] for c in cols]


def load_movielens(
    path: PathLike, *, min_rating: float | None = None, limit: int | None = None
) -> list[Click]:
    """MovieLens ratings as clicks, sorted by time (stable).

    Ids: user ``"{userId}"``, item ``"{movieId}"``, event ``"ml-{user}-{item}-{ts_s}"`` (a
    repeated user, movie and second gets ``~<line>`` appended). ``min_rating`` keeps only
    ratings >= it. ``limit`` stops after that many accepted ratings in *file* order (files are
    grouped by user, so this keeps whole histories of the first users), then sorts.
    """
    _check_limit(limit)
    clicks: list[Click] = []
    if limit == 0:
        return clicks
    with _open(path) as (source, f):
        check_id, event_id, error = source.check_id, source.event_id, source.error
        for lineno, row in _movielens_rows(source, f):
            if len(row) != 4:
                raise error(
                    lineno, f"expected 4 fields user::item::rating::timestamp, got {len(row)}"
                )
            user, item, rating_s, ts_s = row
            # int() alone would also take " 12" or "1_2", which must not reach an event id.
            if not (ts_s.isascii() and ts_s.isdigit()):
                raise error(lineno, f"timestamp {_show(ts_s)} is not an integer (Unix seconds)")
            ts = int(ts_s)
            ts_ms = ts * 1000
            try:
                rating = float(rating_s)
            except ValueError:
                raise error(lineno, f"rating {_show(rating_s)} is not a number") from None
            if not math.isfinite(rating):
                raise error(lineno, f"rating {_show(rating_s)} is not a finite number")
            check_id(user, lineno, "user")
            check_id(item, lineno, "movie")
            source.check_time(ts_ms, lineno, ts_s)
            if min_rating is not None and rating < min_rating:
                continue
            eid = event_id(f"ml-{user}-{item}-{ts}", lineno)
            clicks.append(Click(id=eid, timestamp=ts_ms, user=user, item=item))
            if limit is not None and len(clicks) >= limit:
                break
    clicks.sort(key=_by_time)
    return clicks


def load_movielens_items(path: PathLike) -> list[Item]:
    """MovieLens ``movies.csv`` (or ``movies.dat``) as ``Item`` events, in file order.

    Item id ``"{movieId}"``, event id ``"ml-item-{movieId}"``, tags = the genres (without
    "(no genres listed)"), category = the first genre or None, timestamp
    ``MOVIELENS_CATALOG_TIME_MS`` (1990-01-01T00:00:00Z; the files carry no time).
    """
    p = Path(path)
    dat = p.suffix.lower() == ".dat"
    items: list[Item] = []
    first_seen: dict[str, int] = {}
    # ML-1M/10M .dat files are Latin-1; the .csv releases are UTF-8.
    with _open(p, encoding="latin-1" if dat else "utf-8-sig") as (source, f):
        rows: Iterator[tuple[int, list[str]]]
        if dat:
            rows = (
                (n, line.rstrip("\r\n").split("::")) for n, line in enumerate(f, 1) if line.strip()
            )
        else:
            reader = csv.reader(f)
            rows = ((reader.line_num, row) for row in reader if row)
        for lineno, row in rows:
            if lineno == 1 and not dat and row[0].strip().lower() == "movieid":
                continue
            if len(row) != 3:
                raise source.error(
                    lineno, f"expected 3 fields movieId,title,genres, got {len(row)}"
                )
            movie, title, genres = row
            source.check_id(movie, lineno, "movie")
            if movie in first_seen:
                raise source.error(
                    lineno, f"movie {_show(movie)} already listed on line {first_seen[movie]}"
                )
            first_seen[movie] = lineno
            if len(title) > 1024:
                raise source.error(lineno, f"title is {len(title)} chars, limit 1024")
            tags = [] if genres in ("", _NO_GENRES) else genres.split("|")
            if len(tags) > 64:
                raise source.error(lineno, f"{len(tags)} genres, limit 64")
            for tag in tags:
                if not 1 <= len(tag) <= 64:
                    raise source.error(lineno, f"genre {_show(tag)} must be 1-64 chars")
            items.append(
                Item(
                    id=f"ml-item-{movie}",
                    timestamp=MOVIELENS_CATALOG_TIME_MS,
                    item=movie,
                    title=title,
                    tags=tags,
                    category=tags[0] if tags else None,
                )
            )
    return items


# --- SASRec sequences ----------------------------------------------------------------------


def load_sasrec(
    path: PathLike,
    *,
    start_ms: int = 1_600_000_000_000,
    step_ms: int = 60_000,
    limit: int | None = None,
) -> list[Click]:
    """SASRec-style ``user item`` lines (chronological per user) as clicks.

    The files carry no time: the k-th data line (0-based, blank lines skipped) is stamped
    ``start_ms + k * step_ms`` (ms), which keeps every user's order, so file order is time
    order. Event id ``"sr-{user}-{k}"``. ``limit`` stops after that many lines.
    """
    _check_limit(limit)
    if step_ms < 1:
        raise ConfigError(f"step_ms must be >= 1, got {step_ms}")
    if not 0 <= start_ms <= MAX_TIMESTAMP_MS:
        raise ConfigError(f"start_ms must be a Unix time in milliseconds, got {start_ms}")
    clicks: list[Click] = []
    if limit == 0:
        return clicks
    with _open(path) as (source, f):
        check_id = source.check_id
        k = 0
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise source.error(lineno, f"expected 2 fields 'user item', got {len(fields)}")
            user, item = fields
            check_id(user, lineno, "user")
            check_id(item, lineno, "item")
            ts = start_ms + k * step_ms
            if ts > MAX_TIMESTAMP_MS:
                raise source.error(
                    lineno, f"synthetic time {ts} ms passes 2100: lower start_ms or step_ms"
                )
            clicks.append(Click(id=f"sr-{user}-{k}", timestamp=ts, user=user, item=item))
            k += 1
            if limit is not None and k >= limit:
                break
    return clicks


# --- Session logs --------------------------------------------------------------------------

_SESSION_COLS: Final = ("session", "session_id", "sessionid", "sid")
_SESSION_ITEM_COLS: Final = ("item", "item_id", "itemid", "aid")
_SESSION_TIME_COLS: Final = ("time", "timestamp", "ts", "eventdate", "date")


def _is_date(value: str) -> bool:
    """A calendar time (ISO-8601), as opposed to a number or no time at all."""
    return (
        not value.isdigit() and not _DECIMAL.fullmatch(value) and _parse_time_ms(value) is not None
    )


def _named_column(names: list[str], aliases: tuple[str, ...]) -> int | None:
    lowered = [n.strip().lower() for n in names]
    return next((lowered.index(a) for a in aliases if a in lowered), None)


def _session_layout(
    first: str, lineno: int, source: _Source
) -> tuple[str, bool, tuple[int, int, int]]:
    """(delimiter, has header, (session, item, time) columns) from the first line."""
    delimiter = next((d for d in (",", ";", "\t") if d in first), None)
    if delimiter is None:
        raise source.error(
            lineno, "expected fields separated by ',', ';' or tab: session,item,time"
        )
    fields = next(csv.reader([first], delimiter=delimiter))
    if len(fields) < 3:
        raise source.error(
            lineno, f"expected at least 3 fields session,item,time, got {len(fields)}"
        )
    if all(_parse_time_ms(x) is None for x in fields):  # every data line has a time: a header
        s = _named_column(fields, _SESSION_COLS)
        i = _named_column(fields, _SESSION_ITEM_COLS)
        t = _named_column(fields, _SESSION_TIME_COLS)
        if s is None or i is None or t is None:
            return delimiter, True, (0, 1, 2)
        return delimiter, True, (s, i, t)
    # Headerless: session,item,time, unless the second field is a date and the third is not
    # (YooChoose: session,timestamp,item,category).
    if _is_date(fields[1]) and not _is_date(fields[2]):
        return delimiter, False, (0, 2, 1)
    return delimiter, False, (0, 1, 2)


def load_sessions(path: PathLike, *, limit: int | None = None) -> list[Click]:
    """Session click logs ``session,item,time`` as clicks, sorted by time (stable).

    The session id is the user id. Time per value: Unix seconds or milliseconds (integers,
    told apart by magnitude), decimal seconds, or ISO-8601 (``2014-04-07T10:51:09.277Z``; no
    zone = UTC). The first line is a header when none of its fields is a time; known names
    (``session_id``, ``ItemId``, ``timestamp``, ...) then pick the columns. Without a header the
    columns are session,item,time, or session,time,item when the second field is an ISO date
    (YooChoose). Event id ``"ses-{session}-{item}-{ts_ms}"`` (``~<line>`` appended on repeats).
    ``limit`` stops after that many rows in file order, then sorts.
    """
    _check_limit(limit)
    clicks: list[Click] = []
    if limit == 0:
        return clicks
    with _open(path) as (source, f):
        first_no, first = _first_line(f)
        if not first:
            return clicks
        delimiter, header, (cs, ci, ct) = _session_layout(first, first_no, source)
        check_id, event_id, error = source.check_id, source.event_id, source.error
        reader = csv.reader(f, delimiter=delimiter)
        width = len(next(csv.reader([first], delimiter=delimiter)))
        skipped_header = not header
        for row in reader:
            if not row:
                continue
            if not skipped_header:
                skipped_header = True
                continue
            lineno = reader.line_num
            if len(row) != width:
                raise error(lineno, f"expected {width} fields, got {len(row)}")
            session, item, raw = row[cs], row[ci], row[ct]
            ts_ms = _parse_time_ms(raw)
            if ts_ms is None:
                raise error(lineno, f"time {_show(raw)} is not Unix seconds, Unix ms or ISO-8601")
            check_id(session, lineno, "session")
            check_id(item, lineno, "item")
            source.check_time(ts_ms, lineno, raw)
            eid = event_id(f"ses-{session}-{item}-{ts_ms}", lineno)
            clicks.append(Click(id=eid, timestamp=ts_ms, user=session, item=item))
            if limit is not None and len(clicks) >= limit:
                break
    clicks.sort(key=_by_time)
    return clicks


# --- Dispatch ------------------------------------------------------------------------------

_LOADERS: Final[dict[str, tuple[Callable[..., list[Click]], frozenset[str]]]] = {
    "movielens": (load_movielens, frozenset({"min_rating", "limit"})),
    "sasrec": (load_sasrec, frozenset({"start_ms", "step_ms", "limit"})),
    "sessions": (load_sessions, frozenset({"limit"})),
}
FORMATS: Final = ("auto", *_LOADERS)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def detect_format(path: PathLike) -> str:
    """``"movielens"``, ``"sasrec"`` or ``"sessions"``, from the file name, else the first line."""
    p = Path(path)
    name = p.name.lower()
    if name.startswith("movies."):
        raise DatasetError(f"{p}: a MovieLens catalog, not interactions: use load_movielens_items")
    if name in ("ratings.csv", "ratings.dat", "u.data"):
        return "movielens"
    with _open(p) as (source, f):
        lineno, first = _first_line(f)
    if not first:
        raise DatasetError(f"{p}: empty file, cannot detect its format")
    if "::" in first:
        return "movielens"
    delimiter = next((d for d in (",", ";", "\t") if d in first), None)
    if delimiter is None:
        if len(first.split()) == 2:
            return "sasrec"
        raise source.error(
            lineno, "cannot detect the format (expected 'user item' or session,item,time)"
        )
    fields = [x.strip() for x in next(csv.reader([first], delimiter=delimiter))]
    lowered = {x.lower() for x in fields}
    if {"userid", "movieid"} <= lowered or {"user_id", "item_id", "rating"} <= lowered:
        return "movielens"
    if (
        len(fields) == 4
        and fields[0].isdigit()
        and fields[1].isdigit()
        and fields[3].isdigit()
        and _is_number(fields[2])
    ):
        return "movielens"
    if len(fields) == 2 and delimiter == "\t":
        return "sasrec"
    if len(fields) >= 3:
        return "sessions"
    raise source.error(
        lineno, f"cannot detect the format of {_show(first, 80)}; pass fmt explicitly"
    )


def load_any(path: PathLike, fmt: str = "auto", **kw: object) -> list[Click]:
    """Load clicks with the loader for ``fmt`` (one of ``FORMATS``; "auto" = ``detect_format``).

    ``kw`` go to that loader; an option it does not take is a ``ConfigError``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}")
    chosen = detect_format(path) if fmt == "auto" else fmt
    loader, options = _LOADERS[chosen]
    unknown = sorted(set(kw) - options)
    if unknown:
        raise ConfigError(
            f"option(s) {', '.join(unknown)} do not apply to the {chosen} format of {path}"
        )
    return loader(path, **kw)
