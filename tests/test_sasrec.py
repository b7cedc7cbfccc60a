"""SASRec model, its training loop, serving wrapper and offline evaluation: pure, fast (CPU)."""

from __future__ import annotations

import math
import time
from typing import Iterator, Sequence

import numpy as np
import pytest
import torch

from streamrec.models.errors import ConfigError, StreamrecError
from streamrec.models.sasrec import SASRec, SASRecConfig
from streamrec.models.seqloss import NegativeSampler
from streamrec.models.seqtrain import (
    ItemVocab,
    SeqModel,
    Split,
    TrainConfig,
    evaluate,
    evaluate_valid,
    leave_one_out,
    train,
)

N_CYCLE = 30
Cyclic = tuple[Split, SeqModel, list[float]]  # split, model trained on it, epoch losses


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # the test machine is shared; two spinning intra-op threads on one free core are far
    # slower than one
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cyclic_sequences(n_users: int = 80, seed: int = 0) -> dict[str, list[str]]:
    """Every user walks i -> i+1 (mod 30) from a random start: the next item is always known."""
    rng = np.random.default_rng(seed)
    return {
        f"u{u}": [f"i{(int(start) + j) % N_CYCLE}" for j in range(int(rng.integers(8, 20)))]
        for u, start in enumerate(rng.integers(0, N_CYCLE, n_users))
    }


@pytest.fixture(scope="module")
def cyclic() -> Cyclic:
    split = leave_one_out(cyclic_sequences())
    losses: list[float] = []
    model = train(split.train, TrainConfig(epochs=60, batch_size=64, seed=0, threads=1),
                  lambda p: losses.append(p["loss"]), max_len=20, dim=32, n_blocks=1)
    return split, model, losses


def random_module(**kw: int | float) -> SASRec:
    torch.manual_seed(0)
    settings: dict[str, int | float] = {"n_items": 50, "max_len": 12, "dim": 16, "n_blocks": 2,
                                        "n_heads": 2, "dropout": 0.2}
    settings.update(kw)
    return SASRec(SASRecConfig(**settings)).eval()  # type: ignore[arg-type]


# --- the module ---------------------------------------------------------------------------

def test_attention_is_causal() -> None:
    module = random_module()
    seqs = torch.tensor([[0, 0, 3, 7, 9, 11, 2, 5], [1, 2, 3, 4, 5, 6, 7, 8]])
    changed = seqs.clone()
    changed[:, 5] = 40
    with torch.no_grad():
        a, _ = module(seqs)
        b, _ = module(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def test_output_does_not_depend_on_left_padding() -> None:
    module = random_module()
    short = torch.tensor([[3, 7, 9, 11]])
    padded = torch.tensor([[0, 0, 0, 0, 0, 3, 7, 9, 11]])
    with torch.no_grad():
        a, _ = module(short)
        b, _ = module(padded)
        emb_a = module.session_embedding(short)
        emb_b = module.session_embedding(padded)
    assert torch.allclose(a, b[:, 5:], atol=1e-5)
    assert torch.all(b[:, :5] == 0)  # padding positions are zeroed
    assert torch.allclose(emb_a, emb_b, atol=1e-5)


def test_session_embedding_is_the_last_hidden_state() -> None:
    module = random_module()
    seqs = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 0, 0, 0, 9]])
    with torch.no_grad():
        hidden, loss = module(seqs)
        emb = module.session_embedding(seqs)
    assert loss is None
    assert hidden.shape == (3, 5, 16) and emb.shape == (3, 16)
    assert torch.allclose(hidden[:, -1], emb, atol=1e-5)
    assert module.item_vectors().shape == (51, 16)
    assert torch.all(module.item_vectors()[0] == 0)


