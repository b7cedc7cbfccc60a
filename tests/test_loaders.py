"""Dataset loaders: formats, ordering, ids, and errors that name the file and line."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from streamrec.models.errors import ConfigError, StreamrecError
from streamrec.models.events import MAX_TIMESTAMP_MS, Click, Item, decode, encode
from streamrec.streams.loaders import (
    MOVIELENS_CATALOG_TIME_MS,
    DatasetError,
    detect_format,
    load_any,
    load_movielens,
    load_movielens_items,
    load_sasrec,
    load_sessions,
)

ML_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def roundtrip(event: Click | Item) -> None:
    assert decode(encode(event), now_ms=MAX_TIMESTAMP_MS) == event


def raises_dataset_error(fn: object, *needles: str) -> str:
    """Call ``fn``; require a one-line DatasetError containing every needle."""
    with pytest.raises(DatasetError) as info:
        fn()  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert isinstance(info.value, StreamrecError)
    return message


# --- MovieLens ratings -----------------------------------------------------------------------

RATINGS_CSV = """userId,movieId,rating,timestamp
1,10,4.0,964982703
1,20,3.5,964981247
2,10,5.0,964982703
2,30,1.0,900000000
3,40,2.0,964982703
"""


def test_movielens_csv_sorted_by_time_and_stable_on_ties(tmp_path: Path) -> None:
    clicks = load_movielens(write(tmp_path, "ratings.csv", RATINGS_CSV))
    assert [(c.user, c.item) for c in clicks] == [
        ("2", "30"),
        ("1", "20"),
        ("1", "10"),
        ("2", "10"),
        ("3", "40"),
    ]
    assert clicks[0].timestamp == 900_000_000_000  # seconds -> milliseconds
    assert clicks[0].id == "ml-2-30-900000000"
    assert all(c.request_id is None for c in clicks)
    for c in clicks:
        roundtrip(c)


def test_movielens_min_rating_and_limit(tmp_path: Path) -> None:
    path = write(tmp_path, "ratings.csv", RATINGS_CSV)
    assert {(c.user, c.item) for c in load_movielens(path, min_rating=4.0)} == {
        ("1", "10"),
        ("2", "10"),
    }
    # limit counts accepted rows in file order, then the result is sorted.
    limited = load_movielens(path, limit=3)
    assert [(c.user, c.item) for c in limited] == [("1", "20"), ("1", "10"), ("2", "10")]
    assert load_movielens(path, limit=0) == []
    with pytest.raises(ConfigError):
        load_movielens(path, limit=-1)


def test_movielens_repeated_rating_gets_distinct_deterministic_id(tmp_path: Path) -> None:
    text = "userId,movieId,rating,timestamp\n7,8,4,1000000000\n7,8,5,1000000000\n"
    path = write(tmp_path, "ratings.csv", text)
    first = load_movielens(path)
    assert [c.id for c in first] == ["ml-7-8-1000000000", "ml-7-8-1000000000~3"]
    assert load_movielens(path) == first
    for c in first:
        roundtrip(c)


def test_movielens_dat_and_tab_formats(tmp_path: Path) -> None:
    dat = load_movielens(
        write(
            tmp_path,
            "ratings.dat",
            "1::1193::5::978300760\n1::661::3::978302109\n2::1::4::978300000\n",
        )
    )
    assert [(c.user, c.item, c.timestamp) for c in dat] == [
        ("2", "1", 978_300_000_000),
        ("1", "1193", 978_300_760_000),
        ("1", "661", 978_302_109_000),
    ]
    tab = load_movielens(
        write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    )
    assert [(c.user, c.item) for c in tab] == [("196", "242"), ("186", "302")]


def test_movielens_header_picks_columns_by_name(tmp_path: Path) -> None:
    text = "timestamp,rating,movieId,userId\n1000000001,4,5,6\n1000000000,3,7,8\n"
    clicks = load_movielens(write(tmp_path, "ratings.csv", text))
    assert [(c.user, c.item, c.timestamp) for c in clicks] == [
        ("8", "7", 1_000_000_000_000),
        ("6", "5", 1_000_000_001_000),
    ]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("1,10,4.0", "expected 4 fields"),
        ("1,10,4.0,12.5", "not an integer"),
        ("1,10,4.0, 12", "not an integer"),
        ("1,10,good,964982703", "not a number"),
        ("1,10,nan,964982703", "not a finite number"),
        ("u 1,10,4.0,964982703", "user 'u 1' is not a valid id"),
        ("1,{10},4.0,964982703", "movie '{10}' is not a valid id"),
        ("1,10,4.0,99999999999", "outside 1970..2100"),
    ],
)
def test_movielens_malformed_line_names_file_line_and_problem(
    tmp_path: Path, line: str, needle: str
) -> None:
    path = write(
        tmp_path, "ratings.csv", f"userId,movieId,rating,timestamp\n1,2,3.0,964982703\n{line}\n"
    )
    raises_dataset_error(lambda: load_movielens(path), f"{path}:3:", needle)


def test_movielens_dat_malformed_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "ratings.dat", "1::2::3::4\n1::2::3\n")
    raises_dataset_error(lambda: load_movielens(path), f"{path}:2:", "expected 4 fields")
    missing = tmp_path / "nope" / "ratings.csv"
    raises_dataset_error(lambda: load_movielens(missing), str(missing), "not found")
    raises_dataset_error(lambda: load_movielens(tmp_path), "cannot read")


def test_movielens_header_without_timestamp_column(tmp_path: Path) -> None:
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,when\n1,2,3,4\n")
    raises_dataset_error(lambda: load_movielens(path), f"{path}:1:", "no timestamp column")


def test_byte_order_mark_is_not_part_of_the_header(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_bytes(b"\xef\xbb\xbf" + RATINGS_CSV.encode())
    assert len(load_movielens(path)) == 5


def test_not_utf8_is_a_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_bytes(b"userId,movieId,rating,timestamp\n1,\xff\xfe,3,4\n")
    raises_dataset_error(lambda: load_movielens(path), str(path), "not utf-8")


# --- MovieLens catalog -----------------------------------------------------------------------

MOVIES_CSV = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
11,"American President, The (1995)",Comedy|Drama|Romance
29,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama
182715,Nothing Here (2018),(no genres listed)
"""


