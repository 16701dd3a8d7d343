"""FreezeOut benchmark: test error and training wall time vs normal training.

Normal training is SGD with Nesterov momentum and a cosine-annealed rate
(`keras.optimizers.schedules.CosineDecay`, the schedule FreezeOut anneals
per group); FreezeOut (Brock et al. 2017, arXiv:1706.04983) runs the same
optimizer at a constant `lr0` with `keras_snapshot.freezeout.FreezeOut`,
over `t0`, the three scalings, scaled and unscaled. Data: a fixed random
subset of Fashion-MNIST (`--dataset`, by default the subset bundled with
the package, `fashion_mnist_small`). Models: the ResNet-style and
DenseNet-style networks of `keras_snapshot.app.models`. Wall time is that of
the whole `fit` call, first trace and FreezeOut's retraces included.

Two times are reported per run: the wall time of `fit` (first trace and
FreezeOut's retraces included, what a user waits for), and the steady-state
training time: the sum of the per-batch times with each batch that traced a
train function (the first one, and the first one after each freeze) counted
at the time of the batch after it. Their difference for FreezeOut, minus
that of normal training, is the retracing cost, reported per retrace. On
short CPU runs the retraces can cost more than freezing saves; the
steady-state time shows the saving that longer runs approach.

    python benchmarks/freezeout.py --quick            # minutes, on a CPU
    python benchmarks/freezeout.py                    # the results table

Writes `benchmarks/results/freezeout[_quick].{json,md}` and the per-group
learning rates of the paper's Figure 1 (`freezeout_rates.png`).
"""

import argparse
import gc
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import RESULTS  # noqa: E402
from common import hardware  # noqa: E402
from common import md_table  # noqa: E402
from common import write_results  # noqa: E402

from keras_snapshot.app.datasets import load_dataset  # noqa: E402
from keras_snapshot.app.models import densenet  # noqa: E402
from keras_snapshot.app.models import resnet  # noqa: E402
from keras_snapshot.freezeout import DEFAULT_GROUPS  # noqa: E402
from keras_snapshot.freezeout import FreezeOut  # noqa: E402
from keras_snapshot.freezeout import estimate_speedup  # noqa: E402
from keras_snapshot.freezeout import freeze_fractions  # noqa: E402
from keras_snapshot.freezeout import group_rate_factor  # noqa: E402
from keras_snapshot.freezeout import resolve_groups  # noqa: E402

SHAPE = (28, 28, 1)


def build_model(name: str) -> keras.Model:
    """`resnetD` (D = 6n + 2) or `densenetD` (D = 3L + 4, k = 12)."""
    if name.startswith("resnet"):
        return resnet(int(name[6:]), SHAPE, 10)
    if name.startswith("densenet"):
        return densenet(int(name[8:]), 12, SHAPE, 10)
    raise ValueError(f"Unknown model {name!r}. Received: model={name!r}")


def load_data(args) -> dict:
    data = load_dataset(args.dataset, validation_fraction=0.0, seed=0)
    rng = np.random.default_rng(0)
    train = np.sort(rng.permutation(len(data.x_train))[: args.subset])
    test = np.arange(len(data.x_test))[: args.test_size or None]
    return {
        "x_train": data.x_train[train],
        "y_train": data.y_train[train],
        "x_test": data.x_test[test],
        "y_test": data.y_test[test],
    }


def configs(args, model_name: str) -> list:
    """`None` (normal training), then one dict per FreezeOut setting.

    Models in `--grid-models` run every `--t0` x `--scalings` x (scaled,
    unscaled) setting; every model runs the `--extra` shortlist.
    """
    out = [None]
    if model_name in args.grid_models:
        for t0 in args.t0:
            for scaling in args.scalings:
                for scale_lr in (True, False) if args.unscaled else (True,):
                    out.append(
                        {"t0": t0, "scaling": scaling, "scale_lr": scale_lr}
                    )
    for text in args.extra:
        t0, scaling, kind = text.split(":")
        config = {
            "t0": float(t0),
            "scaling": scaling,
            "scale_lr": kind == "scaled",
        }
        if config not in out:
            out.append(config)
    return out


def label(config) -> str:
    if config is None:
        return "normal (cosine)"
    kind = "scaled" if config["scale_lr"] else "unscaled"
    return f"t0={config['t0']} {config['scaling']} {kind}"


class BatchTimer(keras.callbacks.Callback):
    """Wall time of every training batch, `durations[step]`."""

    def on_train_begin(self, logs=None):
        self.durations = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.durations.append(time.perf_counter() - self._start)


