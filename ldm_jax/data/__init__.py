"""Data: the synthetic music generator, TFDS ArrayRecord builders and the grain input pipeline.

Modules are imported on use (`from ldm_jax.data import builders, pipeline`) so that reading the
generator alone does not load TFDS or grain.
"""


class DataError(ValueError):
    """A dataset is missing, built differently or unreadable; the message says what to do."""
