"""Which cheap ensemble should I use? Every method, same data and budget.

On the bundled Fashion-MNIST subset (`fashion_mnist_small`: 900 training,
100 validation, 5000 test images), the same CNN and the same budget of
`--epochs` epochs, for each seed: a single model (one cosine decay), the
snapshot ensemble (best last m on validation), SGDR snapshots (t_mul=2),
FGE, SWA of the snapshots and of the FGE snapshots (+ BatchNorm
recalibration), running SWA, the distilled student of the best 1x
ensemble, and true ensembles of 2 and 4 independently trained models. The
recipes are those of `keras-snapshot train --method ...`
(`keras_snapshot.app.methods`).

    python benchmarks/methods.py            # 3 seeds, about 20 min on 2 CPUs
    python benchmarks/methods.py --seeds 1 --epochs 2   # smoke test

Writes benchmarks/results/methods.md and methods.json.
"""

import argparse
import os
import shutil
import tempfile
import time

import common

NAME = "methods"
ROWS = (
    # name, training budget (x one model), one-model predictor
    ("single model", 1, True),
    ("snapshot ensemble (best last m)", 1, False),
    ("SGDR-growth snapshots (t_mul=2)", 1, False),
    ("FGE", 1, False),
    ("SWA of snapshots (+BN)", 1, True),
    ("SWA of FGE snapshots (+BN)", 1, True),
    ("running SWA (+BN)", 1, True),
    ("distilled student of best 1x ensemble", 2, True),
    ("true ensemble of 2", 2, False),
    ("true ensemble of 4", 4, False),
)
ONE_X_ENSEMBLES = ROWS[1][0], ROWS[2][0], ROWS[3][0]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--snapshots", type=int, default=3)
    parser.add_argument("--widths", default="8,16,32")
    parser.add_argument("--out", default=common.RESULTS)
    return parser.parse_args(argv)


def member_probs(models, x):
    from keras_snapshot import selection

    return selection.predict_members(models, x)


def scores(probs_list, y, seconds, extra_seconds=0.0):
    """Error/NLL/ECE of the members' mean, their disagreement, the time."""
    import numpy as np

    from keras_snapshot import metrics

    probs = np.asarray(probs_list)
    result = metrics.evaluate_predictions(probs.mean(axis=0), y)
    disagreement = None
    if len(probs) > 1:
        matrix = metrics.pairwise_disagreement(probs)
        disagreement = float(matrix[~np.eye(len(probs), dtype=bool)].mean())
    result.update(
        disagreement=disagreement,
        members=len(probs),
        train_seconds=seconds + extra_seconds,
    )
    return result