def test_loss_ignores_padding_positions() -> None:
    module = random_module(dropout=0.0)
    seqs = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]])
    pos = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]])
    neg = torch.tensor([[20, 21, 22, 23], [24, 25, 26, 27]])
    _, loss = module(seqs, pos, neg)
    changed = neg.clone()
    changed[0, :2] = 30  # positions where pos == 0 do not count
    _, same = module(seqs, pos, changed)
    changed[1, 0] = 30
    _, other = module(seqs, pos, changed)
    assert loss is not None and same is not None and other is not None
    assert loss.item() == pytest.approx(same.item(), abs=1e-6)
    assert loss.item() != pytest.approx(other.item(), abs=1e-6)


# --- training and evaluation on a pattern the model must learn ----------------------------

def test_loss_decreases_and_the_cycle_is_learned(cyclic: Cyclic) -> None:
    split, model, losses = cyclic
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    sampled = evaluate(model, split)
    full = evaluate(model, split, negatives=None)
    valid = evaluate_valid(model, split, negatives=None)
    assert sampled["users"] == full["users"] == 80
    for result in (sampled, full, valid):
        assert result["hr@10"] >= 0.95, result
        assert result["ndcg@10"] >= 0.85, result


def test_next_item_scores_highest(cyclic: Cyclic) -> None:
    _, model, _ = cyclic
    # BCE never pushes down the user's own items (they are not negatives), so the next item
    # is the best among the items outside the session
    session = [f"i{k}" for k in range(3, 15)]
    outside = [f"i{k}" for k in range(N_CYCLE) if f"i{k}" not in session]
    scores = model.score(session, outside)
    assert outside[int(np.argmax(scores))] == "i15"


def test_training_is_deterministic_per_seed() -> None:
    seqs = cyclic_sequences(30, seed=1)
    cfg = TrainConfig(epochs=3, batch_size=8, seed=5, threads=1)
    before = torch.get_rng_state()
    a = train(seqs, cfg, max_len=10, dim=16, n_blocks=1)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    b = train(seqs, cfg, max_len=10, dim=16, n_blocks=1)
    c = train(seqs, TrainConfig(epochs=3, batch_size=8, seed=6, threads=1),
              max_len=10, dim=16, n_blocks=1)
    assert np.array_equal(a.item_matrix(), b.item_matrix())
    assert not np.array_equal(a.item_matrix(), c.item_matrix())


def test_max_seconds_stops_training_early() -> None:
    seen: list[dict[str, float]] = []
    started = time.perf_counter()
    cfg = TrainConfig(epochs=100_000, batch_size=4, max_seconds=0.3, threads=1)
    train(cyclic_sequences(20), cfg, seen.append, max_len=10, dim=8, n_blocks=1)
    assert time.perf_counter() - started < 10
    assert 1 <= len(seen) < 100_000
    assert set(seen[-1]) == {"epoch", "epochs", "loss", "seconds", "seq_per_s"}
    assert seen[-1]["seconds"] >= 0.3


def test_negatives_avoid_the_users_items() -> None:
    sampler = NegativeSampler(20, np.zeros(21), np.random.default_rng(0))
    seen = np.arange(1, 18)  # only 18, 19, 20 are left
    draws = sampler.uniform((4, 50), seen)
    assert set(np.unique(draws).tolist()) == {18, 19, 20}


# --- the serving wrapper ------------------------------------------------------------------

def test_round_trip_through_bytes_is_exact(cyclic: Cyclic) -> None:
    _, model, _ = cyclic
    model.version = "v7"
    data = model.to_bytes()
    back = SeqModel.from_bytes(data)
    assert back.version == "v7" and back.vocab == model.vocab and back.config == model.config
    session = ["i1", "i2", "i3"]
    assert np.array_equal(back.session_embedding(session), model.session_embedding(session))
    assert np.array_equal(back.item_matrix(), model.item_matrix())
    assert np.array_equal(back.score(session, ["i4", "i9"]), model.score(session, ["i4", "i9"]))
    assert back.to_bytes() == data
    with pytest.raises(ConfigError):
        SeqModel.from_bytes(_torch_bytes({"format": "something else"}))


