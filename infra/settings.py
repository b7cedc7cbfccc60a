"""One typed settings object, split into sections.

Every field is read from an environment variable named ``STREAMREC_<SECTION>__<FIELD>``
(for example ``STREAMREC_KAFKA__BOOTSTRAP=broker:9092``); an optional ``.env`` file in the
working directory is read too. Nothing else configures streamrec.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from streamrec.models.errors import ConfigError


class KafkaSettings(BaseModel):
    bootstrap: str = Field("", description="Kafka bootstrap servers; empty = the embedded Tansu broker")
    topic_prefix: str = Field("streamrec", description="Prefix of every topic streamrec creates")
    partitions: int = Field(8, ge=1, le=1024, description="Partitions of the user-keyed topics")
    replication: int = Field(1, ge=1, description="Replication factor of created topics")
    group_id: str = Field("streamrec-worker", description="Consumer group of the stream workers")
    session_timeout_s: float = Field(6.0, gt=0, description="Consumer session timeout (Tansu holds joins half of it)")
    heartbeat_s: float = Field(1.0, gt=0, description="Consumer heartbeat interval")
    embedded_port: int = Field(19092, ge=0, le=65535, description="Port of the embedded broker (0 = any free port)")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How clients talk to the brokers (the same for kafka-python, aiokafka and Faust)")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism (security_protocol SASL_PLAINTEXT or SASL_SSL)")
    sasl_username: str = Field("", description="SASL user name")
    sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (never printed)")
    ssl_cafile: str = Field("", description="CA bundle (PEM) that signed the brokers' certificates; empty = the system's")
    ssl_certfile: str = Field("", description="Client certificate (PEM), for brokers that require one")
    ssl_keyfile: str = Field("", description="Client certificate's private key (PEM)")
    ssl_key_password: SecretStr = Field(SecretStr(""), description="Password of the client key, if it has one (never printed)")
    ssl_check_hostname: bool = Field(True, description="Check that a broker's certificate names the host connected to")

    @property
    def events_topic(self) -> str:
        """User-keyed clicks and impressions."""
        return f"{self.topic_prefix}.events"

    @property
    def items_topic(self) -> str:
        """Item-keyed catalog events."""
        return f"{self.topic_prefix}.items"

    @property
    def served_topic(self) -> str:
        """Every served list with its candidates' features (ranker training data)."""
        return f"{self.topic_prefix}.served"

    @property
    def dlq_topic(self) -> str:
        """Rejected records: original bytes, reason and source position in headers."""
        return f"{self.topic_prefix}.dlq"


class RedisSettings(BaseModel):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    prefix: str = Field("sr", description="Prefix of every Redis key streamrec writes")
    embedded: bool = Field(True, description="Start a private redis-server when the URL does not answer")
    embedded_port: int = Field(6380, ge=0, le=65535, description="Port of the embedded Redis (0 = any free port)")
    username: str = Field("", description="Redis ACL user (empty: the URL's, else the default user)")
    password: SecretStr = Field(SecretStr(""), description="Redis password (empty: the URL's, if any); never printed")
    tls: bool = Field(False, description="Connect with TLS (as a rediss:// URL does)")
    ssl_ca_certs: str = Field("", description="CA bundle (PEM) that signed the server's certificate; empty = the system's")
    ssl_certfile: str = Field("", description="Client certificate (PEM), for servers that require one")
    ssl_keyfile: str = Field("", description="Client certificate's private key (PEM)")
    ssl_check_hostname: bool = Field(True, description="Check that the server's certificate names the host connected to")
    cluster: bool = Field(False, description="The URL names a node of a Redis Cluster: every component uses RedisCluster")


class SessionSettings(BaseModel):
    max_length: int = Field(200, ge=1, le=10_000, description="Items kept per user sequence (most recent by event time)")
    gap_s: float = Field(1800.0, gt=0, description="Inactivity gap that starts a new session, seconds")
    dedupe_window: int = Field(1024, ge=16, description="Event ids remembered per user for duplicate detection")
    ttl_s: float = Field(30 * 86400.0, ge=0, description="A user's state expires this long after their last event (wall clock), s; 0 = never")