def test_movielens_items(tmp_path: Path) -> None:
    items = load_movielens_items(write(tmp_path, "movies.csv", MOVIES_CSV))
    assert [i.item for i in items] == ["1", "11", "29", "182715"]
    assert items[1].title == "American President, The (1995)"
    assert items[2].title.startswith("City of Lost Children, The (Cité")
    assert items[1].tags == ["Comedy", "Drama", "Romance"] and items[1].category == "Comedy"
    assert items[3].tags == [] and items[3].category is None
    assert {i.timestamp for i in items} == {MOVIELENS_CATALOG_TIME_MS}
    assert items[0].id == "ml-item-1"
    for i in items:
        roundtrip(i)  # the catalog time is accepted by validation's 1990 floor


def test_movielens_items_dat_latin1(tmp_path: Path) -> None:
    path = write(
        tmp_path, "movies.dat", "1::Misérables, Les (1995)::Drama|Musical\n", encoding="latin-1"
    )
    (item,) = load_movielens_items(path)
    assert item.title == "Misérables, Les (1995)" and item.tags == ["Drama", "Musical"]


def test_movielens_items_errors(tmp_path: Path) -> None:
    dup = write(tmp_path, "movies.csv", "movieId,title,genres\n1,A,Drama\n1,B,Drama\n")
    raises_dataset_error(lambda: load_movielens_items(dup), f"{dup}:3:", "already listed on line 2")
    short = write(tmp_path, "m2.csv", "movieId,title,genres\n1,A\n")
    raises_dataset_error(lambda: load_movielens_items(short), f"{short}:2:", "expected 3 fields")
    empty_tag = write(tmp_path, "m3.csv", "movieId,title,genres\n1,A,Drama||Comedy\n")
    raises_dataset_error(lambda: load_movielens_items(empty_tag), f"{empty_tag}:2:", "1-64 chars")


