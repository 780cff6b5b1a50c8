"""Reports: per-category evaluation, group means, seeds, JSON / Markdown / CSV files."""

import csv
import json

import numpy as np
import pytest

from maeday_jax import atomic_files, categories, metrics, paper_numbers, reports, thresholds
from tests.test_metrics import pooled


def _result_maps_masks(category, rng, n=12, size=16, seed=None, anomalous=True):
  """A category's result (pixels pooled from its maps and masks), its maps and masks."""
  labels = (np.arange(n) < n // 2).astype(int) if anomalous else np.zeros(n, dtype=int)
  masks = np.zeros((n, size, size), dtype=bool)
  masks[labels == 1, 4:9, 5:10] = True
  maps = rng.normal(size=masks.shape) + masks
  result = reports.CategoryResult(
    category=category,
    file_names=[f"{category}/test/{i:03d}.png" for i in range(n)],
    labels=labels,
    scores=maps.max(axis=(1, 2)),
    pixels=pooled(maps, masks),
    seed=seed,
  )
  return result, maps, masks


def _result(category, rng, **options):
  return _result_maps_masks(category, rng, **options)[0]


def _mvtec_per_category(rng, names=categories.MVTEC_CATEGORIES):
  return {c: reports.category_metrics(_result(c, rng)) for c in names}


def test_category_metrics_match_metrics():
  result, maps, masks = _result_maps_masks("bottle", np.random.default_rng(0))
  out = reports.category_metrics(result)
  assert out["image_auroc"] == metrics.image_auroc(result.scores, result.labels)
  assert out["image_ap"] == metrics.image_ap(result.scores, result.labels)
  assert out["image_f1_max"] == metrics.f1_max(result.scores, result.labels)
  assert out["pixel_auroc"] == pytest.approx(pooled(maps, masks).auroc())
  assert out["pixel_ap"] == pytest.approx(pooled(maps, masks).ap())
  assert out["pixel_f1_max"] == pytest.approx(pooled(maps, masks).f1_max())
  assert out["aupro"] == pytest.approx(pooled(maps, masks).aupro())
  assert (out["num_images"], out["num_normal"], out["num_anomalous"]) == (12, 6, 6)
  assert out["notes"] == {}


def test_accumulator_input_equals_arrays():
  result, maps, masks = _result_maps_masks("bottle", np.random.default_rng(1))
  accumulator = metrics.PixelMetricAccumulator()
  for i in range(0, 12, 5):
    accumulator.add(maps[i : i + 5], masks[i : i + 5])
  streamed = reports.CategoryResult(
    "bottle", result.file_names, result.labels, result.scores, pixels=accumulator
  )
  assert reports.category_metrics(streamed)["aupro"] == pytest.approx(
    reports.category_metrics(result)["aupro"], abs=1e-12
  )


def test_undefined_metrics_are_none_with_reasons():
  out = reports.category_metrics(_result("bottle", np.random.default_rng(2), anomalous=False))
  assert all(out[name] is None for name in metrics.METRIC_NAMES)
  assert "no anomalous images" in out["notes"]["image_auroc"]
  assert "no ground-truth anomaly region" in out["notes"]["aupro"]


def test_missing_masks_and_disabled_pixels():
  result = _result("bottle", np.random.default_rng(3))
  result.pixels = None
  out = reports.category_metrics(result)
  assert out["image_auroc"] is not None and out["pixel_auroc"] is None
  assert "no ground-truth masks" in out["notes"]["pixel_auroc"]
  out = reports.category_metrics(_result("bottle", np.random.default_rng(3)), pixel=False)
  assert out["aupro"] is None and "not requested" in out["notes"]["aupro"]


def test_mismatched_lengths_raise():
  with pytest.raises(ValueError, match="same N"):
    reports.CategoryResult("bottle", ["a.png"], np.array([0, 1]), np.array([0.1, 0.2]))


def test_summarize_mvtec_groups_and_undefined_categories():
  per_category = _mvtec_per_category(np.random.default_rng(4))
  per_category["screw"] = dict(per_category["screw"], image_auroc=None)
  summary = reports.summarize(per_category, "MVTec-AD")
  assert summary["dataset"] == "mvtec_ad"
  assert list(summary["groups"]) == ["objects", "textures", "all"]
  assert list(summary["per_category"]) == list(categories.MVTEC_CATEGORIES)
  textures = [per_category[c]["pixel_auroc"] for c in categories.MVTEC_TEXTURES]
  assert summary["groups"]["textures"]["mean"]["pixel_auroc"] == pytest.approx(np.mean(textures))
  objects = [per_category[c]["image_auroc"] for c in categories.MVTEC_OBJECTS if c != "screw"]
  assert summary["groups"]["objects"]["mean"]["image_auroc"] == pytest.approx(np.mean(objects))
  assert "9 of 10" in summary["groups"]["objects"]["notes"]["image_auroc"]
  assert "screw" in summary["groups"]["all"]["notes"]["image_auroc"]


def test_summarize_other_datasets():
  rng = np.random.default_rng(5)
  visa = reports.summarize(
    {c: reports.category_metrics(_result(c, rng)) for c in ("pcb1", "candle", "cashew")}, "visa"
  )
  assert list(visa["groups"]) == [
    "complex_structure",
    "multiple_instances",
    "single_instance",
    "all",
  ]
  own = reports.summarize({"tiles": reports.category_metrics(_result("tiles", rng))}, "folder")
  assert list(own["groups"]) == ["all"]


def test_summarize_seeds_mean_std():
  rng = np.random.default_rng(6)
  runs = [
    reports.summarize(_mvtec_per_category(rng, ("bottle", "grid")), "mvtec_ad", seed=s)
    for s in range(3)
  ]
  combined = reports.summarize_seeds(runs)
  values = [r["per_category"]["bottle"]["image_auroc"] for r in runs]
  cell = combined["per_category"]["bottle"]["image_auroc"]
  assert cell["mean"] == pytest.approx(np.mean(values))
  assert cell["std"] == pytest.approx(np.std(values))
  assert cell["values"] == values and combined["seeds"] == [0, 1, 2]
  group_values = [r["groups"]["all"]["mean"]["aupro"] for r in runs]
  assert combined["groups"]["all"]["mean"]["aupro"]["mean"] == pytest.approx(np.mean(group_values))
  assert len(combined["runs"]) == 3


def test_metrics_json_is_strict_with_nulls(tmp_path):
  per_category = _mvtec_per_category(np.random.default_rng(7), ("bottle", "carpet"))
  per_category["carpet"] = reports.category_metrics(
    _result("carpet", np.random.default_rng(7), anomalous=False)
  )
  per_category["bottle"]["extra"] = np.float32(np.nan)  # anything non-finite becomes null
  path = reports.write_metrics_json(
    tmp_path / "out" / "metrics.json", reports.summarize(per_category, "mvtec_ad")
  )
  loaded = json.loads(path.read_text())  # json.loads would accept NaN; the writer refuses it
  assert "NaN" not in path.read_text()
  assert loaded["per_category"]["carpet"]["image_auroc"] is None
  assert "no anomalous" in loaded["per_category"]["carpet"]["notes"]["image_auroc"]
  assert loaded["per_category"]["bottle"]["extra"] is None
  assert loaded["groups"]["all"]["mean"]["image_auroc"] == pytest.approx(
    per_category["bottle"]["image_auroc"]
  )


def test_markdown_table_with_paper_numbers(tmp_path):
  summary = reports.summarize(_mvtec_per_category(np.random.default_rng(8)), "mvtec_ad")
  text = reports.write_markdown_table(tmp_path / "table.md", summary, "mvtec_ad").read_text()
  assert "Image AUROC (paper)" in text and "Pixel AUROC (paper)" in text
  bottle = next(line for line in text.splitlines() if line.startswith("| bottle"))
  assert "74.3" in bottle
  all_row = next(line for line in text.splitlines() if "mean (all)" in line)
  assert "74.5" in all_row and "69.4" in all_row
  assert "MAEDAY 0-shot" in text
  few = reports.markdown_table(summary, "mvtec_ad", setting="few_shot", shots=4)
  assert "76.0" in few and "4 shots" in few
  ensemble = reports.markdown_table(summary, "mvtec_ad", "few_shot", "maeday_patchcore_ensemble")
  assert "85.3" in ensemble
  with pytest.raises(ValueError, match="setting"):
    reports.markdown_table(summary, "mvtec_ad", setting="one_shot")


def test_markdown_table_other_dataset_and_seeds():
  rng = np.random.default_rng(9)
  runs = [
    reports.summarize({"pcb1": reports.category_metrics(_result("pcb1", rng))}, "visa")
    for _ in range(3)
  ]
  text = reports.markdown_table(reports.summarize_seeds(runs), "visa", setting="few_shot")
  assert "paper" not in text and "±" in text and "over 3 seeds" in text


def test_format_summary_table():
  summary = reports.summarize(_mvtec_per_category(np.random.default_rng(10), ("bottle",)), "mvtec")
  text = reports.format_summary_table(summary)
  assert "bottle" in text and "mean (all, 1 of 15)" in text and "AUPRO@0.3" in text
  value = summary["per_category"]["bottle"]["image_auroc"]
  assert f"{100 * value:.1f}" in text


def test_scores_csv(tmp_path):
  rng = np.random.default_rng(11)
  results = [_result("bottle", rng, n=4), _result("grid", rng, n=4)]
  path = reports.write_scores_csv(tmp_path / "scores.csv", results)
  rows = list(csv.DictReader(path.open()))
  assert list(rows[0]) == ["file", "category", "label", "score"]
  assert len(rows) == 8 and rows[0]["file"] == "bottle/test/000.png"
  assert float(rows[5]["score"]) == results[1].scores[1]

  per_category = {"bottle": thresholds.fixed_threshold(results[0].scores[2])}
  path = reports.write_scores_csv(tmp_path / "thr.csv", results, threshold=per_category)
  rows = list(csv.DictReader(path.open()))
  expected = (results[0].scores >= results[0].scores[2]).astype(int)
  assert [int(r["predicted_label"]) for r in rows[:4]] == expected.tolist()
  assert all(r["predicted_label"] == "" for r in rows[4:])  # no threshold for grid

  results[0].seed = 2
  rows = list(csv.DictReader(reports.write_scores_csv(tmp_path / "s.csv", results, 0.0).open()))
  assert rows[0]["seed"] == "2" and rows[0]["predicted_label"] in ("0", "1")


def test_scores_csv_quotes_cells_a_spreadsheet_would_run_as_formulas(tmp_path):
  names = ["=cmd|' /C calc'!A0.jpg", "+x.png", "@y.png", "-z.png", "\tt.png", "\rr.png"]
  plain = ["good/000.png", "a=b.png", "x-1.png", "'quoted.png"]
  scores = [-1.5, 2.0, -0.25, 3.0, -7.0, 0.5, 1.0, -2.0, 4.0, -1e-9]
  result = reports.CategoryResult("bottle", names + plain, np.ones(10, int), scores, seed=-3)
  path = reports.write_scores_csv(tmp_path / "scores.csv", [result], threshold=-1.0)
  with path.open(newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["file"] for r in rows] == ["'" + n for n in names] + plain
  assert all(r["category"] == "bottle" and r["label"] == "1" for r in rows)
  # Numbers are not text cells: a negative score or seed is written as it is.
  assert [r["score"] for r in rows] == [repr(s) for s in scores]
  assert rows[0]["score"] == "-1.5" and rows[0]["seed"] == "-3"
  assert [r["predicted_label"] for r in rows] == [str(int(s >= -1.0)) for s in scores]
  other = reports.CategoryResult("-cat", ["a.png"], [0], [1.0])
  rows = list(csv.DictReader(reports.write_scores_csv(tmp_path / "c.csv", [other]).open()))
  assert rows[0]["category"] == "'-cat"
  assert reports.spreadsheet_safe("=1+1") == "'=1+1" and reports.spreadsheet_safe("a") == "a"


def _temporaries(folder):
  return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def test_report_files_have_the_same_bytes_as_before(tmp_path):
  rng = np.random.default_rng(5)
  results = [_result("bottle", rng, n=3), _result("grid", rng, n=2)]
  results[0].scores[1] = -1.5
  summary = reports.summarize(
    {r.category: reports.category_metrics(r) for r in results}, "mvtec_ad"
  )
  # What the writers wrote before they wrote atomically: Path.write_text and csv to a path.
  expected_json = json.dumps(reports._jsonable(summary), indent=2, allow_nan=False) + "\n"
  path = reports.write_metrics_json(tmp_path / "a" / "metrics.json", summary)
  reference = tmp_path / "reference.json"
  reference.write_text(expected_json)
  assert path.read_bytes() == reference.read_bytes()
  path = reports.write_markdown_table(tmp_path / "a" / "metrics.md", summary, "mvtec_ad")
  reference = tmp_path / "reference.md"
  reference.write_text(reports.markdown_table(summary, "mvtec_ad"))
  assert path.read_bytes() == reference.read_bytes() and "—" in path.read_text()
  path = reports.write_scores_csv(tmp_path / "a" / "scores.csv", results, threshold=0.0)
  lines = ["file,category,label,score,predicted_label"]
  for r in results:
    lines += [
      f"{n},{r.category},{label},{score!r},{int(score >= 0.0)}"
      for n, label, score in zip(r.file_names, r.labels, r.scores.tolist(), strict=True)
    ]
  assert path.read_bytes() == ("\r\n".join(lines) + "\r\n").encode()
  assert b",-1.5," in path.read_bytes()
  assert _temporaries(tmp_path) == []


def test_a_report_write_that_fails_half_way_keeps_the_previous_file(tmp_path, monkeypatch):
  rng = np.random.default_rng(6)
  results = [_result("bottle", rng, n=4)]
  summary = reports.summarize({"bottle": reports.category_metrics(results[0])}, "mvtec_ad")
  paths = [
    reports.write_scores_csv(tmp_path / "scores.csv", results),
    reports.write_metrics_json(tmp_path / "metrics.json", summary),
    reports.write_markdown_table(tmp_path / "metrics.md", summary, "mvtec_ad"),
  ]
  before = {p: p.read_bytes() for p in paths}
  real_writer = csv.writer

  class HalfWriter:
    """Writes the header and one row to the file, then fails."""

    def __init__(self, f):
      self.f, self.inner, self.rows = f, real_writer(f), 0

    def writerow(self, row):
      if self.rows == 2:
        self.f.flush()
        raise OSError("killed while writing")
      self.rows += 1
      return self.inner.writerow(row)

  monkeypatch.setattr(csv, "writer", HalfWriter)
  with pytest.raises(OSError, match="killed while writing"):
    reports.write_scores_csv(tmp_path / "scores.csv", [_result("bottle", rng, n=4)])
  monkeypatch.undo()

  real_open = open

  class HalfFile:
    """Writes half of the text to the real file, then fails."""

    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, text):
      self.f.write(text[: len(text) // 2])
      self.f.flush()
      raise OSError("killed while writing")

  opener = lambda *args, **kwargs: HalfFile(real_open(*args, **kwargs))
  monkeypatch.setattr(atomic_files, "open", opener, raising=False)
  other = reports.summarize({"bottle": reports.category_metrics(_result("bottle", rng))}, "visa")
  with pytest.raises(OSError, match="killed while writing"):
    reports.write_metrics_json(tmp_path / "metrics.json", other)
  with pytest.raises(OSError, match="killed while writing"):
    reports.write_markdown_table(tmp_path / "metrics.md", other, "visa")
  monkeypatch.undo()
  for path, content in before.items():
    assert path.read_bytes() == content, path
  assert _temporaries(tmp_path) == []


def test_paper_numbers_are_consistent():
  row = paper_numbers.SUMMARY_ROWS["maeday_zero_shot"]
  per = paper_numbers.ZERO_SHOT_IMAGE_AUROC
  assert set(per) == set(categories.MVTEC_CATEGORIES)
  assert np.mean([per[c] for c in categories.MVTEC_OBJECTS]) == pytest.approx(67.3, abs=0.05)
  assert np.mean([per[c] for c in categories.MVTEC_TEXTURES]) == pytest.approx(88.9, abs=0.05)
  assert np.mean(list(per.values())) == pytest.approx(row.image_auroc, abs=0.05)


# ------------------------------------------------------------------------ VAND summary


def _f1_max_by_sklearn(labels, scores) -> float:
  """Best F1 over the precision-recall curve, written here independently of `metrics`."""
  from sklearn.metrics import precision_recall_curve

  precision, recall, _ = precision_recall_curve(np.ravel(labels), np.ravel(scores))
  with np.errstate(invalid="ignore", divide="ignore"):
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
  return float(f1.max())


def test_vand_score_is_the_harmonic_mean_of_image_and_pixel_f1_max():
  rng = np.random.default_rng(12)
  rows = {}
  for category in ("bottle", "grid"):
    result, maps, masks = _result_maps_masks(category, rng, n=6, size=12)
    image = _f1_max_by_sklearn(result.labels, result.scores)
    pixel = _f1_max_by_sklearn(masks, maps)
    rows[category] = reports.category_metrics(result)
    assert rows[category]["vand_score"] == pytest.approx(2 * image * pixel / (image + pixel))
  summary = reports.summarize(rows, "mvtec_ad")
  expected = np.mean([rows[c]["vand_score"] for c in rows])
  assert summary["groups"]["all"]["mean"]["vand_score"] == pytest.approx(expected)
  assert summary["vand_score"] == pytest.approx(expected)
  assert "vand_score" in summary["metric_names"]
  assert metrics.vand_score(0.5, 1.0) == pytest.approx(2 / 3)
  assert metrics.vand_score(0.0, 0.0) == 0.0 and metrics.vand_score(0.9, None) is None
  # A row made elsewhere (a failed method's, or an older run's) gets it from its F1-max.
  bare = {"image_f1_max": 0.8, "pixel_f1_max": 0.4, "notes": {}}
  assert reports.summarize({"bottle": bare}, "mvtec_ad")["vand_score"] == pytest.approx(0.64 / 1.2)
  # Without masks: undefined, with the reason.
  result = _result("bottle", rng)
  result.pixels = None
  out = reports.category_metrics(result)
  assert out["vand_score"] is None and "pixel F1-max" in out["notes"]["vand_score"]
  seeds = reports.summarize_seeds([summary, summary])
  assert seeds["vand_score"]["mean"] == pytest.approx(expected)
  assert seeds["per_category"]["grid"]["vand_score"]["mean"] == rows["grid"]["vand_score"]


def test_metrics_md_has_the_vand_summary_and_april_gans_published_figures(tmp_path):
  summary = reports.summarize(_mvtec_per_category(np.random.default_rng(13)), "mvtec_ad")
  vand = f"VAND score: {100 * summary['vand_score']:.1f} ("
  text = reports.write_markdown_table(tmp_path / "m.md", summary, "mvtec_ad").read_text()
  assert vand in text and text.splitlines()[3].endswith("| VAND score |")  # Column and line.
  assert "MAEDAY 0-shot" in text and "APRIL-GAN" not in text
  april = reports.write_markdown_table(
    tmp_path / "a.md", summary, "mvtec_ad", method="april_gan"
  ).read_text()
  assert vand in april and "MAEDAY" not in april and "Chen et al. 2023" in april
  published = next(line for line in april.splitlines() if line.startswith("| APRIL-GAN 0-shot"))
  cells = [c.strip() for c in published.strip("|").split("|")]
  lines = april.splitlines()
  titles = [c.strip() for c in lines[lines.index(published) - 3].split("|")]
  by_title = dict(zip(titles[2:], cells[1:], strict=False))
  assert by_title["Image AUROC"] == "86.1" and by_title["Pixel AUROC"] == "87.6"
  assert by_title["AUPRO@0.3"] == "44.0" and by_title["Image AP"] == "—"
  this_run = april.splitlines()[april.splitlines().index(published) - 1]
  assert this_run.startswith("| this run, mean (all)") and vand[12:16] in this_run
  all_row = next(line for line in april.splitlines() if line.startswith("| **mean (all)"))
  assert "86.1" in all_row and "87.6" in all_row  # The paper columns of the main table.
  few = reports.markdown_table(summary, "mvtec_ad", "few_shot", shots=1, method="april_gan")
  assert "APRIL-GAN 1-shot" in few and "92.0" in few
  # Other datasets: the VAND line, no published figures.
  visa = reports.markdown_table(summary, "visa", method="april_gan")
  assert vand in visa and "APRIL-GAN" not in visa
