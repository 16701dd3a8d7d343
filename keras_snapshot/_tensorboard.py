"""What the callbacks add to TensorBoard, next to Keras's own scalars.

`TensorBoardLog` writes `learning_rate` (and `learning_rate/group_<i>`),
`snapshot`, `snapshot_file`, `frozen_groups` and `num_averaged` into
`log_dir/train` at the optimizer step, from the writing process only.
It uses a writer of its own under `record_if(True)`: the `record_if`
filter Keras's `TensorBoard` leaves on between batches would drop them.
"""

import os

import keras
import numpy as np

from keras_snapshot import _fs
from keras_snapshot._distribution import is_writer
from keras_snapshot._keras_compat import innermost_optimizer
from keras_snapshot._keras_compat import learning_rate_schedule

MAX_POINTS_PER_EPOCH = 500
"""Most `learning_rate` points logged per epoch (evenly spaced steps)."""


class TensorBoardLog:
    """Scalars and text into the `train` run of the fit's `TensorBoard`.

    Example:

    ```python
    log = TensorBoardLog()
    log.open("logs", model)  # in on_train_begin
    log.scalar("snapshot", 1, step=400)
    log.close()  # in on_train_end
    ```
    """

    def __init__(self):
        self._writer = None
        self.log_dir = None
        self._logged_step = None
        self._last = {}

    @property
    def active(self) -> bool:
        return self._writer is not None

    def open(self, log_dir, model) -> bool:
        """Opens `log_dir/train` (None: no logging); returns whether it logs
        (only the process that writes snapshots logs)."""
        self.close()
        self._logged_step, self._last = None, {}
        if log_dir is None or not is_writer(model):
            return False
        if _fs.exists(log_dir) and not _fs.isdir(log_dir):
            raise ValueError(
                f"`log_dir` must be a folder, and {log_dir} is a file: pass "
                "the `log_dir` of your keras.callbacks.TensorBoard. "
                f"Received: log_dir={log_dir!r}"
            )
        import tensorflow as tf

        self.log_dir = os.path.join(os.fspath(log_dir), "train")
        self._writer = tf.summary.create_file_writer(self.log_dir)
        return True

    def new_steps(self, start: int, step: int) -> np.ndarray:
        """The steps after `start` up to `step` not yet returned since
        `open` (`logged_steps`); empty when not logging."""
        if self._writer is None:
            return np.zeros(0, dtype=np.int64)
        if self._logged_step is not None:
            start = max(start, self._logged_step)
        self._logged_step = max(start, step)
        return logged_steps(start + 1, step)

    def scalars(self, tag: str, values, steps) -> None:
        """`values[i]` at optimizer step `steps[i]`, for each i."""
        if self._writer is None:
            return
        import tensorflow as tf

        with self._writer.as_default(), tf.summary.record_if(True):
            for value, step in zip(values, steps):
                tf.summary.scalar(tag, float(value), step=int(step))

    def scalar(self, tag: str, value, step: int) -> None:
        """`value` at `step`, unless the tag's last point is the same."""
        point = (float(value), int(step))
        if self._last.get(tag) != point:
            self._last[tag] = point
            self.scalars(tag, [value], [step])

    def text(self, tag: str, text: str, step: int) -> None:
        if self._writer is None:
            return
        import tensorflow as tf

        with self._writer.as_default(), tf.summary.record_if(True):
            tf.summary.text(tag, text, step=int(step))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        self._writer = None


def check_log_dir(log_dir):
    """`log_dir` as a string, or None; refuses anything else in one line."""
    if log_dir is None:
        return None
    if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
        raise TypeError(
            "`log_dir` must be the folder of the fit's "
            "keras.callbacks.TensorBoard (its `log_dir`), or None. "
            f"Received: log_dir={log_dir!r}"
        )
    return os.fspath(log_dir)


def logged_steps(first: int, last: int) -> np.ndarray:
    """Steps `first..last` (inclusive), at most `MAX_POINTS_PER_EPOCH`,
    evenly spaced and always including `last`."""
    if last < first:
        return np.zeros(0, dtype=np.int64)
    steps = np.arange(first, last + 1)
    if len(steps) > MAX_POINTS_PER_EPOCH:
        index = np.linspace(0, len(steps) - 1, MAX_POINTS_PER_EPOCH)
        steps = steps[np.round(index).astype(int)]
    return steps


def update_rates(optimizer, steps, accumulation: int = 1) -> np.ndarray:
    """The learning rate of the updates that made `steps` (float64).

    Keras calls a schedule with the count of the update's last batch,
    `step * accumulation - 1`; a constant rate is read as it is now.
    """
    steps = np.asarray(steps, dtype=np.int64)
    schedule = learning_rate_schedule(optimizer)
    if schedule is None:
        rate = keras.ops.convert_to_numpy(
            innermost_optimizer(optimizer).learning_rate
        )
        return np.full(len(steps), float(rate))
    counts = np.maximum(steps * accumulation - 1, 0)
    return np.array(
        [float(keras.ops.convert_to_numpy(schedule(int(c)))) for c in counts]
    )