def run_seed(seed, args, data, workdir):
    """Trains every method once; returns `{row name: scores}`."""
    import keras
    import numpy as np

    from keras_snapshot import SnapshotCheckpoint
    from keras_snapshot import StochasticWeightAveraging
    from keras_snapshot import average_weights
    from keras_snapshot import distill
    from keras_snapshot import load_snapshots
    from keras_snapshot import selection
    from keras_snapshot.app import methods

    widths = tuple(int(w) for w in args.widths.split(","))
    steps = common.steps_per_epoch(len(data["x_train"]), args.batch_size)
    x_val, y_val = data["x_val"], data["y_val"]
    x_test, y_test = data["x_test"], data["y_test"]
    recal = data["x_train"]
    base = dict(widths=widths, weight_decay=args.weight_decay)

    def train(method=None, seed_offset=0, callbacks=()):
        schedule = None
        if method is not None:
            schedule = methods.optimizer_schedule(
                methods.plan(
                    method, args.lr, args.epochs, steps, args.snapshots
                )
            )
        return common.train_run(
            "cosine",
            args.lr,
            data,
            args.epochs,
            args.batch_size,
            seed * 100 + seed_offset,
            schedule=schedule,
            callbacks=callbacks,
            **base,
        )

    out = {}
    # Independent models: the single model and the true ensembles.
    singles, seconds = [], []
    for k in range(4):
        model, secs = train(seed_offset=k)
        singles.append(model)
        seconds.append(secs)
    test_single = member_probs(singles, x_test)
    out["single model"] = scores(test_single[:1], y_test, seconds[0])
    out["true ensemble of 2"] = scores(
        test_single[:2], y_test, sum(seconds[:2])
    )
    out["true ensemble of 4"] = scores(test_single, y_test, sum(seconds))

    # Snapshot methods: members in a folder each.
    ensembles = {}
    for method, row in zip(("snapshot", "sgdr", "fge"), ONE_X_ENSEMBLES):
        folder = os.path.join(workdir, f"{method}_{seed}")
        _, secs = train(
            method, callbacks=[SnapshotCheckpoint(folder, verbose=0)]
        )
        members = load_snapshots(folder)
        val = member_probs(members, x_val)
        test = member_probs(members, x_test)
        m = len(members)
        if method == "snapshot":
            m, _ = selection.best_last_m(val, y_val)
        result = scores(test[-m:], y_test, secs)
        result["val_error"] = float(
            np.mean(val[-m:].mean(axis=0).argmax(-1) != y_val)
        )
        out[row] = result
        ensembles[row] = (folder, members[-m:], secs)

    # SWA of snapshots: one averaged model, BatchNorm recalibrated.
    for row, source in (
        ("SWA of snapshots (+BN)", ONE_X_ENSEMBLES[0]),
        ("SWA of FGE snapshots (+BN)", ONE_X_ENSEMBLES[2]),
    ):
        folder, _, secs = ensembles[source]
        started = time.perf_counter()
        averaged = average_weights(folder, recalibration_data=recal)
        extra = time.perf_counter() - started
        out[row] = scores(member_probs([averaged], x_test), y_test, secs, extra)

    # Running SWA during training.
    swa_plan = methods.plan("swa", args.lr, args.epochs, steps, args.snapshots)
    swa = StochasticWeightAveraging(
        start_epoch=swa_plan.swa_start_epoch,
        recalibration_data=recal,
        verbose=0,
    )
    _, secs = train("swa", callbacks=[swa])
    started = time.perf_counter()
    averaged = swa.averaged_model()
    extra = time.perf_counter() - started
    out["running SWA (+BN)"] = scores(
        member_probs([averaged], x_test), y_test, secs, extra
    )

    # The distilled student of the best 1x ensemble (chosen on validation).
    best = min(ONE_X_ENSEMBLES, key=lambda r: out[r]["val_error"])
    _, teacher, teacher_secs = ensembles[best]
    keras.utils.set_random_seed(seed * 100 + 7)
    optimizer = keras.optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(args.lr, args.epochs * steps),
        momentum=0.9,
        weight_decay=args.weight_decay,
    )
    started = time.perf_counter()
    student = distill(
        teacher,
        data=(data["x_train"], data["y_train"]),
        temperature=4.0,
        alpha=0.1,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=optimizer,
        verbose=0,
    )
    distill_secs = time.perf_counter() - started
    out["distilled student of best 1x ensemble"] = scores(
        member_probs([student], x_test), y_test, teacher_secs, distill_secs
    )
    out["distilled student of best 1x ensemble"]["teacher"] = best
    return out, singles, ensembles


def inference_costs(singles, ensembles, x):
    """Seconds to predict `x`, relative to one model, for 1..4 members."""
    from keras_snapshot import build_ensemble

    members = {
        1: build_ensemble(singles[:1]),
        2: build_ensemble(singles[:2]),
        3: build_ensemble(singles[:3]),
        4: build_ensemble(singles),
    }
    fns = {
        k: (lambda m=m: m.predict(x, batch_size=256, verbose=0))
        for k, m in members.items()
    }
    best, _ = common.time_interleaved(fns, reps=3)
    return {k: best[k] / best[1] for k in best}, best[1]