class LearnerSettings(BaseModel):
    enabled: bool = Field(True, description="Update the online learners (CF, trending, bandit) in the worker")
    cf_window: int = Field(5, ge=1, le=50, description="Recent session items a click co-occurs with")
    cf_pair_half_life_s: float = Field(3600.0, gt=0, description="A pair's weight halves per this gap between its clicks, s")
    cf_half_life_s: float = Field(30 * 86400.0, gt=0, description="Co-occurrence evidence halves per this much event time, s")
    cf_max_neighbours: int = Field(200, ge=1, description="Neighbours kept per item (weakest dropped)")
    trending_half_life_s: float = Field(86400.0, gt=0, description="Trending counters halve per this much event time, s")
    bandit_prior_alpha: float = Field(1.0, gt=0, description="Beta prior: pseudo-clicks")
    bandit_prior_beta: float = Field(10.0, gt=0, description="Beta prior: pseudo-non-clicks (near the base rate)")
    bandit_eta: float = Field(1.0, ge=0, le=10, description="Examination 1/(1+position)**eta; 0 = no position correction")
    bandit_half_life_s: float = Field(7 * 86400.0, gt=0, description="Bandit evidence halves per this much event time, s")
    attribution_window_s: float = Field(1800.0, gt=0, description="A click joins an impression at most this much later, s")
    max_requests: int = Field(100, ge=1, description="Impressions remembered per user for the click join")
    facts_span: int = Field(100_000, ge=1, description="Facts of a user's event kept (for redelivery) until its partition is this many offsets further")
    facts_ttl_s: float = Field(3600.0, ge=0, description="A user's learner facts expire this long after their last event (at most session.ttl_s), s; 0 = as session.ttl_s")
    join_lateness_s: float = Field(3600.0, ge=0, description="A request's join state is kept until the user's newest event is this much past its attribution window, s")
    trending_max_items: int = Field(10_000, ge=1, description="Items kept in each trending set (global and per category), the highest scored")
    max_segments: int = Field(32, ge=0, description="Segments with their own bandit posterior per item; feedback of further segments is not recorded")
    item_ttl_s: float = Field(90 * 86400.0, ge=0, description="An item's neighbours and statistics expire this long after its last update (wall clock), s; 0 = never")


class ValidationSettings(BaseModel):
    max_payload_bytes: int = Field(65_536, ge=64, description="Largest accepted record value, bytes")
    min_event_time_ms: int = Field(631_152_000_000, description="Earliest accepted event time (default 1990-01-01), ms")
    max_future_skew_s: float = Field(86_400.0, ge=0, description="How far past the wall clock an event time may be, seconds")

    def limits(self) -> dict[str, int]:
        """Keyword arguments of ``models.events.decode``/``validate``: the worker and the SDK
        check events against the same limits."""
        return {"max_bytes": self.max_payload_bytes, "min_time_ms": self.min_event_time_ms,
                "max_future_skew_ms": int(self.max_future_skew_s * 1000)}


class WorkerSettings(BaseModel):
    batch_size: int = Field(2000, ge=1, description="Events applied to Redis per batch at most")
    batch_window_ms: float = Field(5.0, gt=0, description="Longest wait to fill a batch, milliseconds")
    web_port: int = Field(0, ge=0, le=65535, description="Faust web port for the worker (0 = web server off)")
    trace_latency: bool = Field(False, description="Record publish-to-applied latency samples in Redis (benchmarks)")
    heartbeat_s: float = Field(2.0, gt=0, description="How often a worker writes its status to Redis, seconds")
    restore_on_loss: bool = Field(True, description="A worker that finds the Redis state gone starts `streamrec replay --restore` itself")
    dlq_max_bytes: int = Field(900_000, ge=1024, description="Dead-letter values longer than this are cut (headers keep size and sha256)")
    stop_timeout_s: float = Field(8.0, gt=0, description="After SIGTERM, the process ends at the latest this much later, seconds")
    commit_interval_s: float = Field(1.0, gt=0, description="How often the worker commits acknowledged offsets to Kafka, seconds")
    event_loop: Literal["uvloop", "asyncio"] = Field("uvloop", description="The stream worker's event loop: uvloop (faster per message, measured by `streamrec bench ingest`) or asyncio's own")
    apply_lanes: int = Field(4, ge=1, le=64, description="A batch's partitions are applied in this many concurrent lanes (threads, each a disjoint set of partitions), so one lane's Python work overlaps another's Redis calls")
    apply: bool = Field(True, description="False: the agent takes and acknowledges batches without applying them (the stream framework's ceiling, for `streamrec bench ingest`)")
    stream_buffer_maxsize: int = Field(16_384, ge=1, description="Fetched records a worker holds for its agent at most (Faust's stream_buffer_maxsize); more than a fetch (2,000) holds partitions back less often (measured with worker.apply off)")
    consumer_fast_path: bool = Field(True, description="The worker's consumer hands fetched records to the agent without Faust's task per record, and resumes partitions held back by a full stream buffer at once instead of within 1 s; false: Faust's own path (for comparison)")


