"""CLIP's tokenizer (byte-level BPE), in the standard library, with open_clip's ids.

    tokenizer = ClipTokenizer.load()              # the packaged vocabulary (offline)
    tokenizer = ClipTokenizer.load("/hf/model")   # a folder's vocab.json + merges.txt
    ids = tokenizer(["a photo of a damaged bottle.", ""])   # (2, 77) int32

What open_clip's `SimpleTokenizer` does (the OpenAI tokenizer), step by step:

1. clean-up: ftfy's `fix_text`, html unescape twice, strip, whitespace runs folded to one
   space, lower-case. `fix_text` is reproduced here for well-formed text (`_fix_text`:
   html entities ending in ';' when the line has no '<', C1 controls read as
   Windows-1252, Latin ligatures, full/half-width forms, curly quotes, line breaks,
   surrogates, terminal escapes, control characters, NFC), so no dependency is needed;
   what it leaves out is ftfy's repair of mojibake (text decoded with the wrong codec,
   e.g. 'cafÃ©'), which gives other ids for such text only;
2. the pre-tokenizer pattern `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`
   (and the two special tokens), written as a scan over Unicode categories (`_words`):
   letter runs, single digits, runs of other symbols;
3. each piece's UTF-8 bytes mapped to printable characters, merged by the BPE ranks, the
   last symbol marked `</w>`;
4. start token + ids + end token, truncated to the context keeping the end token, padded
   with zeros.

Ids equal open_clip's on tests/fixtures/clip_tokens.json (written by
tools/references/torch_clip_reference.py: anomaly-detection prompts, punctuation,
digits, accents, emoji, CJK, html, over-long prompts).
"""

from __future__ import annotations

import functools
import gzip
import html
import html.entities
import json
import os
import pathlib
import re
import unicodedata
import warnings
from collections.abc import Sequence

import numpy as np

from maeday_jax.weight_files.errors import CheckpointError

CONTEXT_LENGTH = 77
PACKAGED_VOCABULARY = pathlib.Path(__file__).parent / "clip_vocab" / "bpe_simple_vocab_16e6.txt.gz"
# The BPE file's merges that CLIP uses: 49152 ids - 256 bytes - 2 special tokens.
_MERGES = 49152 - 256 - 2

# ------------------------------------------------------------------ ftfy's fix_text

_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_C1 = re.compile("[\x80-\x9f]")
_LINES = re.compile("[^\n]*\n|[^\n]+")  # ftfy fixes each line, its '\n' included.
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\x85]")
_QUOTES = str.maketrans(
  {
    **{c: "'" for c in "\u02bc\u2018\u2019\u201a\u201b"},
    **{c: '"' for c in "\u201c\u201d\u201e\u201f"},
  }
)
_LIGATURES = str.maketrans(
  {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff",
    "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
  }
)  # fmt: skip
_CONTROLS = dict.fromkeys(
  [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF]
  + [*range(0xFFF9, 0xFFFD)]
)


@functools.cache
def _entities() -> dict[str, str]:
  """ftfy's entity table: the HTML5 names that end in ';', and the upper-cased forms of
  the lower-case ones that html.unescape leaves alone ('&EACUTE;' -> 'É')."""
  table = {}
  for name, char in html.entities.html5.items():
    if name.endswith(";"):
      table["&" + name] = char
      if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
        table["&" + name.upper()] = char.upper()
  return table


def _unescape_entity(match: re.Match) -> str:
  text = match.group(0)
  if text in _entities():
    return _entities()[text]
  if text.startswith("&#"):
    unescaped = html.unescape(text)
    return text if ";" in unescaped else unescaped
  return text


@functools.cache
def _width_map() -> dict[int, str]:
  table = {0x3000: " "}
  for code in range(0xFF01, 0xFFF0):
    normal = unicodedata.normalize("NFKC", chr(code))
    if normal != chr(code):
      table[code] = normal
  return table


def _c1(match: re.Match) -> str:
  # ftfy's "sloppy" Windows-1252: the five bytes cp1252 leaves undefined stay Latin-1.
  byte = match.group(0).encode("latin-1")
  try:
    return byte.decode("cp1252")
  except UnicodeDecodeError:
    return match.group(0)


