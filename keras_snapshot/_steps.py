"""The optimizer's real update count, for every step-driven callback.

A step is what `optimizer.iterations` says, never "epoch start + batch
index": gradient accumulation, skipped loss-scaling updates and
`steps_per_execution` all make batches and updates differ. `StepTracker`
reads it once per epoch, and in a batch hook only when the next due step
may have been reached, so Keras's asynchronous dispatch stays on.
"""

import weakref

from keras_snapshot import _keras_compat
from keras_snapshot._keras_compat import innermost_optimizer
from keras_snapshot._keras_compat import learning_rate_schedule


def accumulation_steps(optimizer) -> int:
    """Batches per weight update: `gradient_accumulation_steps`, or 1."""
    return int(
        getattr(
            innermost_optimizer(optimizer), "gradient_accumulation_steps", None
        )
        or 1
    )


def optimizer_updates(model) -> int:
    """The weight updates the optimizer has applied (a device read)."""
    return _keras_compat.optimizer_iterations(model.optimizer)


def check_schedule_counts_updates(owner: str, optimizer) -> None:
    """Refuses gradient accumulation with a schedule that counts batches.

    Keras calls the schedule with the batch count; `SnapshotSchedule` and
    `FGESchedule` built with the same `gradient_accumulation_steps` count
    updates instead.
    """
    steps = accumulation_steps(optimizer)
    schedule = learning_rate_schedule(optimizer)
    if schedule is None:
        return  # A constant rate: nothing to count.
    if not hasattr(schedule, "gradient_accumulation_steps"):
        if steps > 1:
            raise ValueError(
                f"{owner} counts optimizer updates, but Keras calls the "
                f"{type(schedule).__name__} schedule with the batch count; use "
                "SnapshotSchedule or FGESchedule with "
                f"gradient_accumulation_steps={steps}. "
                f"Received: gradient_accumulation_steps={steps}."
            )
        return
    counted = schedule.gradient_accumulation_steps or 1
    if counted != steps:
        expected = steps if steps > 1 else None
        raise ValueError(
            f"The optimizer updates every {steps} batch(es), but its "
            f"{type(schedule).__name__} counts one update per {counted} "
            "batch(es); build the schedule with gradient_accumulation_steps="
            f"{expected}. Received: schedule gradient_accumulation_steps="
            f"{schedule.gradient_accumulation_steps}."
        )


_FIT_CALLBACKS = weakref.WeakSet()
"""This package's callbacks that have joined a `fit` (`join_fit`)."""


def join_fit(callback) -> None:
    """Introduces `callback` to this package's other callbacks in its `fit`.

    Call it from `set_params`: Keras hands every callback of one `fit` the
    same `params` dict, so that dict names the fit. A callback with a
    `check_fit_peer(other)` method may refuse the other there.
    """
    params = callback.params
    peers = [
        c
        for c in list(_FIT_CALLBACKS)
        if c is not callback and c.params is params
    ]
    for first, second in [(p, callback) for p in peers] + [
        (callback, p) for p in peers
    ]:
        check = getattr(first, "check_fit_peer", None)
        if check is not None:
            check(second)
    _FIT_CALLBACKS.add(callback)