def steady_seconds(durations, trace_steps) -> tuple[float, float]:
    """`(steady-state seconds, seconds spent tracing)` of one run.

    Each batch in `trace_steps` (it built a new train function) counts at
    the time of the batch after it; the difference is tracing.
    """
    durations = list(durations)
    traced = 0.0
    for step in sorted(set(trace_steps)):
        if step + 1 < len(durations):
            traced += durations[step] - durations[step + 1]
            durations[step] = durations[step + 1]
    return float(sum(durations)), float(traced)


def run_one(model_name, config, data, args, seed) -> dict:
    # Free the earlier runs' models and traced graphs first: otherwise the
    # process grows, and Python's garbage collector pauses (seconds) land
    # at random in the timed `fit` calls.
    keras.backend.clear_session(free_memory=True)
    gc.collect()
    keras.utils.set_random_seed(seed)
    model = build_model(model_name)
    steps = args.epochs * math.ceil(len(data["x_train"]) / args.batch_size)
    timer = BatchTimer()
    callbacks = [timer]
    if config is None:
        rate = keras.optimizers.schedules.CosineDecay(args.lr, steps)
    else:
        rate = args.lr
        freeze = FreezeOut(
            **config, groups=args.groups, total_steps=steps, verbose=0
        )
        callbacks.append(freeze)
    model.compile(
        keras.optimizers.SGD(rate, momentum=0.9, nesterov=True),
        "sparse_categorical_crossentropy",
    )
    start = time.perf_counter()
    model.fit(
        data["x_train"],
        data["y_train"],
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
        callbacks=callbacks,
    )
    seconds = time.perf_counter() - start
    trace_steps = [0]
    if config is not None:
        trace_steps += [step for step, _ in freeze.freeze_events]
    steady, traced = steady_seconds(timer.durations, trace_steps)
    pred = model.predict(data["x_test"], batch_size=1000, verbose=0)
    result = {
        "model": model_name,
        "config": label(config),
        "seed": seed,
        "test_error": float(np.mean(pred.argmax(-1) != data["y_test"])),
        "seconds": seconds,
        "steady_seconds": steady,
        "trace_seconds": traced,
        "steps": steps,
    }
    if config is not None:
        result["freeze_events"] = len(freeze.freeze_events)
        result["groups"] = len(freeze.groups_)
        result["estimated_saving"] = estimate_speedup(
            model, args.groups, config["t0"], config["scaling"]
        )
    return result


GOAL_SAVING = 0.2
"""The paper's envelope: this much less wall time ..."""
GOAL_RELATIVE_ERROR = 0.03
"""... within this relative change of normal training's test error."""


def steps_to_wall_saving(
    goal, steps, base_steady, steady, base_trace, trace
) -> float | None:
    """Run length (steps) at which the wall-time saving reaches `goal`.

    A projection from one run's measurements: a run of `S` steps costs
    its tracing seconds once plus `S` times its steady-state seconds per
    step, so the saving `1 - (trace + S * p) / (base_trace + S * p_base)`
    grows with `S` towards the steady-state saving `1 - p / p_base`.
    Returns `None` when that limit is below `goal` (never reached), and
    `steps` or fewer when this run already reached it.

    Example: `steps_to_wall_saving(0.2, 100, 50.0, 35.0, 5.0, 12.0)`
    is 160 steps (0.5 s per normal step, 0.35 s with freezing).
    """
    per_step_base = base_steady / steps
    per_step = steady / steps
    margin = (1 - goal) * per_step_base - per_step
    if margin <= 0:
        return None
    return float(max(0.0, (trace - (1 - goal) * base_trace) / margin))


def warm_up(data, args) -> None:
    """One tiny untimed FreezeOut run of each model, so that no timed run
    pays for the process's first `fit` (TensorFlow's start-up costs)."""
    small = {key: value[:256] for key, value in data.items()}
    quick = argparse.Namespace(**{**vars(args), "epochs": 1})
    for model_name in args.models:
        config = {"t0": 0.5, "scaling": "linear", "scale_lr": True}
        run_one(model_name, config, small, quick, seed=0)


