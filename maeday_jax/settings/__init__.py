"""Every library setting, beside the code that owns it: one module per owner.

    settings.model       which MAE (`model_builder`, `models`), its dtype and attention
    settings.data        which images (`data`), pre-training data sources
    settings.few_shot    LoRA / full fine-tuning and its augmentation (`few_shot`, `lora`,
                         `augment`)
    settings.patchcore   the PatchCore backbone and memory bank (`patchcore`)
    settings.pretrain    MAE pre-training (`pretrain.loop`)
    settings.mala        MALA's two training stages (`mala`)

Each holds the constants a library module validates against and the `ml_collections`
section of its config. They live here, not in their owners' packages, because those
packages' `__init__.py` import JAX, Flax and Optax, and config files (`configs/*.py`,
through `maeday_jax.defaults`) must load without them: these modules import nothing but
`ml_collections`, the standard library and each other. This `__init__` imports nothing.
"""
