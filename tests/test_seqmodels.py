"""The sequence-model families (SASRec, GRU4Rec, BERT4Rec) behind one training loop and one
serving interface, and the next-item losses against hand-computed values. Pure, CPU, fast."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from streamrec.models.errors import ConfigError
from streamrec.models.seqloss import LossConfig, NegativeSampler, bce, ce, gbce, gbce_beta, grouped_scores, sampled
from streamrec.models.seqtrain import FAMILIES, SeqModel, TrainConfig, train

N = 30  # a cyclic catalog: i0 -> i1 -> ... -> i29 -> i0


def cyclic(users: int = 60, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out = {}
    for u in range(users):
        start, length = rng.randrange(N), rng.randrange(8, 20)
        out[f"u{u}"] = [f"i{(start + k) % N}" for k in range(length)]
    return out


# family -> the settings under which it overfits the cyclic data (BERT4Rec needs more width:
# at dim 16 with two heads of 8 it does not learn the end-of-sequence prediction in time)
OVERFIT = {
    "sasrec": ({"dim": 16, "n_blocks": 1, "max_len": 20}, TrainConfig(epochs=40, batch_size=16, lr=5e-3, threads=1)),
    "gru4rec": ({"dim": 16, "max_len": 20}, TrainConfig(epochs=40, batch_size=16, lr=5e-3, threads=1)),
    "bert4rec": ({"dim": 32, "n_blocks": 2, "max_len": 20, "dropout": 0.0},
                 TrainConfig(epochs=150, batch_size=16, lr=2e-3, threads=1)),
}


def next_item_accuracy(model: SeqModel) -> float:
    right = 0
    for s in range(N):
        session = [f"i{(s + k) % N}" for k in range(6)]
        scores = model.score(session, [f"i{j}" for j in range(N)])
        right += int(np.argmax(scores) == (s + 6) % N)
    return right / N


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_overfits_a_tiny_dataset_to_the_right_next_item(family: str) -> None:
    overrides, cfg = OVERFIT[family]
    losses: list[float] = []
    cfg = TrainConfig(**{**cfg.__dict__, "loss": LossConfig("ce")})
    model = train(cyclic(), cfg, lambda p: losses.append(p["loss"]), family=family, **overrides)
    assert model.family == family
    assert losses[-1] < losses[0] * 0.5
    assert next_item_accuracy(model) >= 0.8, family


@pytest.mark.parametrize("loss", ["bce", "sampled", "gbce"])
def test_every_loss_trains_sasrec_on_the_tiny_dataset(loss: str) -> None:
    overrides, cfg = OVERFIT["sasrec"]
    cfg = TrainConfig(**{**cfg.__dict__, "epochs": 80, "loss": LossConfig(loss, negatives=16)})
    model = train(cyclic(), cfg, family="sasrec", **overrides)
    # bce and gbce never push down the user's own items much; rank among the items outside
    # the session, where the next one must come first
    right = 0
    for s in range(N):
        session = [f"i{(s + k) % N}" for k in range(6)]
        outside = [f"i{j}" for j in range(N) if f"i{j}" not in session]
        right += int(outside[int(np.argmax(model.score(session, outside)))] == f"i{(s + 6) % N}")
    assert right / N >= 0.8, loss


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_and_padding_independence(family: str) -> None:
    overrides, cfg = OVERFIT[family]
    model = train(cyclic(20), TrainConfig(**{**cfg.__dict__, "epochs": 2}), family=family, **overrides)
    back = SeqModel.from_bytes(model.to_bytes())
    assert back.family == family and back.config == model.config
    sessions = [["i1", "i2", "i3"], ["i4"], [f"i{k}" for k in range(12)], ["i9", "i8"]]
    batch = model.session_embeddings(sessions)
    for row, session in zip(batch, sessions):  # one batch, left-padded, equals one at a time
        alone = model.session_embedding(session)
        assert np.allclose(row, alone, atol=1e-5), family
        assert np.array_equal(back.session_embedding(session), alone)
    assert np.array_equal(back.item_matrix(), model.item_matrix())
    assert model.item_matrix().shape == (len(model.vocab), model.dim)


def test_an_older_sasrec_payload_still_loads() -> None:
    import io

    overrides, cfg = OVERFIT["sasrec"]
    model = train(cyclic(10), TrainConfig(**{**cfg.__dict__, "epochs": 1}), **overrides)
    payload = torch.load(io.BytesIO(model.to_bytes()), weights_only=True)
    payload["format"] = "streamrec.sasrec/1"
    del payload["family"]
    buf = io.BytesIO()
    torch.save(payload, buf)
    old = SeqModel.from_bytes(buf.getvalue())
    assert old.family == "sasrec" and np.array_equal(old.item_matrix(), model.item_matrix())


# --- the losses on a tiny batch, by hand ---------------------------------------------------

TABLE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # row 0 padding, items 1..3
H = torch.tensor([[1.0, 0.0]])  # one position; scores: item 1 -> 1, item 2 -> 0, item 3 -> 1
POS = torch.tensor([1])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bce_by_hand() -> None:
    assert bce(H, TABLE, POS, torch.tensor([2])).item() == pytest.approx(softplus(-1) + softplus(0), abs=1e-6)


def test_full_softmax_by_hand() -> None:
    # over items 1..3 (padding excluded): log(e^1 + e^0 + e^1) - 1
    assert ce(H, TABLE, POS).item() == pytest.approx(math.log(2 * math.e + 1) - 1, abs=1e-6)


def test_sampled_softmax_with_logq_by_hand() -> None:
    log_q = torch.log(torch.tensor([1.0, 0.5, 0.25, 0.25]))  # q(1) = 0.5, q(2) = q(3) = 0.25
    # K = 2: every logit less log(K q): item 1 less log 1, items 2 and 3 less log 0.5
    want = math.log(math.exp(1) + math.exp(0 - math.log(0.5)) + math.exp(1 - math.log(0.5))) - 1
    assert sampled(H, TABLE, POS, torch.tensor([2, 3]), log_q).item() == pytest.approx(want, abs=1e-6)
    # a negative that is the positive itself (an accidental hit) is dropped
    hit = math.log(math.exp(1) + math.exp(0 - math.log(0.5))) - 1
    assert sampled(H, TABLE, POS, torch.tensor([1, 2]), log_q).item() == pytest.approx(hit, abs=1e-6)


def test_gbce_by_hand() -> None:
    # K = 2 negatives out of 5 items: alpha = 2 / 4, beta = alpha * (t (1 - 1/alpha) + 1/alpha)
    beta = gbce_beta(2, 5, 0.75)
    assert beta == pytest.approx(0.5 * (0.75 * (1 - 2) + 2))
    want = beta * softplus(-1) + softplus(0) + softplus(1)
    assert gbce(H, TABLE, POS, torch.tensor([2, 3]), beta).item() == pytest.approx(want, abs=1e-6)
    assert gbce(H, TABLE, POS, torch.tensor([1, 2]), beta).item() == pytest.approx(
        beta * softplus(-1) + softplus(0), abs=1e-6)  # the positive drawn as a negative is masked
    assert gbce_beta(2, 5, 0.0) == pytest.approx(1.0)  # t = 0: plain BCE


def test_gbce_with_negatives_per_sequence_by_hand() -> None:
    # two positions of sequence 0 (negatives 2, 3) and one of sequence 1 (negatives 1, 1)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pos = torch.tensor([1, 2, 3])
    neg = torch.tensor([[2, 3], [1, 1]])
    rows = torch.tensor([0, 0, 1])
    beta = 0.5
    # scores: h0 . (item1, item2, item3) = (1, 0, 1); h1 -> (0, 1, 1); h2 -> (1, 1, 2)
    want = [beta * softplus(-1) + softplus(0) + softplus(1),
            beta * softplus(-1) + softplus(1),  # item 2 is h1's positive: masked
            beta * softplus(-2) + 2 * softplus(1)]
    got = gbce(h, TABLE, pos, neg, beta, rows).item()
    assert got == pytest.approx(sum(want) / 3, abs=1e-6)
    # the grouped product equals the per-position gather, positions in any order
    perm = torch.tensor([2, 0, 1])
    np.testing.assert_allclose(grouped_scores(h[perm], TABLE[neg], rows[perm]).numpy(),
                               torch.einsum("nd,nkd->nk", h[perm], TABLE[neg][rows[perm]]).numpy(), atol=1e-6)


def test_negative_sampler_draws_from_its_proposal() -> None:
    counts = np.array([0, 99, 0, 0])  # item 1 is clicked, 2 and 3 never: q = (100, 1, 1) / 102
    sampler = NegativeSampler(3, counts, np.random.default_rng(0))
    draws = sampler.shared(20_000)
    assert set(np.unique(draws).tolist()) <= {1, 2, 3}
    assert np.mean(draws == 1) == pytest.approx(100 / 102, abs=0.01)
    assert sampler.log_q[1].item() == pytest.approx(math.log(100 / 102), abs=1e-6)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="loss must be one of"):
        LossConfig("hinge")
    with pytest.raises(ConfigError, match="gbce_t"):
        LossConfig("gbce", gbce_t=1.5)
    with pytest.raises(ConfigError, match="model must be one of"):
        train(cyclic(5), TrainConfig(epochs=1), family="lstm")
    with pytest.raises(ConfigError, match="unknown gru4rec settings"):
        train(cyclic(5), TrainConfig(epochs=1), family="gru4rec", n_blocks=2)