def summarize(results, args) -> list:
    rows = []
    for model_name in args.models:
        by_config = {}
        for r in results:
            if r["model"] == model_name:
                by_config.setdefault(r["config"], []).append(r)
        base = by_config[label(None)]
        base_err = np.mean([r["test_error"] for r in base])
        base_sec = np.mean([r["seconds"] for r in base])
        base_steady = np.mean([r["steady_seconds"] for r in base])
        base_trace = np.mean([r["trace_seconds"] for r in base])
        base_err_of_seed = {r["seed"]: r["test_error"] for r in base}
        for name, runs in by_config.items():
            err = [r["test_error"] for r in runs]
            # The change against normal training of the same seed (same
            # initial weights and batches), one value per seed.
            paired = [
                (r["test_error"] - base_err_of_seed[r["seed"]])
                / base_err_of_seed[r["seed"]]
                for r in runs
                if r["seed"] in base_err_of_seed
            ]
            sec = np.mean([r["seconds"] for r in runs])
            steady = np.mean([r["steady_seconds"] for r in runs])
            events = runs[0].get("freeze_events") or 0
            retrace = None
            if events:
                extra = np.mean([r["trace_seconds"] for r in runs]) - base_trace
                retrace = float(extra / events)
            steps = runs[0]["steps"]
            rows.append(
                {
                    "model": model_name,
                    "config": name,
                    "steps": steps,
                    "steps_to_goal": steps_to_wall_saving(
                        GOAL_SAVING,
                        steps,
                        base_steady,
                        steady,
                        base_trace,
                        np.mean([r["trace_seconds"] for r in runs]),
                    ),
                    "seeds": len(runs),
                    "test_error": float(np.mean(err)),
                    "test_error_std": float(np.std(err)),
                    "seconds": float(sec),
                    "time_ratio": float(sec / base_sec),
                    "steady_seconds": float(steady),
                    "steady_ratio": float(steady / base_steady),
                    "seconds_per_retrace": retrace,
                    "relative_error_change": float(
                        (np.mean(err) - base_err) / base_err
                    ),
                    "paired_relative_change_std": float(np.std(paired)),
                    "estimated_saving": runs[0].get("estimated_saving"),
                    "freeze_events": runs[0].get("freeze_events"),
                }
            )
    return rows


def meets_goal(row) -> bool:
    """Whether a setting saved >= 20% wall time within 3% relative error."""
    return (
        1 - row["time_ratio"] >= GOAL_SAVING
        and row["relative_error_change"] <= GOAL_RELATIVE_ERROR
    )


def best_point(rows) -> dict | None:
    """The FreezeOut setting with the largest wall-time saving among those
    within the error envelope (`None` if no setting stays within it)."""
    within = [
        r
        for r in rows
        if r["freeze_events"]
        and r["relative_error_change"] <= GOAL_RELATIVE_ERROR
    ]
    return max(within, key=lambda r: 1 - r["time_ratio"], default=None)


def markdown(rows, args, sizes) -> str:
    table = md_table(
        [
            "model",
            "setting",
            "test error %",
            "rel. error change (± std of seed pairs)",
            "wall s",
            "wall saving",
            "steady-state s",
            "steady-state saving",
            "estimated saving",
            "retraces",
            "s per retrace",
            "steps to 20% wall saving (projected)",
            "goal met",
        ],
        [
            [
                r["model"],
                r["config"],
                f"{100 * r['test_error']:.2f} "
                f"± {100 * r['test_error_std']:.2f}",
                f"{100 * r['relative_error_change']:+.1f}% "
                f"± {100 * r['paired_relative_change_std']:.1f}",
                f"{r['seconds']:.1f}",
                f"{100 * (1 - r['time_ratio']):.0f}%",
                f"{r['steady_seconds']:.1f}",
                f"{100 * (1 - r['steady_ratio']):.0f}%",
                "-"
                if r["estimated_saving"] is None
                else f"{100 * r['estimated_saving']:.0f}%",
                "-" if r["freeze_events"] is None else r["freeze_events"],
                "-"
                if r["seconds_per_retrace"] is None
                else f"{r['seconds_per_retrace']:.1f}",
                "-"
                if not r["freeze_events"]
                else "never"
                if r["steps_to_goal"] is None
                else f"{r['steps_to_goal']:.0f}",
                "-"
                if not r["freeze_events"]
                else "yes"
                if meets_goal(r)
                else "no",
            ]
            for r in rows
        ],
    )
    groups = (
        "one per weighted layer" if args.groups == "layers" else args.groups
    )
    lines = [
        f"`{args.dataset}`, {sizes['train']} training / {sizes['test']} test "
        f"images, {args.epochs} epochs of batch {args.batch_size} "
        f"({rows[0]['steps']} steps), SGD Nesterov lr0={args.lr}, groups: "
        f"{groups}, seeds {args.seeds} (error: mean ± std over seeds; times: "
        "means). Wall: `fit` with the first trace and FreezeOut's retraces; "
        "steady-state: the per-batch times with each tracing batch counted "
        "at the time of the next batch. Savings are against normal "
        "training of the same model. Steps to 20% wall saving: the run "
        "length at which this setting's measured tracing cost and time per "
        "step would give 20% less wall time (a projection; `never` when the "
        "steady-state saving is below 20%). Goal: >= 20% less wall time "
        "within +3% relative test error. Machine: "
        f"{hardware()['cpu']}, {os.cpu_count()} cores.",
        "",
        table,
    ]
    for model_name in dict.fromkeys(r["model"] for r in rows):
        best = best_point([r for r in rows if r["model"] == model_name])
        if best is None:
            closest = min(
                (
                    r
                    for r in rows
                    if r["model"] == model_name and r["freeze_events"]
                ),
                key=lambda r: r["relative_error_change"],
            )
            lines.append(
                f"- {model_name}: no FreezeOut setting stayed within +3% "
                f"relative error; the closest, {closest['config']}, had "
                f"{100 * closest['relative_error_change']:+.1f}% error for "
                f"{100 * (1 - closest['time_ratio']):.0f}% wall / "
                f"{100 * (1 - closest['steady_ratio']):.0f}% steady-state "
                "saving."
            )
        else:
            lines.append(
                f"- {model_name}: best point within +3% relative error: "
                f"{best['config']}, {100 * (1 - best['time_ratio']):.0f}% "
                f"wall / {100 * (1 - best['steady_ratio']):.0f}% steady-state "
                f"saving, {100 * best['relative_error_change']:+.1f}% error "
                f"({'goal met' if meets_goal(best) else 'goal not met'})."
            )
    return "\n".join(lines) + "\n"


