"""``streamrec``: one subcommand per role, each a thin shell over a function tests call.

Errors the user can fix (a bad argument, an unreachable service, a bad file) print one line
and exit non-zero; they never print a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from streamrec.models.errors import ConfigError, StreamrecError

log = logging.getLogger("streamrec")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _time_arg(value: str) -> int:
    """Unix milliseconds, Unix seconds, or an ISO-8601 date/time (UTC unless it says)."""
    if value.isdigit() and len(value) >= 10:  # 20240131 is a date, not 1970
        n = int(value)
        return n if n > 100_000_000_000 else n * 1000
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a time (use ISO-8601 like 2024-01-31T12:00:00Z, or Unix seconds/ms)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            n = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"{value!r} must be positive")
        return n
    return parse


def _bounded(low: float, high: float = float("inf")) -> Callable[[str], float]:
    """A finite float in [low, high]."""
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not (low <= x <= high) or x != x or x in (float("inf"), float("-inf")):
            span = f"at least {low:g}" if high == float("inf") else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"{value!r} must be a finite number {span}")
        return x
    return parse


SEQ_MODELS = ("sasrec", "gru4rec", "bert4rec")  # models.seqtrain.FAMILIES (not imported here: torch)
SEQ_LOSSES = ("bce", "ce", "sampled", "gbce")  # models.seqloss.LOSSES
RANKER_OPTIONS = ("lambdarank", "rank_xendcg", "binary", "deepfm")  # serving.evaluate.RANKER_OPTIONS
SOURCES = ("seq", "cf", "trend", "mf", "users", "tower", "explore")  # serving.sources.REGISTRY
BASELINES = ("als:24h", "itemknn:24h", "als:1h", "itemknn:1h")  # batch refits, model:period of event time


def _baselines(value: str) -> list[tuple[str, int]]:
    """``--baselines``: model:hours pairs (comma-separated), all or none."""
    if value == "none":
        return []
    picked = list(BASELINES) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    out = []
    for v in picked:
        kind, _, period = v.partition(":")
        try:
            hours = float(period[:-1]) if period.endswith("h") else float("nan")
        except ValueError:
            hours = float("nan")
        if kind not in ("als", "itemknn") or not hours > 0:
            raise StreamrecError(f"--baselines takes model:hours pairs such as als:24h,itemknn:1h (models als, "
                                 f"itemknn), all or none; got {v!r}")
        out.append((kind, int(hours * 3_600_000)))
    return out


def _choices(value: str, allowed: Sequence[str], flag: str) -> list[str]:
    """A comma-separated subset of ``allowed`` (or ``all``), in the order given."""
    picked = list(allowed) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in picked if v not in allowed]
    if bad or not picked:
        raise StreamrecError(f"{flag} takes {', '.join(allowed)} (comma-separated) or all; got {value!r}")
    return list(dict.fromkeys(picked))


def _settings() -> Any:
    from streamrec.infra.settings import Settings
    return Settings()  # ConfigError naming the variable when one is unusable


def _services(start: bool, kafka: bool = True) -> Any:
    from streamrec.infra.services import ensure_services
    return ensure_services(_settings(), start=start, kafka=kafka)


# -- subcommands -----------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    """Start embedded Kafka (Tansu) and Redis in the foreground."""
    from streamrec.infra.kafka import ensure_topics
    from streamrec.infra.redisconn import redact
    services = _services(start=True)
    try:
        ensure_topics(services.settings.kafka)
        print(f"export STREAMREC_KAFKA__BOOTSTRAP={services.bootstrap}")
        # a password in a configured URL is masked: secrets are never printed (export it yourself)
        print(f"export STREAMREC_REDIS__URL={redact(services.redis_url)}")
        print("# embedded services running; Ctrl-C stops them (Tansu keeps messages in memory only)",
              flush=True)
        _wait_for_signal()
    finally:
        services.close()
    return 0


def _wait_for_signal() -> None:
    stop = {"now": False}

    def handler(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop["now"]:
        time.sleep(0.2)


def cmd_worker(args: argparse.Namespace) -> int:
    from streamrec.streams.worker import StreamWorker, use_event_loop
    services = _services(start=args.embedded)
    try:
        use_event_loop(services.settings.worker.event_loop)
        worker = StreamWorker(services.settings, worker_id=args.id)
        return worker.run(loglevel=args.loglevel)
    finally:
        services.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from streamrec.serving.worker import serve
    services = _services(start=args.embedded)
    try:
        return serve(services.settings, worker_id=args.id)
    finally:
        services.close()


def cmd_train(args: argparse.Namespace) -> int:
    from streamrec.serving import trainer
    services = _services(start=False, kafka=not (args.data and args.seq_only))
    try:
        if args.every or args.after_events:
            t = services.settings.trainer
            trainer.train_service(services.settings, every_s=args.every or t.every_s,
                                  after_events=args.after_events or t.after_events, epochs=args.epochs)
            return 0
        report = trainer.train_once(services.settings, data=args.data, fmt=args.format,
                                    seq=not args.ranker_only, ranker=not args.seq_only, epochs=args.epochs)
        print(json.dumps(report))
        return 0
    finally:
        services.close()


def cmd_recs(args: argparse.Namespace) -> int:
    from streamrec.models.events import check_id
    from streamrec.streams.sdk import Reader
    check_id(args.user, "user id")
    services = _services(start=False, kafka=False)
    with Reader.from_settings(services.settings) as reader:
        recs = reader.recommendations(args.user, fallback=not args.own)
    if recs is None:
        raise StreamrecError(f"no recommendations for {args.user!r} (and no default list): is `streamrec serve` running?")
    print(json.dumps(recs, indent=None if args.compact else 2))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from streamrec.models.errors import InvalidEvent
    from streamrec.models.events import decode
    from streamrec.streams.sdk import Publisher
    services = _services(start=False)
    stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    sent = bad = 0
    with stream, Publisher.from_settings(services.settings) as pub:
        for number, line in enumerate(stream, 1):
            line = line.strip()
            if not line:
                continue
            try:
                event = decode(line)
            except InvalidEvent as exc:
                bad += 1
                print(f"{args.file}:{number}: {exc}", file=sys.stderr)
                if args.raw:
                    pub.send_raw(services.settings.kafka.events_topic, None, line)
                continue
            pub.send(event)
            sent += 1
    print(json.dumps({"published": sent, "invalid": bad, "invalid_sent_raw": bad if args.raw else 0}))
    return 1 if bad and not args.raw else 0


def cmd_load(args: argparse.Namespace) -> int:
    from streamrec.streams import loaders
    from streamrec.streams.sdk import Publisher
    services = _services(start=False)
    started = time.monotonic()
    kwargs: dict[str, Any] = {}
    if args.min_rating is not None:
        kwargs["min_rating"] = args.min_rating
    if args.limit is not None:
        kwargs["limit"] = args.limit
    clicks = loaders.load_any(args.path, args.format, **kwargs)
    items = loaders.load_movielens_items(args.items) if args.items else []
    from streamrec.infra.console import Progress
    with Publisher.from_settings(services.settings) as pub, \
            Progress("load: published", total=len(clicks), unit="clicks") as shown:
        n_items = pub.send_all(items)
        for n, click in enumerate(clicks, 1):
            pub.send(click)
            if n % 1000 == 0 or n == len(clicks):
                shown.set(n)
    print(json.dumps({"clicks": len(clicks), "items": n_items,
                      "seconds": round(time.monotonic() - started, 2)}))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from streamrec.models import synthetic
    from streamrec.models.events import encode
    from streamrec.streams.sdk import Publisher
    config = synthetic.SyntheticConfig(n_users=args.users, n_items=args.items, seed=args.seed)
    catalog = synthetic.catalog(config)
    events = synthetic.events(config, args.clicks)
    if args.out:
        with open(args.out, "wb") as fh:
            for event in (*catalog, *events):
                fh.write(encode(event) + b"\n")
        print(json.dumps({"written": str(args.out)}))
        return 0
    services = _services(start=False)
    with Publisher.from_settings(services.settings) as pub:
        n_items = pub.send_all(catalog)
        n = pub.send_all(events)
    print(json.dumps({"items": n_items, "events": n}))
    return 0


def cmd_session(args: argparse.Namespace) -> int:
    from streamrec.models.events import check_id
    from streamrec.streams.sdk import Reader
    check_id(args.user, "user id")
    services = _services(start=False, kafka=False)
    with Reader.from_settings(services.settings) as reader:
        view = reader.session(args.user, args.namespace)
    print(json.dumps(view.to_dict(), indent=None if args.compact else 2))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from streamrec.streams.replay import replay
    if args.abort:
        from streamrec.infra.state import StateStore
        store = StateStore.from_settings(_services(start=False, kafka=False).settings)
        name = store.registry.rebuild_name()
        if name is None:
            print(json.dumps({"aborted": None}))
            return 0
        store.registry.abort_rebuild(name)
        print(json.dumps({"aborted": name}))
        return 0
    services = _services(start=False)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through replay(), which clears the rebuild marker

    signal.signal(signal.SIGTERM, on_term)

    from streamrec.infra.console import Progress
    shown = Progress("replay: read", unit="records")

    def progress(stats: Any, behind: int, seconds: float) -> None:
        if behind >= 0:  # the end as known now (live events move it)
            shown.set_total(stats.read + behind)
        shown.set(stats.read, note=f"applied {stats.applied:,} rejected {stats.rejected:,} "
                                   f"skipped {stats.skipped:,} behind {behind:,}")

    if args.restore and (args.since is not None or args.no_switch):
        raise ConfigError("--restore rebuilds everything and switches: it takes neither --since nor --no-switch")
    try:
        summary = replay(services.settings, namespace=args.namespace, since_ms=args.since,
                         switch=not args.no_switch, allow_mismatch=args.allow_mismatch, restore=args.restore,
                         progress=progress)
    finally:
        shown.close()
    print(json.dumps(summary.as_dict()))
    return 0


def cmd_namespaces(args: argparse.Namespace) -> int:
    from streamrec.infra.state import StateStore
    services = _services(start=False, kafka=False)
    store = StateStore.from_settings(services.settings)
    live, rebuild = store.registry.live_name(), store.registry.rebuild_name()
    for name, created in store.registry.namespaces():
        role = "live" if name == live else "rebuilding" if name == rebuild else ""
        print(json.dumps({"namespace": name, "created_ms": created, "role": role,
                          "info": store.registry.info(name)}))
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    from streamrec.infra.state import StateStore
    services = _services(start=False, kafka=False)
    deleted = StateStore.from_settings(services.settings).registry.drop(args.namespace)
    print(json.dumps({"namespace": args.namespace, "keys_deleted": deleted}))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from streamrec.infra.redisconn import redact
    from streamrec.infra.state import StateStore
    services = _services(start=False, kafka=False)
    store = StateStore.from_settings(services.settings)
    registry = store.registry  # reads only: status never creates or changes state
    live = registry.live_name()
    offsets = store.offsets(store.keys.ns(live)) if live else None
    print(json.dumps({
        "kafka": services.bootstrap, "redis": redact(services.redis_url),
        "redis_cluster": services.settings.redis.cluster,
        "kafka_security": services.settings.kafka.security_protocol,
        "state": registry.condition(), "lost": registry.lost_marker(),
        "live": live, "rebuilding": registry.rebuild_name(),
        "progress": offsets.progress if offsets else {},
        "incarnations": offsets.incarnations if offsets else {},
        "workers": registry.workers(),
    }, indent=2))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the roles' workers are alive and keeping up, 1 otherwise; one line why."""
    from streamrec.serving.health import ROLES, check
    services = _services(start=False, kafka=False)
    verdict = check(services.settings, [args.role] if args.role else list(ROLES[:2]), here=args.here)
    print(verdict.line, file=sys.stdout if verdict.healthy else sys.stderr)
    return 0 if verdict.healthy else 1


