"""The HTTP routes: POST /score, GET /healthz, GET /metrics (FastAPI).

Every answer is JSON except /metrics (the Prometheus text format); every refusal is
{"error": reason} with its status: 400 (a bad body or query), 408 (a body that does not
arrive in time), 413 (a body over the byte limit, an image over the pixel budget), 415 (a
content type other than an image, bytes or multipart), 503 with Retry-After (the queue is
full), 500 (the model failed, or gave a NaN or infinite score or map, which is never sent
as a number). No input ends the service.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import math
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from maeday_jax.bulk import maps_store
from maeday_jax.data.images import encode_png
from maeday_jax.serve import decoding
from maeday_jax.serve.batcher import Batcher
from maeday_jax.serve.metrics import Metrics
from maeday_jax.serve.model import ServedModel

MAP_FORMATS = ("png", "npy")


def encode_map(anomaly_map: np.ndarray, fmt: str) -> dict:
  """One map for a JSON answer: `npy` is the float32 array as a .npy file; `png` is the map
  quantised per map as the bulk job stores uint8 maps (`bulk.maps_store`): the map is
  `offset + scale * png / 255`. Both base64-encoded in `data`."""
  anomaly_map = np.asarray(anomaly_map, np.float32)
  answer = {"format": fmt, "shape": list(anomaly_map.shape)}
  if fmt == "npy":
    buffer = io.BytesIO()
    np.save(buffer, anomaly_map, allow_pickle=False)
    return {**answer, "dtype": "float32", "data": base64.b64encode(buffer.getvalue()).decode()}
  quantised = maps_store.encode(anomaly_map[None], "uint8")
  return {
    **answer,
    "offset": float(quantised["offset"][0]),
    "scale": float(quantised["scale"][0]),
    "data": base64.b64encode(encode_png(quantised["maps"][0])).decode(),
  }


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
  return JSONResponse({"error": reason}, status_code=status, headers=headers)


def create_app(
  model: ServedModel,
  *,
  max_wait_ms: float = 5.0,
  queue_size: int = 64,
  max_body_bytes: int = 20 << 20,
  decode_threads: int = 4,
  body_timeout_s: float = 30.0,
) -> FastAPI:
  """The service of `model` (`load_model`) as an ASGI app, with its own metrics registry.

  Args:
    model: the loaded detector; its `max_batch` is the largest dynamic batch.
    max_wait_ms: how long the first request of a batch waits for others.
    queue_size: requests that may wait beyond the batch being scored; more get 503.
    max_body_bytes: the largest body read (413 beyond).
    decode_threads: threads decoding images (the pixel budget assumes 4 at once,
      `data.images.set_pixel_budget`).
    body_timeout_s: the longest a body may take to arrive (408 beyond): a slow client
      holds a place in the queue while it sends.
  """
  metrics = Metrics(model.max_batch)
  batcher = Batcher(
    model.score,
    max_batch=model.max_batch,
    max_wait=max_wait_ms / 1000,
    queue_size=queue_size,
    on_batch=metrics.batch,
  )
  decoder = concurrent.futures.ThreadPoolExecutor(decode_threads, thread_name_prefix="serve-decode")

  @contextlib.asynccontextmanager
  async def lifespan(app):
    batcher.start()
    yield
    await batcher.stop()
    decoder.shutdown(wait=False, cancel_futures=True)

  app = FastAPI(title="maeday_jax scoring service", lifespan=lifespan)
  app.state.model, app.state.metrics, app.state.batcher = model, metrics, batcher

  @app.exception_handler(HTTPException)
  async def http_error(request, error: HTTPException):
    return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

  @app.exception_handler(RequestValidationError)
  async def validation_error(request, error: RequestValidationError):
    return _error(400, f"bad request ({error.errors()})")

  async def answer(request: Request) -> JSONResponse:
    started = time.perf_counter()
    map_format = request.query_params.get("map") or None
    if map_format not in (None, *MAP_FORMATS):
      raise decoding.BadRequest(400, "bad_query", f"map={map_format!r}: use map=png or map=npy")
    kind = decoding.check_content_type(request.headers.get("content-type"))
    if not batcher.admit():
      metrics.error("queue_full")
      retry = str(batcher.retry_after())
      return _error(503, "queue full: retry later", {"Retry-After": retry})
    metrics.pending.set(batcher.pending)
    try:
      length = request.headers.get("content-length")
      try:
        async with asyncio.timeout(body_timeout_s):
          data = await decoding.read_body(request.stream(), length, max_body_bytes)
      except TimeoutError:
        reason = f"the body did not arrive within {body_timeout_s:g} s"
        raise decoding.BadRequest(408, "body_timeout", reason) from None
      if kind == decoding.MULTIPART:
        data = await decoding.multipart_file(data, request.headers, max_body_bytes)
      loop = asyncio.get_running_loop()
      image = await loop.run_in_executor(
        decoder, decoding.to_input, data, model.input_size, model.aspect
      )
      decoded = time.perf_counter()
      try:
        result = await batcher.score(image)
      except Exception as e:  # The model failed on this batch: say so, keep serving.
        metrics.error("model_error")
        return _error(500, f"scoring failed ({type(e).__name__}: {e})")
    finally:
      batcher.release()
      metrics.pending.set(batcher.pending)
    if not (math.isfinite(result.score) and np.isfinite(result.map).all()):
      metrics.error("non_finite")
      return _error(
        500,
        f"{model.name} gave a NaN or infinite score or map for this image: the fitted state "
        "is corrupt or overflows; check the detector",
      )
    threshold = model.threshold
    body = {
      "score": result.score,
      "label": None if threshold is None else int(result.score >= threshold),
      "threshold": threshold,
      "detector": model.name,
      "timing": {
        "read_decode_ms": round((decoded - started) * 1e3, 3),
        "queue_ms": round(result.queue_seconds * 1e3, 3),
        "model_ms": round(result.model_seconds * 1e3, 3),
        "total_ms": round((time.perf_counter() - started) * 1e3, 3),
        "batch_size": result.batch_size,
      },
    }
    if map_format:
      body["map"] = encode_map(result.map, map_format)
    return JSONResponse(body)

  @app.post("/score")
  async def score(request: Request):
    """Scores one image (the body, or a multipart file); `?map=png|npy` adds its map."""
    started = time.perf_counter()
    try:
      response = await answer(request)
    except decoding.BadRequest as e:
      metrics.error(e.kind)
      response = _error(e.status, e.reason)
    except ClientDisconnect:
      metrics.error("client_disconnect")
      response = _error(400, "the client disconnected before the body was read")
    except Exception as e:  # Whatever it is, this request fails alone.
      metrics.error("internal")
      response = _error(500, f"internal error ({type(e).__name__}: {e})")
    metrics.answered(response.status_code, time.perf_counter() - started)
    return response

  @app.get("/healthz")
  async def healthz():
    """200 while the batcher runs, 503 otherwise."""
    ok = batcher.alive
    body = {
      "status": "ok" if ok else "unhealthy",
      "detector": model.name,
      "input_size": model.input_size,
      "max_batch": model.max_batch,
      "pending": batcher.pending,
      "capacity": batcher.capacity,
    }
    return JSONResponse(body, status_code=200 if ok else 503)

  @app.get("/metrics")
  async def prometheus():
    """The Prometheus text format."""
    return Response(metrics.text(), media_type=metrics.content_type)

  return app
