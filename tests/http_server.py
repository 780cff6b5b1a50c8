"""A local HTTP server for download tests: fixed bytes on 127.0.0.1, HTTP ranges optional.

Tests start one with the `file_server` fixture (tests/conftest.py), which closes it.
"""

import http.server
import re
import threading


class FileServer:
  """Serves `files` (by the last part of the request path) in a background thread.

  `/truncated/<name>` announces the whole length but stops half-way. With `ranges`, a
  `Range: bytes=N-` request is answered 206 with the rest of the file (416 past its end);
  without, every request gets the whole file (200), as from a server that ignores ranges.
  Each request is recorded in `requests` as `(path, range header or None, status)`.

  Use as a context manager, or call `close()`.
  """

  def __init__(self, files: dict[str, bytes], ranges: bool = True):
    self.files, self.ranges, self.requests = files, ranges, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        body = server.files.get(self.path.rsplit("/", 1)[-1])
        asked = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-", asked or "")
        if body is None:
          status = 404
        elif server.ranges and match:
          start = int(match.group(1))
          status = 206 if start < len(body) else 416
        else:
          status, start = 200, 0
        server.requests.append((self.path, asked, status))
        if status == 404:
          self.send_error(404)
          return
        self.send_response(status)
        if status == 416:
          self.send_header("Content-Range", f"bytes */{len(body)}")
          body = b""
        elif status == 206:
          self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        body = body[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path.startswith("/truncated/"):
          body = body[: len(body) // 2]
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
