"""File names that are not valid UTF-8: one text form for records, reports and logs.

On Linux a file name is any bytes; an old NAS share or a camera's FAT card often holds
names in Latin-1 or CP437 (`b"bad\\xff.png"`). Python lists such a name as a str with
lone surrogates (`os.fsdecode`'s 'surrogateescape': `"bad\\udcff.png"`), which cannot be
written to UTF-8 text (tfds records, CSV, JSON, logs) without a UnicodeEncodeError.

- `to_text`: the name every record, report (scores.csv, metrics.json) and log shows: each
  byte that is not valid UTF-8 becomes the four characters `\\xNN` (Python's
  'backslashreplace': `bad\\xff.png`); a valid name is returned unchanged.
- `to_disk`: back from that text to the name on disk (the original bytes, as a str that
  `open` and `pathlib` encode back with 'surrogateescape'); outputs named after an
  input file (maps, overlays, ...) get its exact bytes.

The round trip is lossless: an escape is only ever `\\x80`..`\\xff` (bytes below 0x80 are
always valid UTF-8), so `to_disk(to_text(name)) == name` for every name except one that
itself holds the literal text `\\x` followed by two hex digits from 80 to ff, which no
camera or scanner writes.
"""

from __future__ import annotations

import os
import re

# The escapes `to_text` writes: a backslash, 'x' and a byte of 0x80 or more.
_ESCAPE = re.compile(rb"\\x([89a-fA-F][0-9a-fA-F])")


def to_text(name: str | os.PathLike) -> str:
  """`name` as valid UTF-8 text: undecodable bytes written as `\\xNN` (see the module)."""
  name = os.fspath(name)
  if isinstance(name, bytes):
    raw = name
  else:
    try:
      name.encode("utf-8")
      return name  # The common case: already valid text.
    except UnicodeEncodeError:
      pass
    try:
      raw = os.fsencode(name)
    except UnicodeEncodeError:  # A lone surrogate that no file name decoded to.
      return name.encode("utf-8", "backslashreplace").decode("ascii")
  return raw.decode("utf-8", "backslashreplace")


def to_disk(text: str) -> str:
  """The on-disk name (a str with surrogate escapes) of a `to_text` name."""
  if "\\x" not in text:
    return text
  raw = _ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), text.encode("utf-8"))
  return os.fsdecode(raw)
