"""Which process of a distributed training run writes the snapshots.

One rule for every backend, so that `SnapshotCheckpoint` (and anything else
that writes files during `fit`) asks one place.
"""

import keras


def is_writer(model) -> bool:
    """Whether this process writes files for `model`'s distributed training.

    With several processes training one model, every process runs the same
    callbacks, but only one of them should write each snapshot and the
    manifest (Huang et al. 2017, arXiv:1704.00109, train one network: one
    set of snapshots). The writer is:

    - TensorFlow backend: the process whose `tf.distribute` strategy says
      `model.distribute_strategy.extended.should_checkpoint` (the chief of a
      multi-worker cluster; every single-process strategy).
    - JAX backend: process 0 (`jax.process_index() == 0`) when JAX runs
      several processes, e.g. after `keras.distribution.initialize(...)`.
    - Otherwise (one process, or another backend): this process.

    The other processes must still run every step that takes part in a
    collective operation (they save into a scratch folder they delete).

    Args:
        model: The `keras.Model` being trained.

    Returns:
        `True` if this process writes the snapshot files.

    Example:

    ```python
    from keras_snapshot._distribution import is_writer

    if is_writer(model):
        model.save("model.keras")
    ```
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        if strategy is None:
            return True
        return bool(getattr(strategy.extended, "should_checkpoint", True))
    if backend == "jax":
        import jax

        return jax.process_count() == 1 or jax.process_index() == 0
    return True
