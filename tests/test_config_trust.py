"""Bad settings and bad outcomes end in one `error:` line (exit status 2), checked before
any work where they can be: misspelt config fields, seeds, model shapes, mask schedules,
thresholds, work directories, texture folders, training recipes; a diverging few-shot
method fails alone; a model whose maps are NaN is named before any metric."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maeday_jax.config_errors import ConfigError
from tests import data_makers
from tests.conftest import FIXTURE_MAE, REPO_ROOT


def _main(*args: str, timeout: float = 300, env: dict | None = None):
  """`python -m maeday_jax.main ARGS` in the repository root."""
  return subprocess.run(
    [sys.executable, "-m", "maeday_jax.main", *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=None if env is None else {**os.environ, **env},
  )


def _error_lines(result) -> list[str]:
  """The run's `error:` lines, after checking it exited 2 without a traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def _only_line(result) -> str:
  """The one line a run that stops before any work writes to stderr."""
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("error: "), lines
  return lines[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A generated folder dataset with normal references and masks, and its data fields."""
  tmp = tmp_path_factory.mktemp("trust_folder")
  fake = data_makers.make_folder(tmp / "raw")
  return fake, data_makers.folder_fields(fake.root, tmp / "tfds")


# ------------------------------------------------------------------ the command line


def test_a_misspelt_config_field_names_the_nearest_one(tmp_path):
  """ml_collections raised a bare AttributeError/KeyError during flag parsing (a
  traceback, exit 1); now one line naming the field and the nearest valid one."""
  workdir = tmp_path / "run"
  cases = {
    "--config.num_maskz=4": "error: --config.num_maskz: no such field; did you mean "
    "--config.num_masks?",
    "--config.train.stepz=3": "error: --config.train.stepz: no such field; did you mean "
    "--config.train.steps?",
    "--config.lora.rnak=2": "error: --config.lora.rnak: no such field; did you mean "
    "--config.lora.rank?",
  }
  for arg, expected in cases.items():
    result = _main("--config", "configs/few_shot.py:runlocal", arg, "--workdir", str(workdir))
    assert _only_line(result) == expected
  unrelated = _main("--config", "configs/zero_shot.py:runlocal", "--config.zzz.qqq=1")
  assert _only_line(unrelated).startswith("error: --config.zzz.qqq: no such field")
  # A value of the wrong type and a missing config file: one line too.
  wrong = _main("--config", "configs/zero_shot.py:runlocal", "--config.num_masks=x")
  assert _only_line(wrong).startswith("error: --config.num_masks=x: invalid literal")
  missing = _main("--config", "configs/nothere.py", "--workdir", str(workdir))
  assert "no such config file" in _only_line(missing)
  assert not workdir.exists()


def test_bad_seeds_are_refused_before_any_work(tmp_path):
  from maeday_jax.jobs import few_shot as few_shot_job
  from tests.conftest import make_job_config

  # What ml_collections makes of --config.seeds=a,b / = / -1 / 1,1 / ().
  for seeds, match in (
    (("a,b",), "not a list of integers"),
    (("",), "is empty"),
    ((), "is empty"),
    ((-1,), "not a list of integers"),
    ((1.5,), "not a list of integers"),
    ((1, 1), "names a seed twice"),
  ):
    config = make_job_config("few_shot", "runlocal")
    config.seeds = seeds
    with pytest.raises(ConfigError, match=rf"--config.seeds: .*{match}"):
      few_shot_job.validate(config)
  config = make_job_config("few_shot", "runlocal")
  config.seeds = (3, 0)
  few_shot_job.validate(config)
  assert few_shot_job.seeds(config) == [3, 0]
  workdir = tmp_path / "run"
  result = _main(
    "--config", "configs/few_shot.py:runlocal", "--config.seeds=a,b", "--workdir", str(workdir)
  )
  assert _only_line(result).startswith("error: --config.seeds: 'a,b' is not a list of integers")
  assert not workdir.exists()


# ------------------------------------------------------------------ model and masks


def test_img_size_must_be_a_multiple_of_patch_size():
  from maeday_jax import model_builder
  from maeday_jax.jobs import common
  from maeday_jax.jobs import fit as fit_job
  from tests.conftest import make_job_config

  config = make_job_config("zero_shot", "runlocal")  # Random 'test' variant, patch 8.
  config.model.img_size = 30
  with pytest.raises(ConfigError, match=r"--config.model.img_size: .*not a multiple of patch"):
    common.validate_scoring(config)
  config.model.img_size = None  # The variant's 32 px: the patch size is the user's.
  config.model.patch_size = 5
  with pytest.raises(ConfigError, match=r"--config.model.patch_size: img_size 32"):
    model_builder.validate_model_config(config.model)
  config.model.patch_size = 16
  common.validate_scoring(config)
  config.model.embed_dim = 66  # Not divisible by the variant's 2 heads' sin-cos needs.
  with pytest.raises(ConfigError, match=r"--config.model.embed_dim"):
    model_builder.validate_model_config(config.model)
  # The fit job's detectors check it too (every maeday-based one, MALA, the mae detector).
  for detector in ("maeday", "maeday_lora", "mae", "mala"):
    config = make_job_config("fit", "runlocal")
    config.detector = detector
    config.model.img_size = 36
    with pytest.raises(ConfigError, match=r"model.img_size"):
      fit_job.validate(config)


def test_stratified_masks_need_a_visible_patch(folder, tmp_path):
  """The tiny model has 16 patches: 0.99 leaves int(16 * 0.01) = 0 visible patches,
  which `models.masking.stratified_noise` cannot partition; refused up front."""
  from maeday_jax.detectors import registry
  from maeday_jax.jobs import common
  from maeday_jax.jobs import evaluate as evaluate_job
  from tests.conftest import make_job_config

  config = make_job_config("zero_shot", "runlocal", masking="stratified", mask_ratio=0.99)
  with pytest.raises(ConfigError, match=r"--config.mask_ratio: 0.99 leaves no visible patch"):
    common.validate_scoring(config)
  with pytest.raises(ConfigError, match="at most 0.9375"):
    registry.get("maeday").validate(config)
  config.mask_ratio = 0.9375  # One visible patch per mask: fine.
  common.validate_scoring(config)
  config.masking = "random"
  config.mask_ratio = 0.99
  common.validate_scoring(config)
  # A checkpoint's patch count is known once loaded: refused before anything compiles.
  _, data = folder
  config = make_job_config("evaluate", "runlocal", data=data, masking="stratified")
  config.mask_ratio = 0.99
  config.model.checkpoint = str(FIXTURE_MAE)
  evaluate_job.validate(config)  # Not known yet: no file is read here.
  with pytest.raises(ConfigError, match="leaves no visible patch of the model's 16"):
    evaluate_job.run(config, tmp_path / "run")


# ------------------------------------------------------------------ thresholds


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_fixed_threshold_must_be_finite_in_every_job(value):
  from maeday_jax.jobs import common
  from maeday_jax.jobs import evaluate as evaluate_job
  from maeday_jax.jobs import few_shot as few_shot_job
  from maeday_jax.jobs import fit as fit_job
  from maeday_jax.jobs import mala as mala_job
  from tests.conftest import make_job_config

  validators = {
    "zero_shot": common.validate_scoring,
    "evaluate": evaluate_job.validate,
    "few_shot": few_shot_job.validate,
    "fit": fit_job.validate,
  }
  for name, validate in validators.items():
    config = make_job_config(name, "runlocal")
    config.threshold.method = "fixed"
    config.threshold.value = value
    with pytest.raises(ConfigError, match=r"--config.threshold.value: must be a finite"):
      validate(config)
  config = make_job_config("mala", "runlocal")
  config.eval.threshold.method = "fixed"
  config.eval.threshold.value = value
  with pytest.raises(ConfigError, match=r"--config.eval.threshold.value: must be a finite"):
    mala_job.validate(config)


# ------------------------------------------------------------------ work directories


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  from maeday_jax.jobs import common
  from tests.conftest import make_job_config

  target = tmp_path / "notes.txt"
  target.write_text("not a work directory")
  config = make_job_config("zero_shot", "runlocal")
  with pytest.raises(common.WorkdirError, match=r"is a file, not a folder"):
    common.prepare_workdir(target, config)
  with pytest.raises(common.WorkdirError, match=r"lies under .*notes.txt, which is a file"):
    common.prepare_workdir(target / "run", config)
  with pytest.raises(common.WorkdirError, match=r"--overwrite: .*is a file.*left untouched"):
    common.clear_workdir(target)
  assert target.read_text() == "not a work directory"
  for extra in ([], ["--overwrite"]):
    result = _main(
      "--config", "configs/zero_shot.py:runlocal", "--workdir", str(target), *extra, timeout=120
    )
    (line,) = _error_lines(result)
    assert "is a file, not a folder" in line
  assert target.read_text() == "not a work directory"


# ------------------------------------------------------------------ non-finite maps


def _nan_detector():
  """A zero-shot MAEDAY whose maps and scores are NaN (a corrupt or diverged model)."""
  from maeday_jax.detectors.maeday import ZeroShotMaeday

  class NanMaeday(ZeroShotMaeday):
    method = "nan_maeday"
    summary = "test only: MAEDAY with NaN maps"

    def step_signature(self):
      return ("nan", *super().step_signature())

    def score_function(self, mesh, local_batch: int):
      score = super().score_function(mesh, local_batch)

      def nan_score(state, images, ids, key):
        maps, scores = score(state, images, ids, key)
        return maps * np.nan, scores * np.nan

      return nan_score

  return NanMaeday


def test_nan_maps_are_one_error_naming_the_model_and_image_before_metrics(folder, tmp_path):
  """On data with masks the pixel metrics raised a bare ValueError on NaN maps; now the
  first batch with a NaN map stops the run with a CheckpointError naming the detector
  and the image (main prints it as one error line)."""
  from maeday_jax.checkpoints import CheckpointError
  from maeday_jax.detectors import registry
  from maeday_jax.jobs import evaluate as evaluate_job
  from tests.conftest import make_job_config

  fake, data = folder
  registry.register("nan_maeday", _nan_detector())
  try:
    config = make_job_config("evaluate", "runlocal", data=data, detector="nan_maeday")
    with pytest.raises(CheckpointError) as caught:
      evaluate_job.run(config, tmp_path / "run")
  finally:
    registry.unregister("nan_maeday")
  message = str(caught.value)
  assert message.startswith("nan_maeday (") and "NaN or infinite anomaly maps" in message
  first = message.split("first for ", 1)[1].split(",", 1)[0]
  assert first in fake.examples[""]["test"]
  assert "\n" not in message


# ------------------------------------------------------------------ few-shot divergence


def test_a_diverging_method_fails_alone_with_one_error_line(folder, tmp_path):
  """--config.train.learning_rate=1e12 makes MAEDAY's few-shot loss NaN: MAEDAY is
  recorded as failed (naming the method and the step), PatchCore's results are written,
  and the run ends with one error line listing the failed method, exit 2."""
  _, data = folder
  workdir = tmp_path / "run"
  fields = {
    **{f"data.{k}": v for k, v in data.items()},
    "model.checkpoint": str(FIXTURE_MAE),
    "data.num_workers": 2,
    "seeds": "0",
    "train.steps": 3,
    "heldout_normals": 2,
    "method": "maeday,patchcore",
    "train.learning_rate": 1e12,
  }
  args = [f"--config.{k}={v}" for k, v in fields.items()]
  result = _main("--config", "configs/few_shot.py:runlocal", *args, "--workdir", str(workdir))
  (line,) = _error_lines(result)
  assert line.startswith("error: 1 of 2 methods failed"), line
  assert "maeday (seed 0 images): maeday_lora: the few-shot loss became nan at step" in line
  assert "learning_rate" in line and "patchcore" in line
  assert "lower the learning rate" not in result.stderr  # The old, unqualified advice.
  # PatchCore's half of the run is complete.
  scores = (workdir / "seed_0" / "patchcore" / "scores.csv").read_text().splitlines()
  assert len(scores) == 1 + 4  # Header + the folder's four readable test images.
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["methods"]["patchcore"]["per_category"]["images"]["image_auroc"] is not None
  assert metrics["methods"]["maeday"]["per_category"]["images"]["image_auroc"] is None
  (failure,) = metrics["failed"]
  assert failure["method"] == "maeday" and failure["seed"] == 0 and "step" in failure["reason"]
  seed_metrics = json.loads((workdir / "seed_0" / "maeday" / "metrics.json").read_text())
  assert "images" in seed_metrics["failed"]
  (record,) = json.loads((workdir / "adaptation.json").read_text())
  assert set(record["failed"]) == {"maeday"} and "nan" in record["failed"]["maeday"]


def test_the_first_step_blames_the_weights_not_the_learning_rate():
  from maeday_jax.few_shot.adapt import AdaptationDiverged

  first = AdaptationDiverged(float("nan"), 1, 50, 0, 1e-2)
  assert "before any update" in str(first) and "learning_rate" not in str(first)
  later = AdaptationDiverged(float("inf"), 7, 50, 0, 1e-2)
  assert "step 7 of 50" in str(later) and "--config.train.learning_rate" in str(later)
  assert isinstance(later, FloatingPointError)


# ------------------------------------------------------------------ MALA


def test_mala_scores_with_the_training_sources_masks(folder):
  """`--config.data.mask_path` was ignored by the evaluation (`eval.data` referenced only
  name, path and categories): no pixel metrics, exit 0."""
  from maeday_jax import data as data_lib
  from maeday_jax.jobs import mala as mala_job
  from maeday_jax.jobs import recipe_eval
  from tests.conftest import make_job_config

  _, fields = folder
  config = make_job_config("mala", "runlocal", data=fields)
  test = recipe_eval.eval_data(config)
  assert test.mask_path == fields["mask_path"] and test.normal_path == fields["normal_path"]
  assert test.data_dir == fields["data_dir"]
  mala_job.validate(config)
  (category,) = data_lib.resolve_categories(test)
  split = data_lib.load_split(test, category, "test")
  assert any(split[i]["mask"].any() for i in range(len(split)))  # Pixel metrics follow.
  # Masks for another test source than the training one: refused, saying where to set them.
  config.eval.data = data_lib.get_data_config()
  config.eval.data.name = "folder"
  config.eval.data.path = fields["normal_path"]
  with pytest.raises(ConfigError, match=r"--config.data.mask_path: .*eval.data.mask_path"):
    mala_job.validate(config)


def test_mala_texture_folder_needs_a_readable_image_before_training(tmp_path):
  from maeday_jax.jobs import fit as fit_job
  from maeday_jax.jobs import mala as mala_job
  from maeday_jax.mala import texture_folder
  from tests.conftest import make_job_config

  textures = tmp_path / "textures"
  data_makers.write_truncated(textures / "broken.png")
  data_makers.write_not_image(textures / "notes.jpg")
  config = make_job_config("mala", "runlocal")
  config.stage2.synthetic.textures = "folder"
  config.stage2.synthetic.texture_dir = str(textures)
  with pytest.raises(ConfigError, match=r"texture_dir: .*holds 2 image files but none can be"):
    mala_job.validate(config)
  fit = make_job_config("fit", "runlocal", detector="mala")
  fit.mala.stage2.synthetic.textures = "images,folder"
  fit.mala.stage2.synthetic.texture_dir = str(textures)
  with pytest.raises(ConfigError, match=r"--config.mala.stage2.synthetic.texture_dir: .*none"):
    fit_job.validate(fit)
  data_makers.write_image(textures / "sub" / "good.png")
  assert texture_folder.check_texture_folder(textures) == 3
  mala_job.validate(config)
  fit_job.validate(fit)
  # The job says so as one line, before any work directory or training.
  (tmp_path / "only_bad").mkdir()
  data_makers.write_truncated(tmp_path / "only_bad" / "a.png")
  workdir = tmp_path / "run"
  result = _main(
    "--config",
    "configs/mala.py:runlocal",
    "--config.stage2.synthetic.textures=folder",
    f"--config.stage2.synthetic.texture_dir={tmp_path / 'only_bad'}",
    "--workdir",
    str(workdir),
    timeout=120,
  )
  assert "texture_dir" in _only_line(result)
  assert not workdir.exists()


# ------------------------------------------------------------------ training recipes


def test_pretraining_inputs_are_checked_before_training(tmp_path):
  from maeday_jax import data as data_lib
  from maeday_jax.jobs import fit as fit_job
  from maeday_jax.jobs import mala as mala_job
  from maeday_jax.jobs import pretrain as pretrain_job
  from tests.conftest import make_job_config

  bad = {
    "mask_ratio": 1.0,
    "b2": 1.0,
    "weight_decay": -1.0,
    "augment.crop_scale": (0.9, 0.2),
  }
  for field, value in bad.items():
    config = make_job_config("pretrain", "runlocal", **{f"train.{field}": value})
    with pytest.raises(ConfigError, match=rf"--config.train.{field.split('.')[0]}"):
      pretrain_job.validate(config)
    mala = make_job_config("mala", "runlocal", **{f"stage1.{field}": value})
    with pytest.raises(ConfigError, match=r"--config.stage1\."):
      mala_job.validate(mala)
    fit = make_job_config("fit", "runlocal", detector="mae", **{f"pretrain.train.{field}": value})
    with pytest.raises(ConfigError, match=r"--config.pretrain.train\."):
      fit_job.validate(fit)
  config = make_job_config("pretrain", "runlocal", **{"train.pixel_weight": 0.0})
  with pytest.raises(ConfigError, match=r"--config.train.pixel_weight: every loss weight"):
    pretrain_job.validate(config)
  config = make_job_config("pretrain", "runlocal", **{"data.splits": "train,tset"})
  with pytest.raises(ConfigError, match=r"--config.data.splits"):
    pretrain_job.validate(config)
  # The end-of-training evaluation's images are resolved before training, not after it.
  fake = data_makers.make_folder(tmp_path / "raw")
  fields = data_makers.folder_fields(fake.root, tmp_path / "tfds")
  config = make_job_config("pretrain", "runlocal", data=fields)
  config.eval.enabled = True
  config.eval.data.name = "mvtec_ad"
  config.eval.data.categories = "bottel"
  with pytest.raises(data_lib.DataError, match="bottel"):
    pretrain_job.run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_few_shot_recipe_is_checked_before_adaptation():
  from maeday_jax.jobs import few_shot as few_shot_job
  from maeday_jax.jobs import fit as fit_job
  from tests.conftest import make_job_config

  bad = {
    "learning_rate": float("nan"),
    "momentum": 1.5,
    "mask_ratio": 1.0,
    "augment.min_crop_scale": 0.0,
    "augment.fill_mode": "zeros",
    "lora.targets": ("blocks_(",),
  }
  for field, value in bad.items():
    config = make_job_config("few_shot", "runlocal", **{f"train.{field}": value})
    with pytest.raises(ConfigError, match=rf"--config.train.{field}"):
      few_shot_job.validate(config)
    fit = make_job_config("fit", "runlocal", detector="maeday_lora", **{f"train.{field}": value})
    with pytest.raises(ConfigError, match=rf"--config.train.{field}"):
      fit_job.validate(fit)
  # PatchCore alone trains nothing: the adaptation recipe is not its business.
  config = make_job_config("few_shot", "runlocal", method="patchcore")
  config.train.momentum = 1.5
  few_shot_job.validate(config)


def test_the_fit_job_reports_a_diverging_training_as_one_error(folder, tmp_path):
  from maeday_jax.jobs import fit as fit_job
  from maeday_jax.run_errors import RunFailed
  from tests.conftest import make_job_config

  _, data = folder
  config = make_job_config("fit", "runlocal", data=data, detector="maeday_lora", shots=1)
  config.model.checkpoint = str(FIXTURE_MAE)
  config.heldout_normals = 1
  config.train.steps = 3
  config.train.learning_rate = 1e12
  with pytest.raises(RunFailed, match=r"^maeday_lora on images: the few-shot loss became nan"):
    fit_job.run(config, tmp_path / "run")