class ServingSettings(BaseModel):
    sources: list[str] = Field(default_factory=lambda: ["seq", "cf", "trend", "explore"],
                               description='Candidate sources, in merge order (JSON list, e.g. ["cf","trend"])')
    notify: bool = Field(True, description="Stream workers announce changed users and new items to serving (Redis streams)")
    k: int = Field(20, ge=1, le=1000, description="Items in each served list")
    candidates: int = Field(500, ge=10, le=10_000, description="Candidates re-ranked per list at most")
    seq_candidates: int = Field(200, ge=0, description="Nearest items of the session embedding (FAISS) per list")
    cf_candidates: int = Field(200, ge=0, description="CF neighbours of the recent session items per list")
    trending_candidates: int = Field(100, ge=0, description="Trending items per list")
    mf_candidates: int = Field(200, ge=0, description="Source mf: nearest items (FAISS) of the user's matrix-factorisation vector, folded in from the recent clicks")
    users_candidates: int = Field(200, ge=0, description="Source users: recent items of the user's nearest users (user-user CF over MF user vectors)")
    users_neighbours: int = Field(20, ge=1, le=1000, description="Source users: neighbour users whose recent clicks are read per list")
    tower_candidates: int = Field(200, ge=0, description="Source tower: nearest items (FAISS) of the two-tower model's user vector")
    explore_pool: int = Field(200, ge=0, description="Items the exploration draw chooses from (newest catalog items first)")
    explore_slots: int = Field(2, ge=0, description="Positions of each list given to exploration picks (chosen by serving.policy)")
    policy: Literal["thompson", "ucb", "epsilon-greedy", "greedy"] = Field("thompson", description="Exploration policy over the bandit posteriors that fills the exploration slots (models.policies)")
    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="epsilon-greedy: share of exploration slots filled uniformly at random")
    ucb_c: float = Field(2.0, ge=0.0, description="UCB: posterior standard deviations added to the mean")
    propensity_draws: int = Field(100, ge=10, le=100_000, description="Thompson sampling: Monte Carlo draws behind each logged propensity (the logged posteriors let `streamrec eval --ope` recompute it with more)")
    diversity: float = Field(0.0, ge=0.0, le=1.0, description="Weight of the maximal-marginal-relevance diversity re-rank of the ranked slots (0 = off, 1 = only novelty)")
    diversity_by: Literal["vectors", "categories"] = Field("vectors", description="Similarity the diversity re-rank penalises: item vectors (cosine, the sequence model's index) or categories and tags (Jaccard of content tokens)")
    fresh_items_s: float = Field(7 * 86400.0, gt=0, description="Catalog items younger than this (by created_at) join the exploration pool, s")
    recent: int = Field(5, ge=1, le=50, description="Recent session items whose CF neighbours are candidates")
    seq_len: int = Field(50, ge=1, le=1000, description="Recent session items fed to the sequence model")
    batch: int = Field(64, ge=1, description="Users refreshed together at most (one batched model pass)")
    block_ms: int = Field(50, ge=1, description="An idle serving worker waits at most this long for dirty users (woken at once when one appears), ms")
    lease_s: float = Field(30.0, gt=0, description="A claimed user is claimed again by another worker if not done within this, s")
    retry_base_s: float = Field(0.5, gt=0, description="First backoff after a user's refresh raised (doubling per failure), s")
    retry_cap_s: float = Field(60.0, gt=0, description="Longest backoff after failed refreshes, s")
    stats_ttl_s: float = Field(1.0, ge=0, description="How long item statistics read from Redis are reused, s")
    neighbours_ttl_s: float = Field(10.0, ge=0, description="How long an item's CF neighbour list (and its similarities) read from Redis is reused, s")
    default_every_s: float = Field(5.0, gt=0, description="How often the default list (unknown users) is recomputed, s")
    model_poll_s: float = Field(1.0, gt=0, description="How often serving checks for newer models, s")
    recs_ttl_s: float = Field(30 * 86400.0, gt=0, description="A user's list expires this long after its last refresh, s")
    log_features: bool = Field(True, description="Log every served list with its features to the served topic (ranker training data)")
    log_top: int = Field(100, ge=1, description="Candidates logged per served list (best first)")
    coarse_candidates: int = Field(100, ge=0, description="Candidates per list the coarse stage (the trained ranker's first trees) passes to the full ranker, at least k; 0 = no coarse stage")
    tree_evaluator: Literal["auto", "native", "compiled"] = Field("auto", description="What evaluates a trained ranker's trees: native (compiled to machine code by lleaves, in the model-loading thread), compiled (numpy), or auto (native when lleaves is installed); both equal LightGBM's scores bit for bit")
    coarse_trees: int = Field(20, ge=1, description="Trees of the trained ranker (its first ones) that score the coarse stage")
    group: str = Field("streamrec-serve", description="Consumer group of the serving workers on the change streams")
    stream_maxlen: int = Field(100_000, ge=100, description="New-item notifications kept per item stream (approximate)")
    trace_latency: bool = Field(False, description="Record click-publish-to-list-written samples in Redis (benchmarks)")