# --- SASRec ----------------------------------------------------------------------------------


def test_sasrec_synthesises_times_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, "seq.txt", "1 5\n2 6\n1 7\n\n2 5\n")
    clicks = load_sasrec(path, start_ms=1_600_000_000_000, step_ms=1_000)
    assert [(c.user, c.item) for c in clicks] == [("1", "5"), ("2", "6"), ("1", "7"), ("2", "5")]
    assert [c.timestamp for c in clicks] == [1_600_000_000_000 + k * 1_000 for k in range(4)]
    assert len({c.id for c in clicks}) == 4
    for c in clicks:
        roundtrip(c)
    assert len(load_sasrec(path, limit=2)) == 2


def test_sasrec_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "seq.txt", "1 5\n1 5 9\n")
    raises_dataset_error(lambda: load_sasrec(path), f"{path}:2:", "expected 2 fields")
    bad = write(tmp_path, "bad.txt", "1 i|5\n")
    raises_dataset_error(lambda: load_sasrec(bad), f"{bad}:1:", "not a valid id")
    with pytest.raises(ConfigError):
        load_sasrec(path, step_ms=0)


# --- Session logs ----------------------------------------------------------------------------


def test_sessions_time_units_detected_per_value(tmp_path: Path) -> None:
    text = (
        "session_id,item_id,timestamp\n"
        "s1,a,1396864269\n"  # seconds
        "s1,b,1396864270500\n"  # milliseconds
        "s2,c,2014-04-07T10:51:09.277Z\n"  # ISO-8601, UTC
        "s2,d,1396864268.25\n"  # decimal seconds
        "s3,e,2014-04-07T10:51:09\n"  # ISO without zone: UTC
    )
    clicks = load_sessions(write(tmp_path, "clicks.csv", text))
    by_item = {c.item: c.timestamp for c in clicks}
    assert by_item == {
        "a": 1_396_864_269_000,
        "b": 1_396_864_270_500,
        "c": 1_396_867_869_277,
        "d": 1_396_864_268_250,
        "e": 1_396_867_869_000,
    }
    assert [c.timestamp for c in clicks] == sorted(by_item.values())
    assert {c.user for c in clicks} == {"s1", "s2", "s3"}
    for c in clicks:
        roundtrip(c)


def test_sessions_headerless_semicolon_and_yoochoose_layout(tmp_path: Path) -> None:
    plain = load_sessions(write(tmp_path, "a.txt", "1;10;1400000001\n1;11;1400000000\n"))
    assert [c.item for c in plain] == ["11", "10"]
    yoo = "1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z,214536500,0\n"
    clicks = load_sessions(write(tmp_path, "yoochoose-clicks.dat", yoo))
    assert [(c.user, c.item) for c in clicks] == [("1", "214536502"), ("1", "214536500")]
    assert clicks[0].timestamp == 1_396_867_869_277


def test_sessions_header_variants(tmp_path: Path) -> None:
    gru4rec = write(tmp_path, "train.tsv", "\nTime\tSessionId\tItemId\n1400000000\t1\t9\n")
    assert [(c.user, c.item) for c in load_sessions(gru4rec)] == [("1", "9")]
    unnamed = write(tmp_path, "u.csv", "a,b,c\n1,9,1400000000\n")
    assert [(c.user, c.item) for c in load_sessions(unnamed)] == [("1", "9")]
    no_separator = write(tmp_path, "n.csv", "\n\n1 2 3\n")
    raises_dataset_error(lambda: load_sessions(no_separator), f"{no_separator}:3:", "separated")