def groups_table(rows, args) -> str:
    """Estimated saving with FreezeOut's default groups vs one per layer.

    No training: `estimate_speedup` of each model and setting run, with
    `groups=None` (at most `DEFAULT_GROUPS` merged groups) and `"layers"`.
    """
    table = []
    for row in rows:
        if not row["freeze_events"]:
            continue
        t0, scaling = row["config"].split()[:2]
        t0 = float(t0.removeprefix("t0="))
        model = build_model(row["model"])
        per_layer = resolve_groups(model, "layers")
        table.append(
            [
                row["model"],
                f"t0={t0} {scaling}",
                f"{100 * estimate_speedup(model, None, t0, scaling):.0f}%",
                f"{100 * estimate_speedup(model, 'layers', t0, scaling):.0f}%",
                f"{len(per_layer) - 1}",
            ]
        )
    unique = list({tuple(r): r for r in table}.values())
    return (
        f"Estimated saving of training FLOPs with FreezeOut's default groups "
        f"(at most {DEFAULT_GROUPS}, so at most {DEFAULT_GROUPS - 1} "
        "retraces) against one group per weighted layer (no training):\n\n"
        + md_table(
            [
                "model",
                "setting",
                f"default groups (<= {DEFAULT_GROUPS})",
                "one group per layer",
                "freeze steps (retraces) per layer, at most",
            ],
            unique,
        )
        + "\n"
    )