def _torch_bytes(obj: object) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_wrapper_shapes_alignment_and_unknown_items(cyclic: Cyclic) -> None:
    _, model, _ = cyclic
    items = model.item_matrix()
    assert items.shape == (N_CYCLE, 32) and items.dtype == np.float32
    vectors = model.module.item_vectors().detach().numpy()
    for row, item in enumerate(model.vocab.items):
        assert np.array_equal(items[row], vectors[model.vocab.index[item]])
    assert np.array_equal(model.session_embedding(["nope", "never"]), np.zeros(32, np.float32))
    # unknown items are skipped, so they do not change the embedding
    assert np.allclose(model.session_embedding(["i1", "nope", "i2"]),
                       model.session_embedding(["i1", "i2"]), atol=1e-6)
    # only the newest max_len (20) items are read
    long = [f"i{k % N_CYCLE}" for k in range(45)]
    assert np.allclose(model.session_embedding(long), model.session_embedding(long[-20:]),
                       atol=1e-6)
    batch = model.session_embeddings([["i1", "i2"], [], long, ["i5"]])
    assert batch.shape == (4, 32)
    assert np.allclose(batch[0], model.session_embedding(["i1", "i2"]), atol=1e-5)
    assert np.all(batch[1] == 0)
    assert np.allclose(batch[2], model.session_embedding(long), atol=1e-5)
    scores = model.score(["i1", "i2"], ["i3", "unknown", "i0"])
    assert np.isnan(scores[1]) and not np.isnan(scores[[0, 2]]).any()
    session = model.session_embedding(["i1", "i2"])
    assert scores[0] == pytest.approx(float(items[model.vocab.index["i3"] - 1] @ session), rel=1e-5)


# --- evaluation on a scorer whose answer is known ----------------------------------------

class FixedScorer:
    """Item vectors are the identity, every session vector is ``weights``: score(item) = weight."""

    def __init__(self, items: Sequence[str], weights: dict[str, float]) -> None:
        self.vocab = ItemVocab(items)
        self.weights = np.array([weights.get(i, 0.0) for i in items], dtype=np.float32)

    def session_embeddings(self, sessions: Sequence[Sequence[str]]) -> np.ndarray:
        return np.tile(self.weights, (len(sessions), 1))

    def item_matrix(self) -> np.ndarray:
        return np.eye(len(self.weights), dtype=np.float32)


CATALOG = list("abcdefghij")
ONE_USER = Split(train={"u": ["a", "b", "c"]}, valid={"u": "d"}, test={"u": "e"})


def test_target_on_top_gives_ndcg_one() -> None:
    scorer = FixedScorer(CATALOG, {"e": 1.0})
    for negatives in (100, 3, None):
        result = evaluate(scorer, ONE_USER, negatives=negatives)
        assert result["hr@10"] == 1.0 and result["ndcg@10"] == 1.0 and result["users"] == 1


def test_full_ranking_excludes_the_input_and_counts_the_rest() -> None:
    # input items a, b, d outscore everything but are excluded; f and g beat the target e
    scorer = FixedScorer(CATALOG, {"a": 9, "b": 9, "d": 9, "f": 2, "g": 2, "e": 1})
    result = evaluate(scorer, ONE_USER, negatives=None)
    assert result["hr@10"] == 1.0
    assert result["ndcg@10"] == pytest.approx(1 / math.log2(4))  # rank 2 (0-based)
    assert evaluate(scorer, ONE_USER, negatives=None, k=2)["hr@2"] == 0.0


