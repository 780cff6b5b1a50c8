"""`python -m maeday_jax.serve --detector FOLDER_OR_METHOD [--port 8080] ...`: the scoring
service (see `maeday_jax.serve`). A bad command line, a detector that cannot be loaded or
served, or an address that cannot be bound is one `error:` line and exit status 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from maeday_jax.serve import server


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, as `maeday_jax.main` prints its errors.
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _port(value: str) -> int:
  try:
    port = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
  if not 0 <= port <= 65535:
    raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
  return port


def _positive(value: str) -> int:
  number = int(value)
  if number < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
  return number


def parse_args(argv=None) -> argparse.Namespace:
  """The command line's options (exits 2 with one `error:` line when they are bad)."""
  parser = _Parser(prog="python -m maeday_jax.serve", description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--detector",
    required=True,
    help="a fitted detector folder (the fit job's <workdir>/detector), an exported "
    "StableHLO folder (the export job's), or a zero-shot method name",
  )
  parser.add_argument("--host", default=server.DEFAULT_HOST, help="address to bind (loopback)")
  parser.add_argument("--port", type=_port, default=8080, help="0: any free port")
  parser.add_argument("--max-batch", type=_positive, default=8, help="images per model call")
  parser.add_argument("--max-wait-ms", type=float, default=5.0, help="wait to fill a batch")
  parser.add_argument("--queue-size", type=int, default=64, help="waiting requests; then 503")
  parser.add_argument("--max-body-mb", type=float, default=20.0, help="larger bodies get 413")
  parser.add_argument(
    "--max-image-pixels", type=int, default=0, help="per-image pixel budget (0: from memory)"
  )
  parser.add_argument("--decode-threads", type=_positive, default=4)
  parser.add_argument("--body-timeout-s", type=float, default=30.0, help="slower bodies: 408")
  parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
  args = parser.parse_args(argv)
  if args.max_wait_ms < 0 or args.queue_size < 0:
    parser.error("--max-wait-ms and --queue-size must be >= 0")
  if args.max_body_mb <= 0 or args.body_timeout_s <= 0:
    parser.error("--max-body-mb and --body-timeout-s must be > 0")
  if args.max_image_pixels < 0:
    parser.error("--max-image-pixels must be >= 0 (0: derived from memory)")
  return args


def _detector(spec: str):
  """What `--detector` names: a folder as it is (`serve.load_model` reads it), or a
  zero-shot method built with its default settings (`defaults.evaluate_config`; weights
  are downloaded and checked as the jobs do), transductive ones refused before loading.

  Raises:
    ConfigError: an unknown method (listing the known ones); ServeError: a transductive one.
  """
  from maeday_jax import defaults, serve
  from maeday_jax.detectors import registry
  from maeday_jax.jobs import detector_choice

  if os.path.isdir(os.path.expanduser(spec)):
    return spec  # A fitted or exported folder: `serve.load_model` reads and checks it.
  config = defaults.evaluate_config()
  config.detector = spec
  detector_choice.check(config)  # An unknown method or a bad folder fails here.
  if detector_choice.is_path(spec):
    return spec
  if registry.get(spec).scores_groups(config):
    raise serve.ServeError(
      f"detector {spec} is transductive (an image's score depends on the other images "
      "scored with it); score it with the bulk job (configs/score.py, --config.group_size)."
    )
  return detector_choice.load(config, spec, "serve")


def main(argv=None) -> int:
  """Loads the detector, binds the address, serves until interrupted."""
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s")
  from maeday_jax import serve
  from maeday_jax.data import images

  try:
    sock = server.bind(args.host, args.port)  # First: a port in use fails before compiling.
  except OSError as e:
    print(f"error: cannot listen on {args.host}:{args.port} ({e.strerror or e})", file=sys.stderr)
    return 2
  try:
    images.set_pixel_budget(args.max_image_pixels, threads=args.decode_threads)
    model = serve.load_model(_detector(args.detector), max_batch=args.max_batch)
  except (ValueError, OSError) as e:  # ConfigError, ArtifactError, ExportError, ServeError.
    sock.close()
    # The jobs' messages name their config field; here the same value is --detector.
    message = " ".join(str(e).split()).replace("--config.detector", "--detector")
    print(f"error: {message}", file=sys.stderr)
    return 2
  app = serve.create_app(
    model,
    max_wait_ms=args.max_wait_ms,
    queue_size=args.queue_size,
    max_body_bytes=int(args.max_body_mb * (1 << 20)),
    decode_threads=args.decode_threads,
    body_timeout_s=args.body_timeout_s,
  )
  host, port = sock.getsockname()[:2]
  # Printed, not logged: the one line a user (or a script starting it on port 0) needs.
  print(f"Serving {model.name} on http://{host}:{port}", file=sys.stderr, flush=True)
  server.serve_forever(app, sock, args.log_level)
  return 0


if __name__ == "__main__":
  from maeday_jax import cpu_memory

  cpu_memory.reexec_with_kept_memory()  # Before JAX starts (see `maeday_jax.cpu_memory`).
  sys.exit(main())
