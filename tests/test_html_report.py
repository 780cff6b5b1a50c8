"""report.html: the page's structure and escaping, and the page of a real run in a browser.

The browser test opens the page of a tiny evaluate run in headless Chromium (Debian's
`chromium` package; skipped where /usr/bin/chromium is missing, CI installs it): a
screenshot must show something, every table row and picture must be there and loaded,
and the console must stay free of errors.
"""

import io
import os
import pathlib
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from maeday_jax import defaults, html_charts, html_report, pictures, reports, thresholds
from maeday_jax.jobs import evaluate as evaluate_job
from tests import data_makers
from tests.conftest import FIXTURE_MAE

CHROMIUM = pathlib.Path("/usr/bin/chromium")
EVIL_CATEGORY = "<script>alert(1)</script>"
EVIL_FILE = '"><img src=x onerror=alert(1)>.png'
UNDECODABLE = os.fsdecode(b"bad\xff.png")  # A Latin-1 name, as Python lists it.
# Nothing the browser would fetch: no `src=` to the network, no stylesheet, script or CSS
# import of any origin; `href` only on plain links (`<a>`, e.g. to the paper).
REMOTE = re.compile(r"""\bsrc\s*=\s*["']?\s*(https?:)?//""", re.IGNORECASE)
LINKED = re.compile(r"<link\b|<script\b[^>]*\bsrc\s*=|@import|url\(", re.IGNORECASE)
HREF_TAGS = re.compile(r"<(\w+)\b[^>]*\shref\s*=", re.IGNORECASE)


def _loads_nothing(text: str) -> bool:
  tags = {t.lower() for t in HREF_TAGS.findall(text)}
  return not REMOTE.search(text) and not LINKED.search(text) and tags <= {"a"}