class TrainerSettings(BaseModel):
    every_s: float = Field(3600.0, gt=0, description="Retrain at most this often when running as a service, s")
    after_events: int = Field(100_000, ge=1, description="...or as soon as this many new events arrived since the last training")
    seq_epochs: int = Field(30, ge=1, description="Epochs of sequence-model training")
    seq_dim: int = Field(64, ge=8, description="Sequence model embedding size")
    seq_max_len: int = Field(50, ge=2, description="Sequence model context length")
    seq_max_seconds: float = Field(600.0, gt=0, description="Wall-clock cap of one sequence-model training, s")
    seq_model: Literal["sasrec", "gru4rec", "bert4rec"] = Field("sasrec", description="Sequence model family (models.seqtrain.FAMILIES)")
    seq_loss: Literal["bce", "ce", "sampled", "gbce"] = Field("bce", description="Sequence model loss: bce (one negative), ce (full softmax), sampled (sampled softmax, logQ-corrected), gbce (gSASRec)")
    seq_negatives: int = Field(256, ge=1, description="Negatives of the sampled and gbce losses")
    seq_gbce_t: float = Field(0.75, ge=0.0, le=1.0, description="gSASRec's calibration parameter t of the gbce loss")
    mf_model: Literal["als", "bpr"] = Field("als", description="Matrix factorisation (implicit) behind the mf and users sources: ALS or BPR on the click matrix")
    mf_factors: int = Field(64, ge=2, le=1024, description="Matrix factorisation factors")
    mf_iterations: int = Field(15, ge=1, description="ALS sweeps (BPR: ten times as many epochs)")
    mf_regularization: float = Field(0.05, ge=0.0, description="Matrix factorisation L2 regularisation (also of the fold-in)")
    mf_alpha: float = Field(10.0, gt=0, description="ALS confidence of an item a user clicked n times: alpha * n (implicit's convention; unclicked items 1)")
    tower_dim: int = Field(64, ge=4, le=1024, description="Two-tower vector size")
    tower_max_seconds: float = Field(120.0, gt=0, description="Wall-clock cap of one two-tower training, s")
    tower_epochs: int = Field(30, ge=1, description="Two-tower epochs at most")
    index_exact_below: int = Field(20_000, ge=0, description="Catalogs smaller than this use exact search; larger, HNSW")
    ranker_trees: int = Field(300, ge=1, description="LambdaMART trees at most (early stopping may use fewer)")
    ranker_min_lists: int = Field(50, ge=1, description="Served lists with a click needed before a ranker is trained")
    ranker_negatives: int = Field(300, ge=1, description="Negatives kept per served list for training (best-ranked half, random half)")
    ranker_model: Literal["lightgbm", "deepfm"] = Field("lightgbm", description="The trained ranker: LightGBM (trainer.ranker_objective) or DeepFM (PyTorch), both from the served log")
    ranker_max_seconds: float = Field(300.0, gt=0, description="Wall-clock cap of one DeepFM training, s")
    ranker_objective: Literal["lambdarank", "rank_xendcg", "binary"] = Field("lambdarank", description="LightGBM objective of the ranker: lambdarank (listwise), rank_xendcg (listwise), binary (pointwise)")
    ranker_leaves: int = Field(15, ge=2, description="LambdaMART leaves per tree")
    ranker_min_leaf: int = Field(100, ge=1, description="LambdaMART minimum rows per leaf")
    ranker_learning_rate: float = Field(0.05, gt=0, description="LambdaMART learning rate")
    ranker_early_stopping: int = Field(50, ge=1, description="Rounds without better validation NDCG@10 before stopping")
    keep_versions: int = Field(3, ge=1, description="Model versions kept in Redis per kind")
    drift: Literal["off", "adwin", "page-hinkley"] = Field("adwin", description="Drift detector (river) on the live click-through rate of served lists; when it fires the ranker is retrained at once")
    drift_delta: float = Field(0.002, gt=0, lt=1, description="ADWIN confidence (smaller: fewer false alarms); Page-Hinkley uses its default threshold")
    drift_min_lists: int = Field(500, ge=1, description="Served lists observed after a (re)training before the drift detector may fire again")


