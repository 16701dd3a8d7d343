"""The learning rate of Fast Geometric Ensembling (FGE)."""

import math

import keras
from keras import ops

from keras_snapshot._checks import check_accumulation_steps
from keras_snapshot._checks import check_in_range
from keras_snapshot._checks import check_non_negative_int
from keras_snapshot._checks import check_positive_int
from keras_snapshot._checks import check_positive_number
from keras_snapshot._checks import resolve_steps_per_epoch


def _check_alpha2(alpha1: float, alpha2) -> float:
    return check_in_range(
        "alpha2",
        alpha2,
        0.0,
        alpha1,
        f"It is the lowest rate, between 0 and `alpha1` ({alpha1}).",
        include_high=True,
    )


@keras.saving.register_keras_serializable(package="keras_snapshot")
class FGESchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Fast Geometric Ensembling: short piecewise-linear cycles.

    The schedule of FGE (Garipov et al. 2018, arXiv:1802.10026). After
    `start_step` steps of normal training come cycles of `c = cycle_steps`
    steps in which the rate goes linearly from `alpha1` down to `alpha2` and
    back. With `i = s - start_step + 1` for optimizer step `s` (from 0) and
    `t = (((i - 1) mod c) + 1) / c`:

    `lr = (1 - 2t) alpha1 + 2t alpha2`        for `t <= 1/2`,
    `lr = (2 - 2t) alpha2 + (2t - 1) alpha1`  for `t > 1/2`.

    Snapshots are due at each minimum, `start_step + (k - 1) * c + c // 2`
    steps (`cycle_end_steps`, read by `SnapshotCheckpoint`).

    Args:
        alpha1: The highest rate, at the start and end of each cycle; a
            finite positive number (the paper uses 0.05 for VGG/ResNets).
        alpha2: The lowest rate, at the middle of each cycle, where the
            snapshots are taken; between 0 and `alpha1` (paper: 0.0005).
        cycle_steps: Steps per cycle `c`, at least 2.
        num_snapshots: Number of cycles, one snapshot each.
        start_step: Steps of the normal training phase before the cycles.
        initial_learning_rate: The rate before `start_step` (only with
            `start_step > 0`): None for the constant `alpha1`, a number
            `lr0` for a half cosine from `lr0` down to `alpha1`, or a
            `LearningRateSchedule`.
        gradient_accumulation_steps: The optimizer's
            `gradient_accumulation_steps`, if set: the schedule then counts
            weight updates (Keras calls it with the batch count), as
            `SnapshotSchedule` does.
        name: Optional name of the schedule.

    Example:

    ```python
    # 40 epochs of 100 steps: 30 epochs of cosine decay from 0.1 to 0.05,
    # then 5 cycles of 2 epochs, a snapshot in the middle of each.
    schedule = keras_snapshot.FGESchedule(
        alpha1=0.05, alpha2=0.0005, cycle_steps=200, num_snapshots=5,
        start_step=3000, initial_learning_rate=0.1,
    )
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)
    schedule.cycle_end_steps  # [3100, 3300, 3500, 3700, 3900]
    ```
    """

    def __init__(
        self,
        alpha1: float,
        alpha2: float,
        cycle_steps: int,
        num_snapshots: int,
        start_step: int = 0,
        initial_learning_rate=None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
    ):
        super().__init__()
        self.alpha1 = check_positive_number("alpha1", alpha1)
        self.alpha2 = _check_alpha2(self.alpha1, alpha2)
        self.cycle_steps = check_positive_int("cycle_steps", cycle_steps)
        if self.cycle_steps < 2:
            raise ValueError(
                "`cycle_steps` must be at least 2 (FGE uses cycles of 2 to 4 "
                f"epochs). Received: cycle_steps={cycle_steps}."
            )
        self.num_snapshots = check_positive_int("num_snapshots", num_snapshots)
        self.start_step = check_non_negative_int(
            "start_step",
            start_step,
            "It counts the steps of normal training before the cycles.",
        )
        if isinstance(initial_learning_rate, dict):
            initial_learning_rate = keras.optimizers.schedules.deserialize(
                initial_learning_rate
            )
        if initial_learning_rate is not None:
            if self.start_step == 0:
                raise ValueError(
                    "`initial_learning_rate` sets the rate before "
                    "`start_step`: leave it unset or pass a positive "
                    "`start_step`. Received: initial_learning_rate="
                    f"{initial_learning_rate!r}, start_step=0."
                )
            if not isinstance(
                initial_learning_rate,
                keras.optimizers.schedules.LearningRateSchedule,
            ):
                initial_learning_rate = check_positive_number(
                    "initial_learning_rate",
                    initial_learning_rate,
                    hint="Pass a number, a LearningRateSchedule or None.",
                )
        self.initial_learning_rate = initial_learning_rate
        self.gradient_accumulation_steps = check_accumulation_steps(
            gradient_accumulation_steps
        )
        self.name = name

    @classmethod
    def from_epochs(
        cls,
        alpha1: float,
        alpha2: float,
        cycle_epochs: int,
        steps_per_epoch,
        num_snapshots: int,
        start_epoch: int = 0,
        initial_learning_rate=None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
    ) -> "FGESchedule":
        """Builds the schedule from epochs of `steps_per_epoch` steps.

        `steps_per_epoch` is an int or a finite `tf.data.Dataset`, as in
        `SnapshotSchedule.from_epochs`.

        Example:

        ```python
        # 20 epochs of normal training, then 4 cycles of 2 epochs.
        schedule = FGESchedule.from_epochs(
            0.05, 0.0005, cycle_epochs=2, steps_per_epoch=390,
            num_snapshots=4, start_epoch=20, initial_learning_rate=0.1,
        )
        ```
        """
        steps_per_epoch = resolve_steps_per_epoch(steps_per_epoch)
        cycle_epochs = check_positive_int("cycle_epochs", cycle_epochs)
        start_epoch = check_non_negative_int("start_epoch", start_epoch)
        accumulation = check_accumulation_steps(gradient_accumulation_steps)
        k = accumulation or 1
        return cls(
            alpha1,
            alpha2,
            cycle_steps=cycle_epochs * steps_per_epoch // k,
            num_snapshots=num_snapshots,
            start_step=start_epoch * steps_per_epoch // k,
            initial_learning_rate=initial_learning_rate,
            gradient_accumulation_steps=accumulation,
            name=name,
        )

    @property
    def cycle_length(self) -> int:
        """Steps per cycle (`cycle_steps`), as `SnapshotSchedule` names it."""
        return self.cycle_steps

    @property
    def cycle_end_steps(self) -> list[int]:
        """Step counts after which snapshots 1..M are taken (rate `alpha2`)."""
        c = self.cycle_steps
        return [
            self.start_step + k * c + c // 2 for k in range(self.num_snapshots)
        ]

    @property
    def snapshot_steps(self) -> list[int]:
        """The same as `cycle_end_steps`: where the snapshots are due."""
        return self.cycle_end_steps

    @property
    def total_steps(self) -> int:
        """Steps to train: up to the last snapshot (`cycle_end_steps[-1]`)."""
        return self.cycle_end_steps[-1]

    def cycle_of_step(self, step: int) -> int:
        """The 1-based cycle of optimizer step `step` (from 0); 0 before it."""
        step = int(step)
        if step < self.start_step:
            return 0
        return (step - self.start_step) // self.cycle_steps + 1

    def _first_phase(self, step, dtype):
        base = self.initial_learning_rate
        if base is None:
            return ops.cast(self.alpha1, dtype)
        if isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
            return ops.cast(base(step), dtype)
        progress = ops.minimum(
            ops.cast(step, dtype) / float(self.start_step), 1.0
        )
        cosine = ops.cos(ops.multiply(math.pi, progress))
        return self.alpha1 + (base - self.alpha1) / 2.0 * (1.0 + cosine)

    def __call__(self, step):
        with keras.name_scope(self.name or "FGESchedule"):
            dtype = "float32"
            # int32 as in SnapshotSchedule: JAX without x64 has no int64.
            step = ops.cast(step, "int32")
            if self.gradient_accumulation_steps:
                step = ops.floor_divide(step, self.gradient_accumulation_steps)
            c = self.cycle_steps
            since_start = ops.maximum(step - self.start_step, 0)
            position = ops.mod(since_start, c) + 1
            t = ops.cast(position, dtype) / float(c)
            alpha1 = ops.cast(self.alpha1, dtype)
            alpha2 = ops.cast(self.alpha2, dtype)
            falling = (1.0 - 2.0 * t) * alpha1 + 2.0 * t * alpha2
            rising = (2.0 - 2.0 * t) * alpha2 + (2.0 * t - 1.0) * alpha1
            cyclic = ops.where(t <= 0.5, falling, rising)
            if self.start_step == 0:
                return cyclic
            return ops.where(
                step < self.start_step, self._first_phase(step, dtype), cyclic
            )

    def get_config(self) -> dict:
        base = self.initial_learning_rate
        if isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
            base = keras.optimizers.schedules.serialize(base)
        return {
            "alpha1": self.alpha1,
            "alpha2": self.alpha2,
            "cycle_steps": self.cycle_steps,
            "num_snapshots": self.num_snapshots,
            "start_step": self.start_step,
            "initial_learning_rate": base,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "name": self.name,
        }

    def __repr__(self) -> str:
        return (
            f"FGESchedule(alpha1={self.alpha1}, alpha2={self.alpha2}, "
            f"cycle_steps={self.cycle_steps}, num_snapshots="
            f"{self.num_snapshots}, start_step={self.start_step})"
        )
