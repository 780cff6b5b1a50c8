"""A scoring service for a fitted detector: FastAPI on uvicorn, batching requests
dynamically onto one compiled step.

    python -m maeday_jax.serve --detector runs/line3/detector --port 8080

From Python (a notebook, a test):

    from maeday_jax import serve
    model = serve.load_model("runs/line3/detector", max_batch=8)
    app = serve.create_app(model, queue_size=64)            # any ASGI server
    with serve.BackgroundServer(app) as server:              # or uvicorn on loopback
      httpx.post(f"{server.url}/score", content=open("a.png", "rb").read())

Modules: `model` (the detector behind one fixed-size batch function), `decoding` (a
body to the model input, as the bulk job reads files), `batcher` (dynamic batching and
bounded admission), `metrics` (Prometheus), `app` (the routes), `server` (uvicorn).
"""

from maeday_jax.serve.app import create_app, encode_map
from maeday_jax.serve.model import ServedModel, ServeError, load_model
from maeday_jax.serve.server import DEFAULT_HOST, BackgroundServer, bind, serve_forever

__all__ = [
  "DEFAULT_HOST",
  "BackgroundServer",
  "ServeError",
  "ServedModel",
  "bind",
  "create_app",
  "encode_map",
  "load_model",
  "serve_forever",
]
