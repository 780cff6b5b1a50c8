"""maeday_jax: zero- and few-shot anomaly detection with a pre-trained Masked Autoencoder.

The pipeline, one module per stage:

  checkpoints (official MAE weights) -> models (Flax ViT-MAE) -> masking ->
  zero_shot (reconstructions -> error maps -> scores) -> metrics / reports.
"""

__version__ = "0.1.0"
