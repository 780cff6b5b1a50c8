"""Running the app under uvicorn: in the foreground (the command line) or in a background
thread (tests, benchmarks, a notebook).

The socket is bound here, before uvicorn starts, so that a port in use or a bad address
is one clear error (`OSError`) rather than a log line and an exit inside uvicorn, and so
that port 0 (any free port) can be told to the caller.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

DEFAULT_HOST = "127.0.0.1"  # Loopback: exposing the service is a deliberate choice.


def bind(host: str = DEFAULT_HOST, port: int = 0) -> socket.socket:
  """A listening-ready TCP socket on (host, port); port 0 picks a free one.

  Raises:
    OSError: the address cannot be bound (in use, not this machine's, no permission).
  """
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError:
    sock.close()
    raise
  return sock


def _config(app, log_level: str) -> uvicorn.Config:
  # The app logs what matters itself (metrics); one line per request would flood the log.
  return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on")


def serve_forever(app, sock: socket.socket, log_level: str = "info") -> None:
  """Serves `app` on `sock` until interrupted (SIGINT/SIGTERM: graceful shutdown)."""
  uvicorn.Server(_config(app, log_level)).run(sockets=[sock])


class BackgroundServer:
  """`app` served on loopback in a daemon thread; use as a context manager.

  with BackgroundServer(app) as server:
    httpx.post(f"{server.url}/score", content=png_bytes)
  """

  def __init__(self, app, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning"):
    self.sock = bind(host, port)
    self.host, self.port = self.sock.getsockname()[:2]
    self.server = uvicorn.Server(_config(app, log_level))
    self.thread = threading.Thread(
      target=self.server.run, kwargs={"sockets": [self.sock]}, name="serve", daemon=True
    )

  @property
  def url(self) -> str:
    host = f"[{self.host}]" if ":" in self.host else self.host
    return f"http://{host}:{self.port}"

  def start(self, timeout: float = 30.0) -> BackgroundServer:
    """Starts serving; returns once the app has started (its lifespan ran)."""
    self.thread.start()
    deadline = time.monotonic() + timeout
    while not self.server.started:
      if not self.thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"the service did not start on {self.url}")
      time.sleep(0.01)
    return self

  def stop(self, timeout: float = 30.0) -> None:
    """Shuts down gracefully (answers in flight finish) and closes the socket."""
    self.server.should_exit = True
    self.thread.join(timeout)
    self.sock.close()

  def __enter__(self) -> BackgroundServer:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
