"""The cyclic cosine learning rate of Snapshot Ensembles."""

import math

import keras
from keras import ops

from keras_snapshot._checks import check_accumulation_steps
from keras_snapshot._checks import check_positive_int
from keras_snapshot._checks import check_positive_number
from keras_snapshot._checks import count_batches  # noqa: F401 (public here)
from keras_snapshot._checks import resolve_steps_per_epoch


@keras.saving.register_keras_serializable(package="keras_snapshot")
class SnapshotSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Cyclic cosine annealing with restarts, one cycle per snapshot.

    The schedule of Snapshot Ensembles (Huang et al. 2017,
    arXiv:1704.00109): `total_steps` optimizer steps are split into
    `num_snapshots` cycles of `c = ceil(total_steps / num_snapshots)` steps,
    and within each the rate follows a half cosine, updated every step:

    `lr(t) = initial_learning_rate / 2 * (cos(pi * (t mod c) / c) + 1)`

    `SnapshotCheckpoint` saves the model at each cycle end. `cycle_length`,
    `cycle_end_steps` and `cycle_of_step` are the one home of the cycle
    arithmetic.

    Args:
        initial_learning_rate: Rate at the start of every cycle; a finite
            positive number.
        total_steps: Training budget `T` in optimizer steps: weight updates
            (batches, unless gradients are accumulated).
        num_snapshots: Number of cycles `M`, between 1 and `total_steps`.
        gradient_accumulation_steps: The optimizer's
            `gradient_accumulation_steps`, if set (an integer >= 2): the
            schedule then counts weight updates (batch // k), as
            `optimizer.iterations` does.
        name: Optional name of the schedule.

    Example:

    ```python
    schedule = keras_snapshot.SnapshotSchedule(
        initial_learning_rate=0.1, total_steps=1000, num_snapshots=5
    )
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)
    schedule.cycle_end_steps  # [200, 400, 600, 800, 1000]
    ```
    """

    def __init__(
        self,
        initial_learning_rate: float,
        total_steps: int,
        num_snapshots: int,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
    ):
        super().__init__()
        self.initial_learning_rate = check_positive_number(
            "initial_learning_rate", initial_learning_rate
        )
        self.total_steps = check_positive_int("total_steps", total_steps)
        self.num_snapshots = check_positive_int("num_snapshots", num_snapshots)
        if self.num_snapshots > self.total_steps:
            raise ValueError(
                "`num_snapshots` must be between 1 and `total_steps` "
                f"({self.total_steps}); train longer or take fewer snapshots. "
                f"Received: num_snapshots={num_snapshots}."
            )
        cycle = -(-self.total_steps // self.num_snapshots)
        if (self.num_snapshots - 1) * cycle >= self.total_steps:
            raise ValueError(
                f"Cycles of {cycle} steps end before cycle {self.num_snapshots}"
                " starts, so the last snapshot would repeat an earlier one; "
                "take fewer snapshots. Received: "
                f"total_steps={self.total_steps}, "
                f"num_snapshots={self.num_snapshots}."
            )
        self.gradient_accumulation_steps = check_accumulation_steps(
            gradient_accumulation_steps
        )
        self.name = name

    @classmethod
    def from_epochs(
        cls,
        initial_learning_rate: float,
        epochs: int,
        steps_per_epoch,
        num_snapshots: int,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
    ) -> "SnapshotSchedule":
        """Builds the schedule for `epochs` epochs of `steps_per_epoch` steps.

        A dataset's batches are counted with `count_batches`; only the
        resulting `total_steps` is kept.

        Args:
            initial_learning_rate: Rate at the start of every cycle.
            epochs: Number of epochs to train.
            steps_per_epoch: Batches per epoch: a positive int, or a finite
                `tf.data.Dataset` of batches (one epoch of it).
            num_snapshots: Number of cycles `M`.
            gradient_accumulation_steps: The optimizer's
                `gradient_accumulation_steps`, if set.
            name: Optional name of the schedule.

        Returns:
            A `SnapshotSchedule` with `total_steps = epochs *
            steps_per_epoch // (gradient_accumulation_steps or 1)`.

        Example:

        ```python
        # 50k images, batch 64 -> 782 steps per epoch; 200 epochs, M=5.
        schedule = SnapshotSchedule.from_epochs(0.2, 200, 782, 5)
        schedule.total_steps  # 156400
        ```
        """
        epochs = check_positive_int("epochs", epochs)
        steps_per_epoch = resolve_steps_per_epoch(steps_per_epoch)
        accumulation = check_accumulation_steps(gradient_accumulation_steps)
        return cls(
            initial_learning_rate,
            total_steps=epochs * steps_per_epoch // (accumulation or 1),
            num_snapshots=num_snapshots,
            gradient_accumulation_steps=accumulation,
            name=name,
        )

    @property
    def cycle_length(self) -> int:
        """Steps per cycle, `ceil(total_steps / num_snapshots)`."""
        return -(-self.total_steps // self.num_snapshots)

    @property
    def cycle_end_steps(self) -> list[int]:
        """Step counts after which snapshots 1..M are taken.

        Snapshot `k` is taken once `min(k * cycle_length, total_steps)`
        optimizer steps have run, at the minimum of the learning rate.
        """
        c = self.cycle_length
        return [
            min(k * c, self.total_steps)
            for k in range(1, self.num_snapshots + 1)
        ]

    def cycle_of_step(self, step: int) -> int:
        """The 1-based cycle that optimizer step `step` (from 0) belongs to."""
        return int(step) // self.cycle_length + 1

    def __call__(self, step):
        with keras.name_scope(self.name or "SnapshotSchedule"):
            dtype = "float32"
            cycle_length = self.cycle_length
            # int32, not int64: JAX without x64 has no int64 (it warns and
            # truncates every step) and TPUs emulate 64-bit integers.
            step = ops.cast(step, "int32")
            if self.gradient_accumulation_steps:
                step = ops.floor_divide(step, self.gradient_accumulation_steps)
            position = ops.mod(step, cycle_length)
            fraction = ops.cast(position, dtype) / float(cycle_length)
            cosine = ops.cos(ops.multiply(math.pi, fraction))
            return (
                ops.cast(self.initial_learning_rate, dtype)
                / 2.0
                * (cosine + 1.0)
            )

    def get_config(self) -> dict:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "total_steps": self.total_steps,
            "num_snapshots": self.num_snapshots,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "name": self.name,
        }

    def __repr__(self) -> str:
        return (
            f"SnapshotSchedule(initial_learning_rate="
            f"{self.initial_learning_rate}, total_steps={self.total_steps}, "
            f"num_snapshots={self.num_snapshots}"
            + (
                f", gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps})"
                if self.gradient_accumulation_steps
                else ")"
            )
        )


def restart_steps(schedule, total_steps: int) -> list[int]:
    """Steps after which a `CosineDecayRestarts` schedule restarts.

    The k-th SGDR restart (Loshchilov & Hutter 2017) comes after
    `first_decay_steps * (1 + t_mul + ... + t_mul**(k-1))` steps, rounded up
    as Keras does; returns those up to and including `total_steps`.

    Example:

    ```python
    sgdr = keras.optimizers.schedules.CosineDecayRestarts(0.1, 100, t_mul=2.0)
    restart_steps(sgdr, 700)  # [100, 300, 700]
    ```
    """
    config = schedule.get_config()
    first, t_mul = float(config["first_decay_steps"]), float(config["t_mul"])
    total_steps = check_positive_int("total_steps", total_steps)
    steps, boundary, length = [], 0.0, first
    while True:
        boundary += length
        step = math.ceil(boundary - 1e-9)
        if step > total_steps:
            return steps
        steps.append(step)
        length *= t_mul