def cmd_dlq(args: argparse.Namespace) -> int:
    from streamrec.infra import kafka as kafka_wiring
    services = _services(start=False)
    k = services.settings.kafka
    consumer = kafka_wiring.reader(k, [k.dlq_topic])
    shown = repeated = 0
    seen: set[tuple[str, int]] = set()
    idle_since = time.monotonic()
    try:
        while shown < args.limit and time.monotonic() - idle_since < 2.0:
            polled = consumer.poll(timeout_ms=300)
            if polled:
                idle_since = time.monotonic()
            for records in polled.values():
                for r in records:
                    headers = {k: v.decode(errors="replace") for k, v in r.headers}
                    source = (f"{headers.get('streamrec.source.topic')}[{headers.get('streamrec.source.partition')}]"
                              f"@{headers.get('streamrec.source.offset')}")
                    # A crash between delivering a dead letter and recording it can send it
                    # twice: each source record is shown once.
                    identity = (source, zlib.crc32(r.value or b""))
                    if identity in seen:
                        repeated += 1
                        continue
                    seen.add(identity)
                    row = {
                        "dlq_offset": f"{r.partition}:{r.offset}",
                        "code": headers.get("streamrec.error.code"),
                        "reason": headers.get("streamrec.error.reason"),
                        "source": source,
                        "value": (r.value or b"")[:200].decode(errors="replace"),
                    }
                    if headers.get("streamrec.dlq.truncated"):
                        row["truncated_from_bytes"] = int(headers.get("streamrec.dlq.original_bytes", "0"))
                        row["sha256"] = headers.get("streamrec.dlq.sha256")
                    print(json.dumps(row))
                    shown += 1
    finally:
        consumer.close()
    if repeated:
        print(f"streamrec: {repeated} repeated dead letter(s) of records shown above were left out", file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from streamrec.models.events import json_schema
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "serve":
        from streamrec.serving import bench as serve_bench
        print(json.dumps(serve_bench.run(items=args.items, candidates=args.candidates, users=args.users,
                                          rate=args.rate, duration_s=args.duration, requests=args.requests,
                                          clicks=args.clicks, overload_rate=args.overload_rate)))
        return 0
    from streamrec.streams import bench
    result = bench.ingest(events=args.events, rate=args.rate, duration_s=args.duration,
                          users=args.users, partitions=args.partitions)
    print(json.dumps(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.ope:
        if args.path:
            raise StreamrecError("--ope reads the served and events topics: give no PATH")
        if args.epsilon is not None and args.policy != "epsilon-greedy":
            raise StreamrecError(f"--epsilon applies to --policy epsilon-greedy only (got --policy {args.policy})")
        if args.ucb_c is not None and args.policy != "ucb":
            raise StreamrecError(f"--ucb-c applies to --policy ucb only (got --policy {args.policy})")
        from streamrec.serving import analysis
        services = _services(start=False)
        return analysis.run_ope(services.settings, args.policy, 0.1 if args.epsilon is None else args.epsilon,
                                2.0 if args.ucb_c is None else args.ucb_c, args.tolerance)
    if not args.path:
        raise StreamrecError("PATH is required (a dataset file), except with --ope")
    if args.seq:
        from streamrec.serving import evaluate as seq_eval
        return seq_eval.run_seq(args.path, args.format, args.epochs, args.max_seconds,
                                models=_choices(args.model, SEQ_MODELS, "--model"),
                                losses=_choices(args.loss, SEQ_LOSSES, "--loss"),
                                negatives=args.negatives, gbce_t=args.gbce_t, dim=args.dim, max_len=args.max_len)
    if args.two_stage:
        from streamrec.serving import evaluate as two_stage
        return two_stage.run(args.path, args.format, args.limit, args.items, args.every, args.epochs, args.out,
                             sources=_choices(args.sources, SOURCES, "--sources") if args.sources else None,
                             rankers=[] if args.rankers == "none" else _choices(args.rankers, RANKER_OPTIONS, "--rankers"),
                             baselines=_baselines(args.baselines))
    from streamrec.streams import evaluate
    return evaluate.run(args.path, args.format, args.limit, args.out)


def cmd_experiment(args: argparse.Namespace) -> int:
    from streamrec.serving import analysis
    services = _services(start=False)
    return analysis.run_experiment(services.settings)


def cmd_explain(args: argparse.Namespace) -> int:
    from streamrec.models.events import check_id
    from streamrec.streams.sdk import Reader
    check_id(args.user, "user id")
    check_id(args.item, "item id")
    services = _services(start=False)
    with Reader.from_settings(services.settings) as reader:
        why = reader.explain(args.user, args.item)
    if args.json:
        print(json.dumps(why))
        return 0
    print(f"{why['item']} at position {why['position']} of user {why['user']}'s list {why['request_id']} "
          f"({why['kind']} slot, propensity {why['propensity']}, policy {why['policy']})")
    if why["experiment"] == "interleave":
        print("experiment: interleaved, " + (f"placed by the {why['team']} team" if why["team"] else
                                             f"not drafted ({why['kind']} slot)")
              + f"; scored by the {why['ranked_by']} ranker")
    elif why["experiment"] == "ab":
        print(f"experiment: A/B, {why['arm']} arm; scored by the {why['ranked_by']} ranker")
    print("sources: " + ", ".join(f"{k} (rank {v})" if v is not None else f"{k} (policy index {why['policy_index']:.4g})"
                                  for k, v in why["sources"].items()))
    if why["via"]:
        print("via: " + ", ".join(f"{k}: session item {v}" for k, v in why["via"].items()))
    print(f"posterior: mean {why['posterior']['mean']:.4f}, sd {why['posterior']['std']:.4f}")
    print(f"score {why['score']:.6f} by {why['ranker']} = bias {why['bias']:+.6f}")
    for name, c in list(why["contributions"].items())[: args.top]:
        print(f"  {name:<16} {c:+.6f}  (value {why['features'][name]:g})")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from streamrec.serving import simulate
    return simulate.run(windows=args.windows, lists=args.lists, seed=args.seed, seeds=args.seeds, out=args.out,
                        ope=args.ope, interleaving=args.interleaving, aa_runs=args.aa_runs, drift=args.drift)


def cmd_demo(args: argparse.Namespace) -> int:
    from streamrec.serving import demo
    return demo.run(clicks=args.clicks, users=args.users, rate=args.rate, data=args.data, epochs=args.epochs)


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamrec", description="Streaming recommender: Kafka events in, state in Redis.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--log-format", choices=["text", "json"],
                        help="log lines as text or one JSON object per line (default: log.format, text)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("up", help="run embedded Kafka (Tansu) and Redis in the foreground")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("worker", help="run a stream worker (Faust) that applies events to Redis")
    p.add_argument("--id", help="worker id shown in `streamrec status` (default host-pid)")
    p.add_argument("--loglevel", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--embedded", action="store_true",
                   help="start embedded Kafka/Redis if none answers (single-process use)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("serve", help="run a serving worker: recompute users' lists when their state changes")
    p.add_argument("--id", help="worker id shown in `streamrec status` (default serve-host-pid)")
    p.add_argument("--embedded", action="store_true",
                   help="start embedded Kafka/Redis if none answers (single-process use)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train the sequence model and the ranker, publish them to serving")
    p.add_argument("--data", help="train the sequence model on this dataset file instead of the events topic")
    p.add_argument("--format", default="auto", choices=["auto", "movielens", "sasrec", "sessions"])
    p.add_argument("--seq-only", action="store_true", help="only the sequence model (and index)")
    p.add_argument("--ranker-only", action="store_true", help="only the ranker (from the served log)")
    p.add_argument("--epochs", type=_positive(int), help="sequence-model epochs (default trainer.seq_epochs)")
    p.add_argument("--every", type=_positive(float), help="keep running: retrain at least this often, s")
    p.add_argument("--after-events", type=_positive(int), help="keep running: retrain after this many new events")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recs", help="print a user's recommendations (JSON); unknown users get the default list")
    p.add_argument("user")
    p.add_argument("--own", action="store_true", help="no fallback to the default list")
    p.add_argument("--compact", action="store_true", help="one line")
    p.set_defaults(func=cmd_recs)

    p = sub.add_parser("publish", help="publish JSON-lines events (file or - for stdin)")
    p.add_argument("file", help="JSON lines, one event per line, or - for standard input")
    p.add_argument("--raw", action="store_true",
                   help="send invalid lines too (the worker dead-letters them)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("load", help="publish a public dataset as click events in event-time order")
    p.add_argument("path", help="MovieLens ratings.csv/ratings.dat, SASRec `user item` lines, or session log")
    p.add_argument("--format", default="auto", choices=["auto", "movielens", "sasrec", "sessions"])
    p.add_argument("--min-rating", type=float, help="MovieLens: keep ratings at or above this")
    p.add_argument("--limit", type=_positive(int), help="publish at most this many clicks")
    p.add_argument("--items", help="MovieLens movies.csv to publish as catalog events")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("generate", help="publish (or write) synthetic events for the demo")
    p.add_argument("--users", type=_positive(int), default=1000)
    p.add_argument("--items", type=_positive(int), default=5000)
    p.add_argument("--clicks", type=_positive(int), default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write JSON lines here instead of publishing")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("session", help="print a user's session state (JSON)")
    p.add_argument("user")
    p.add_argument("--namespace", help="read this namespace instead of the live one")
    p.add_argument("--compact", action="store_true", help="one line")
    p.set_defaults(func=cmd_session)

    p = sub.add_parser("replay", help="rebuild state from the topics into a new namespace and switch")
    p.add_argument("--since", type=_time_arg, help="only events at or after this event time")
    p.add_argument("--namespace", help="name of the new namespace (default: next vN)")
    p.add_argument("--no-switch", action="store_true", help="build and verify, but keep readers where they are")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="switch even if a full rebuild differs from the live state (refused by default)")
    p.add_argument("--restore", action="store_true",
                   help="rebuild state Redis lost (no registry: restarted empty, flushed) up to what the "
                        "workers committed, and resume the paused workers into it")
    p.add_argument("--abort", action="store_true",
                   help="clear the marker of a rebuild whose replay process died")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("namespaces", help="list state namespaces")
    p.set_defaults(func=cmd_namespaces)

    p = sub.add_parser("drop", help="delete a namespace that is neither live nor rebuilding")
    p.add_argument("namespace")
    p.set_defaults(func=cmd_drop)

    p = sub.add_parser("status", help="live namespace, progress per partition, workers")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("health", help="exit 0 when a role's workers are alive and keeping up, 1 otherwise (one line why)")
    p.add_argument("--role", choices=["worker", "serve", "trainer"],
                   help="the role to check (default: worker and serve)")
    p.add_argument("--here", action="store_true",
                   help="only this host's workers (a container's healthcheck: is this replica healthy)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("dlq", help="print dead-lettered records with their reasons")
    p.add_argument("--limit", type=_positive(int), default=100)
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("schema", help="print the JSON Schema of the event contract")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("bench", help="benchmarks (print figures, end with one JSON line)")
    bench_sub = p.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    b = bench_sub.add_parser("ingest", help="worker throughput and event-to-state latency")
    b.add_argument("--events", type=_positive(int), default=200_000)
    b.add_argument("--rate", type=_positive(int), default=1000, help="events/s of the latency phase")
    b.add_argument("--duration", type=_positive(float), default=20.0, help="seconds of the latency phase")
    b.add_argument("--users", type=_positive(int), default=10_000)
    b.add_argument("--partitions", type=_positive(int), default=8)
    b.set_defaults(func=cmd_bench)

    b = bench_sub.add_parser("serve", help="per-user refresh time and click-to-list freshness")
    b.add_argument("--items", type=_positive(int), default=100_000, help="catalog size")
    b.add_argument("--candidates", type=_positive(int), default=500, help="candidates re-ranked per list")
    b.add_argument("--users", type=_positive(int), default=5000)
    b.add_argument("--requests", type=_positive(int), default=2000, help="single-user refreshes timed")
    b.add_argument("--clicks", type=_positive(int), default=200_000, help="clicks that build the learner state")
    b.add_argument("--rate", type=_positive(int), default=1000, help="clicks/s of the freshness phase")
    b.add_argument("--overload-rate", type=_positive(int), default=5000,
                   help="clicks/s of the overload phase (past what one serving process refreshes)")
    b.add_argument("--duration", type=_positive(float), default=20.0, help="seconds of each freshness phase")
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="prequential evaluation of the built-in recommenders on a dataset; --ope: "
                                    "off-policy estimates of a candidate policy from the served log")
    p.add_argument("path", nargs="?", help="MovieLens ratings, SASRec `user item` lines, or a session log")
    p.add_argument("--format", default="auto", choices=["auto", "movielens", "sasrec", "sessions"])
    p.add_argument("--limit", type=_positive(int), help="only the first N clicks of the file")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="folder for the plot")
    p.add_argument("--two-stage", action="store_true",
                   help="evaluate the whole serving pipeline (sequence model, ranker) against each source alone")
    p.add_argument("--items", help="--two-stage: MovieLens movies.csv for content features (default: beside PATH)")
    p.add_argument("--every", type=_positive(int), default=5, help="--two-stage: score every N-th click")
    p.add_argument("--sources", help="--two-stage: the pipeline's candidate sources, comma-separated (default: "
                                     "serving.sources with mf, users and tower added; a second pipeline without "
                                     "those three runs alongside)")
    p.add_argument("--rankers", default="all", help="--two-stage: ranker options trained on the same logged lists: "
                                                    "lambdarank, rank_xendcg, binary, deepfm, comma-separated, all or none")
    p.add_argument("--baselines", default="all", help="--two-stage: batch-refit baselines as model:hours "
                                                      "(als:24h,itemknn:24h,als:1h,itemknn:1h = all), or none")
    p.add_argument("--seq", action="store_true",
                   help="the sequence model alone, leave-one-out (SASRec protocol): HR@10/NDCG@10 with "
                        "100 sampled negatives and with full ranking")
    p.add_argument("--epochs", type=_positive(int), help="--two-stage/--seq: sequence-model epochs")
    p.add_argument("--max-seconds", type=_positive(float), help="--seq: stop each training after this long")
    p.add_argument("--model", default="sasrec",
                   help="--seq: sasrec, gru4rec, bert4rec, comma-separated, or all (each with each --loss)")
    p.add_argument("--loss", default="bce", help="--seq: bce, ce (full softmax), sampled (sampled softmax with "
                                                 "logQ correction), gbce (gSASRec), comma-separated, or all")
    p.add_argument("--negatives", type=_positive(int), default=256, help="--seq: negatives of sampled and gbce")
    p.add_argument("--gbce-t", type=_bounded(0.0, 1.0), default=0.75, help="--seq: gSASRec's calibration t")
    p.add_argument("--dim", type=_positive(int), default=50, help="--seq: embedding size")
    p.add_argument("--max-len", type=_positive(int), default=200, help="--seq: longest input sequence")
    p.add_argument("--ope", action="store_true",
                   help="off-policy evaluation: the clicks per exploration slot a candidate policy would have had, "
                        "from the served log (IPS, SNIPS, doubly robust; bootstrap 95%% intervals, ESS)")
    p.add_argument("--policy", default="thompson", choices=["thompson", "ucb", "epsilon-greedy", "greedy"],
                   help="--ope: the candidate policy")
    p.add_argument("--epsilon", type=_bounded(0.0, 1.0),
                   help="--ope with --policy epsilon-greedy: the candidate's epsilon, 0 to 1 (default 0.1)")
    p.add_argument("--ucb-c", type=_bounded(0.0), help="--ope with --policy ucb: the candidate's UCB width, "
                                                       "at least 0 (default 2)")
    p.add_argument("--tolerance", type=_bounded(0.0, 1.0), default=0.01,
                   help="--ope: refuse when more than this share of the candidate's mass is unsupported")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("experiment", help="report the running experiment from the served log: interleaving wins, "
                                          "losses, ties and sign-test p; A/B CTR per arm with intervals")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("explain", help="why ITEM is in USER's current list: sources, session items, posterior, "
                                       "the ranker's feature contributions")
    p.add_argument("user")
    p.add_argument("item")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--top", type=_positive(int), default=8, help="contributions shown")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("simulate", help="closed-loop simulation: exploration policies, position correction and "
                                        "diversity compared on one seeded synthetic population (ends with one JSON line)")
    p.add_argument("--windows", type=_positive(int), default=16)
    p.add_argument("--lists", type=_positive(int), default=400, help="lists served per window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=_positive(int), default=1, help="worlds (seed, seed + 1, ...) averaged")
    p.add_argument("--out", type=Path, default=Path("simulate-out"), help="folder for the PNG plots")
    p.add_argument("--ope", action="store_true", help="also validate off-policy estimates against online truth")
    p.add_argument("--interleaving", action="store_true", help="also validate interleaving (better ranker; A/A runs)")
    p.add_argument("--aa-runs", type=_positive(int), default=200, help="--interleaving: A/A experiments")
    p.add_argument("--drift", action="store_true",
                   help="also compare retraining on the schedule alone with schedule plus drift detection "
                        "after every taste turns around")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="end to end on embedded services: events flow, models train, recommendations update")
    p.add_argument("--clicks", type=_positive(int), default=20_000)
    p.add_argument("--users", type=_positive(int), default=200)
    p.add_argument("--rate", type=_positive(int), default=1000, help="clicks/s published")
    p.add_argument("--data", help="stream this dataset (MovieLens ratings, SASRec lines) instead of synthetic clicks")
    p.add_argument("--epochs", type=_positive(int), default=10, help="sequence-model epochs of the mid-way training")
    p.set_defaults(func=cmd_demo)
    return parser


def _fail(line: str) -> None:
    """The one line an error ends a command with (a JSON object under --log-format json)."""
    from streamrec.infra.console import emit
    emit(line, level="ERROR")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from streamrec.infra.console import setup_logging
    # read before the settings (whose errors are logged): the same variables, checked the same way
    fmt = args.log_format or os.environ.get("STREAMREC_LOG__FORMAT", "text").lower()
    level = "INFO" if args.verbose else os.environ.get("STREAMREC_LOG__LEVEL", "WARNING").upper()
    if fmt not in ("text", "json") or level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        print(f"streamrec: error: STREAMREC_LOG__FORMAT must be text or json and STREAMREC_LOG__LEVEL one of "
              f"DEBUG, INFO, WARNING, ERROR (got {fmt!r}, {level!r})", file=sys.stderr)
        return 2
    if args.log_format:  # child processes (a worker's restore) log the same way
        os.environ["STREAMREC_LOG__FORMAT"] = fmt
    setup_logging(fmt, level)
    if level != "DEBUG" and not args.verbose:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except StreamrecError as exc:
        _fail(f"streamrec: error: {exc}")
        return 1
    except FileNotFoundError as exc:
        _fail(f"streamrec: error: {exc.filename}: no such file")
        return 1
    except BrokenPipeError:  # the reader went away (`streamrec status | head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        _fail(f"streamrec: error: {exc.filename or ''}: {exc.strerror or exc}")
        return 1
    except Exception as exc:  # Kafka or Redis client errors: one line, no traceback
        from kafka.errors import KafkaError
        from redis.exceptions import RedisError
        if isinstance(exc, (KafkaError, RedisError)):
            _fail(f"streamrec: error: {type(exc).__name__}: {exc}")
            return 1
        raise
    except KeyboardInterrupt:
        print("streamrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