def _fix_segment(text: str, unescape: bool) -> str:
  while True:
    before = text
    if unescape:
      text = _ENTITY.sub(_unescape_entity, text)
    text = _C1.sub(_c1, text)
    text = text.translate(_LIGATURES).translate(_width_map()).translate(_QUOTES)
    text = _LINE_BREAKS.sub("\n", text)
    if _SURROGATE.search(text):
      text = _SURROGATE_PAIR.sub(
        lambda m: chr(0x10000 + (ord(m[0][0]) - 0xD800) * 0x400 + ord(m[0][1]) - 0xDC00), text
      )
      text = _SURROGATE.sub("\ufffd", text)
    text = _ANSI.sub("", text).translate(_CONTROLS)
    text = unicodedata.normalize("NFC", text)
    if text == before:
      return text


def _fix_text(text: str) -> str:
  """ftfy 6's `fix_text` with its defaults, less the mojibake repair: line by line, html
  entities decoded until a line holding '<' is met (then no more, as ftfy does)."""
  out, unescape = [], True
  for segment in _LINES.findall(text):
    unescape = unescape and "<" not in segment
    out.append(_fix_segment(segment, unescape))
  return "".join(out)


def clean(text: str) -> str:
  """open_clip's default clean-up ('lower'): fix_text, html unescape twice, whitespace
  runs folded, lower-case."""
  text = html.unescape(html.unescape(_fix_text(text))).strip()
  return " ".join(text.split()).lower()


# ---------------------------------------------------------------------- pre-tokenizer

_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")


def _kind(char: str) -> str:
  """'L' letter, 'N' number, ' ' whitespace or '?' anything else (regex's \\p{L}, \\p{N}, \\s)."""
  if char.isspace():
    return " "
  category = unicodedata.category(char)[0]
  return category if category in "LN" else "?"


def _words(text: str, specials: Sequence[str]) -> list[str]:
  """The pieces open_clip's pattern finds, in order (whitespace is skipped)."""
  pieces, i, n = [], 0, len(text)
  while i < n:
    special = next((s for s in specials if text.startswith(s, i)), None)
    if special:
      pieces.append(special)
      i += len(special)
      continue
    if text[i] == "'":
      # Case-insensitive as the pattern (re.IGNORECASE): 'ſ' (long s) folds to 's'.
      after = text[i + 1 : i + 3].replace("ſ", "s")
      suffix = next((s for s in _CONTRACTIONS if after.startswith(s)), None)
      if suffix:
        pieces.append(text[i : i + 1 + len(suffix)])
        i += 1 + len(suffix)
        continue
    kind = _kind(text[i])
    if kind == " ":
      i += 1
      continue
    j = i + 1
    if kind != "N":  # One digit per piece; letters and other symbols in runs.
      while j < n and _kind(text[j]) == kind:
        j += 1
    pieces.append(text[i:j])
    i = j
  return pieces


# ------------------------------------------------------------------------------ BPE


