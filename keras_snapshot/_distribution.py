"""Which process of a distributed training run writes the snapshots."""

import keras


def is_writer(model) -> bool:
    """Whether this process writes files for `model`'s distributed training.

    TensorFlow: the process whose strategy says
    `extended.should_checkpoint` (the chief); JAX: process 0; otherwise
    this process. The others must still take part in collective steps.

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