class StepTracker:
    """What every step-driven callback asks about the steps of its `fit`.

    Call `attach` in `on_train_begin`, `epoch_begin` in `on_epoch_begin`
    (`starts_fit` is True at the fit's first epoch, after `BackupAndRestore`
    restored the step: plan there), `poll(batch, due)` in
    `on_train_batch_begin` and `epoch_end` in `on_epoch_end`.

    Args:
        callback: The callback it serves. Its `model` is read through the
            callback: on JAX, `Callback.model` first writes the running
            training state back into the variables.

    Example:

    ```python
    tracker = StepTracker(callback)      # in the callback's __init__
    tracker.attach()                     # in on_train_begin
    step = tracker.epoch_begin()         # in on_epoch_begin
    step = tracker.poll(batch, due=400)  # in on_train_batch_begin
    ```
    """

    def __init__(self, callback):
        self.callback = callback
        self.steps_per_execution = 1
        self.accumulation = 1
        self.epoch_steps = None
        self._step = 0  # The last real step read ...
        self._batch = 0  # ... at this batch offset of the epoch.

    def attach(self) -> None:
        """Reads the training mode of the `fit` that begins."""
        _keras_compat.check_backend()
        model, params = self.callback.model, self.callback.params
        self.steps_per_execution = int(
            getattr(model, "steps_per_execution", 1) or 1
        )
        self.accumulation = accumulation_steps(model.optimizer)
        self.epoch_steps = (params or {}).get("steps")
        self.epochs = (params or {}).get("epochs")
        self._step, self._batch = 0, 0
        self.fit_start_step = None  # Set by the fit's first epoch_begin.
        self.starts_fit = False
        self.fit_epochs = 0  # Epochs this fit has ended.

    def read(self) -> int:
        """The real step now (a device read)."""
        return optimizer_updates(self.callback.model)

    def epoch_begin(self) -> int:
        """The real step at the start of an epoch; at the fit's first, also
        `fit_start_step` (and `starts_fit` is True until the next)."""
        self._step, self._batch = self.read(), 0
        self.starts_fit = self.fit_start_step is None
        if self.starts_fit:
            self.fit_start_step = self._step
        return self._step

    def epoch_end(self) -> None:
        self.fit_epochs += 1

    def fit_updates(self, epoch: int = 0) -> int | None:
        """Updates this fit runs from the start of epoch `epoch` (Keras's
        index, `initial_epoch` counted) to its end; None when the epoch
        length is unknown."""
        if not self.epochs or not self.epoch_steps:
            return None
        return (self.epochs - epoch) * self.epoch_steps // self.accumulation

    def updates_run(self) -> int | None:
        """Updates the ended epochs of this fit ran (none skipped)."""
        if not self.epoch_steps:
            return None
        return self.fit_epochs * self.epoch_steps // self.accumulation

    def refuse_unreachable(
        self, start_step: int, due_steps, epoch: int, what: str, fix: str
    ) -> None:
        """Refuses the `due_steps` that no hook of this fit sees exactly
        (`unreachable`); `what` names them ("the snapshots"), `fix` says
        what to change."""
        epochs_left = (self.epochs or 0) - epoch
        missed = self.unreachable(start_step, due_steps, epochs_left)
        if missed:
            shown = missed[:5] + (["..."] if len(missed) > 5 else [])
            raise ValueError(
                f"With steps_per_execution={self.steps_per_execution}, Keras "
                "calls back only every N batches of each epoch "
                f"({self.epoch_steps} batches), so {what} due at steps "
                f"{shown} cannot be taken at their step. {fix}"
            )

    def poll(self, batch: int, due) -> int | None:
        """The real step at `on_train_batch_begin(batch)`, if it may be `due`.

        Each batch applies at most one update (one per
        `gradient_accumulation_steps` batches), so until the bound reaches
        `due` no read is needed. Once read, the bound starts again from the
        real step: skipped updates (loss scaling) only delay the next read.
        """
        if due is None:
            return None
        batches = batch - self._batch
        bound = self._step + -(-batches // self.accumulation)
        if bound < due:
            return None
        self._step, self._batch = self.read(), batch
        return self._step

    def unreachable(self, start_step: int, due_steps, epochs_left) -> list:
        """The due steps no batch hook of this `fit` can see exactly.

        Hooks run at batch offsets 0, N, 2N, ... of each epoch and at its
        end (N = `steps_per_execution`); step `s` is seen if one falls in
        batches `[s*k, s*k + k - 1]` (k = `gradient_accumulation_steps`).
        Empty when N = 1 or the epoch length is unknown.
        """
        n, k = self.steps_per_execution, self.accumulation
        length = self.epoch_steps
        if n == 1 or not length:
            return []
        first = start_step * k  # The batch count at this fit's start.
        end = first + epochs_left * length
        missed = []
        for step in due_steps:
            if step * k > end:
                continue  # Past this fit: not a question of hooks.
            batches = range(
                max(step * k, first), min(step * k + k - 1, end) + 1
            )
            if not any(_has_hook(b - first, n, length) for b in batches):
                missed.append(step)
        return missed


def _has_hook(offset: int, n: int, length: int) -> bool:
    """Whether a batch hook runs `offset` batches into the fit: at offsets
    0, n, 2n, ... of each epoch of `length` batches, and at its end."""
    return (offset % length) % n == 0
