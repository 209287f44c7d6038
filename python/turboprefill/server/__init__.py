"""turboprefill.server — an OpenAI-compatible HTTP server over one Engine (`turboprefill serve MODEL`).

scheduler.py runs requests through the engine (queue, slots, prefills, batched decode); app.py and
openai_format.py speak OpenAI's API over it; metrics.py exports Prometheus metrics. Needs the `serve` extra
(starlette, uvicorn, prometheus_client).
"""

from .app import create_app

__all__ = ["create_app"]