def plot_group_rates(
    path: str,
    num_groups: int = 5,
    t0: float = 0.8,
    scaling: str = "cubic",
    scale_lr: bool = True,
    total_steps: int = 1000,
) -> str:
    """Writes the per-group learning rates over training (paper, Fig. 1).

    Uses matplotlib's object-oriented API (`Figure`), so it sets no global
    state. Returns `path`.
    """
    from matplotlib.figure import Figure

    steps = np.arange(total_steps)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for i, fraction in enumerate(freeze_fractions(num_groups, t0, scaling)):
        factor = keras.ops.convert_to_numpy(
            group_rate_factor(steps, fraction, total_steps, scale_lr)
        )
        ax.plot(steps / total_steps, factor, label=f"group {i}")
    kind = "scaled" if scale_lr else "unscaled"
    ax.set_title(f"FreezeOut rates, t0={t0}, {scaling}, {kind}")
    ax.set_xlabel("fraction of training t / T")
    ax.set_ylabel("lr_i(t) / lr0")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def results_from_log(path, args) -> list:
    """The runs printed in a log of this script (one line per run).

    For a run cut short (e.g. by a time limit) before it wrote its files.
    The time spent tracing is taken as wall minus steady-state time, the
    estimated saving and number of freezes are recomputed (no training).
    """
    import re

    from keras_snapshot.freezeout import freeze_steps

    pattern = re.compile(
        r"^(\S+) (.+) seed (\d+): error ([\d.]+)%, ([\d.]+) s "
        r"\(steady ([\d.]+) s\)$"
    )
    size = len(load_data(args)["x_train"])
    steps = args.epochs * math.ceil(size / args.batch_size)
    by_label = {
        label(c): c for name in args.models for c in configs(args, name)
    }
    results = []
    with open(path) as f:
        for line in f:
            match = pattern.match(line.strip())
            if not match:
                continue
            name, setting, seed, err, wall, steady = match.groups()
            result = {
                "model": name,
                "config": setting,
                "seed": int(seed),
                "test_error": float(err) / 100,
                "seconds": float(wall),
                "steady_seconds": float(steady),
                "trace_seconds": float(wall) - float(steady),
                "steps": steps,
            }
            config = by_label[setting]
            if config is not None:
                model = build_model(name)
                groups = resolve_groups(model, args.groups)
                fractions = freeze_fractions(
                    len(groups), config["t0"], config["scaling"]
                )
                result["freeze_events"] = len(
                    set(freeze_steps(fractions, steps)[:-1])
                )
                result["groups"] = len(groups)
                result["estimated_saving"] = estimate_speedup(
                    model, args.groups, config["t0"], config["scaling"]
                )
            results.append(result)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke setting")
    p.add_argument(
        "--dataset",
        default="fashion_mnist_local",
        help="Debian's Fashion-MNIST files (apt-get install -y "
        "dataset-fashion-mnist); fashion_mnist_small needs no install",
    )
    p.add_argument(
        "--models", nargs="+", default=["resnet20", "densenet16", "resnet56"]
    )
    p.add_argument(
        "--grid-models",
        nargs="*",
        default=["resnet20"],
        help="models that run the whole t0 x scalings x (un)scaled grid; "
        "the others run normal training and the --extra settings",
    )
    p.add_argument("--t0", type=float, nargs="+", default=[0.5, 0.8])
    p.add_argument(
        "--scalings", nargs="+", default=["linear", "squared", "cubic"]
    )
    p.add_argument(
        "--extra",
        nargs="*",
        default=["0.8:cubic:scaled", "0.5:linear:unscaled"],
        help="settings every model runs, as t0:scaling:scaled|unscaled "
        "(the paper's two defaults)",
    )
    p.add_argument("--no-unscaled", dest="unscaled", action="store_false")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="run seeds first-seed .. first-seed + seeds - 1 (to add seeds "
        "to a log: append its lines and use --from-log)",
    )
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--subset", type=int, default=2048)
    p.add_argument("--test-size", type=int, default=2000, help="0: all")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument(
        "--groups",
        type=int,
        default=4,
        help="merge the weighted layers into this many groups, i.e. this "
        "many minus one retraces (4 is FreezeOut's default; 0: one group "
        "per weighted layer)",
    )
    p.add_argument("--name", default="freezeout", help="result file prefix")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="write the tables again from the runs in NAME.json, without "
        "training",
    )
    p.add_argument(
        "--from-log",
        help="write the results of the runs printed in this log of an "
        "interrupted run of the same settings, without training",
    )
    args = p.parse_args(argv)
    args.groups = args.groups or "layers"
    if args.quick:
        args.dataset = "fashion_mnist_small"
        args.models, args.grid_models = ["resnet8", "densenet7"], ["resnet8"]
        args.t0, args.scalings, args.unscaled = [0.8], ["cubic"], False
        args.seeds, args.epochs, args.extra = 1, 3, ["0.5:linear:unscaled"]
        args.subset, args.test_size = 1024, 2000
        args.name = "freezeout_quick"
    return args


def main(argv=None):
    args = parse_args(argv)
    data = load_data(args)
    results = []
    if args.from_log:
        results = results_from_log(args.from_log, args)
    elif args.render_only:
        with open(os.path.join(RESULTS, f"{args.name}.json")) as f:
            results = json.load(f)["runs"]
    else:
        warm_up(data, args)
    if results:
        args.models = list(dict.fromkeys(r["model"] for r in results))
    for model_name in args.models if not results else []:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for config in configs(args, model_name):
                r = run_one(model_name, config, data, args, seed)
                print(
                    f"{model_name} {r['config']} seed {seed}: error "
                    f"{100 * r['test_error']:.2f}%, {r['seconds']:.1f} s "
                    f"(steady {r['steady_seconds']:.1f} s)",
                    flush=True,
                )
                results.append(r)
    rows = summarize(results, args)
    sizes = {"train": len(data["x_train"]), "test": len(data["x_test"])}
    text = markdown(rows, args, sizes) + "\n" + groups_table(rows, args)
    print(text)
    write_results(
        RESULTS,
        args.name,
        {
            "args": vars(args),
            "hardware": hardware(),
            "runs": results,
            "rows": rows,
        },
        text,
    )
    print(plot_group_rates(os.path.join(RESULTS, "freezeout_rates.png")))


if __name__ == "__main__":
    main()
