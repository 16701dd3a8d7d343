"""Snapshot Ensembles + FreezeOut: a shared frozen trunk, measured.

Freezing is permanent and warm restarts are not, so FreezeOut's per-group
anneal does not combine with a cyclic schedule as it is. The combination
measured here (issue 14): the cyclic snapshot schedule of Huang et al. 2017
(arXiv:1704.00109) for every trainable layer, and at the end of a cycle (at
the snapshot, where the rate is ~0) the early stages of the network freeze
for good (FreezeOut, Brock et al. 2017, arXiv:1706.04983: `trainable =
False`, BatchNorm in inference mode, left out of the backward pass). Every
snapshot taken from then on shares that trunk bit for bit, so

- training gets faster (no backward pass through the trunk afterwards), and
- the ensemble of those snapshots runs the trunk once and only the heads
  once per member.

Variants (ResNet-8-style model, stages: stem+stage 1, stage 2, stage 3+head):

- `plain`: the snapshot ensemble, all layers train in every cycle;
- `half`: stem+stage 1 freezes at the end of cycle M/2;
- `progressive`: stem+stage 1 freezes at the end of cycle 1, stage 2 at the
  end of cycle 2.

For each: training wall time and steady-state time (tracing excluded, as in
`benchmarks/freezeout.py`), test error of the last-m snapshot ensembles,
and inference time of the ensemble that shares a trunk, run as one graph
of M full models (plain) against one graph of trunk + M heads (shared).

    python benchmarks/freezeout_snapshot.py            # a few minutes on CPU

Writes `benchmarks/results/freezeout_snapshot.{json,md}`.
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import RESULTS  # noqa: E402
from common import hardware  # noqa: E402
from common import md_table  # noqa: E402
from common import time_interleaved  # noqa: E402
from common import write_results  # noqa: E402
from freezeout import BatchTimer  # noqa: E402
from freezeout import steady_seconds  # noqa: E402

import keras_snapshot  # noqa: E402
from keras_snapshot.app.datasets import load_dataset  # noqa: E402
from keras_snapshot.app.models import resnet  # noqa: E402

CUTS = ("stage 1", "stage 2")
"""The trunks: the model up to the end of stage 1, or of stage 2."""


def cut_index(model, cut: int) -> int:
    """Index in `model.layers` of the ReLU that ends stage `cut + 1`."""
    adds = [
        i
        for i, layer in enumerate(model.layers)
        if isinstance(layer, keras.layers.Add)
    ]
    return adds[cut] + 1


def plans(num_snapshots: int) -> dict:
    """Variant -> {cycle after which to freeze: index of the cut}."""
    return {
        "plain": {},
        "half": {num_snapshots // 2: 0},
        "progressive": {1: 0, 2: 1},
    }


class TrunkFreezer(keras.callbacks.Callback):
    """Takes snapshots at cycle ends and freezes trunks per `plan`.

    Snapshots are kept in memory (`self.snapshots`, weight lists). At a
    cycle end listed in `plan`, the layers up to the cut get `trainable =
    False` and the train function is rebuilt (one retrace).
    """

    def __init__(self, schedule, plan):
        super().__init__()
        self.schedule = schedule
        self.plan = plan
        self.snapshots = []
        self.freeze_steps = []

    def on_train_begin(self, logs=None):
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        ends = self.schedule.cycle_end_steps
        if self.step not in ends:
            return
        cycle = ends.index(self.step) + 1
        self.snapshots.append(self.model.get_weights())
        if cycle in self.plan:
            last = cut_index(self.model, self.plan[cycle])
            for layer in self.model.layers[: last + 1]:
                layer.trainable = False
            self.model.make_train_function(force=True)
            self.freeze_steps.append(self.step)


def train(variant, data, args, seed):
    keras.utils.set_random_seed(seed)
    model = resnet(8, data["x_train"].shape[1:], 10)
    steps = math.ceil(len(data["x_train"]) / args.batch_size)
    schedule = keras_snapshot.SnapshotSchedule.from_epochs(
        args.lr, args.epochs, steps, args.snapshots
    )
    model.compile(
        keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True),
        "sparse_categorical_crossentropy",
    )
    timer = BatchTimer()
    freezer = TrunkFreezer(schedule, plans(args.snapshots)[variant])
    started = time.perf_counter()
    model.fit(
        data["x_train"],
        data["y_train"],
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
        callbacks=[timer, freezer],
    )
    wall = time.perf_counter() - started
    steady, _ = steady_seconds(timer.durations, [0] + freezer.freeze_steps)
    return model, freezer.snapshots, wall, steady


def members(snapshots, input_shape):
    out = []
    for weights in snapshots:
        model = resnet(8, input_shape, 10)
        model.set_weights(weights)
        out.append(model)
    return out


def shared_trunk(models, cut):
    """Trunk (shared, checked bit-identical) and one head per member."""
    trunk_layers = None
    heads = []
    for model in models:
        layers = model.layers[: cut_index(model, cut) + 1]
        if trunk_layers is None:
            trunk_layers = layers
        else:
            for a, b in zip(trunk_layers, layers):
                for wa, wb in zip(a.get_weights(), b.get_weights()):
                    if not np.array_equal(wa, wb):
                        raise AssertionError(f"trunk differs at {a.name}")
        cut_output = model.layers[cut_index(model, cut)].output
        heads.append(keras.Model(cut_output, model.output))
    first = models[0]
    trunk = keras.Model(first.input, first.layers[cut_index(first, cut)].output)
    return trunk, heads


def inference_times(models, trunk, heads, x, reps):
    x = tf.constant(x)

    @tf.function
    def plain(x):
        return tf.add_n([m(x, training=False) for m in models]) / len(models)

    @tf.function
    def shared(x):
        t = trunk(x, training=False)
        return tf.add_n([h(t, training=False) for h in heads]) / len(heads)

    a = plain(x).numpy()
    b = shared(x).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
    best, _ = time_interleaved(
        {
            "plain": lambda: plain(x).numpy(),
            "shared": lambda: shared(x).numpy(),
        },
        reps,
    )
    return best, a


def error(probs, y):
    return float(np.mean(probs.argmax(-1) != y))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion_mnist_small")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--snapshots", type=int, default=4)
    p.add_argument("--subset", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    full = load_dataset(args.dataset, validation_fraction=0.0, seed=0)
    rng = np.random.default_rng(0)
    train_idx = np.sort(rng.permutation(len(full.x_train))[: args.subset])
    data = {
        "x_train": full.x_train[train_idx],
        "y_train": full.y_train[train_idx],
        "x_test": full.x_test,
        "y_test": full.y_test,
    }
    shape = data["x_train"].shape[1:]
    runs = []
    for seed in range(args.seeds):
        for variant, plan in plans(args.snapshots).items():
            _, snapshots, wall, steady = train(variant, data, args, seed)
            models = members(snapshots, shape)
            probs = np.stack(
                [m.predict(data["x_test"], verbose=0) for m in models]
            )
            last_m = [
                error(probs[-m:].mean(0), data["y_test"])
                for m in range(1, len(models) + 1)
            ]
            # The members that share the deepest-frozen trunk, and that
            # trunk; for `plain`, all members and no sharing.
            sharing, cut = len(models), None
            best = {"plain": None, "shared": None}
            if plan:
                deepest = max(plan, key=lambda c: plan[c])
                cut = plan[deepest]
                sharing = len(models) - deepest + 1
                share = models[-sharing:]
                trunk, heads = shared_trunk(share, cut)
                best, _ = inference_times(
                    share, trunk, heads, data["x_test"][:1000], args.reps
                )
            run = {
                "variant": variant,
                "seed": seed,
                "wall_seconds": wall,
                "steady_seconds": steady,
                "last_m_error": last_m,
                "sharing_members": sharing,
                "cut": None if cut is None else CUTS[cut],
                "inference_plain_s": best["plain"],
                "inference_shared_s": best["shared"],
            }
            print(run, flush=True)
            runs.append(run)
    rows = summarize(runs, args)
    text = markdown(rows, args)
    print(text)
    write_results(
        RESULTS,
        "freezeout_snapshot",
        {"args": vars(args), "hardware": hardware(), "runs": runs},
        text,
    )


def summarize(runs, args):
    rows = []
    base = [r for r in runs if r["variant"] == "plain"]
    base_wall = np.mean([r["wall_seconds"] for r in base])
    base_steady = np.mean([r["steady_seconds"] for r in base])
    for variant in plans(args.snapshots):
        rs = [r for r in runs if r["variant"] == variant]
        errs = np.array([r["last_m_error"] for r in rs])
        k = rs[0]["sharing_members"]
        row = {
            "variant": variant,
            "error_all": errs[:, -1].mean(),
            "error_all_std": errs[:, -1].std(),
            "error_sharing": errs[:, k - 1].mean(),
            "error_single": errs[:, 0].mean(),
            "sharing_members": k,
            "cut": rs[0]["cut"],
            "wall": np.mean([r["wall_seconds"] for r in rs]),
            "wall_saving": 1
            - np.mean([r["wall_seconds"] for r in rs]) / base_wall,
            "steady_saving": 1
            - np.mean([r["steady_seconds"] for r in rs]) / base_steady,
        }
        if rs[0]["inference_shared_s"] is not None:
            row["inference_saving"] = 1 - np.mean(
                [r["inference_shared_s"] / r["inference_plain_s"] for r in rs]
            )
        rows.append(row)
    return rows


def markdown(rows, args):
    table = md_table(
        [
            "variant",
            "error % (all M)",
            "members sharing a trunk",
            "error % (those)",
            "error % (last snapshot)",
            "train wall s",
            "wall saving",
            "steady-state saving",
            "inference saving (shared trunk)",
        ],
        [
            [
                r["variant"],
                f"{100 * r['error_all']:.2f} ± {100 * r['error_all_std']:.2f}",
                "-"
                if r["cut"] is None
                else f"{r['sharing_members']} (up to {r['cut']})",
                f"{100 * r['error_sharing']:.2f}",
                f"{100 * r['error_single']:.2f}",
                f"{r['wall']:.1f}",
                f"{100 * r['wall_saving']:.0f}%",
                f"{100 * r['steady_saving']:.0f}%",
                "-"
                if "inference_saving" not in r
                else f"{100 * r['inference_saving']:.0f}%",
            ]
            for r in rows
        ],
    )
    return (
        f"ResNet-8-style, `{args.dataset}` ({args.subset} training images, "
        f"all test images), {args.epochs} epochs, M={args.snapshots} "
        f"snapshots, batch {args.batch_size}, SGD Nesterov lr0={args.lr}, "
        f"seeds {args.seeds} (means). Errors of last-m snapshot ensembles. "
        "Inference saving: one graph of trunk + heads against one graph "
        "of the same members as full models, 1000 test images, best of "
        f"{args.reps}.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