def test_sessions_ties_keep_file_order_and_limit(tmp_path: Path) -> None:
    path = write(
        tmp_path, "s.csv", "session,item,time\n2,x,1000000000\n1,y,1000000000\n1,z,999999999\n"
    )
    assert [c.item for c in load_sessions(path)] == ["z", "x", "y"]
    assert [c.item for c in load_sessions(path, limit=2)] == ["x", "y"]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("1,2", "expected 3 fields"),
        ("1,2,yesterday", "time 'yesterday' is not"),
        ("1,2,2014-13-45T00:00:00", "is not"),
        ("1 2,3,1400000000", "session '1 2' is not a valid id"),
    ],
)
def test_sessions_malformed(tmp_path: Path, line: str, needle: str) -> None:
    path = write(tmp_path, "s.csv", f"session,item,time\n1,2,1400000000\n{line}\n")
    raises_dataset_error(lambda: load_sessions(path), f"{path}:3:", needle)


# --- Dispatch --------------------------------------------------------------------------------


def test_load_any_detects_each_format(tmp_path: Path) -> None:
    cases = {
        "ratings.csv": (RATINGS_CSV, "movielens", 5),
        "r.dat": ("1::2::3::978300760\n", "movielens", 1),
        "data.tsv": ("196\t242\t3\t881250949\n", "movielens", 1),
        "plain.csv": ("1,2,3.5,978300760\n", "movielens", 1),
        "seq.txt": ("1 2\n1 3\n", "sasrec", 2),
        "seq.tsv": ("1\t2\n", "sasrec", 1),
        "sess.csv": ("SessionId,ItemId,Time\n1,2,1400000000\n", "sessions", 1),
        "yoo.dat": ("1,2014-04-07T10:51:09.277Z,214536502,0\n", "sessions", 1),
    }
    for name, (text, fmt, count) in cases.items():
        path = write(tmp_path, name, text)
        assert detect_format(path) == fmt, name
        assert len(load_any(path)) == count, name
        assert load_any(path, fmt) == load_any(path), name


def test_load_any_rejects_bad_arguments_and_catalogs(tmp_path: Path) -> None:
    ratings = write(tmp_path, "ratings.csv", RATINGS_CSV)
    assert len(load_any(ratings, min_rating=4.0, limit=10)) == 2
    with pytest.raises(ConfigError, match="unknown dataset format"):
        load_any(ratings, "parquet")
    sessions = write(tmp_path, "s.csv", "session,item,time\n1,2,1400000000\n")
    with pytest.raises(ConfigError, match="min_rating"):
        load_any(sessions, min_rating=3.0)
    movies = write(tmp_path, "movies.csv", MOVIES_CSV)
    raises_dataset_error(lambda: load_any(movies), "load_movielens_items")
    raises_dataset_error(lambda: load_any(tmp_path / "missing.csv"), "not found")
    empty = write(tmp_path, "empty.txt", "\n")
    raises_dataset_error(lambda: load_any(empty), "empty")


# --- Real data -------------------------------------------------------------------------------


def test_ml_latest_small() -> None:
    if not ML_SMALL.is_dir():
        pytest.skip(f"{ML_SMALL} not present")
    started = time.perf_counter()
    clicks = load_any(ML_SMALL / "ratings.csv")
    elapsed = time.perf_counter() - started
    assert len(clicks) == 100_836
    assert len({c.user for c in clicks}) == 610
    stamps = [c.timestamp for c in clicks]
    assert all(a <= b for a, b in itertools.pairwise(stamps))
    assert len({c.id for c in clicks}) == len(clicks)
    for c in clicks:
        roundtrip(c)
    assert elapsed < 10  # ~0.25 s normally; a guard against accidental quadratic work
    items = load_movielens_items(ML_SMALL / "movies.csv")
    assert len(items) == 9_742
    assert {c.item for c in clicks} <= {i.item for i in items}
    for i in items:
        roundtrip(i)
