"""The jobs behind `python -m maeday_jax.main`: each is `run(config, workdir) -> summary`."""
