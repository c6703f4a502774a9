"""Prometheus metrics with vLLM's names (``moe:`` in place of ``vllm:``), on a per-app registry.

Engine-wide state (running / waiting requests, KV-cache usage, prefix-cache counters) is read
from ``engine.stats()`` at scrape time, speculative-decoding counters from ``engine.spec_stats()``;
per-request counters and histograms are observed by the server as each request's outputs arrive
(it timestamps tokens itself).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0)


class _EngineCollector:
    """Gauges and cumulative counters the engine keeps, read when Prometheus scrapes."""

    def __init__(self, async_llm, model_name: str):
        self.llm, self.model_name = async_llm, model_name

    def collect(self):
        s = self.llm.engine.stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge("moe:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("moe:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("moe:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", s.kv_cache_usage)
        yield gauge("moe:kv_cache_free_blocks", "KV-cache blocks in the free pool.", s.num_free_blocks)
        yield gauge("moe:kv_cache_total_blocks", "KV-cache blocks in all.", s.num_total_blocks)
        yield counter("moe:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("moe:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        engine = self.llm.engine
        if engine.spec is not None:  # vLLM's speculative-decoding counters, from engine.spec_stats()
            spec = engine.spec_stats()
            yield counter("moe:spec_decode_num_drafts", "Drafts verified (one per sequence and step).",
                          spec.num_verify_steps)
            yield counter("moe:spec_decode_num_draft_tokens", "Draft tokens proposed.", spec.num_draft_tokens)
            yield counter("moe:spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens)
            per_pos = CounterMetricFamily("moe:spec_decode_num_accepted_tokens_per_pos",
                                          "Draft tokens accepted at each draft position.",
                                          labels=["model_name", "position"])
            accepted_at = list(spec.accepted_at)  # (the engine thread may lengthen it meanwhile)
            k = max(engine.spec.num_speculative_tokens, len(accepted_at))
            for pos, n in enumerate(accepted_at + [0] * (k - len(accepted_at))):
                per_pos.add_metric([self.model_name, str(pos)], n)
            yield per_pos


class ServerMetrics:
    def __init__(self, async_llm, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(async_llm, model_name))
        lab = ["model_name"]
        r = self.registry
        self.model_name = model_name
        self.prompt_tokens = Counter("moe:prompt_tokens", "Prefill tokens processed.", lab, registry=r)
        self.generation_tokens = Counter("moe:generation_tokens", "Generation tokens produced.", lab, registry=r)
        self.request_success = Counter("moe:request_success", "Finished requests by finish reason.",
                                       lab + ["finished_reason"], registry=r)

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, lab, buckets=buckets, registry=r)

        self.ttft = hist("moe:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = hist("moe:inter_token_latency_seconds", "Time between output tokens.", _TOKEN_BUCKETS)
        self.tpot = hist("moe:request_time_per_output_token_seconds", "Mean time per output token of a request.",
                         _TOKEN_BUCKETS)
        self.e2e = hist("moe:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue = hist("moe:request_queue_time_seconds", "Time waiting before first scheduled.", _LATENCY_BUCKETS)
        self.prefill = hist("moe:request_prefill_time_seconds", "Time from first scheduled to first token.",
                            _LATENCY_BUCKETS)
        self.decode = hist("moe:request_decode_time_seconds", "Time from first token to the last.", _LATENCY_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """One request's timeline as the server sees it (monotonic seconds)."""

    def __init__(self, m: ServerMetrics):
        self.m = m
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.num_tokens = 0
        self.prompt_counted = False

    def observe(self, out: RequestOutput) -> None:
        m, lab = self.m, self.m.model_name
        now = time.perf_counter()
        if not self.prompt_counted:
            m.prompt_tokens.labels(lab).inc(len(out.prompt_token_ids))
            self.prompt_counted = True
        new = len(out.delta.token_ids) if out.delta is not None else 0
        if new:
            m.generation_tokens.labels(lab).inc(new)
            if self.first_token is None:
                self.first_token = now
                m.ttft.labels(lab).observe(now - self.arrival)
            elif self.last_token is not None:
                gap = (now - self.last_token) / new
                for _ in range(new):
                    m.itl.labels(lab).observe(gap)
            self.last_token = now
            self.num_tokens += new
        if out.finished:
            self.finish(out, now)

    def finish(self, out: RequestOutput, now: float) -> None:
        m, lab = self.m, self.m.model_name
        reasons = {c.finish_reason or "abort" for c in out.outputs}
        for reason in reasons:
            m.request_success.labels(lab, reason).inc()
        m.e2e.labels(lab).observe(now - self.arrival)
        if self.first_token is not None and self.num_tokens > 1:
            m.tpot.labels(lab).observe((now - self.first_token) / (self.num_tokens - 1))
            m.decode.labels(lab).observe(now - self.first_token)
        em = out.metrics
        if em.first_scheduled_time is not None:
            m.queue.labels(lab).observe(max(em.first_scheduled_time - em.arrival_time, 0.0))
            if em.first_token_time is not None:
                m.prefill.labels(lab).observe(max(em.first_token_time - em.first_scheduled_time, 0.0))

    def aborted(self) -> None:
        self.m.request_success.labels(self.m.model_name, "abort").inc()
        self.m.e2e.labels(self.m.model_name).observe(time.perf_counter() - self.arrival)
