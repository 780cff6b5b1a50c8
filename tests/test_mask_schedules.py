"""Stratified masks: every patch visible equally often, each mask still a uniform K-subset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maeday_jax import evaluation, models, parallel, zero_shot
from maeday_jax.models import masking


def _visible(noise, ratio):
  return 1 - np.asarray(masking.from_noise(jnp.asarray(noise), ratio).mask)  # (N, L)


@pytest.mark.parametrize("num_patches,ratio", [(196, 0.75), (16, 0.75), (49, 0.75), (9, 0.5)])
def test_each_group_shows_every_patch(num_patches, ratio):
  keep = masking.num_visible(num_patches, ratio)
  group = -(-num_patches // keep)
  num_masks = 3 * group
  noise = masking.stratified_noise(jax.random.key(0), num_masks, num_patches, ratio)
  visible = _visible(noise, ratio)
  assert (visible.sum(axis=1) == keep).all()  # Exactly K visible per mask.
  for g in range(3):
    counts = visible[g * group : (g + 1) * group].sum(axis=0)
    # Every patch once per group; the G*K - L wrapped-around ones twice.
    assert counts.min() == 1
    assert (counts == 2).sum() == group * keep - num_patches


def test_stratified_is_a_pure_function_of_the_key():
  a = masking.stratified_noise(jax.random.key(3), 8, 16, 0.75)
  b = masking.stratified_noise(jax.random.key(3), 8, 16, 0.75)
  c = masking.stratified_noise(jax.random.key(4), 8, 16, 0.75)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(_visible(a, 0.75), _visible(c, 0.75))


def test_single_masks_are_uniform_like_random_ones():
  """Over many keys each patch is visible with probability K / L, as for i.i.d. masks."""
  keys = jax.random.split(jax.random.key(0), 2000)
  noise = jax.vmap(lambda k: masking.stratified_noise(k, 1, 16, 0.75))(keys)[:, 0]
  frequency = _visible(noise, 0.75).mean(axis=0)  # K / L = 4 / 16
  np.testing.assert_allclose(frequency, 0.25, atol=0.035)  # ~3.6 sigma of a binomial


def test_stratified_evens_out_patch_coverage():
  """The point of the schedule: at 8 masks, i.i.d. masks leave some patches rarely seen."""
  keys = jax.random.split(jax.random.key(1), 200)
  spread = {}
  for schedule in ("random", "stratified"):
    noise = zero_shot.image_noise(keys, 8, 16, 0.75, schedule)
    counts = np.stack([_visible(n, 0.75).sum(axis=0) for n in np.asarray(noise)])
    spread[schedule] = counts.std(axis=1).mean()
  assert spread["stratified"] == 0.0  # 16 patches, K = 4: two whole groups
  assert spread["random"] > 0.5


def test_unknown_schedule_is_refused():
  with pytest.raises(ValueError, match="sobol"):
    masking.schedule_noise(jax.random.key(0), 4, 16, 0.75, "sobol")


def test_scorer_uses_the_schedule_and_stays_device_independent(tiny_mae):
  params = models.init_params(tiny_mae, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  ids = zero_shot.image_ids([np.asarray(x) for x in images])
  key = jax.random.key(2)
  results = {}
  for devices in (8, 1):
    mesh = parallel.data_mesh(jax.devices()[:devices])
    scoring = evaluation.Scoring.create(
      tiny_mae, params, num_masks=4, batch_size=8, key=key, mesh=mesh, masking="stratified"
    )
    maps, scores = scoring.score_fn(scoring.replicated, images, jnp.asarray(ids), key)
    results[devices] = np.asarray(scores)
    # The same maps as computing the stratified noise by hand.
    noise = zero_shot.image_noise(
      zero_shot.image_keys(key, jnp.asarray(ids)), 4, 16, 0.75, "stratified"
    )
    expected = zero_shot.anomaly_maps_from_noise(tiny_mae, params, images, noise)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(results[8], results[1], rtol=1e-6)
  random = evaluation.Scoring.create(tiny_mae, params, num_masks=4, batch_size=8, key=key)
  _, random_scores = random.score_fn(random.replicated, images, jnp.asarray(ids), key)
  assert not np.allclose(random_scores, results[1])
