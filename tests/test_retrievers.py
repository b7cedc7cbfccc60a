"""The retrievers besides the sequence model: matrix factorisation (``implicit`` ALS and BPR,
with the fold-in serving uses), the two-tower model (in-batch softmax with log-Q correction,
content-only vectors for new items), their bytes (no pickle) and their publication by the
trainer. The ``CandidateSource`` contract of the mf, users and tower sources is
``tests/test_sources.py`` (every registered source)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from streamrec.infra.recstore import RecStore
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.errors import ConfigError
from streamrec.models.mf import MFConfig, MFModel, click_matrix, fit_mf
from streamrec.models.retrieval import RetrievalSet
from streamrec.models.twotower import TowerModel, TwoTowerConfig, in_batch_loss, train_two_tower, training_pairs
from streamrec.serving.modelio import load_models, pack_retrieval, unpack_retrieval

GROUPS, PER = 6, 12  # items in six groups; each user clicks within one group


def grouped(users: int = 240, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out = {}
    for u in range(users):
        g = u % GROUPS
        out[f"u{u}"] = [f"g{g}-{rng.randrange(PER)}" for _ in range(rng.randrange(6, 14))]
    return out


def group_of(item: str) -> int:
    return int(item[1 : item.index("-")])


def cyclic(users: int = 80, n: int = 20, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out = {}
    for u in range(users):
        start = rng.randrange(n)
        out[f"u{u}"] = [f"i{(start + k) % n}" for k in range(rng.randrange(6, 14))]
    return out


# -- matrix factorisation ----------------------------------------------------------------------


def test_click_matrix_counts_every_click() -> None:
    users, items, m = click_matrix({"a": ["x", "y", "x"], "b": ["y"]})
    assert users == ["a", "b"] and items == ["x", "y"]
    assert m.toarray().tolist() == [[2.0, 1.0], [0.0, 1.0]]


@pytest.mark.parametrize("kind", ["als", "bpr"])
def test_mf_folds_a_new_history_into_its_group(kind: str) -> None:
    model = fit_mf(grouped(), MFConfig(kind=kind, factors=16, iterations=15, bpr_iterations=200))
    assert model.item_factors.shape[0] == GROUPS * PER
    histories = [[f"g{g}-0", f"g{g}-3", f"g{g}-5"] for g in range(GROUPS)]
    vectors = model.fold_in([*histories, [], ["never-seen"]])
    assert vectors.shape == (GROUPS + 2, model.dim) and vectors.dtype == np.float32
    assert not vectors[GROUPS:].any()  # nothing known: no vector
    scores = vectors[:GROUPS] @ model.item_factors.T  # (groups, items)
    for g in range(GROUPS):
        top = [model.items[j] for j in np.argsort(-scores[g])[:PER // 2]]
        assert sum(group_of(i) == g for i in top) >= PER // 2 - 1, (kind, g, top)


def test_mf_fold_in_is_the_als_user_step() -> None:
    """Folding in is the ALS user step x = (Y'Y + Y'(C - I)Y + lambda I)^-1 Y'C p with
    implicit's confidence C = alpha * clicks on clicked items (1 elsewhere), checked with numpy
    to 1e-5 (float32 factors)."""
    cfg = MFConfig(kind="als", factors=8, regularization=0.1, alpha=5.0)
    model = fit_mf(grouped(60), cfg)
    history = ["g1-2", "g1-4", "g1-2"]
    Y = model.item_factors.astype(np.float64)
    c = np.zeros(len(model.items))
    for item in history:
        c[model.index[item]] += 1.0
    conf = cfg.alpha * c
    A = Y.T @ Y + cfg.regularization * np.eye(Y.shape[1]) + (Y.T * np.where(c > 0, conf - 1.0, 0.0)) @ Y
    want = np.linalg.solve(A, Y.T @ conf)
    got = model.fold_in([history])[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_mf_bytes_round_trip_without_pickle() -> None:
    model = fit_mf(grouped(60), MFConfig(kind="bpr", factors=8))
    blob = model.to_bytes()
    again = MFModel.from_bytes(blob)
    assert again.items == model.items and again.users == model.users
    assert np.array_equal(again.item_factors, model.item_factors)
    assert np.array_equal(again.fold_in([["g0-1"]]), model.fold_in([["g0-1"]]))
    with np.load(__import__("io").BytesIO(blob), allow_pickle=False) as z:  # every array reads without pickle
        assert {"header", "items", "users", "item_factors", "user_factors"} <= set(z.files)
    with pytest.raises(ConfigError):
        MFModel.from_bytes(b"not a model")


def test_mf_settings_are_checked() -> None:
    for bad in ({"kind": "svd"}, {"factors": 0}, {"alpha": 0.0}):
        with pytest.raises(ConfigError):
            MFConfig(**bad)
    with pytest.raises(ConfigError):
        fit_mf({}, MFConfig())


# -- two-tower ----------------------------------------------------------------------------------


def test_in_batch_loss_by_hand() -> None:
    """Two pairs with different next items, then two with the same one (not each other's negative)."""
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    log_q = torch.log(torch.tensor([0.5, 0.25]))
    tau = 0.5
    # row 0: logits 1/0.5 - log .5, 0.6/0.5 - log .25; row 1: 0/0.5 - log .5, 0.8/0.5 - log .25
    r0 = [2.0 - math.log(0.5), 1.2 - math.log(0.25)]
    r1 = [0.0 - math.log(0.5), 1.6 - math.log(0.25)]

    def nll(row: list[float], k: int) -> float:
        return math.log(sum(math.exp(x) for x in row)) - row[k]

    want = (nll(r0, 0) + nll(r1, 1)) / 2
    got = in_batch_loss(u, v, torch.tensor([3, 7]), log_q, tau).item()
    assert got == pytest.approx(want, abs=1e-5)
    # the same next item twice: each pair's only candidate is its own column
    same = in_batch_loss(u, v, torch.tensor([3, 3]), log_q, tau).item()
    assert same == pytest.approx(0.0, abs=1e-6)


def test_training_pairs_are_every_prefix_and_its_next_item() -> None:
    hists, targets = training_pairs([[1, 2, 3], [4]], max_len=2)
    assert targets.tolist() == [2, 3]
    assert hists.tolist() == [[1, 0], [1, 2]]


def test_two_tower_overfits_a_tiny_dataset_to_the_right_next_item() -> None:
    n = 20
    tokens = {f"i{k}": [f"t{k}"] for k in range(n)}
    model = train_two_tower(cyclic(n=n), tokens, TwoTowerConfig(dim=32, max_len=1, epochs=150, batch=64,
                                                                 id_dropout=0.0, max_seconds=60))
    items = [f"i{k}" for k in range(n)]
    V = model.item_vectors(items)
    U = model.user_vectors([[f"i{k}"] for k in range(n)])
    right = sum(int(np.argmax(V @ U[k]) == (k + 1) % n) for k in range(n))
    assert right / n >= 0.8, right


def test_two_tower_places_a_new_item_by_its_content_alone() -> None:
    seqs = grouped()
    tokens = {f"g{g}-{j}": [f"genre{g}", f"t{g}-{j}"] for g in range(GROUPS) for j in range(PER)}
    model = train_two_tower(seqs, tokens, TwoTowerConfig(dim=16, epochs=40, id_dropout=0.5, max_seconds=60))
    new = model.item_vectors([f"new{g}" for g in range(GROUPS)], [[f"genre{g}"] for g in range(GROUPS)])
    assert np.allclose(np.linalg.norm(new, axis=1), 1.0, atol=1e-5)
    known = model.item_vectors(list(tokens))
    centroid = np.stack([known[[group_of(i) == g for i in tokens]].mean(0) for g in range(GROUPS)])
    nearest = np.argmax(new @ centroid.T, axis=1)
    assert nearest.tolist() == list(range(GROUPS))  # each new item lies with its genre's items
    # neither an id nor a known token: no vector, and no entry in the index
    assert not model.item_vectors(["blank"], [["unheard-of"]]).any()
    rs = RetrievalSet.build(None, model, {**tokens, "new0": ["genre0"], "blank": ["unheard-of"]}, exact_below=10)
    assert rs.tower_items is not None and "new0" in rs.tower_items and "blank" not in rs.tower_items
    assert rs.add_cold("new1", ["genre1"]) == 1 and rs.add_cold("new1", ["genre1"]) == 0


def test_two_tower_bytes_round_trip() -> None:
    tokens = {f"i{k}": [f"t{k}"] for k in range(20)}
    model = train_two_tower(cyclic(), tokens, TwoTowerConfig(dim=8, epochs=2))
    again = TowerModel.from_bytes(model.to_bytes())
    h = [["i3", "i4"], ["i9"], []]
    assert np.array_equal(again.user_vectors(h), model.user_vectors(h))
    assert np.array_equal(again.item_vectors(["i1", "x"], [["t1"], ["t5"]]), model.item_vectors(["i1", "x"], [["t1"], ["t5"]]))
    with pytest.raises(ConfigError):
        TowerModel.from_bytes(b"\x00garbage")
    with pytest.raises(ConfigError):
        TwoTowerConfig(id_dropout=1.0)


# -- bundle and publication ---------------------------------------------------------------------


def test_retrieval_bundle_round_trip() -> None:
    seqs = grouped(60)
    tokens = {i: ["tok"] for s in seqs.values() for i in s}
    rs = RetrievalSet.build(fit_mf(seqs, MFConfig(factors=8)), train_two_tower(seqs, tokens, TwoTowerConfig(dim=8, epochs=2)),
                            tokens)
    again = unpack_retrieval(pack_retrieval(rs))
    assert again.mf is not None and again.tower is not None
    for a, b in ((rs.mf_items, again.mf_items), (rs.mf_users, again.mf_users), (rs.tower_items, again.tower_items)):
        assert a is not None and b is not None and a.items == b.items
    q = rs.mf.fold_in([["g2-1"]]) if rs.mf else None
    assert q is not None and again.mf_items is not None and rs.mf_items is not None
    assert again.mf_items.search(q, 5)[0] == rs.mf_items.search(q, 5)[0]
    only_mf = unpack_retrieval(pack_retrieval(RetrievalSet.build(rs.mf, None)))
    assert only_mf.tower is None and only_mf.mf_users is not None


def test_the_trainer_publishes_the_retrieval_models_and_serving_loads_them(settings: Settings) -> None:
    from streamrec.serving import trainer

    s = settings.model_copy(update={
        "serving": settings.serving.model_copy(update={"sources": ["seq", "mf", "users", "tower", "trend"]}),
        "trainer": settings.trainer.model_copy(update={"seq_epochs": 1, "seq_dim": 8, "tower_epochs": 2, "mf_factors": 8}),
    })
    store = StateStore.from_settings(s)
    recstore = RecStore(store, s.kafka.partitions)
    seqs = grouped(60)
    rs = trainer.fit_retrieval(s, seqs, catalog={})
    assert rs is not None and rs.mf is not None and rs.tower is not None
    assert trainer.fit_retrieval(s, seqs, sources=["seq", "cf"]) is None  # no source needs them
    recstore.publish_model("retrieval", "v1", pack_retrieval(rs), {"mf": rs.mf.report}, 2)
    models = load_models(recstore)
    assert models.retrieval is not None and models.retrieval.version == "v1"
    assert models.label.endswith(";retrieval=v1")
    assert load_models(recstore, models).retrieval is models.retrieval  # unchanged version: reused


# -- batch-refit baselines ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["als", "itemknn"])
def test_a_batch_baseline_refits_at_each_boundary_from_the_clicks_before_it(kind: str) -> None:
    from streamrec.models.baselines import BatchRefit

    b = BatchRefit(kind, every_ms=1000, k=5, mf=MFConfig(factors=4))
    assert b.recommend("u0", 500) == [] and b.refits == 0  # nothing observed: no job, no list
    for t in range(300):  # 10 ms apart: boundaries at 1000, 2000, 3000 of event time
        b.observe(f"u{t % 7}", f"i{(t * 13) % 40}", t * 10)
    first = b.recommend("u1", 2500)
    assert b.refits == 1 and b.job is not None and b.job.at_ms == 2000
    assert b.job.matrix.sum() == 200  # the clicks before the boundary, not those after it
    clicked = {f"i{(t * 13) % 40}" for t in range(200) if t % 7 == 1}
    assert len(first) == 5 and not set(first) & clicked  # what the user had clicked is left out
    assert b.recommend("u1", 2999) == first and b.refits == 1  # the same list until the next boundary
    assert b.recommend("stranger", 2999) == b.job.popular  # unknown to the job: its most clicked items
    b.recommend("u1", 3000)
    assert b.refits == 2 and b.job.matrix.sum() == 300
    with pytest.raises(ConfigError):
        b.observe("u1", "i1", 5)  # out of event-time order
    with pytest.raises(ConfigError):
        BatchRefit("svd", 1000)


def test_the_baselines_side_run_scores_the_clicks_the_pipeline_scores() -> None:
    """``score_baselines`` (run beside the pipeline) answers before each click the prequential
    loop predicts, having observed exactly the clicks before it."""
    from streamrec.models.baselines import BatchRefit
    from streamrec.models.evaluation import test_then_train
    from streamrec.serving.evaluate import score_baselines

    clicks = [(f"u{t % 5}", f"i{(t * 7) % 30}", t * 400) for t in range(200)]
    got = score_baselines(clicks, 50, 3, [("itemknn", 1000)], 5, MFConfig(factors=4), 0)["batch_itemknn_1s"]
    ref = BatchRefit("itemknn", 1000, k=5)
    for c in clicks[:50]:
        ref.observe(*c)
    want: list[list[str]] = []
    test_then_train(clicks[50:], lambda c: want.append(ref.recommend(c[0], c[2])),
                    lambda batch: [ref.observe(*c) for c in batch], every=3, batch=7)
    assert got[0] == want and len(want) == len(clicks[50::3])
    assert got[1]["refits"] == ref.refits > 1
