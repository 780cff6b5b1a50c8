"""A RealNVP normalizing flow for PMAD's patch residuals, in Flax linen.

`CouplingFlow` maps x (..., D) to z = f(x) with an exact log|det df/dx|: an elementwise
affine normalisation (ActNorm: (x - loc) * exp(-log_scale), which `fit_flow` starts at the
samples' mean and standard deviation) followed by `num_couplings` affine coupling layers
with alternating fixed masks (layer l keeps the dimensions d with d % 2 == l % 2 and
transforms the others: y = x * exp(s(kept)) + t(kept)). The scale and shift come from a
small MLP per layer whose last layer starts at zero (so the couplings start as the
identity); log-scales are bounded by a tanh soft clamp. Likelihoods are under a standard
normal base, in float32 and in log space.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

HIDDEN = 256
NUM_COUPLINGS = 4
MAX_LOG_SCALE = 2.0


class CouplingNet(nn.Module):
  """The scale/shift network of one coupling layer.

  Attributes:
    dim: width D of the flow (the network outputs a log-scale and a shift per dimension).
    hidden: width of the two hidden layers (SiLU).
  """

  dim: int
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = nn.silu(nn.Dense(self.hidden)(x))
    h = nn.silu(nn.Dense(self.hidden)(h))
    out = nn.Dense(2 * self.dim, kernel_init=nn.initializers.zeros)(h)
    return out[..., : self.dim], out[..., self.dim :]


def kept_dimensions(dim: int, layer: int) -> np.ndarray:
  """Float (D,) mask of the dimensions coupling layer `layer` keeps (and conditions on)."""
  return (np.arange(dim) % 2 == layer % 2).astype(np.float32)


class CouplingFlow(nn.Module):
  """RealNVP: ActNorm then affine coupling layers with alternating masks.

  Attributes:
    dim: width D of the vectors.
    num_couplings: number of affine coupling layers (even, so every dimension is
      transformed equally often, is the usual choice).
    hidden: width of each coupling network's hidden layers.
    max_log_scale: bound of the log-scales: s = b * tanh(raw / b).
  """

  dim: int
  num_couplings: int = NUM_COUPLINGS
  hidden: int = HIDDEN
  max_log_scale: float = MAX_LOG_SCALE

  def setup(self):
    self.loc = self.param("loc", nn.initializers.zeros, (self.dim,))
    self.log_scale = self.param("log_scale", nn.initializers.zeros, (self.dim,))
    self.nets = [CouplingNet(self.dim, self.hidden) for _ in range(self.num_couplings)]

  def _scale_shift(self, layer: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kept = kept_dimensions(self.dim, layer)
    raw, shift = self.nets[layer](x * kept)
    bound = self.max_log_scale
    log_scale = bound * jnp.tanh(raw / bound)
    return log_scale * (1.0 - kept), shift * (1.0 - kept)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z (..., D) and log|det dz/dx| (...,) for x (..., D)."""
    z = (x.astype(jnp.float32) - self.loc) * jnp.exp(-self.log_scale)
    log_det = jnp.broadcast_to(-jnp.sum(self.log_scale), z.shape[:-1])
    for layer in range(self.num_couplings):
      log_scale, shift = self._scale_shift(layer, z)
      z = z * jnp.exp(log_scale) + shift
      log_det = log_det + jnp.sum(log_scale, axis=-1)
    return z, log_det

  def inverse(self, z: jax.Array) -> jax.Array:
    """x (..., D) with self(x)[0] == z."""
    x = z.astype(jnp.float32)
    for layer in reversed(range(self.num_couplings)):
      log_scale, shift = self._scale_shift(layer, x)
      x = (x - shift) * jnp.exp(-log_scale)
    return x * jnp.exp(self.log_scale) + self.loc


def init_flow(key: jax.Array, dim: int, **kwargs) -> tuple[CouplingFlow, dict]:
  """`CouplingFlow(dim, **kwargs)` and its freshly initialised parameters (the identity
  map: ActNorm at loc 0, scale 1, couplings with zero output layers)."""
  module = CouplingFlow(dim=dim, **kwargs)
  params = jax.jit(module.init)(key, jnp.zeros((1, dim), jnp.float32))["params"]
  return module, params


def log_likelihood(params: dict, module: CouplingFlow, x: jax.Array) -> jax.Array:
  """log p(x) (M,) of rows x (M, D) under the flow with a standard normal base:
  log N(f(x); 0, I) + log|det df/dx|, in float32."""
  z, log_det = module.apply({"params": params}, x)
  return -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * module.dim * math.log(2 * math.pi) + log_det


def fit_flow(
  key: jax.Array,
  samples: jax.Array,
  *,
  steps: int = 1000,
  batch_size: int = 256,
  learning_rate: float = 1e-3,
  **kwargs,
) -> tuple[dict, jax.Array]:
  """Parameters of `CouplingFlow(D, **kwargs)` fitted to `samples` (M, D), and the loss
  (steps,) of every step.

  Maximum likelihood: ActNorm starts at the samples' mean and standard deviation (floored
  at 1e-6), then `steps` Adam steps on the negative mean log-likelihood of `batch_size`
  rows drawn uniformly with replacement, all in one jitted `lax.scan`. A pure function of
  `key` (split into the initialisation key and one batch key per step).
  """
  samples = jnp.asarray(samples, jnp.float32)
  if samples.ndim != 2 or samples.shape[0] < 1:
    raise ValueError(f"samples must be (M, D) with M >= 1, got shape {samples.shape}.")
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1.")
  dim = samples.shape[1]
  init_key, train_key = jax.random.split(key)
  module, params = init_flow(init_key, dim, **kwargs)
  params = dict(params)
  params["loc"] = samples.mean(axis=0)
  params["log_scale"] = jnp.log(jnp.maximum(samples.std(axis=0), 1e-6))
  keys = jax.random.split(train_key, steps)
  return _train(module, batch_size, learning_rate, params, samples, keys)


@functools.partial(jax.jit, static_argnames=("module", "batch_size", "learning_rate"))
def _train(
  module: CouplingFlow,
  batch_size: int,
  learning_rate: float,
  params: dict,
  samples: jax.Array,
  keys: jax.Array,
) -> tuple[dict, jax.Array]:
  """Adam on the negative mean log-likelihood, one step per key, in one `lax.scan`."""
  optimizer = optax.adam(learning_rate)

  def loss_fn(p, batch):
    return -jnp.mean(log_likelihood(p, module, batch))

  def step(carry, step_key):
    p, opt_state = carry
    batch = samples[jax.random.randint(step_key, (batch_size,), 0, samples.shape[0])]
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), keys)
  return params, losses