def summarize(per_seed, costs, args):
    rows = {}
    for name, budget, one_model in ROWS:
        values = [s[name] for s in per_seed]
        members = values[0]["members"]
        rows[name] = {
            "budget": budget,
            "one_model": one_model,
            "members": members,
            "error": common.mean_std([v["error"] for v in values]),
            "nll": common.mean_std([v["nll"] for v in values]),
            "ece": common.mean_std([v["ece"] for v in values]),
            "disagreement": (
                None
                if values[0]["disagreement"] is None
                else common.mean_std([v["disagreement"] for v in values])
            ),
            "train_seconds": common.mean_std(
                [v["train_seconds"] for v in values]
            ),
            "inference_relative": costs[1 if one_model else members],
        }
    single = rows["single model"]["error"]["mean"]
    true4 = rows["true ensemble of 4"]["error"]["mean"]
    one_x = [n for n, b, _ in ROWS if b == 1 and n != "single model"]
    goal_a = {}
    for name in one_x:
        err = rows[name]["error"]["mean"]
        goal_a[name] = {
            "relative_reduction": (single - err) / single,
            "gap_closed": (single - err) / (single - true4)
            if single > true4
            else None,
        }
    met_a = [
        n
        for n, g in goal_a.items()
        if g["relative_reduction"] >= 0.10 or (g["gap_closed"] or 0) >= 0.5
    ]
    best_ens = min(
        (n for n in one_x if not rows[n]["one_model"]),
        key=lambda n: rows[n]["error"]["mean"],
    )
    reduction = single - rows[best_ens]["error"]["mean"]
    goal_b = {}
    for name in (n for n, _, one in ROWS if one and n != "single model"):
        kept = (
            (single - rows[name]["error"]["mean"]) / reduction
            if reduction > 0
            else None
        )
        goal_b[name] = kept
    met_b = [n for n, k in goal_b.items() if k is not None and k >= 0.5]
    return rows, {
        "a": {"per_method": goal_a, "met_by": met_a},
        "b": {
            "best_ensemble": best_ens,
            "best_ensemble_reduction": reduction,
            "kept_per_predictor": goal_b,
            "met_by": met_b,
        },
    }


def recommendation(rows, goals) -> str:
    one_x = [n for n, b, _ in ROWS if b == 1 and n != "single model"]
    best_1x = min(one_x, key=lambda n: rows[n]["error"]["mean"])
    one_model = [n for n in one_x if rows[n]["one_model"]]
    best_one = min(one_model, key=lambda n: rows[n]["error"]["mean"])
    single = rows["single model"]["error"]["mean"]
    lines = [
        f"Lowest test error at 1x training budget: **{best_1x}** "
        f"({100 * rows[best_1x]['error']['mean']:.2f}% vs "
        f"{100 * single:.2f}% for the single model, "
        f"{rows[best_1x]['inference_relative']:.1f}x inference).",
        f"Best one-model predictor at 1x training and 1x inference: "
        f"**{best_one}** ({100 * rows[best_one]['error']['mean']:.2f}%).",
    ]
    if rows[best_1x]["error"]["mean"] < single:
        lines.append(
            f"Default: `--method "
            f"{_cli_method(best_1x)}` when M-times inference is affordable;"
            f" `{_cli_method(best_one)}` when serving must cost one model."
        )
    else:
        lines.append(
            "Default: no 1x method beat the single model here; keep the "
            "single model and spend more budget on true ensembles."
        )
    return "\n".join(lines)


def _cli_method(row: str) -> str:
    for key, method in (
        ("FGE", "fge"),
        ("SGDR", "sgdr"),
        ("running SWA", "swa"),
        ("snapshot ensemble", "snapshot"),
    ):
        if row.startswith(key) or key in row:
            return method
    return row