def _png(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
  return pictures.overlay_png(image, rng.random((10, 15)), max_side=32)


def _gallery(result, threshold):
  fp, fn = html_report.worst_cases(result, threshold)
  return [
    [
      html_report.GalleryImage(result.file_names[p], result.scores[p], result.labels[p], _png(p))
      for p in positions
    ]
    for positions in (fp, fn)
  ]


def _synthetic_page(tmp_path, size: int = 5000):
  """A page of three categories: one with an escaped name and a threshold, MVTec's
  'bottle' (the paper's numbers), and one of normal images only (metrics undefined)."""
  rng = np.random.default_rng(0)
  labels = (rng.random(size) < 0.3).astype(int)
  names = [f"img{i}.png" for i in range(size)]
  names[0], names[1] = EVIL_FILE, UNDECODABLE
  labels[0] = labels[1] = 0
  scores = rng.normal(labels * 1.5, 1.0)
  scores[0], scores[1] = 10.0, 9.0  # The two worst false positives.
  evil = reports.CategoryResult(EVIL_CATEGORY, names, labels, scores)
  bottle = reports.CategoryResult("bottle", names[2:50], labels[2:50], scores[2:50])
  normal = reports.CategoryResult("normal_only", ["n0.png", "n1.png"], [0, 0], [0.1, 0.2])
  threshold = thresholds.fixed_threshold(0.75)
  runs = []
  for result, chosen in ((evil, threshold), (bottle, None), (normal, None)):
    note = "fixed by the configuration" if chosen else "no threshold (no labelled anomalies)"
    fp, fn = _gallery(result, chosen)
    runs.append(html_report.CategoryRun(result, chosen, note, None, fp, fn))
  per_category = {r.result.category: reports.category_metrics(r.result) for r in runs}
  summary = reports.summarize(per_category, "mvtec_ad")
  path = html_report.write_page(
    tmp_path / "report.html", "tiny report", "mvtec_ad", "zero_shot", {None: summary}, runs
  )
  return path, runs


def test_worst_cases_are_the_most_wrong_first_and_bounded():
  result = reports.CategoryResult(
    "c", [f"{i}" for i in range(8)], [0, 0, 0, 1, 1, 1, -1, 0], [5, 1, 3, 0.5, 2, 4, 9, 2.5]
  )
  fp, fn = html_report.worst_cases(result, thresholds.fixed_threshold(2.0), count=2)
  assert fp.tolist() == [0, 2]  # Normal and >= 2, highest first; 7 is the third (cut).
  assert fn.tolist() == [3]  # Anomalous and < 2; the unlabelled image 6 never shows.
  fp, fn = html_report.worst_cases(result, None, count=2)  # No threshold: the extremes.
  assert fp.tolist() == [0, 2] and fn.tolist() == [3, 4]
  counts = html_report.confusion_counts(result, thresholds.fixed_threshold(2.0))
  assert counts == {"TP": 2, "FP": 3, "TN": 1, "FN": 1}
  assert html_report.confusion_counts(result, None) is None


def test_page_structure_escaping_and_bounds(tmp_path):
  path, runs = _synthetic_page(tmp_path)
  raw = path.read_bytes()
  text = raw.decode("utf-8")  # Valid UTF-8 despite the undecodable file name.
  assert text.startswith("<!DOCTYPE html>") and "<title>tiny report</title>" in text
  # User names are text, never markup.
  assert "<script" not in text.lower() and "<img src=x" not in text
  assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
  assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;.png" in text
  assert "bad\\xff.png" in text
  # Nothing from the network: pictures inline, charts inline, no stylesheet or script.
  assert _loads_nothing(text)
  assert re.findall(r'<img src="([^"]{5})', text) == ["data:"] * text.count("<img ")
  # Bounded: 6 worst false positives and negatives, curves of at most 200 points.
  evil = runs[0]
  assert [g.file_name for g in evil.false_positives[:2]] == [EVIL_FILE, UNDECODABLE]
  assert len(evil.false_positives) == len(evil.false_negatives) == 6
  polylines = re.findall(r'<polyline points="([^"]*)"', text)
  assert len(polylines) == 4  # ROC and PR of the two categories with both classes.
  assert all(len(p.split()) <= html_charts.MAX_CURVE_POINTS for p in polylines)
  assert len(raw) < 200_000
  # The threshold and its confusion counts; "no threshold" otherwise.
  counts = html_report.confusion_counts(evil.result, evil.threshold)
  assert "fixed: 0.75" in text and f"<td>{counts['TP']}</td><td>{counts['FP']}</td>" in text
  assert text.count("no threshold") >= 2
  # The paper's numbers beside ours, and undefined metrics as n/a with the reason.
  assert '<td class="paper">74.3</td>' in text  # bottle, MAEDAY 0-shot (Table 1).
  assert re.search(r'<td class="na" title="[^"]*no anomalous images[^"]*">n/a<sup>', text)
  assert "no ground-truth masks were given" in text  # Pixel metrics: footnoted reason.
  assert "ROC and PR undefined" in text


def test_page_of_several_methods_and_seeds(tmp_path):
  """A few-shot page: one row per method and category, a line per method and seed."""
  rng = np.random.default_rng(1)
  labels = np.array([0, 0, 1, 1, 0, 1])
  summaries, runs = {}, []
  for method in ("maeday", "patchcore"):
    per_seed = []
    for seed in (0, 1):
      result = reports.CategoryResult("bottle", list("abcdef"), labels, rng.random(6), seed=seed)
      runs.append(html_report.CategoryRun(result, None, "no threshold", method))
      per_seed.append(reports.summarize({"bottle": reports.category_metrics(result)}, "mvtec_ad"))
    summaries[method] = reports.summarize_seeds(per_seed)
  path = html_report.write_page(
    tmp_path / "report.html", "t", "mvtec_ad", "few_shot", summaries, runs
  )
  text = path.read_text()
  assert text.count("<polyline") == 8 and "PC, seed 1" in text and "MAEDAY, seed 0" in text
  assert "±" in text and "Mean ± std over 2 seeds" in text
  assert "MAEDAY 1-shot (LoRA)" in text and "PatchCore 1-shot" in text
  # A rerun replaces the page; no temporary file stays beside it.
  html_report.write_page(path, "again", "mvtec_ad", "few_shot", summaries, runs)
  assert "<title>again</title>" in path.read_text()
  assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


# ---------------------------------------------------------------------------------------------
# In a browser.

# Added to the test's copy of the page only (the page itself has no script): marks in the
# DOM how many pictures there are and how many decoded.
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", images.length + "/" + loaded);
});
</script>"""
# Chromium's console lines on stderr (`--enable-logging=stderr`), e.g.
# `[...:INFO:CONSOLE:7] "Loading the image ... violates ...", source: file:///... (7)`.
CONSOLE = re.compile(r":[A-Z]+:CONSOLE[^\]]*\] (.*?)(?:, source: .*)?$", re.MULTILINE)


def _chromium(tmp_path, *args, timeout: int = 90) -> subprocess.CompletedProcess:
  profile = tmp_path / "profile"
  command = [
    str(CHROMIUM),
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--user-data-dir={profile}",
    *args,
  ]
  return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _open(tmp_path, page: pathlib.Path) -> tuple[str, list[str]]:
  """The DOM after load (with `CHECK_SCRIPT`) and the console messages of the page."""
  copy = tmp_path / "checked.html"
  text = page.read_text(encoding="utf-8")
  # The page's policy forbids every script; the copy allows its own inline one.
  text = text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
  copy.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
  done = _chromium(
    tmp_path,
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=5000",
    "--dump-dom",
    copy.as_uri(),
  )
  assert done.returncode == 0, done.stderr[-2000:]
  return done.stdout, [m.group(1) for m in CONSOLE.finditer(done.stderr)]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """A tiny evaluate run (the fixture MAE, zero-shot MAEDAY, no threshold) of
  `make_folder`'s images plus two normal images with hostile names."""
  tmp = tmp_path_factory.mktemp("html_report")
  fake = data_makers.make_folder(tmp / "raw")
  for i, name in enumerate((EVIL_FILE, UNDECODABLE)):
    # Written under a plain name first: the maker seeds its pixels from the name's UTF-8.
    plain = fake.root / "images" / f"hostile{i}.png"
    data_makers.write_image(plain, "rgb")
    plain.rename(plain.with_name(name))
  config = defaults.evaluate_config("runlocal")
  config.detector = "maeday"
  config.model.checkpoint = str(FIXTURE_MAE)
  config.data.update(data_makers.folder_fields(fake.root, tmp / "tfds"))
  config.data.num_workers = 2
  config.outputs.reconstructions = 0
  # No threshold: the gallery shows every normal image (4 < 6), the hostile names too.
  config.threshold.method = "none"
  evaluate_job.run(config, tmp / "work")
  return tmp / "work" / "report.html"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium")
