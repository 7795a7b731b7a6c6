"""Prometheus metrics of the coordinator, in a registry of its own (one per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "hexgen_requests", "HTTP generation requests by how they ended: ok, error, cancelled (the client left), "
            "rejected (429: the server full; 503: shutting down) or invalid (4xx before admission: a bad field, a "
            "prompt past the context, an unknown model)", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("hexgen_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("hexgen_generation_tokens", "Tokens generated", registry=r)
        self.failovers = Counter("hexgen_failovers", "Requests re-sent after their replica went down", registry=r)
        self.ttft = Histogram(
            "hexgen_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.tpot = Histogram(
            "hexgen_time_per_output_token_seconds",
            "Mean time per output token after the first",
            buckets=TOKEN_BUCKETS_S,
            registry=r,
        )
        self.e2e = Histogram(
            "hexgen_e2e_request_latency_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.replica_up = Gauge("hexgen_replica_up", "1 if the replica serves, else 0", ["replica"], registry=r)
        self.replica_outstanding = Gauge(
            "hexgen_replica_outstanding_requests",
            "Requests dispatched to the replica and not finished (queue depth)",
            ["replica"],
            registry=r,
        )
        self.replica_running = Gauge(
            "hexgen_replica_running_sequences", "Sequences in the replica's batch", ["replica"], registry=r
        )
        self.replica_waiting = Gauge(
            "hexgen_replica_waiting_sequences", "Sequences queued inside the replica", ["replica"], registry=r
        )
        self.replica_kv_blocks = Gauge(
            "hexgen_replica_kv_blocks", "KV-cache blocks of the replica's pool, by state", ["replica", "state"],
            registry=r,
        )
        self.replica_prefix_hit_tokens = Gauge(
            "hexgen_replica_prefix_cache_hit_tokens",
            "Prompt tokens whose keys/values came from the prefix cache so far", ["replica"], registry=r,
        )
        self.replica_preemptions = Gauge(
            "hexgen_replica_preemptions", "Sequences preempted (blocks freed, recomputed later) so far", ["replica"],
            registry=r,
        )
        self.replica_draft_tokens = Gauge(
            "hexgen_replica_draft_tokens", "Speculative decoding: draft tokens verified so far, and those accepted",
            ["replica", "outcome"], registry=r,
        )

        # The driver's step totals (engine/engine.py:StepTotals): rate() of busy seconds over rate() of steps is the
        # mean step time; of step tokens over steps, the mean batch in tokens.
        self.replica_engine = {
            key: Gauge(f"hexgen_replica_engine_{name}", text, ["replica"], registry=r)
            for key, name, text in (
                ("engine_steps", "steps", "Micro-batches the replica's driver has finished so far"),
                ("engine_step_tokens", "step_tokens", "Tokens (prompt chunks and decodes) those steps computed"),
                ("engine_sampled_tokens", "sampled_tokens", "Tokens those steps sampled"),
                ("engine_busy_s", "busy_seconds", "Wall seconds the driver spent inside its steps"),
            )
        }

    def render(self, replicas) -> bytes:
        """Prometheus text format, with the per-replica gauges read fresh."""
        for replica in replicas:
            label = str(replica.index)
            self.replica_up.labels(label).set(1 if replica.state.is_up else 0)
            self.replica_outstanding.labels(label).set(replica.state.outstanding)
            self.replica_running.labels(label).set(replica.load.get("running", 0))  # 0 once down (mark_down)
            self.replica_waiting.labels(label).set(replica.load.get("waiting", 0))
            for state in ("used", "free", "cached"):
                self.replica_kv_blocks.labels(label, state).set(replica.load.get(f"kv_blocks_{state}", 0))
            self.replica_preemptions.labels(label).set(replica.load.get("preemptions", 0))
            self.replica_draft_tokens.labels(label, "verified").set(replica.load.get("draft_tokens", 0))
            self.replica_draft_tokens.labels(label, "accepted").set(replica.load.get("accepted_draft_tokens", 0))
            self.replica_prefix_hit_tokens.labels(label).set(replica.load.get("prefix_hit_tokens", 0))
            for key, gauge in self.replica_engine.items():
                gauge.labels(label).set(replica.load.get(key, 0))
        return generate_latest(self.registry)