def test_sampled_negatives_come_from_items_never_touched() -> None:
    # negatives may only be f..j (a-e are the user's), all with score 0 < 1 = target
    scorer = FixedScorer(CATALOG, {"a": 9, "b": 9, "c": 9, "d": 9, "e": 1})
    assert evaluate(scorer, ONE_USER, negatives=100)["ndcg@10"] == 1.0
    # with valid as the target, the test item e is never a sampled negative, but it does
    # compete in the full ranking (only the input, a-c, is excluded there)
    scorer = FixedScorer(CATALOG, {"e": 5, "d": 1})
    assert evaluate_valid(scorer, ONE_USER, negatives=100)["ndcg@10"] == 1.0
    full = evaluate_valid(scorer, ONE_USER, negatives=None)
    assert full["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_ties_count_against_the_target_and_unknown_targets_miss() -> None:
    constant = FixedScorer(CATALOG, {})  # 5 competitors (10 - input a-d - target e), all tied
    assert evaluate(constant, ONE_USER, negatives=None, k=5)["hr@5"] == 0.0
    assert evaluate(constant, ONE_USER, negatives=None, k=6)["hr@6"] == 1.0
    split = Split(train={"u": ["a", "b"], "v": ["a"]}, valid={"u": "c", "v": "b"},
                  test={"u": "e", "v": "zz"})
    result = evaluate(FixedScorer(CATALOG, {"e": 1}), split, negatives=None)
    assert result["users"] == 2 and result["unknown_targets"] == 1 and result["hr@10"] == 0.5


def test_max_users_evaluates_a_seeded_subset() -> None:
    train_part = {f"u{k}": ["a", "b"] for k in range(20)}
    split = Split(train=train_part, valid={u: "c" for u in train_part},
                  test={u: "e" for u in train_part})
    scorer = FixedScorer(CATALOG, {"e": 1})
    assert evaluate(scorer, split, max_users=5)["users"] == 5
    assert evaluate(scorer, split)["users"] == 20


# --- data handling ------------------------------------------------------------------------

def test_leave_one_out() -> None:
    split = leave_one_out({"long": ["a", "b", "c", "d"], "three": ["x", "y", "z"],
                           "two": ["p", "q"], "one": ["r"], "none": []})
    assert split.train == {"long": ["a", "b"], "three": ["x"], "two": ["p", "q"],
                           "one": ["r"], "none": []}
    assert split.valid == {"long": "c", "three": "y"}
    assert split.test == {"long": "d", "three": "z"}


def test_item_vocab() -> None:
    vocab = ItemVocab.from_sequences([["b", "a"], ["a", "c"]])
    assert vocab.items == ["b", "a", "c"] and len(vocab) == 3
    assert vocab.encode(["c", "zz", "b"]) == [3, 1]
    assert vocab.encode_last(["a", "zz", "b", "c", "a"], 3) == [1, 3, 2]
    assert "a" in vocab and "zz" not in vocab
    assert ItemVocab.from_dict(vocab.to_dict()) == vocab
    with pytest.raises(ConfigError):
        ItemVocab(["a", "a"])
    with pytest.raises(ConfigError):
        ItemVocab.from_dict({"nope": 1})


# --- bad arguments ------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {"n_items": 0}, {"n_items": 10, "dim": 10, "n_heads": 3}, {"n_items": 10, "max_len": 0},
    {"n_items": 10, "dropout": 1.0}, {"n_items": 10, "n_blocks": 0}, {"n_items": 2.5},
])
def test_bad_model_config(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        SASRecConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"l2": -1.0},
                                {"threads": 0}, {"max_seconds": 0.0}])
def test_bad_train_config(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**kw)  # type: ignore[arg-type]


def test_bad_arguments_raise_config_error() -> None:
    seqs = {"u": ["a", "b", "c"]}
    with pytest.raises(ConfigError, match="unknown sasrec settings"):
        train(seqs, TrainConfig(epochs=1), hidden=8)
    with pytest.raises(ConfigError):
        train(seqs, TrainConfig(epochs=1), n_items=3)
    with pytest.raises(ConfigError):
        train({"u": ["a"]}, TrainConfig(epochs=1))
    module = random_module()
    with pytest.raises(ConfigError):
        module(torch.ones(1, 13, dtype=torch.long))  # longer than max_len 12
    with pytest.raises(ConfigError):
        module(torch.ones(1, 4, dtype=torch.long), pos=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ConfigError):
        evaluate(FixedScorer(CATALOG, {}), ONE_USER, target="train")
    with pytest.raises(StreamrecError):
        evaluate(FixedScorer(CATALOG, {}), ONE_USER, negatives=0)