@functools.cache
def _byte_chars() -> dict[int, str]:
  """GPT-2's reversible map of the 256 bytes to printable characters, in its order (the
  printable bytes first: the order of the vocabulary's first 256 ids)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  printable += range(ord("®"), ord("ÿ") + 1)
  codes = {byte: chr(byte) for byte in printable}
  others = [byte for byte in range(256) if byte not in codes]
  codes.update({byte: chr(256 + n) for n, byte in enumerate(others)})
  return codes


class ClipTokenizer:
  """Prompts -> CLIP token ids (open_clip's `SimpleTokenizer`, default 'lower' clean-up).

  Attributes:
    encoder: token -> id; merges: the BPE merge ranks; start_id, end_id: the special ids.
    context_length: the rows' length (77 for every CLIP).
  """

  def __init__(
    self,
    encoder: dict[str, int],
    merges: Sequence[tuple[str, str]],
    specials: tuple[str, str],
    context_length: int = CONTEXT_LENGTH,
  ):
    self.encoder = encoder
    self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    self.specials = specials
    self.start_id, self.end_id = encoder[specials[0]], encoder[specials[1]]
    self.context_length = context_length
    self._cache: dict[str, list[int]] = {}
    self._warned = False

  @classmethod
  def load(
    cls, folder: str | os.PathLike | None = None, context_length: int = CONTEXT_LENGTH
  ) -> ClipTokenizer:
    """The tokenizer of a Hugging Face model folder (`vocab.json` + `merges.txt`), or of
    the packaged copy of CLIP's vocabulary when `folder` is None or has none."""
    if folder is not None:
      folder = pathlib.Path(folder)
      vocab, merges = folder / "vocab.json", folder / "merges.txt"
      if folder.is_dir() and vocab.is_file() and merges.is_file():
        return cls.from_huggingface(vocab, merges, context_length)
    return cls.from_bpe(PACKAGED_VOCABULARY, context_length)

  @classmethod
  def from_bpe(cls, path: str | os.PathLike, context_length: int = CONTEXT_LENGTH):
    """From OpenAI's / open_clip's `bpe_simple_vocab_16e6.txt.gz` (merges only; the
    vocabulary is the bytes, the bytes + '</w>', the merges, then the special tokens)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGES + 1]]
    chars = list(_byte_chars().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    specials = ("<start_of_text>", "<end_of_text>")  # open_clip's names (ids 49406, 49407)
    encoder = {token: i for i, token in enumerate([*tokens, *specials])}
    return cls(encoder, merges, specials, context_length)

  @classmethod
  def from_huggingface(cls, vocab, merges, context_length: int = CONTEXT_LENGTH):
    """From a Hugging Face `CLIPTokenizer`'s `vocab.json` and `merges.txt`."""
    try:
      encoder = json.loads(pathlib.Path(vocab).read_text(encoding="utf-8"))
      lines = pathlib.Path(merges).read_text(encoding="utf-8").strip().split("\n")
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{vocab}: unreadable CLIP vocabulary ({e}).") from e
    pairs = [tuple(line.split()) for line in lines[1 : _MERGES + 1]]  # Line 0: '#version'.
    specials = ("<|startoftext|>", "<|endoftext|>")
    if not all(s in encoder for s in specials) or any(len(p) != 2 for p in pairs):
      raise CheckpointError(f"{vocab}: not a CLIP vocabulary (no {specials[1]} or bad merges).")
    return cls(encoder, pairs, specials, context_length)

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  def _bpe(self, piece: str) -> list[int]:
    if piece in self.specials:
      return [self.encoder[piece]]
    cached = self._cache.get(piece)
    if cached is not None:
      return cached
    word = [_byte_chars()[b] for b in piece.encode("utf-8")]
    word[-1] += "</w>"
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):  # Every occurrence, left to right.
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    ids = [self.encoder[token] for token in word]
    self._cache[piece] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """The ids of one prompt, without the start and end tokens or truncation."""
    return [i for piece in _words(clean(text), self.specials) for i in self._bpe(piece)]

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    """(len(texts), context_length) int32 ids: start, the prompt, end, zeros. A prompt
    longer than the context is truncated keeping the end token (with one warning)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    length = context_length or self.context_length
    out = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"prompt {row} is a {type(text).__name__}, not a str.")
      ids = [self.start_id, *self.encode(text), self.end_id]
      if len(ids) > length:
        if not self._warned:
          warnings.warn(
            f"prompt {text[:40]!r}... has {len(ids)} tokens; truncated to the context of "
            f"{length} (keeping the end token). Further truncations are not reported.",
            stacklevel=2,
          )
          self._warned = True
        ids = [*ids[: length - 1], self.end_id]
      out[row, : len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """The text of a row of ids, up to its end token (the start token left out)."""
    tokens = {i: t for t, i in self.encoder.items()}
    byte_of = {c: b for b, c in _byte_chars().items()}
    raw = bytearray()
    for i in (int(i) for i in ids):
      if i == self.end_id:
        break
      if i != self.start_id:
        token = tokens[i]
        word = token.removesuffix("</w>")
        raw += bytes(byte_of[c] for c in word) + (b" " if word != token else b"")
    return raw.decode("utf-8", errors="replace").strip()
