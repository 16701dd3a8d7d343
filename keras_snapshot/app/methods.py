"""The cheap-ensemble methods of `keras-snapshot train --method`.

One `MethodPlan` per method, on the same budget and model:

- `snapshot`: M cosine cycles, a snapshot at each end (Huang et al. 2017).
- `sgdr`: `CosineDecayRestarts` with `t_mul=2`, a snapshot per restart.
- `fge`: a normal phase down to `lr / 2`, then M short cycles between
  `lr / 2` and `lr / 200`, a snapshot at each minimum (Garipov et al. 2018).
- `swa`: cosine to `lr / 10` over 75% of the epochs, then constant, the
  weights averaged each final epoch (Izmailov et al. 2018).
"""

import math
import os

METHODS = ("snapshot", "fge", "swa", "sgdr")
SWA_FILE = "swa.keras"

FGE_ALPHA1 = 0.5  # alpha1 = lr / 2 (Garipov et al.: 0.05 for lr 0.1).
FGE_ALPHA2 = 0.005  # alpha2 = lr / 200 (0.0005 for lr 0.1).
FGE_CYCLE_EPOCHS = 2  # The paper's cycles are 2 to 4 epochs.
SWA_RATE = 0.1  # The constant rate of SWA's final phase, lr / 10.
SWA_START = 0.75  # SWA's final phase: the last 25% of the epochs.


class MethodPlan:
    """A method's learning rate and snapshot steps for one run.

    Args:
        method: One of `METHODS`.
        learning_rate: The Keras schedule given to the optimizer.
        total_steps: Optimizer steps of the run.
        cycle_end_steps: Steps after which the snapshots are taken.
        description: One line for the printed plan and the plots.
        swa_start_epoch: For `swa`: the first averaged epoch (1-based).
    """

    def __init__(
        self,
        method,
        learning_rate,
        total_steps,
        cycle_end_steps,
        description,
        swa_start_epoch=None,
    ):
        self.method = method
        self.learning_rate = learning_rate
        self.total_steps = total_steps
        self.cycle_end_steps = list(cycle_end_steps)
        self.num_snapshots = len(self.cycle_end_steps)
        self.description = description
        self.swa_start_epoch = swa_start_epoch

    def __call__(self, step):
        return self.learning_rate(step)

    def describe(self) -> str:
        return self.description


def plan(method, learning_rate, epochs, steps_per_epoch, num_snapshots):
    """The `MethodPlan` of `method` on a budget of `epochs` epochs.

    Raises:
        UsageError: when the budget is too small for the method's cycles.
    """
    import keras

    from keras_snapshot import SnapshotSchedule
    from keras_snapshot.app.run import UsageError
    from keras_snapshot.fge import FGESchedule
    from keras_snapshot.schedule import restart_steps

    total = epochs * steps_per_epoch
    if method == "snapshot":
        schedule = SnapshotSchedule.from_epochs(
            learning_rate, epochs, steps_per_epoch, num_snapshots
        )
        return schedule
    if method == "sgdr":
        first = total // (2**num_snapshots - 1)
        if first < 2:
            raise UsageError(
                f"--method sgdr with {num_snapshots} doubling cycles needs at"
                f" least {2 * (2**num_snapshots - 1)} steps; this budget has "
                f"{total}. Use fewer --snapshots or more --epochs."
            )
        schedule = keras.optimizers.schedules.CosineDecayRestarts(
            learning_rate, first, t_mul=2.0, m_mul=1.0, alpha=0.0
        )
        ends = restart_steps(schedule, total)[:num_snapshots]
        return MethodPlan(
            method,
            schedule,
            total,
            ends,
            f"SGDR (CosineDecayRestarts, t_mul=2): cycles of {first}, "
            f"{2 * first}, ... steps ({total} steps, {epochs} epochs), "
            f"snapshots after steps {ends}",
        )
    if method == "fge":
        cycle = min(
            FGE_CYCLE_EPOCHS * steps_per_epoch, total // (num_snapshots + 1)
        )
        cycle -= cycle % 2
        start = total - (num_snapshots - 1) * cycle - cycle // 2
        if cycle < 2 or start < cycle:
            raise UsageError(
                f"--method fge with {num_snapshots} cycles needs a normal "
                f"phase before them; this budget ({total} steps) is too "
                "small. Use fewer --snapshots or more --epochs."
            )
        schedule = FGESchedule(
            FGE_ALPHA1 * learning_rate,
            FGE_ALPHA2 * learning_rate,
            cycle,
            num_snapshots,
            start_step=start,
            initial_learning_rate=learning_rate,
        )
        return MethodPlan(
            method,
            schedule,
            total,
            schedule.cycle_end_steps,
            f"FGE: {start} normal steps, then {num_snapshots} cycles of "
            f"{cycle} steps ({total} steps, {epochs} epochs), snapshots "
            f"after steps {schedule.cycle_end_steps}",
        )
    if method == "swa":
        start_epoch = max(1, min(epochs - 1, math.floor(SWA_START * epochs)))
        if epochs < 2:
            raise UsageError(
                "--method swa averages the epochs of a final phase and needs "
                f"--epochs of at least 2. Received: --epochs {epochs}."
            )
        schedule = keras.optimizers.schedules.CosineDecay(
            learning_rate, start_epoch * steps_per_epoch, alpha=SWA_RATE
        )
        ends = [e * steps_per_epoch for e in range(start_epoch, epochs + 1)]
        return MethodPlan(
            method,
            schedule,
            total,
            ends,
            f"SWA: cosine to {SWA_RATE * learning_rate:g} over "
            f"{start_epoch} epochs, then constant; the weights averaged at "
            f"the end of epochs {start_epoch}..{epochs} ({total} steps)",
            swa_start_epoch=start_epoch,
        )
    raise UsageError(
        f"unknown method {method!r}: choose one of {', '.join(METHODS)}."
    )


