"""The scoring service (`maeday_jax.serve`) on loopback: a served score equals the bulk job's
score of the same file, under concurrent load with malformed bodies among good ones; a
full queue answers 503 with Retry-After; maps round-trip; an exported folder serves too;
a bad command line is one `error:` line."""

from __future__ import annotations

import base64
import concurrent.futures
import csv
import io
import json
import pathlib
import socket
import struct
import sys
import threading
import time
import zlib

import httpx
import jax
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from maeday_jax import defaults, detectors, evaluation, exporting, serve
from maeday_jax.bulk import engine, source
from maeday_jax.data.images import decode_image
from maeday_jax.data.preprocess import preprocess_image
from maeday_jax.detectors import scoring
from maeday_jax.serve import __main__ as command_line
from tests.conftest import COMPILE_EVENT

MAX_BODY = 256 << 10


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _declared_huge_png(side: int = 100_000) -> bytes:
  """A small file whose header declares side x side pixels: a decompression bomb."""
  header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + _png_chunk(b"IHDR", header)
    + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    + _png_chunk(b"IEND", b"")
  )


def _encode(array: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _images() -> dict[str, bytes]:
  """Files of several sizes, modes and formats (the service resizes as the job does)."""
  rng = np.random.default_rng(0)

  def pixels(h, w, c=3):
    return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)

  return {
    "a.png": _encode(pixels(32, 32), "PNG"),
    "b.png": _encode(pixels(48, 40), "PNG"),
    "c.jpg": _encode(pixels(64, 64), "JPEG"),
    "d.png": _encode(pixels(30, 50, 1), "PNG"),  # Grayscale.
    "e.png": _encode(pixels(36, 36, 4), "PNG"),  # With alpha.
  }


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  """A tiny fitted PatchCore, its artifact (threshold at the median bulk score), the image
  files and their scores by the bulk job."""
  tmp = tmp_path_factory.mktemp("serve")
  config = defaults.fit_config("runlocal")
  detector = detectors.create(config, "patchcore")
  rng = np.random.default_rng(0)
  shots = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  heldout = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  detectors.fit_with_statistics(
    detector, detectors.NormalImages.from_arrays(shots, heldout), jax.random.key(0)
  )
  files = _images()
  folder = tmp / "images"
  folder.mkdir()
  for name, data in files.items():
    (folder / name).write_bytes(data)
  engine.score_listing(
    source.list_source(str(folder)),
    tmp / "bulk",
    make_scoring=lambda: evaluation.Scoring.for_detector(detector, batch_size=8),
    batch_size=8,
    progress=False,
  )
  with open(tmp / "bulk" / engine.SCORES_FILE) as f:
    bulk = {row["file"]: float(row["score"]) for row in csv.DictReader(f)}
  assert sorted(bulk) == sorted(files)
  threshold = float(np.median(list(bulk.values())))
  artifact = detectors.save(
    detector, tmp / "detector", threshold={"method": "fixed", "value": threshold}
  )
  return {
    "detector": detector,
    "artifact": artifact,
    "threshold": threshold,
    "files": files,
    "bulk": bulk,
    "tmp": tmp,
  }


@pytest.fixture(scope="module")
def service(fitted):
  model = serve.load_model(fitted["artifact"], max_batch=8)
  app = serve.create_app(model, max_wait_ms=20, queue_size=64, max_body_bytes=MAX_BODY)
  with serve.BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as c:
    yield c


def _metrics(client) -> dict:
  """{(name, labels): value} of every sample of /metrics."""
  text = client.get("/metrics").text
  return {
    (s.name, tuple(sorted(s.labels.items()))): s.value
    for family in text_string_to_metric_families(text)
    for s in family.samples
  }