class ExperimentSettings(BaseModel):
    mode: Literal["off", "interleave", "ab"] = Field("off", description="Experiment between the live ranker (control) and experiment.treatment: team-draft interleaving in one list, or an A/B split of users")
    treatment: str = Field("", description="Registry version of the treatment ranker (empty: no experiment)")
    share: float = Field(1.0, ge=0.0, le=1.0, description="Share of users (by a hash of the user id) in the experiment")
    salt: str = Field("exp1", description="Salt of the user hash: a new salt draws new arms")


class MetricsSettings(BaseModel):
    port: int = Field(0, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint of each streamrec process (0 = off)")
    host: str = Field("127.0.0.1", description="Address the metrics endpoint listens on (0.0.0.0 in containers)")
    redis_every_s: float = Field(5.0, gt=0, description="How often gauges read from Redis (memory, model age) are refreshed, s")


class HealthSettings(BaseModel):
    max_heartbeat_age_s: float = Field(15.0, gt=0, description="A worker whose last heartbeat is older than this is dead, s")
    max_lag_records: int = Field(100_000, ge=0, description="A stream worker further behind than this (records, all partitions) is not keeping up")
    max_dirty_age_s: float = Field(60.0, gt=0, description="Serving is not keeping up when a user has waited longer than this for a refresh, s")
    max_model_age_s: float = Field(3 * 86400.0, gt=0, description="The trainer is unhealthy when the newest live model is older than this, s")


class LogSettings(BaseModel):
    format: Literal["text", "json"] = Field("text", description="Log lines as text, or one JSON object per line (for log shippers)")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", description="Lowest level logged (-v: INFO)")


class Settings(BaseSettings):
    """Everything streamrec reads from its environment. An unusable value raises
    ``ConfigError`` naming its environment variable."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)
    learners: LearnerSettings = Field(default_factory=LearnerSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    experiment: ExperimentSettings = Field(default_factory=ExperimentSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_invalid(exc)) from exc
        except SettingsError as exc:  # a value that does not parse (a JSON list, say)
            raise ConfigError(f"invalid setting: {' '.join(str(exc).split())}") from exc


def describe_invalid(exc: ValidationError) -> str:
    """One line naming each rejected setting by its environment variable."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if not isinstance(p, int)]
        name = "STREAMREC_" + "__".join(loc).upper() if loc else "a setting"
        parts.append(f"{name}: {error.get('msg', 'invalid')} (got {error.get('input')!r})"[:300])
    return "invalid setting " + "; ".join(parts)


def env_for(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce ``settings`` in a child process."""
    out: dict[str, str] = {}
    for section_name in type(settings).model_fields:
        section = getattr(settings, section_name)
        for field, value in section.model_dump().items():
            key = f"STREAMREC_{section_name.upper()}__{field.upper()}"
            if isinstance(value, SecretStr):  # a child needs the secret itself
                out[key] = value.get_secret_value()
            elif isinstance(value, bool):
                out[key] = str(value).lower()
            elif isinstance(value, (list, dict)):
                out[key] = json.dumps(value)  # how pydantic-settings reads complex fields
            else:
                out[key] = str(value)
    return out