def make_schedule(config: dict, data):
    """The run's plan from its settings (checked before anything is written).

    Raises:
        UsageError: when the settings do not make a schedule (e.g. more
            snapshots than steps).
    """
    from keras_snapshot.app import run as run_lib

    with run_lib.as_usage_error():
        return plan(
            config.get("method", "snapshot"),
            config["learning_rate"],
            config["epochs"],
            run_lib.steps_per_epoch(config, data),
            config["num_snapshots"],
        )


def optimizer_schedule(schedule):
    """The Keras schedule to compile with (a `MethodPlan` holds one)."""
    return getattr(schedule, "learning_rate", schedule)


def check_resume(config: dict) -> None:
    """Refuses to resume a run of another method in the same folder."""
    from keras_snapshot.app import run as run_lib

    path = os.path.join(config["output_dir"], run_lib.RUN_FILE)
    if not os.path.isfile(path):
        return
    old = run_lib.read_run(config["output_dir"])["config"]
    before = old.get("method", "snapshot")
    if before != config["method"]:
        raise run_lib.UsageError(
            f"{config['output_dir']} holds a run of --method {before}, not "
            f"{config['method']}. Use another --output-dir, or --overwrite "
            "to start over."
        )


def snapshot_kwargs(schedule) -> dict:
    """Extra `SnapshotCheckpoint` arguments: explicit steps for SWA.

    The other methods' cycle ends are read from the optimizer's schedule
    by `SnapshotCheckpoint` itself.
    """
    if getattr(schedule, "method", None) == "swa":
        return {"snapshot_steps": schedule.cycle_end_steps}
    return {}


def extra_callbacks(schedule, run_dir: str, recalibration) -> list:
    """The running SWA callback (`WeightAveraging`) of `swa` runs."""
    if getattr(schedule, "method", None) != "swa":
        return []
    from keras_snapshot.averaging import WeightAveraging

    return [
        WeightAveraging(
            mode="swa",
            average_batchnorm=True,
            start_epoch=schedule.swa_start_epoch,
            filepath=os.path.join(run_dir, SWA_FILE),
            recalibration_data=recalibration,
            verbose=0,
        )
    ]


def exported_members(config: dict, run_dir: str, snapshots, weights):
    """What to export: the SWA model alone for `swa`, else the snapshots."""
    if config.get("method", "snapshot") == "swa":
        return [os.path.join(run_dir, SWA_FILE)], None
    return snapshots, weights


def method_scores(config: dict, run_dir: str, data) -> dict:
    """Test scores of the one-model SWA predictor (`swa` runs only)."""
    if config.get("method", "snapshot") != "swa":
        return {}
    from keras_snapshot import metrics
    from keras_snapshot.app.evaluate import predict_models

    probs = predict_models(run_dir, data, {"swa": SWA_FILE}, ("test",))
    swa = probs["test"]["swa"]
    return {"swa": metrics.evaluate_predictions(swa, data.labels("test"))}