def _count(metrics: dict, name: str, **labels) -> float:
  return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_concurrent_load_with_malformed_bodies(fitted, service):
  files, bulk = fitted["files"], fitted["bulk"]
  threshold = fitted["threshold"]
  good = [(name, i % 2 == 0) for i, name in enumerate(list(files) * 6)]  # 30, half multipart
  bad = [
    ({"content": b"", "headers": {"content-type": "image/png"}}, 400),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    ({"content": b"not an image", "headers": {"content-type": "image/png"}}, 400),
    ({"content": files["a.png"][:60], "headers": {"content-type": "image/png"}}, 400),
    ({"content": _declared_huge_png(), "headers": {"content-type": "image/png"}}, 413),
  ] * 2
  jobs = [("good", g) for g in good] + [("bad", b) for b in bad]
  np.random.default_rng(1).shuffle(jobs)
  before = _metrics(service)

  def send(job):
    kind, what = job
    if kind == "bad":
      return service.post("/score", **what[0])
    name, multipart = what
    if multipart:
      return service.post("/score", files={"image": (name, files[name], "image/png")})
    return service.post("/score", content=files[name], headers={"content-type": "image/png"})

  compiled = []  # The step was compiled at start-up; no batch size compiles again.

  def listen(event: str, duration: float, **kwargs):
    if event == COMPILE_EVENT:
      compiled.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listen)
  started = time.monotonic()
  try:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      answers = list(pool.map(send, jobs))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert time.monotonic() - started < 60
  assert compiled == []
  assert len(answers) == len(jobs)
  for (kind, what), answer in zip(jobs, answers, strict=True):
    body = answer.json()
    if kind == "bad":
      assert answer.status_code == what[1], body
      assert isinstance(body["error"], str) and body["error"]
      continue
    assert answer.status_code == 200, body
    name = what[0]
    np.testing.assert_allclose(body["score"], bulk[name], rtol=1e-5, err_msg=name)
    assert body["label"] == int(body["score"] >= threshold)
    assert 1 <= body["timing"]["batch_size"] <= 8
  health = service.get("/healthz")
  assert health.status_code == 200 and health.json()["status"] == "ok"
  assert health.json()["pending"] == 0
  after = _metrics(service)

  def delta(name, **labels):
    return _count(after, name, **labels) - _count(before, name, **labels)

  assert delta("maeday_serve_requests_total", status="200") == len(good)
  assert delta("maeday_serve_requests_total", status="400") == 6
  assert delta("maeday_serve_requests_total", status="415") == 2
  assert delta("maeday_serve_errors_total", kind="image_too_large") == 2
  assert delta("maeday_serve_errors_total", kind="empty_body") == 2
  assert delta("maeday_serve_request_seconds_count") == len(jobs)
  assert delta("maeday_serve_batch_size_sum") == len(good)  # Every good image scored once.


def test_limits_and_maps(fitted, service):
  data = fitted["files"]["b.png"]
  too_big = service.post("/score", content=b"\0" * (MAX_BODY + 1))
  assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
  assert service.post("/score?map=jpg", content=data).status_code == 400
  assert service.get("/nowhere").json() == {"error": "Not Found"}
  image = preprocess_image(decode_image(data), fitted["detector"].input_size)
  maps, scores = scoring.score_images(fitted["detector"], image[None])
  raw = service.post("/score?map=npy", content=data).json()
  assert raw["map"]["format"] == "npy"
  served = np.load(io.BytesIO(base64.b64decode(raw["map"]["data"])))
  np.testing.assert_allclose(served, maps[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(raw["score"], scores[0], rtol=1e-5)
  png = service.post("/score?map=png", content=data).json()["map"]
  quantised = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["data"]))), np.float32)
  restored = png["offset"] + png["scale"] * quantised / 255.0
  assert restored.shape == maps[0].shape
  np.testing.assert_allclose(restored, maps[0], atol=png["scale"] / 255 + 1e-6)


def _gated_model(score: float = 0.5):
  """A stand-in model that holds each batch until `gate` is set."""
  gate = threading.Event()

  def run(images):
    gate.wait(30)
    return np.zeros((len(images), 4, 4), np.float32), np.full(len(images), score, np.float32)

  return serve.ServedModel("gated", 32, 1, run, threshold=None), gate


