"""How the mask schedule and the compute dtype change zero-shot maps (README tables).

    python tools/studies/scoring_study.py masks --model /work/runs/pretrain_mt/model --model fixture
    python tools/studies/scoring_study.py dtype --model /work/runs/pretrain_mt/model --model fixture

`masks`: for 1, 2, 4, 8, 16 and 32 masks under each schedule (`random`, the paper's
i.i.d. masks, and `stratified`, groups whose visible patches partition the image), the
map's distance to a 256-random-mask reference (relative L2 and Spearman rank correlation
per image, averaged; `--repeats` independent draws averaged), and image and pixel AUROC.
`dtype`: the same 32 masks in float32 and bfloat16: the maps' relative L2 difference and
both AUROCs.

Images: the `test` split of `--data_path` (default the shared magnetic-tile sample:
24 normal and 40 defective tiles), read at the model's input size; pixel AUROC against
the masks at 224 px, the maps resized bilinearly. `--model fixture` is the parity
fixtures' random-weight MAE (`tests/fixtures/mae_ref_a.pth`, 32 px). AUROCs come from
scikit-learn (an independent implementation).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score
from study_common import MT_SAMPLE, data_config, load_model

from maeday_jax import data, zero_shot

MASK_COUNTS = (1, 2, 4, 8, 16, 32)
REFERENCE_MASKS = 256
EVAL_SIZE = 224


def load_images(data_path: str, image_size: int):
  """(images (B, S, S, 3), masks (B, 224, 224), labels (B,)) of the test split."""
  config = data_config("magnetic_tile", data_path)
  split = data.load_split(config, data.resolve_categories(config)[0], "test")
  examples = [data.load_example(split, i, image_size) for i in range(len(split))]
  masks = [data.load_example(split, i, EVAL_SIZE)["mask"] for i in range(len(split))]
  images = np.stack([e["image"] for e in examples])
  labels = np.asarray([e["label"] for e in examples])
  return images, (np.stack(masks) > 0).astype(np.uint8), labels


def compute_maps(model, params, images, noise, chunk: int = 32) -> np.ndarray:
  """Maps (B, S, S) for explicit noise (B, N, L), `chunk` masks at a time."""
  size = min(chunk, noise.shape[1])
  return np.asarray(
    zero_shot.anomaly_maps_from_noise(model, params, images, noise, mask_batch_size=size)
  )


def aurocs(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """Image AUROC (max of the map) and pixel AUROC at 224 px, in percent."""
  scores = maps.reshape(len(maps), -1).max(axis=1)
  image = roc_auc_score(labels, scores)
  resized = np.asarray(
    jax.image.resize(jnp.asarray(maps), (len(maps), EVAL_SIZE, EVAL_SIZE), "linear")
  )
  pixel = roc_auc_score(masks.reshape(-1), resized.reshape(-1))
  return 100 * image, 100 * pixel


def map_errors(maps: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
  """Mean over images of the relative L2 distance and the Spearman rank correlation."""
  flat, ref = maps.reshape(len(maps), -1), reference.reshape(len(reference), -1)
  rel = np.linalg.norm(flat - ref, axis=1) / np.linalg.norm(ref, axis=1)
  rho = [stats.spearmanr(a, b).statistic for a, b in zip(flat, ref, strict=True)]
  return float(rel.mean()), float(np.mean(rho))


def image_keys(key, images) -> jax.Array:
  return zero_shot.image_keys(key, jnp.asarray(zero_shot.image_ids(list(images))))


def study_masks(name: str, args) -> dict:
  model, params = load_model(name)
  images, masks, labels = load_images(args.data_path, model.img_size)
  images = jnp.asarray(images)
  ref_noise = zero_shot.image_noise(
    image_keys(jax.random.key(10_000), images), REFERENCE_MASKS, model.num_patches
  )
  reference = compute_maps(model, params, images, ref_noise)
  rows = []
  for schedule in ("random", "stratified"):
    for count in MASK_COUNTS:
      errors, metrics = [], []
      for repeat in range(args.repeats):
        keys = image_keys(jax.random.key(repeat), images)
        noise = zero_shot.image_noise(keys, count, model.num_patches, 0.75, schedule)
        maps = compute_maps(model, params, images, noise)
        errors.append(map_errors(maps, reference))
        metrics.append(aurocs(maps, masks, labels))
      rel, rho = np.mean(errors, axis=0)
      image, pixel = np.mean(metrics, axis=0)
      rows.append(
        dict(
          schedule=schedule,
          masks=count,
          rel_l2=rel,
          spearman=rho,
          image_auroc=image,
          pixel_auroc=pixel,
        )
      )
      print(
        f"[{name}] {schedule:10s} {count:3d} masks: rel L2 {rel:.4f}, rho {rho:.4f}, "
        f"image {image:.1f}, pixel {pixel:.1f}",
        file=sys.stderr,
        flush=True,
      )
  ref_image, ref_pixel = aurocs(reference, masks, labels)
  # The reference's own Monte-Carlo noise: a second, independent 256-mask draw.
  floor_noise = zero_shot.image_noise(
    image_keys(jax.random.key(20_000), images), REFERENCE_MASKS, model.num_patches
  )
  floor_rel, floor_rho = map_errors(compute_maps(model, params, images, floor_noise), reference)
  return dict(
    model=name,
    rows=rows,
    reference=dict(
      image_auroc=ref_image,
      pixel_auroc=ref_pixel,
      second_draw_rel_l2=floor_rel,
      second_draw_spearman=floor_rho,
    ),
  )


def study_dtype(name: str, args) -> dict:
  model, params = load_model(name)
  model16, _ = load_model(name, jnp.bfloat16)
  images, masks, labels = load_images(args.data_path, model.img_size)
  images = jnp.asarray(images)
  noise = zero_shot.image_noise(image_keys(jax.random.key(0), images), 32, model.num_patches)
  maps32 = compute_maps(model, params, images, noise)
  maps16 = compute_maps(model16, params, images, noise)
  flat32, flat16 = maps32.reshape(len(images), -1), maps16.reshape(len(images), -1)
  rel = np.linalg.norm(flat16 - flat32, axis=1) / np.linalg.norm(flat32, axis=1)
  (i32, p32), (i16, p16) = aurocs(maps32, masks, labels), aurocs(maps16, masks, labels)
  s32, s16 = flat32.max(axis=1), flat16.max(axis=1)
  return dict(
    model=name,
    maps_rel_l2_mean=float(rel.mean()),
    maps_rel_l2_max=float(rel.max()),
    score_rel_diff_max=float(np.max(np.abs(s16 - s32) / np.abs(s32))),
    image_auroc=dict(float32=i32, bfloat16=i16, difference=i16 - i32),
    pixel_auroc=dict(float32=p32, bfloat16=p16, difference=p16 - p32),
  )


def masks_table(result: dict) -> str:
  lines = [
    f"Model `{result['model']}` (reference: {REFERENCE_MASKS} random masks, image AUROC "
    f"{result['reference']['image_auroc']:.1f}, pixel AUROC "
    f"{result['reference']['pixel_auroc']:.1f}; a second 256-mask draw is at rel. L2 "
    f"{result['reference']['second_draw_rel_l2']:.3f}, rank corr. "
    f"{result['reference']['second_draw_spearman']:.3f} from it: the floor)",
    "",
    "| masks | random: rel. L2 | stratified: rel. L2 | random: rank corr. | stratified: rank "
    "corr. | random: image / pixel AUROC | stratified: image / pixel AUROC |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  by = {(r["schedule"], r["masks"]): r for r in result["rows"]}
  for count in MASK_COUNTS:
    r, s = by["random", count], by["stratified", count]
    lines.append(
      f"| {count} | {r['rel_l2']:.3f} | {s['rel_l2']:.3f} | {r['spearman']:.3f} | "
      f"{s['spearman']:.3f} | {r['image_auroc']:.1f} / {r['pixel_auroc']:.1f} | "
      f"{s['image_auroc']:.1f} / {s['pixel_auroc']:.1f} |"
    )
  return "\n".join(lines)


def dtype_table(results: list[dict]) -> str:
  lines = [
    "| model | maps: rel. L2 (mean / max) | image score: max rel. diff | image AUROC f32 -> "
    "bf16 | pixel AUROC f32 -> bf16 |",
    "| --- | --- | --- | --- | --- |",
  ]
  for r in results:
    i, p = r["image_auroc"], r["pixel_auroc"]
    lines.append(
      f"| `{r['model']}` | {r['maps_rel_l2_mean']:.4f} / {r['maps_rel_l2_max']:.4f} | "
      f"{r['score_rel_diff_max']:.4f} | {i['float32']:.2f} -> {i['bfloat16']:.2f} "
      f"({i['difference']:+.2f}) | {p['float32']:.2f} -> {p['bfloat16']:.2f} "
      f"({p['difference']:+.2f}) |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("study", choices=["masks", "dtype"])
  parser.add_argument(
    "--model",
    action="append",
    required=True,
    help="checkpoint (anything load_mae accepts) or 'fixture'; repeatable",
  )
  parser.add_argument("--data_path", default=str(MT_SAMPLE))
  parser.add_argument("--repeats", type=int, default=3, help="independent draws (masks)")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  if args.study == "masks":
    results = [study_masks(name, args) for name in args.model]
    print("\n\n".join(masks_table(r) for r in results))
  else:
    results = [study_dtype(name, args) for name in args.model]
    print(dtype_table(results))
  print(f"\n({time.perf_counter() - start:.0f} s; {jax.devices()[0].device_kind})")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
