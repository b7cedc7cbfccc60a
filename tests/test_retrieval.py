"""Pure parts of serving: the vector index contract (exact and HNSW), content vectors for
cold start, model bundles, and the join of served lists with the clicks that followed."""

from __future__ import annotations

import numpy as np
import pytest

from streamrec.models.content import ContentModel, content_similarity, session_tokens, tokens
from streamrec.models.errors import ConfigError
from streamrec.models.events import Click
from streamrec.models.index import VectorIndex
from streamrec.models.ranking import FEATURES
from streamrec.models.servedlog import ServedLog, label_lists, served_decoder
from streamrec.serving.modelio import pack, unpack
from streamrec.serving.trainer import sequences_of
from streamrec.serving.worker import encode_served


def vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("exact_below", [10_000, 10])  # exact and HNSW: one contract
def test_index_contract(exact_below: int) -> None:
    v = vectors(500)
    items = [f"i{j}" for j in range(500)]
    index = VectorIndex.build(items, v, exact_below=exact_below)
    assert index.kind == ("exact" if exact_below > 500 else "hnsw")
    ids, scores = index.search(v[:20], 10)
    truth = np.argsort(-(v[:20] @ v.T), axis=1)[:, :10]
    recall = np.mean([len(set(ids[q]) & {items[j] for j in truth[q]}) / 10 for q in range(20)])
    assert recall >= (1.0 if index.kind == "exact" else 0.9)
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first
    # round trip through bytes answers the same
    again = VectorIndex.from_bytes(index.to_bytes())
    assert again.search(v[:20], 10)[0] == ids and again.kind == index.kind
    # appended (cold) items are searchable and their vectors readable
    new = np.full((1, 16), 10.0, np.float32)
    assert index.add(["cold"], new) == 1 and index.add(["cold"], new) == 0
    assert index.search(new, 1)[0] == [["cold"]]
    dots, known = index.dots(new[0], ["cold", "nope", "i3"])
    assert known.tolist() == [True, False, True]
    assert dots[0] == pytest.approx(1600.0) and dots[1] == 0.0
    assert np.allclose(index.vector("i3"), v[3])


def test_index_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        VectorIndex.build(["a", "a"], vectors(2))
    with pytest.raises(ConfigError):
        VectorIndex.build(["a"], vectors(2))
    bad = vectors(2)
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError):
        VectorIndex.build(["a", "b"], bad)


def test_content_vector_of_a_new_item_sits_with_its_tags() -> None:
    rng = np.random.default_rng(1)
    centres = {g: rng.normal(size=8) * 5 for g in ("drama", "comedy")}
    catalog, vecs = {}, {}
    for j in range(40):
        g = "drama" if j % 2 else "comedy"
        catalog[f"m{j}"] = tokens(f"Film number {j}", [g])
        vecs[f"m{j}"] = (centres[g] + rng.normal(size=8)).astype(np.float32)
    model = ContentModel.fit(catalog, vecs, 8)
    v = model.vector(tokens("A brand new film", ["drama"]))
    assert v is not None
    assert np.linalg.norm(v - centres["drama"]) < np.linalg.norm(v - centres["comedy"])
    assert model.vector(tokens("zzz", ["unknown-tag"])) is None
    again = ContentModel.from_dict(model.to_dict())
    assert np.allclose(again.vector(tokens("x", ["drama"])), model.vector(tokens("x", ["drama"])))


def test_tokens_and_similarity() -> None:
    t = tokens("The Matrix (1999)", ["Sci-Fi", "Action"], "Action")
    assert {"w:matrix", "w:1999", "t:sci-fi", "t:action", "c:action"} <= t and "w:the" not in t
    session = session_tokens([t, tokens("Matrix Reloaded", ["Action"])])
    assert content_similarity(t, session) > content_similarity(tokens("Amelie", ["Romance"]), session) == 0.0
    assert content_similarity(frozenset(), session) == 0.0


def test_vectorised_content_similarity_equals_the_reference() -> None:
    """The batch form (many users' candidates in one call, token ids padded) equals the
    reference exactly: its sums are integer counts."""
    from streamrec.models.content import content_similarities

    rng = np.random.default_rng(3)
    vocab = [f"t:{j}" for j in range(30)]
    index = {t: j for j, t in enumerate(vocab)}

    def item() -> frozenset[str]:
        return frozenset(rng.choice(vocab, size=rng.integers(0, 6), replace=False))

    def ids(toks: frozenset[str]) -> np.ndarray:
        return np.array([index[t] for t in toks], dtype=np.int64)

    for _ in range(50):
        users = int(rng.integers(1, 5))
        sessions = [[item() for _ in range(rng.integers(0, 5))] for _ in range(users)]
        cands = [item() for _ in range(40)]
        owner = rng.integers(0, users, len(cands))
        padded = np.full((len(cands), 7), -1, dtype=np.int32)
        for j, c in enumerate(cands):
            padded[j, : len(c)] = ids(c)
        fast = content_similarities(padded, np.array([len(c) for c in cands]), owner,
                                    [np.concatenate([ids(x) for x in s] or [np.zeros(0, np.int64)]) for s in sessions])
        expected = [content_similarity(c, session_tokens(sessions[u])) for c, u in zip(cands, owner)]
        assert fast.tolist() == expected