def test_a_full_queue_answers_503_with_retry_after(fitted):
  model, gate = _gated_model()
  app = serve.create_app(model, max_wait_ms=0, queue_size=1)
  data = fitted["files"]["a.png"]
  with serve.BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      held = [pool.submit(c.post, "/score", content=data) for _ in range(2)]
      deadline = time.monotonic() + 10
      while c.get("/healthz").json()["pending"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
      refused = c.post("/score", content=data)
      assert refused.status_code == 503, refused.text
      assert int(refused.headers["retry-after"]) >= 1 and "queue" in refused.json()["error"]
      assert c.get("/healthz").status_code == 200  # The loop answers while the model works.
      gate.set()
      assert [f.result().status_code for f in held] == [200, 200]
      assert [f.result().json()["label"] for f in held] == [None, None]
    assert _count(_metrics(c), "maeday_serve_errors_total", kind="queue_full") == 1


def _broken(images):
  raise RuntimeError("device lost")


def _nan(images):
  return np.zeros((len(images), 4, 4), np.float32), np.full(len(images), np.nan, np.float32)


@pytest.mark.parametrize(
  "run, kind, words", [(_nan, "non_finite", "NaN"), (_broken, "model_error", "device lost")]
)
def test_a_failing_model_is_a_500_never_a_number(fitted, run, kind, words):
  app = serve.create_app(serve.ServedModel("broken", 32, 2, run))
  with serve.BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
    answer = c.post("/score", content=fitted["files"]["a.png"])
    assert answer.status_code == 500 and words in answer.json()["error"]
    assert c.get("/healthz").status_code == 200
    assert _count(_metrics(c), "maeday_serve_errors_total", kind=kind) == 1


def test_a_slow_body_is_a_408(fitted):
  model, gate = _gated_model()
  gate.set()
  app = serve.create_app(model, body_timeout_s=0.3)

  def slow():
    yield fitted["files"]["a.png"][:20]
    time.sleep(1.0)
    yield fitted["files"]["a.png"][20:]

  with serve.BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
    answer = c.post("/score", content=slow(), headers={"content-type": "image/png"})
    assert answer.status_code == 408 and "did not arrive" in answer.json()["error"]
    assert c.get("/healthz").json()["pending"] == 0  # Its place in the queue is free again.


def test_an_exported_folder_serves_the_same_scores(fitted):
  threshold = {"method": "fixed", "value": fitted["threshold"]}
  folder = exporting.export_stablehlo(
    fitted["detector"], fitted["tmp"] / "exported", platforms=("cpu",), threshold=threshold
  )
  model = serve.load_model(folder, max_batch=4)
  assert model.threshold == fitted["threshold"]
  app = serve.create_app(model, max_wait_ms=20)
  with serve.BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as c:
    for name in ("b.png", "c.jpg"):
      answer = c.post("/score", content=fitted["files"][name])
      assert answer.status_code == 200, answer.text
      body = answer.json()
      np.testing.assert_allclose(body["score"], fitted["bulk"][name], rtol=1e-5)
      assert body["label"] == int(body["score"] >= fitted["threshold"])


def test_the_command_line_refuses_in_one_line(capsys, tmp_path):
  cases = [
    (["--detector", str(tmp_path / "missing"), "--port", "0"], "no such folder"),
    (["--detector", "musc", "--port", "0"], "musc is transductive"),
    (["--detector", "x", "--port", "70000"], "not a port number"),
  ]
  taken = socket.socket()
  taken.bind(("127.0.0.1", 0))
  taken.listen()
  cases.append((["--detector", "x", "--port", str(taken.getsockname()[1])], "cannot listen"))
  for argv, expected in cases:
    try:
      code = command_line.main(argv)
    except SystemExit as e:  # argparse's own refusals.
      code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, argv
    assert err.startswith("error: ") and expected in err and "\n" not in err, err
  taken.close()


def test_the_benchmark_task_runs(fitted, tmp_path, capsys):
  tools = pathlib.Path(__file__).resolve().parents[1] / "tools"
  sys.path[:0] = [str(tools), str(tools / "benchmarks")]
  import benchmark

  out = tmp_path / "serve.json"
  argv = ["--task", "serve", "--detector", str(fitted["artifact"]), "--requests", "12"]
  assert benchmark.main([*argv, "--warmup", "2", "--concurrency", "3", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["statuses"] == {"200": 12} and result["requests_per_s"] > 0
  assert "requests/s, latency p50" in capsys.readouterr().out
