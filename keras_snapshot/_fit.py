"""The `fit` that calls a callback, read from the call stack.

Keras tells a callback neither which other callbacks its `fit` runs nor
that `fit` ended by an exception. `FreezeOut` needs both, and the
callbacks find the `keras.callbacks.TensorBoard` of their `fit` here
(`_tensorboard`). This is the one place that reads the stack.
"""

import inspect

import keras


def fit_frame(callback):
    """The frame of the `fit` calling `callback` now, and its callbacks.

    Keras tells a callback neither which other callbacks its `fit` runs
    nor that `fit` ended by an exception. Both are read here, and only
    here, from the call stack: Keras calls each hook through a
    `keras.callbacks.CallbackList` that holds the callback, and the frame
    that calls the list is `fit`'s (or a custom training loop's).

    Returns:
        `(frame, callbacks)`; when no `CallbackList` called the hook (a
        hook called directly), the frame that called it and None.
    """
    hook = inspect.currentframe().f_back
    frame, found = hook.f_back, None
    try:
        for _ in range(8):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList) and any(
                c is callback for c in owner.callbacks
            ):
                found = owner
            elif found is not None:
                return frame, list(found.callbacks)
            frame = frame.f_back
        return hook.f_back, None
    finally:
        del hook, frame
