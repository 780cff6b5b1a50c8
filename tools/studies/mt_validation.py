"""Choosing the magnetic-tile recipe on a validation split, never on the test split.

    python tools/studies/mt_validation.py --out runs/mt_validation            # all steps
    python tools/studies/mt_validation.py --out runs/mt_validation --recipes mala_tiled

1. The split (`maeday_jax.recipe_validation`): the recipes' 700 normal training images
   (`defaults.use_normal_tiles`) at 224 px; 10 % held out by a hash of the file name, half
   of those given a synthetic hole, crack or scratch (defects unlike MALA's training
   ones), with masks. `<out>/split/train/` keeps the other 90 %.
2. Each recipe (`--recipes`), trained on `<out>/split/train/` only, into `<out>/<recipe>/`:
   `mala_tiled` (`configs/mt_recipe.py` on square 224 px images) and `pmad_tiled`
   (`configs/pmad_mt.py` likewise, on the feature MAE of this split's `mala_tiled` stage
   1, so nothing it uses saw a held-out image); `mala_aspect` and `pmad_aspect`: the
   configs as they are (aspect ratios kept, short side 224 px), on the same split written
   with aspect ratios kept (`<out>/split_aspect/`: the same images and defect draws).
   Reruns resume.
3. Each fitted detector scores `<out>/split/validation/` (as the evaluate job, pixel
   metrics at 224 px), PMAD also by each way of scoring (`entropy`, `surprise`, `flow`)
   and each of `--pmad-mask-ratios` (scoring-time choices: no refit);
   `<out>/validation.json` and the printed table hold image AUROC, pixel AUROC and AUPRO
   per recipe.
4. `--reads 0,224,-1`: the held-out images written again with their aspect ratio kept
   (`<out>/split_aspect/`, the same images and defect draws), and each fitted recipe scored
   on them with each `tiling.resize_short_side` (`<out>/reads.json`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

from study_common import REPO_ROOT, evaluate_detector

RECIPES = ("mala_tiled", "pmad_tiled", "mala_aspect", "pmad_aspect")
# `*_aspect`: the configs as they are (images with their aspect ratio kept, short side
# 224 px, for training and scoring), trained on `<out>/split_aspect/train/` and scored on
# `<out>/split_aspect/validation/`; `*_tiled`: the same configs on square 224 px images
# (as first written), on `<out>/split/`.
CONFIG_FILES = {"mala": "mt_recipe.py", "pmad": "pmad_mt.py"}


def _config(recipe: str, smoke: bool = False):
  method = recipe.split("_")[0]
  path = REPO_ROOT / "configs" / CONFIG_FILES[method]
  spec = importlib.util.spec_from_file_location(method, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal" if smoke else None)
  if recipe.endswith("_tiled"):  # Square images at 224 px: no aspect ratio kept.
    config.tiling.resize_short_side = 0
    if method == "mala":
      config.mala.stage1.load_short_side = config.mala.stage2.load_short_side = 0
    else:
      config.pmad.train.load_short_side = 0
  return config


def _aspect(recipe: str) -> bool:
  return recipe.endswith("_aspect")


def write_split(out: pathlib.Path) -> dict:
  """The validation split of the recipes' training images, square at 224 px (written
  once)."""
  return _write_once(out, "split", short_side=0)


def write_aspect_split(out: pathlib.Path) -> dict:
  """The same split of the same images (and defect draws), each written with its aspect
  ratio kept, short side 224 px (written once)."""
  return _write_once(out, "split_aspect", short_side=224)


def _write_once(out: pathlib.Path, name: str, short_side: int) -> dict:
  """`<out>/<name>/` and its summary `<out>/<name>.json`, unless already written."""
  from maeday_jax import defaults, recipe_validation, resizing
  from maeday_jax.pretrain import inputs

  summary_path = out / f"{name}.json"
  if summary_path.is_file():
    return json.loads(summary_path.read_text())
  config = _config("mala_tiled")
  defaults.use_normal_tiles(config, REPO_ROOT.parent / "shared" / "data")
  sources = inputs.training_sources([config.data, *config.extra_data])
  aspect = resizing.KeepAspect(short_side) if short_side else None
  images, names = inputs.load_images(sources, 224, True, aspect=aspect)
  summary = recipe_validation.write_split(images, names, out / name)
  summary_path.write_text(json.dumps(summary, indent=2))
  return summary


def _train_on(config, split: dict) -> None:
  """Points a recipe config's training images at the split's training folder."""
  from maeday_jax import defaults

  config.data = defaults.training_source(
    "train", name="folder", path=split["train"], normal_path=split["train"]
  )
  config.extra_data = []


def fit(recipe: str, out: pathlib.Path, split: dict, smoke: bool = False) -> pathlib.Path:
  """Trains `recipe` on the split's training images (the fit job; a rerun resumes);
  returns its detector folder."""
  from maeday_jax.jobs import fit as fit_job

  config = _config(recipe, smoke)
  if recipe.startswith("pmad") and not smoke:
    # The feature MAE: stage 1 of this split's MALA of the same reads, trained with the
    # settings the PMAD recipe trains its own with (`features.checkpoint=pretrain`).
    mala = "mala_aspect" if _aspect(recipe) else "mala_tiled"
    config.pmad.features.checkpoint = str(out / mala / "training" / "stage1" / "model")
  _train_on(config, split)
  workdir = out / recipe
  if not (workdir / "detector" / "manifest.json").is_file():
    fit_job.run(config, workdir)
  return workdir / "detector"


def evaluate(detector, split: dict, workdir: pathlib.Path) -> dict:
  """Image AUROC, pixel AUROC and AUPRO of a fitted detector (or its folder) on the
  validation images, scored as the evaluate job scores (pixel metrics at 224 px)."""
  fields = dict(name="folder", path=split["images"], mask_path=split["masks"])
  return evaluate_detector(detector, fields, workdir)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/mt_validation")
  parser.add_argument("--recipes", default=",".join(RECIPES))
  parser.add_argument(
    "--pmad-mask-ratios",
    default="0.1,0.25,0.5",
    help="PMAD's fraction of masked patches at scoring, each tried on the fitted detector",
  )
  parser.add_argument("--smoke", action="store_true", help="the recipes' tiny runlocal models")
  parser.add_argument(
    "--reads",
    default="",
    help="instead: score each fitted recipe on the split written with the images' aspect "
    "ratio kept, with each of these tiling.resize_short_side values (e.g. 0,224,-1)",
  )
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  split = write_split(out)
  print(json.dumps(split, indent=2))
  recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
  if args.reads:
    return compare_reads(out, split, recipes, [int(r) for r in args.reads.split(",")])
  results = {}
  for recipe in recipes:
    on = write_aspect_split(out) if _aspect(recipe) else split
    folder = fit(recipe, out, on, args.smoke)
    results[recipe] = evaluate(folder, on, out / f"{recipe}_validation")
    if recipe == "pmad_tiled":  # Scoring-time choices: no refit needed.
      from maeday_jax import detectors

      ratios = [float(r) for r in args.pmad_mask_ratios.split(",") if r.strip()]
      variants = [("flow", None)] + [(how, r) for how in ("entropy", "surprise") for r in ratios]
      for how, ratio in variants:
        detector = detectors.load(folder)
        detector.set_scoring(how)
        if ratio is not None:
          detector.set_mask_ratio(ratio)
        name = f"pmad_tiled, {how}" + ("" if ratio is None else f", mask ratio {ratio}")
        tag = how if ratio is None else f"{how}_m{ratio}"
        results[name] = evaluate(detector, split, out / f"pmad_tiled_{tag}_validation")
  (out / "validation.json").write_text(json.dumps({"split": split, "results": results}, indent=2))
  _print_table(results)
  return 0


def _print_table(results: dict) -> None:
  print("| recipe | image AUROC | pixel AUROC | AUPRO |\n| --- | --- | --- | --- |")
  for recipe, metrics in results.items():
    cells = " | ".join("-" if v is None else f"{100 * v:.1f}" for v in metrics.values())
    print(f"| {recipe} | {cells} |")


def compare_reads(out: pathlib.Path, split: dict, recipes: list, reads: list) -> int:
  """Each fitted recipe (trained on the square split's training images) scored on the
  same held-out images written with their aspect ratio kept (short side 224 px, the
  same images and defect draws), read square (0) or with `tiling.resize_short_side` of
  each of `reads`."""
  from maeday_jax import detectors

  aspect = write_aspect_split(out)
  fields = dict(name="folder", path=aspect["images"], mask_path=aspect["masks"])
  results = {}
  for recipe in recipes:
    for side in reads:
      detector = detectors.load(fit(recipe, out, aspect if _aspect(recipe) else split))
      detector.settings.tiling.resize_short_side = side
      name = f"{recipe}, {detector.tiling.describe()}"
      results[name] = evaluate_detector(detector, fields, out / f"{recipe}_read{side}_aspect")
  (out / "reads.json").write_text(json.dumps(results, indent=2))
  _print_table(results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
