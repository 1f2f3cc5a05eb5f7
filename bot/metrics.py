"""Prometheus metrics of the generation worker, served on `worker.metrics_port` when it is set.

Each `WorkerMetrics` has a registry of its own (not the process-global one), so several workers in one
process (tests, `personabot run` with a worker) never clash over metric names.

| metric | type | meaning |
| --- | --- | --- |
| `personabot_queue_depth` | gauge | jobs claimable now (pending and due, or with an expired lease) |
| `personabot_job_latency_seconds` | histogram | job queued → its reply written |
| `personabot_time_to_first_token_seconds` | histogram | batch generation start → the job's first token |
| `personabot_generated_tokens_total{persona}` | counter | tokens generated; `rate()` is tokens/s |
| `personabot_tokens_per_second{persona}` | gauge | the persona's decode tokens/s in the last batch |
| `personabot_batch_size` | histogram | jobs per generated batch |
| `personabot_kv_cache_lookups_total{result}` | counter | channel KV cache `hit` / `miss` |
| `personabot_kv_cache_hit_ratio` | gauge | hits / lookups since start |
| `personabot_kv_cache_reused_tokens_total` | counter | prompt tokens not prefilled thanks to the cache |
| `personabot_kv_cache_bytes` | gauge | bytes held by the channel KV cache |
| `personabot_jobs_total{outcome}` | counter | `replied`, `vetoed`, `retried`, `failed`, `released`, `lost` |
| `personabot_job_failures_total{reason}` | counter | failed attempts by cause: `persona`, `adapter`, `prompt`, `generation`, `oom`, `empty`, `store` |
| `personabot_adapters_loaded` | gauge | LoRA adapters held by the backend |
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("personabot_queue_depth", "Reply jobs claimable now.", registry=r)
        self.job_latency = Histogram(
            "personabot_job_latency_seconds",
            "From a job being queued to its reply being written.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "personabot_time_to_first_token_seconds",
            "From the start of a batch's generation to a job's first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "personabot_generated_tokens", "Tokens generated, by persona.", ["persona"], registry=r
        )
        self.tokens_per_second = Gauge(
            "personabot_tokens_per_second",
            "Decode tokens per second of the persona's replies in the last batch.",
            ["persona"],
            registry=r,
        )
        self.batch_size = Histogram(
            "personabot_batch_size", "Jobs per generated batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.kv_lookups = Counter(
            "personabot_kv_cache_lookups", "Channel KV cache lookups.", ["result"], registry=r
        )
        self.kv_hit_ratio = Gauge("personabot_kv_cache_hit_ratio", "KV cache hits / lookups.", registry=r)
        self.kv_reused_tokens = Counter(
            "personabot_kv_cache_reused_tokens", "Prompt tokens served from the KV cache.", registry=r
        )
        self.kv_bytes = Gauge("personabot_kv_cache_bytes", "Bytes held by the channel KV cache.", registry=r)
        self.jobs = Counter("personabot_jobs", "Jobs handled, by outcome.", ["outcome"], registry=r)
        self.failures = Counter(
            "personabot_job_failures", "Failed job attempts, by cause.", ["reason"], registry=r
        )
        self.adapters_loaded = Gauge("personabot_adapters_loaded", "LoRA adapters loaded.", registry=r)
        self._hits = 0
        self._lookups = 0

    def kv_lookup(self, hit: bool, reused_tokens: int) -> None:
        self.kv_lookups.labels("hit" if hit else "miss").inc()
        self._lookups += 1
        if hit:
            self._hits += 1
            self.kv_reused_tokens.inc(reused_tokens)
        self.kv_hit_ratio.set(self._hits / self._lookups)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Start the `/metrics` HTTP endpoint in a background thread; returns the server."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A sample's current value (for tests and the batch log line)."""
        return self.registry.get_sample_value(name, labels or {})
