"""`streamrec eval`: prequential evaluation through the pipeline's own state machinery.

A dataset is replayed in event-time order through the same ``Processor`` the worker runs
(decoding, session state, fact derivation, learner scripts, all in Redis), one click at a
time, into a private namespace. Before each click every recommender produces the list it would
have served (reading the Redis state as a serving worker would), the list is scored against
the clicked item, and only then is the click applied. Kafka is left out of the loop: a
round trip through the broker for each of 100,000 clicks would measure the broker, not the
recommenders, and the records carry the offsets they would have had.
"""

from __future__ import annotations

import json
import random
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from streamrec.infra.console import Progress
from streamrec.infra.services import ensure_services
from streamrec.infra.settings import Settings
from streamrec.infra.state import StateStore
from streamrec.models.evaluation import Scores, random_items, test_then_train
from streamrec.models.events import Click, Impression, Item, encode
from streamrec.streams.processor import Processor, Record

NAMESPACE = "eval"


class Feeder:
    """Feeds clicks and items to the worker's processor with the offsets Kafka would give."""

    def __init__(self, settings: Settings, store: StateStore, namespace: str) -> None:
        self.processor = Processor(settings, store, namespace=namespace)
        self.topic, self.items_topic = settings.kafka.events_topic, settings.kafka.items_topic
        self.parts = settings.kafka.partitions
        self.offsets: dict[tuple[str, int], int] = {}

    def _record(self, topic: str, key: str, value: bytes, ts: int) -> Record:
        p = zlib.crc32(key.encode()) % self.parts
        off = self.offsets.get((topic, p), 0)
        self.offsets[(topic, p)] = off + 1
        return Record(topic, p, off, key.encode(), value, ts)

    def clicks(self, clicks: Sequence[Click | Impression]) -> None:
        """User events (clicks, impressions), in one batch."""
        if clicks:
            self.processor.process([self._record(self.topic, c.user, encode(c), c.timestamp) for c in clicks])

    def items(self, items: Sequence[Item]) -> None:
        for lo in range(0, len(items), 2000):
            self.processor.process([self._record(self.items_topic, i.item, encode(i), i.timestamp)
                                    for i in items[lo : lo + 2000]])


@dataclass
class EvalResult:
    summary: dict[str, dict[str, float]]
    curves: dict[str, list[tuple[int, float, float]]]
    clicks: int
    seconds: float


def prequential(settings: Settings, clicks: Sequence[Click], *, k: int = 10,
                recommenders: Sequence[str] = ("random", "trending", "cf_recent"),
                curve_every: int = 2000, seed: int = 0,
                progress: Callable[[int, float], None] | None = None) -> EvalResult:
    """Test-then-train over ``clicks`` (already in event-time order) in a private key prefix."""
    tag = uuid.uuid4().hex[:8]
    settings = settings.model_copy(update={"redis": settings.redis.model_copy(update={"prefix": f"eval{tag}"})})
    store = StateStore.from_settings(settings)
    feeder = Feeder(settings, store, NAMESPACE)
    rng = random.Random(seed)
    history: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    catalog: list[str] = []
    known: set[str] = set()
    scores = {name: Scores() for name in recommenders}
    window = store.cf.window
    started = time.monotonic()

    def serve(name: str, user: str) -> list[str]:
        exclude = seen.get(user, set())
        if name == "trending":
            return store.trending_excluding(k, exclude, namespace=NAMESPACE)
        if name == "cf_recent":
            return store.recommend_cf(history.get(user, []), k, exclude, window, namespace=NAMESPACE)
        return random_items(catalog, k, exclude, rng)

    def predict(click: Click) -> None:
        for name in recommenders:
            scores[name].add(serve(name, click.user), click.item, k)

    def learn(batch: list[Click]) -> None:
        feeder.clicks(batch)
        for click in batch:
            history.setdefault(click.user, []).append(click.item)
            seen.setdefault(click.user, set()).add(click.item)
            if click.item not in known:
                known.add(click.item)
                catalog.append(click.item)

    def mark(n: int) -> None:
        for s in scores.values():
            s.mark(n)
        if progress:
            progress(n, time.monotonic() - started)

    try:
        test_then_train(clicks, predict, learn, hooks=[(curve_every, mark)])
    finally:
        store.drop_everything()
    return EvalResult(
        summary={name: s.summary(len(catalog)) for name, s in scores.items()},
        curves={name: s.curve for name, s in scores.items()},
        clicks=len(clicks), seconds=round(time.monotonic() - started, 2),
    )


def format_table(summary: dict[str, dict[str, float]], width: int = 12) -> str:
    lines = [f"{'recommender':<{width}} {'Hit@10':>8} {'NDCG@10':>8} {'MRR':>8} {'coverage':>9}"]
    for name, m in summary.items():
        lines.append(f"{name:<{width}} {m['hit_at_10']:>8.4f} {m['ndcg_at_10']:>8.4f} {m['mrr']:>8.4f} "
                     f"{m['coverage']:>9.4f}")
    return "\n".join(lines)


def table(result: EvalResult) -> str:
    return format_table(result.summary)


def plot(result: EvalResult, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in result.curves.items():
        if curve:
            xs = [c[0] for c in curve]
            axes[0].plot(xs, [c[1] for c in curve], label=name)
            axes[1].plot(xs, [c[2] for c in curve], label=name)
    for ax, title in zip(axes, ("Hit@10 (cumulative)", "NDCG@10 (cumulative)")):
        ax.set_title(title)
        ax.set_xlabel("clicks replayed")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(path: str, fmt: str = "auto", limit: int | None = None, out: Path = Path("eval-out")) -> int:
    from streamrec.streams import loaders

    settings = Settings()
    clicks = loaders.load_any(path, fmt, **({"limit": limit} if limit else {}))
    with ensure_services(settings, start=True, kafka=False) as services, \
            Progress("eval: scored", total=len(clicks), unit="clicks") as shown:
        result = prequential(services.settings, clicks, progress=lambda n, seconds: shown.set(n))
    print(table(result))
    png = plot(result, out / "prequential.png")
    print(f"plot: {png}")
    print(json.dumps(result.summary))
    return 0


__all__ = ["EvalResult", "Feeder", "prequential", "table", "format_table", "plot", "run"]