def test_report_of_a_real_run_renders_in_chromium(evaluated, tmp_path):
  text = evaluated.read_text(encoding="utf-8")
  assert _loads_nothing(text)
  assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;.png" in text and "bad\\xff.png" in text
  num_images = text.count("<img ")
  assert num_images >= 2  # The hostile names are normal images: shown as the worst cases.

  dom, console = _open(tmp_path, evaluated)
  assert "<title>maeday_jax report: work</title>" in dom
  # Every picture decoded, and no other: a hostile name read as markup would add one.
  assert f'data-images="{num_images}/{num_images}"' in dom
  rows = re.findall(r"<tr>\s*<td", dom)
  assert len(rows) >= 2  # The category and its mean, at least.
  assert "<polyline" in dom and "no threshold" in dom
  # Chromium logs every console message at one level (INFO): the page has no script, so
  # anything there is the browser's complaint (a blocked or failed load, a policy error).
  assert not console, console

  shot = tmp_path / "shot.png"
  done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", evaluated.as_uri())
  assert done.returncode == 0 and shot.stat().st_size > 0, done.stderr[-2000:]
  pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=np.float64)
  assert pixels.shape == (2000, 1280) and pixels.std() > 10  # Not a blank page.
  if os.environ.get("MAEDAY_REPORT_SHOT"):  # Where to keep a copy to look at.
    pathlib.Path(os.environ["MAEDAY_REPORT_SHOT"]).write_bytes(shot.read_bytes())


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium")
def test_the_browser_check_sees_broken_pictures_and_console_errors(tmp_path):
  """The checks above can fail: a missing picture and a console error are both seen."""
  page = tmp_path / "broken.html"
  csp = "default-src 'none'; img-src data:"
  page.write_text(
    f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{csp}">'
    '<title>broken</title></head><body><img src="data:image/png;base64,AAAA">'
    '<img src="https://example.invalid/x.png"><script>console.error("boom")</script>'
    "</body></html>"
  )
  dom, console = _open(tmp_path, page)
  assert 'data-images="2/0"' in dom
  assert any("example.invalid" in m for m in console), console  # Blocked by the policy.
  assert '"boom"' in console, console