def markdown(rows, goals, args, hardware, seconds, sizes) -> str:
    header = [
        "method",
        "test error %",
        "NLL",
        "ECE %",
        "disagreement %",
        "training budget",
        "training wall s",
        "inference cost",
    ]
    table = []
    for name, row in rows.items():
        dis = row["disagreement"]
        table.append(
            [
                f"{name} ({row['members']} model"
                f"{'s' if row['members'] > 1 else ''})",
                common.pct(row["error"]),
                f"{row['nll']['mean']:.3f}",
                common.pct(row["ece"]),
                "-" if dis is None else common.pct(dis),
                f"{row['budget']}x",
                f"{row['train_seconds']['mean']:.0f}",
                f"{row['inference_relative']:.2f}x",
            ]
        )
    a, b = goals["a"], goals["b"]
    goal_lines = [
        "## Goals",
        "",
        "(a) A 1x-budget method cuts test error by >= 10% relative, or "
        "closes >= 50% of the gap to the true ensemble of 4:",
        "",
    ]
    for name, g in a["per_method"].items():
        gap = g["gap_closed"]
        goal_lines.append(
            f"- {name}: {100 * g['relative_reduction']:+.1f}% relative, "
            + ("gap n/a" if gap is None else f"{100 * gap:.0f}% of the gap")
        )
    goal_lines += [
        "",
        f"**(a) {'met' if a['met_by'] else 'not met'}**"
        + (f" by {', '.join(a['met_by'])}." if a["met_by"] else "."),
        "",
        f"(b) A one-model predictor keeps >= 50% of the best 1x ensemble's "
        f"error reduction ({b['best_ensemble']}, "
        f"{100 * b['best_ensemble_reduction']:.2f} points):",
        "",
    ]
    for name, kept in b["kept_per_predictor"].items():
        goal_lines.append(
            f"- {name}: "
            + ("n/a" if kept is None else f"keeps {100 * kept:.0f}%")
        )
    goal_lines += [
        "",
        f"**(b) {'met' if b['met_by'] else 'not met'}**"
        + (f" by {', '.join(b['met_by'])}." if b["met_by"] else "."),
    ]
    return "\n".join(
        [
            "# Which cheap ensemble should I use?",
            "",
            f"`python benchmarks/methods.py --seeds {args.seeds} --epochs "
            f"{args.epochs}`: Fashion-MNIST subset (`fashion_mnist_small`, "
            f"{sizes['train']} train / {sizes['val']} validation / "
            f"{sizes['test']} test), CNN widths "
            f"{args.widths} (Conv-BN-ReLU-MaxPool blocks, `bench_cnn`), "
            f"{args.epochs} epochs of batch {args.batch_size}, SGD momentum "
            f"0.9, lr {args.lr}, weight decay {args.weight_decay}, "
            f"{args.snapshots} snapshots/cycles per method, mean ± std over "
            f"{args.seeds} seeds. {hardware['cpu_count']} CPUs shared "
            f"(load {hardware['load_average']:.1f}); the whole run took "
            f"{seconds / 60:.1f} min. Training wall time includes BN "
            "recalibration and, for the student, the teacher's training "
            "plus distillation's own. Inference cost: measured predict "
            "time over the test set relative to one model. "
            + common.WEIGHT_DECAY_NOTE,
            "",
            common.md_table(header, table),
            "",
            *goal_lines,
            "",
            "## Recommendation",
            "",
            recommendation(rows, goals),
            "",
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    from keras_snapshot.app.datasets import load_dataset

    started = time.perf_counter()
    loaded = load_dataset(
        "fashion_mnist_small", validation_fraction=0.1, seed=0
    )
    data = {
        k: getattr(loaded, k)
        for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    }
    hardware = common.hardware()
    workdir = tempfile.mkdtemp(prefix="methods_bench_")
    per_seed, costs = [], None
    try:
        for seed in range(args.seeds):
            out, singles, ensembles = run_seed(seed, args, data, workdir)
            per_seed.append(out)
            if costs is None:
                costs, one_seconds = inference_costs(
                    singles, ensembles, data["x_test"]
                )
            print(
                f"seed {seed} done after "
                f"{(time.perf_counter() - started) / 60:.1f} min",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - started
    rows, goals = summarize(per_seed, costs, args)
    sizes = {k: len(data[f"y_{k}"]) for k in ("train", "val", "test")}
    md = markdown(rows, goals, args, hardware, seconds, sizes)
    common.write_results(
        args.out,
        NAME,
        {
            "settings": vars(args),
            "hardware": hardware,
            "wall_seconds": seconds,
            "one_model_predict_seconds": one_seconds,
            "rows": rows,
            "goals": goals,
            "per_seed": per_seed,
        },
        md,
    )
    print(md)


if __name__ == "__main__":
    main()
