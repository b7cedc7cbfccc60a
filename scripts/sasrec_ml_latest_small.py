"""SASRec on MovieLens ml-latest-small, the paper's leave-one-out protocol.

Every rating is an interaction; each user's ratings are sorted by timestamp (ties keep file
order). Trains under a wall-clock budget, then reports HR@10 / NDCG@10 on the test item with
100 sampled negatives and with full ranking, the training speed, and the single-session
inference latency on one thread. Ends with one JSON line.

    .venv/bin/python scripts/sasrec_ml_latest_small.py --max-seconds 600 --eval-every 50
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamrec.models.seqtrain import (  # noqa: E402
    SeqModel,
    Split,
    TrainConfig,
    evaluate,
    leave_one_out,
    train,
)

DATA = ROOT.parent / "shared" / "data" / "ml-latest-small" / "ratings.csv"


def load(path: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Per-user item sequences in time order, and every item in first-seen file order."""
    rows: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    catalog: dict[str, None] = {}
    with path.open(newline="") as f:
        for line, rec in enumerate(csv.DictReader(f)):
            rows[rec["userId"]].append((int(rec["timestamp"]), line, rec["movieId"]))
            catalog[rec["movieId"]] = None
    return {u: [m for _, _, m in sorted(r)] for u, r in rows.items()}, list(catalog)


def all_metrics(model: SeqModel, split: Split, target: str = "test") -> dict[str, float]:
    s = evaluate(model, split, negatives=100, target=target)
    f = evaluate(model, split, negatives=None, target=target)
    return {"sampled_hr@10": s["hr@10"], "sampled_ndcg@10": s["ndcg@10"],
            "full_hr@10": f["hr@10"], "full_ndcg@10": f["ndcg@10"], "users": s["users"]}


def latency(model: SeqModel, sessions: list[list[str]], calls: int) -> dict[str, float]:
    """p50/p99 ms of model.session_embedding on one thread, cycling through ``sessions``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for s in sessions[:50]:
            model.session_embedding(s)
        out = []
        for i in range(calls):
            t = time.perf_counter()
            model.session_embedding(sessions[i % len(sessions)])
            out.append((time.perf_counter() - t) * 1e3)
    finally:
        torch.set_num_threads(before)
    return {"p50_ms": float(np.percentile(out, 50)), "p99_ms": float(np.percentile(out, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--epochs", type=int, default=100_000)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--l2", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=0, help="epochs between checkpoint evals")
    ap.add_argument("--latency-calls", type=int, default=2000)
    args = ap.parse_args()

    sequences, catalog = load(args.data)
    split = leave_one_out(sequences)
    n_ratings = sum(map(len, sequences.values()))
    print(f"users {len(sequences)}  items {len(catalog)}  interactions {n_ratings}  "
          f"test users {len(split.test)}", flush=True)

    curve: list[dict[str, float]] = []
    eval_seconds = 0.0
    last: dict[str, float] = {}

    def progress(p: dict[str, float]) -> None:
        last.update(p)
        if p["epoch"] % 10 == 0 or p["epoch"] == 1:
            print(f"epoch {p['epoch']:5.0f}  loss {p['loss']:.4f}  {p['seconds']:7.1f}s  "
                  f"{p['seq_per_s']:.0f} seq/s", flush=True)

    def on_epoch(epoch: int, model: SeqModel) -> None:
        nonlocal eval_seconds
        if args.eval_every and epoch % args.eval_every == 0:
            t = time.perf_counter()
            point = {"epoch": epoch, "train_seconds": last["seconds"] - eval_seconds,
                     **{f"valid_{k}": v for k, v in all_metrics(model, split, "valid").items()
                        if k != "users"},
                     **{f"test_{k}": v for k, v in all_metrics(model, split, "test").items()
                        if k != "users"}}
            eval_seconds += time.perf_counter() - t
            curve.append(point)
            print("checkpoint " + json.dumps(point), flush=True)

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, l2=args.l2,
                      seed=args.seed, threads=args.threads, max_seconds=args.max_seconds)
    started = time.perf_counter()
    model = train(split.train, cfg, progress, catalog=catalog, on_epoch=on_epoch,
                  max_len=args.max_len, dim=args.dim, n_blocks=args.blocks, n_heads=args.heads,
                  dropout=args.dropout)
    wall = time.perf_counter() - started
    train_seconds = wall - eval_seconds
    epochs = int(last["epoch"])

    with torch.inference_mode():
        test = all_metrics(model, split, "test")
        valid = all_metrics(model, split, "valid")
    rng = np.random.default_rng(0)
    users = list(split.test)
    real = [split.train[u] + [split.valid[u]] for u in users]
    lat_real = latency(model, [real[i] for i in rng.permutation(len(real))], args.latency_calls)
    long = [s for s in real if len(s) >= 200]
    lat = {f"len{n}": latency(model, [s[-n:] for s in long], args.latency_calls) for n in (50, 200)}

    result = {
        "data": "ml-latest-small", "users": len(sequences), "items": len(catalog),
        "interactions": n_ratings,
        "model": {"max_len": args.max_len, "dim": args.dim, "n_blocks": args.blocks,
                  "n_heads": args.heads, "dropout": args.dropout},
        "train": {"lr": args.lr, "batch_size": args.batch_size, "l2": args.l2, "seed": args.seed,
                  "threads": args.threads, "max_seconds": args.max_seconds, "epochs": epochs,
                  "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
                  "seq_per_s": round(epochs * sum(len(s) >= 2 for s in split.train.values())
                                     / train_seconds, 1),
                  "last_loss": round(last["loss"], 4)},
        "test": test, "valid": valid,
        "latency_1thread": {"real_histories": lat_real, **lat},
        "curve": curve,
    }
    for name, m in (("test", test), ("valid", valid)):
        print(f"{name:6} sampled-100 HR@10 {m['sampled_hr@10']:.4f} "
              f"NDCG@10 {m['sampled_ndcg@10']:.4f} | full HR@10 {m['full_hr@10']:.4f} "
              f"NDCG@10 {m['full_ndcg@10']:.4f}")
    print(f"train  {epochs} epochs in {train_seconds:.0f}s ({result['train']['seq_per_s']} seq/s)"
          f"  latency p50/p99 ms: {lat_real['p50_ms']:.3f}/{lat_real['p99_ms']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
