"""metrics.py — the server's Prometheus metrics, in a registry of their own (one per app, so that several
apps in one process, as in the tests, do not collide in prometheus_client's global registry).

Latencies are histograms (TTFT from the request's arrival, so queueing counts; inter-token latency between
consecutive streamed tokens of one request); speeds are gauges of the last prefill and the last decode step;
queue depth and running requests are gauges the scheduler sets; ubatches in flight per pipeline stage are read
from the engine when /metrics is scraped.
"""

from __future__ import annotations

from .._optional import require

# Buckets: 5 ms .. 2 min for TTFT (long prompts on CPU take tens of seconds), 1 ms .. 10 s between tokens.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class Metrics:
    def __init__(self, engine=None):
        prom = require("prometheus_client", "turboprefill serve")
        self.prom = prom
        self.registry = r = prom.CollectorRegistry()
        self.ttft = prom.Histogram("tp_time_to_first_token_seconds", "Arrival to first generated token",
                                   buckets=TTFT_BUCKETS, registry=r)
        self.itl = prom.Histogram("tp_inter_token_latency_seconds", "Between consecutive tokens of a request",
                                  buckets=ITL_BUCKETS, registry=r)
        self.prefill_tps = prom.Gauge("tp_prefill_tokens_per_second", "Speed of the last prefill", registry=r)
        self.decode_tps = prom.Gauge("tp_decode_tokens_per_second",
                                     "Tokens per second of the last decode step (all running requests)", registry=r)
        self.queued = prom.Gauge("tp_requests_queued", "Requests waiting for a slot", registry=r)
        self.running = prom.Gauge("tp_requests_running", "Requests holding a slot (prefilling or decoding)",
                                  registry=r)
        self.prompt_tokens = prom.Counter("tp_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = prom.Counter("tp_generated_tokens", "Tokens generated", registry=r)
        self.requests = prom.Counter("tp_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.in_flight = prom.Gauge("tp_stage_ubatches_in_flight",
                                    "Ubatches at each pipeline stage (in its input ring or being computed)", ["stage"],
                                    registry=r)
        self.ubatch_cap = prom.Gauge("tp_prompt_ubatch_cap",
                                     "Token cap on prompt ubatches now (0: none; set while answers stream)", registry=r)
        self.engine = engine

    def _sample_engine(self) -> None:
        if self.engine is None:
            return
        try:
            counts = self.engine.in_flight()
        except Exception:  # noqa: BLE001 — a closed engine (shutdown) leaves the last values
            return
        for s, n in enumerate(counts):
            self.in_flight.labels(str(s)).set(n)

    def render(self) -> tuple[bytes, str]:
        self._sample_engine()
        return self.prom.generate_latest(self.registry), self.prom.CONTENT_TYPE_LATEST