def test_bundle_round_trip() -> None:
    parts = {"a": b"x" * 10, "b": b"", "c": bytes(range(256))}
    assert unpack(pack(parts)) == parts
    with pytest.raises(ConfigError):
        unpack(pack(parts) + b"junk")


def served(user: str | None, as_of: int, cands: list[str], computed_at: int = 0,
           ties: list[str] | None = None) -> ServedLog:
    f = np.arange(len(cands) * len(FEATURES), dtype=np.float32).reshape(len(cands), len(FEATURES))
    return ServedLog("r", user, as_of, computed_at, "m", cands[:2], cands, f.tobytes(), list(FEATURES),
                     ties if ties is not None else [])


def click(user: str, item: str, ts: int) -> Click:
    return Click(id=f"{user}-{ts}", timestamp=ts, user=user, item=item)


def test_served_lists_are_labelled_by_the_next_click() -> None:
    logs = [
        served("u1", 1000, ["a", "b", "c"]),  # next click of u1 after t=1000: "b" at 2000 -> positive b
        served("u1", 2000, ["a", "c", "d"]),  # next: "x" (not a candidate) -> dropped
        served("u2", 500, ["a", "b"]),  # next click too late -> dropped
        served(None, 0, ["a", "b"]),  # the default list: no user -> not used
        served("u3", 100, ["a", "b"], computed_at=1),  # recomputed for the same state: the later one counts
        served("u3", 100, ["b", "a"], computed_at=2),
    ]
    clicks = [click("u1", "b", 2000), click("u1", "x", 3000), click("u2", "a", 500 + 10_000),
              click("u3", "a", 150), click("u1", "a", 900)]
    out = label_lists(logs, clicks, window_ms=5000)
    assert out.groups == [3, 2]
    assert out.y.tolist() == [0, 1, 0, 0, 1]
    assert out.lists == 4 and out.dropped == 2  # distinct (user, state) lists; u1@2000 and u2 dropped
    assert out.X.shape == (5, len(FEATURES))
    assert out.X[3, 0] == 0.0 and out.X[4, 0] == len(FEATURES)  # u3's later list, rows in its order


def test_a_click_at_the_same_time_as_the_state_follows_it_unless_the_state_holds_it() -> None:
    # u clicked a and b in the same second (bulk rating); lists after a and after b
    clicks = [click("u", "a", 1000), click("u", "b", 1000), click("u", "c", 2000)]
    logs = [served("u", 1000, ["b", "c", "x"], ties=["u-1000"]),  # state holds a only
            served("u", 1000, ["c", "x"], computed_at=1, ties=["u-1000", "u-1000b"])]  # holds a and b
    clicks[1] = Click(id="u-1000b", timestamp=1000, user="u", item="b")
    out = label_lists(logs, clicks, window_ms=5000)
    assert out.groups == [3, 2]
    assert out.y.tolist() == [1, 0, 0, 1, 0]  # b follows the first list, c the second


def test_served_log_round_trip_keeps_features() -> None:
    from streamrec.serving.engine import Served

    X = np.random.default_rng(0).normal(size=(4, len(FEATURES)))
    s = Served("u", "rid", ["a"], [1.0], ["seq"], 5, 6, 7, "m", ["a", "b", "c", "d"], X)
    back = served_decoder.decode(encode_served(s))
    assert back.user == "u" and back.candidates == ["a", "b", "c", "d"]
    assert np.allclose(back.matrix(), X.astype(np.float32))


def test_sequences_are_in_event_time_order() -> None:
    clicks = [click("u", "b", 20), click("v", "z", 5), click("u", "a", 10), click("u", "c", 20)]
    assert sequences_of(clicks) == {"u": ["a", "b", "c"], "v": ["z"]}


def test_leave_one_out_evaluation_reads_sasrec_files(tmp_path) -> None:
    """`streamrec eval FILE --seq`: SASRec's `user item` lines (chronological per user); a
    sequential pattern (each item followed by the next) is learned under both protocols."""
    from streamrec.serving.evaluate import seq_loo

    lines = []
    for u in range(60):
        start = (u * 7) % 40
        lines += [f"user{u} item{(start + k) % 40}" for k in range(12)]
    path = tmp_path / "seq.txt"
    path.write_text("\n".join(lines) + "\n")
    out = seq_loo(str(path), "sasrec", epochs=40, dim=16, max_len=20, dropout=0.0)
    assert out["users"] == 60 and out["items"] == 40 and out["test_users"] == 60
    assert out["sampled_100"]["hr@10"] >= 0.9  # 39 other items: 100 negatives drawn with replacement
    assert out["full"]["hr@10"] >= 0.9 and out["full"]["ndcg@10"] > 0.5
