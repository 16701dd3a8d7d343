"""Which cheap ensemble should I use? Every method, same data and budget.

From scratch, on the bundled Fashion-MNIST subset (`fashion_mnist_small`:
900 training, 100 validation, 5000 test images), the same CNN and the same
budget of `--epochs` epochs, for each seed: a single model (one cosine
decay), its EMA (`WeightAveraging(mode="ema", warmup=True)`, BatchNorm
recalibrated), the snapshot ensemble (best last m on validation), SGDR
snapshots (t_mul=2), FGE, the uniform soup of the snapshots (=
`average_weights`, i.e. SWA of the snapshots) and of the FGE snapshots,
the greedy soup of the snapshots (`average_weights(method="greedy")` on
the validation split; Wortsman et al. 2022), running SWA, the distilled
student of the best 1x ensemble, and true ensembles of 2 and 4
independently trained models. The recipes are those of `keras-snapshot
train --method ...` (`keras_snapshot.app.methods`).

Fine-tuning (`--scenario finetune`, or with `all`): for each seed, the CNN
is pretrained on classes 0-4 (the training and the test images of those
classes: task A), then fine-tuned with a fresh 5-class head on classes 5-9
(relabelled 0-4; their training and validation images: task B), tested on
the test images of classes 5-9, which pretraining never saw. Same
fine-tuning budget (`--epochs`) for every row: plain fine-tuning (one
cosine decay of `--finetune-lr`, by default `--lr` / 10), and `--snapshots`
short `SnapshotSchedule` cycles from the pretrained point restarting at
that same small rate, giving the last snapshot, the snapshot ensemble and
the uniform and greedy soups of the snapshots.

    python benchmarks/methods.py            # 3 seeds, about 20 min on 2 CPUs
    python benchmarks/methods.py --seeds 1 --epochs 4   # smoke test
    python benchmarks/methods.py --scenario finetune    # fine-tuning only

Writes benchmarks/results/methods.md and methods.json
(`methods_finetune.*` with `--scenario finetune`).
"""

import argparse
import os
import shutil
import tempfile
import time

import common

NAME = "methods"
SCENARIOS = ("all", "scratch", "finetune")
UNIFORM_SOUP = "uniform soup of snapshots (= SWA of snapshots, +BN)"
UNIFORM_SOUP_FGE = "uniform soup of FGE snapshots (+BN)"
GREEDY_SOUP = "greedy soup of snapshots (+BN)"
EMA = "EMA of the single model (+BN)"
ROWS = (
    # name, training budget (x one model), one-model predictor
    ("single model", 1, True),
    (EMA, 1, True),
    ("snapshot ensemble (best last m)", 1, False),
    ("SGDR-growth snapshots (t_mul=2)", 1, False),
    ("FGE", 1, False),
    (UNIFORM_SOUP, 1, True),
    (GREEDY_SOUP, 1, True),
    (UNIFORM_SOUP_FGE, 1, True),
    ("running SWA (+BN)", 1, True),
    ("distilled student of best 1x ensemble", 2, True),
    ("true ensemble of 2", 2, False),
    ("true ensemble of 4", 4, False),
)
ONE_X_ENSEMBLES = ROWS[2][0], ROWS[3][0], ROWS[4][0]
FT_PLAIN = "plain fine-tuning (one cosine decay)"
FT_ROWS = (
    # name, one-model predictor
    (FT_PLAIN, True),
    ("last snapshot", True),
    ("snapshot ensemble (all snapshots)", False),
    ("uniform soup of the snapshots (+BN)", True),
    ("greedy soup of the snapshots (+BN)", True),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--snapshots", type=int, default=3)
    parser.add_argument("--widths", default="8,16,32")
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=0.99,
        help="EMA decay per optimizer step (with warm-up)",
    )
    parser.add_argument(
        "--soup-metric",
        choices=("nll", "error"),
        default="nll",
        help="validation metric of the greedy soup (nll: finer on the "
        "small validation split)",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="all",
        help="from scratch, fine-tuning a pretrained model, or both",
    )
    parser.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help="peak and restart rate of fine-tuning (default: --lr / 10)",
    )
    parser.add_argument("--out", default=common.RESULTS)
    parser.add_argument(
        "--name",
        default=None,
        help="stem of the result files in --out (default: methods, or "
        "methods_finetune with --scenario finetune)",
    )
    args = parser.parse_args(argv)
    if args.finetune_lr is None:
        args.finetune_lr = args.lr / 10
    return args


def command_line(args) -> str:
    """The command that reproduces `args` (the options not at default)."""
    defaults = vars(parse_args([]))
    options = [
        f"--{key.replace('_', '-')} {value}"
        for key, value in vars(args).items()
        if key != "out" and value != defaults[key]
    ]
    return " ".join(["python benchmarks/methods.py", *options])


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
        matrix = metrics.diversity(probs)["disagreement"]
        disagreement = float(matrix[~np.eye(len(probs), dtype=bool)].mean())
    result.update(
        disagreement=disagreement,
        members=len(probs),
        train_seconds=seconds + extra_seconds,
    )
    return result


def soup_scores(folder, validation, recal, metric, x_test, y_test, seconds):
    """Scores of the greedy soup of `folder`'s snapshots, with `kept`."""
    from keras_snapshot import average_weights

    started = time.perf_counter()
    soup = average_weights(
        folder,
        method="greedy",
        validation_data=validation,
        metric=metric,
        recalibration_data=recal,
    )
    extra = time.perf_counter() - started
    result = scores(member_probs([soup], x_test), y_test, seconds, extra)
    result["kept"] = [int(k) for k in soup.soup_members]
    return result


def run_seed(seed, args, data, workdir):
    """Trains every method once; returns `{row name: scores}`."""
    import keras
    import numpy as np

    from keras_snapshot import SnapshotCheckpoint
    from keras_snapshot import WeightAveraging
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

    # EMA of the single model: the same seed, so the same trajectory.
    ema = WeightAveraging(
        mode="ema",
        decay=args.ema_decay,
        warmup=True,
        recalibration_data=recal,
        verbose=0,
    )
    _, secs = train(callbacks=[ema])
    started = time.perf_counter()
    averaged = ema.averaged_model()
    extra = time.perf_counter() - started
    out[EMA] = scores(member_probs([averaged], x_test), y_test, secs, extra)

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

    # Soups of the snapshots: one averaged model, BatchNorm recalibrated.
    for row, source in (
        (UNIFORM_SOUP, ONE_X_ENSEMBLES[0]),
        (UNIFORM_SOUP_FGE, ONE_X_ENSEMBLES[2]),
    ):
        folder, _, secs = ensembles[source]
        started = time.perf_counter()
        averaged = average_weights(folder, recalibration_data=recal)
        extra = time.perf_counter() - started
        out[row] = scores(member_probs([averaged], x_test), y_test, secs, extra)
    folder, _, secs = ensembles[ONE_X_ENSEMBLES[0]]
    out[GREEDY_SOUP] = soup_scores(
        folder, (x_val, y_val), recal, args.soup_metric, x_test, y_test, secs
    )

    # Running SWA during training.
    swa_plan = methods.plan("swa", args.lr, args.epochs, steps, args.snapshots)
    swa = WeightAveraging(
        mode="swa",
        average_batchnorm=True,
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


def split_tasks(data) -> tuple[dict, dict]:
    """Task A (classes 0-4, to pretrain) and task B (5-9, relabelled 0-4).

    Task A takes every image of classes 0-4 (training, validation and
    test splits); task B keeps the splits of classes 5-9, so its test
    images are seen neither in pretraining nor in fine-tuning.
    """
    import numpy as np

    splits = ("train", "val", "test")
    task_a = {
        "x_train": np.concatenate(
            [data[f"x_{k}"][data[f"y_{k}"] < 5] for k in splits]
        ),
        "y_train": np.concatenate(
            [data[f"y_{k}"][data[f"y_{k}"] < 5] for k in splits]
        ),
    }
    task_b = {}
    for k in splits:
        new = data[f"y_{k}"] >= 5
        task_b[f"x_{k}"] = data[f"x_{k}"][new]
        task_b[f"y_{k}"] = data[f"y_{k}"][new] - 5
    return task_a, task_b


def pretrain_epochs(args) -> int:
    return max(2, args.epochs // 2)


def run_finetune_seed(seed, args, task_a, task_b, workdir):
    """Pretrains on task A, fine-tunes on task B every way; scores."""
    import keras

    from keras_snapshot import SnapshotCheckpoint
    from keras_snapshot import average_weights
    from keras_snapshot import load_snapshots

    widths = tuple(int(w) for w in args.widths.split(","))
    base = dict(weight_decay=args.weight_decay)
    pretrained, pretrain_secs = common.train_run(
        "cosine",
        args.lr,
        task_a,
        pretrain_epochs(args),
        args.batch_size,
        seed * 100 + 50,
        model=common.bench_cnn(widths, num_classes=5),
        **base,
    )

    def from_pretrained():
        """The pretrained backbone under a fresh (seeded) 5-class head."""
        keras.utils.set_random_seed(seed * 100 + 51)
        model = common.bench_cnn(widths, num_classes=5)
        for new, old in zip(model.layers[:-1], pretrained.layers[:-1]):
            new.set_weights(old.get_weights())
        return model

    def fine_tune(kind, callbacks=()):
        return common.train_run(
            kind,
            args.finetune_lr,
            task_b,
            args.epochs,
            args.batch_size,
            seed * 100 + 52,
            num_snapshots=args.snapshots,
            model=from_pretrained(),
            callbacks=callbacks,
            **base,
        )

    x_val, y_val = task_b["x_val"], task_b["y_val"]
    x_test, y_test = task_b["x_test"], task_b["y_test"]
    recal = task_b["x_train"]
    rows = [name for name, _ in FT_ROWS]
    out = {}
    plain, secs = fine_tune("cosine")
    out[rows[0]] = scores(member_probs([plain], x_test), y_test, secs)

    folder = os.path.join(workdir, f"finetune_{seed}")
    _, secs = fine_tune("snapshot", [SnapshotCheckpoint(folder, verbose=0)])
    members = load_snapshots(folder)
    test = member_probs(members, x_test)
    out[rows[1]] = scores(test[-1:], y_test, secs)
    out[rows[2]] = scores(test, y_test, secs)
    started = time.perf_counter()
    uniform = average_weights(folder, recalibration_data=recal)
    extra = time.perf_counter() - started
    out[rows[3]] = scores(member_probs([uniform], x_test), y_test, secs, extra)
    out[rows[4]] = soup_scores(
        folder, (x_val, y_val), recal, args.soup_metric, x_test, y_test, secs
    )
    out["pretrain_seconds"] = pretrain_secs
    return out, [plain, *members]


def inference_costs(models, x, largest):
    """Seconds to predict `x`, relative to one model, for 1..`largest`
    members (the first `k` of `models`, of one architecture)."""
    from keras_snapshot import build_ensemble

    members = {
        k: build_ensemble(models[:k])
        for k in range(1, min(largest, len(models)) + 1)
    }
    fns = {
        k: (lambda m=m: m.predict(x, batch_size=256, verbose=0))
        for k, m in members.items()
    }
    best, _ = common.time_interleaved(fns, reps=3)
    return {k: best[k] / best[1] for k in best}, best[1]


def row_summary(values, budget, one_model, costs) -> dict:
    """Mean ± std over the seeds of one row's `scores`."""
    members = values[0]["members"]
    row = {
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
        "train_seconds": common.mean_std([v["train_seconds"] for v in values]),
        "inference_relative": costs.get(1 if one_model else members),
    }
    if "kept" in values[0]:
        row["kept"] = [v["kept"] for v in values]
    return row


def summarize_finetune(per_seed, costs) -> dict:
    rows = {
        name: row_summary([s[name] for s in per_seed], 1, one_model, costs)
        for name, one_model in FT_ROWS
    }
    return {
        "rows": rows,
        "pretrain_seconds": common.mean_std(
            [s["pretrain_seconds"] for s in per_seed]
        ),
    }


def summarize(per_seed, costs, args):
    rows = {
        name: row_summary([s[name] for s in per_seed], budget, one, costs)
        for name, budget, one in ROWS
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
    if best_1x == best_one and rows[best_1x]["error"]["mean"] < single:
        lines.append(
            f"Default: {_recipe(best_1x)}: the lowest error and one model "
            "to serve."
        )
    elif rows[best_1x]["error"]["mean"] < single:
        lines.append(
            f"Default: {_recipe(best_1x)} when M-times inference is "
            f"affordable; {_recipe(best_one)} when serving must cost one "
            "model."
        )
    else:
        lines.append(
            "Default: no 1x method beat the single model here; keep the "
            "single model and spend more budget on true ensembles."
        )
    return "\n".join(lines)


def _recipe(row: str) -> str:
    """How to get a row's predictor with the package."""
    for key, recipe in (
        ("EMA", '`WeightAveraging(mode="ema", warmup=True)`'),
        (
            "greedy soup",
            "`--method snapshot`, then `average_weights(method='greedy')`",
        ),
        ("uniform soup of FGE", "`--method fge`, then `average_weights`"),
        ("uniform soup", "`--method snapshot`, then `average_weights`"),
        ("FGE", "`--method fge`"),
        ("SGDR", "`--method sgdr`"),
        ("running SWA", "`--method swa`"),
        ("snapshot ensemble", "`--method snapshot`"),
        ("distilled", "`keras-snapshot distill`"),
    ):
        if key in row:
            return recipe
    return row


HEADER = [
    "method",
    "test error %",
    "NLL",
    "ECE %",
    "disagreement %",
    "training budget",
    "training wall s",
    "inference cost",
]


def table(rows) -> str:
    """The Markdown table of summarized rows (`row_summary`)."""
    cells = []
    for name, row in rows.items():
        dis, cost = row["disagreement"], row["inference_relative"]
        cells.append(
            [
                f"{name} ({row['members']} model"
                f"{'s' if row['members'] > 1 else ''})",
                common.pct(row["error"]),
                f"{row['nll']['mean']:.3f}",
                common.pct(row["ece"]),
                "-" if dis is None else common.pct(dis),
                f"{row['budget']}x",
                f"{row['train_seconds']['mean']:.0f}",
                "-" if cost is None else f"{cost:.2f}x",
            ]
        )
    return common.md_table(HEADER, cells)


def kept_line(row, name) -> str:
    return (
        f"Greedy soup members kept (snapshot indices, oldest 0, per seed) "
        f"for the {name}: " + "; ".join(str(k) for k in row["kept"]) + "."
    )


def scratch_markdown(rows, goals, args, sizes) -> list:
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
    return [
        "## From scratch",
        "",
        f"Fashion-MNIST subset (`fashion_mnist_small`, {sizes['train']} "
        f"train / {sizes['val']} validation / {sizes['test']} test). "
        "Training wall time includes BN recalibration (and the greedy "
        "soup's search) and, for the student, the teacher's training plus "
        "distillation's own. The EMA is taken over every optimizer step "
        f"of the single model's run (decay {args.ema_decay}, TensorFlow's "
        "warm-up `min(decay, (1 + n) / (10 + n))`). The uniform soup "
        "averages all the snapshots of the snapshot run (`average_weights`,"
        " the same as SWA of the snapshots); the greedy soup "
        "(`average_weights(method='greedy')`, metric "
        f"{args.soup_metric} on the validation "
        "split) adds a snapshot only if the validation score does not get "
        "worse.",
        "",
        table(rows),
        "",
        kept_line(rows[GREEDY_SOUP], "from-scratch snapshots"),
        "",
        *goal_lines,
        "",
        "## Recommendation",
        "",
        recommendation(rows, goals),
        "",
    ]


def finetune_markdown(finetune, args, sizes_a, sizes_b) -> list:
    rows = finetune["rows"]
    best = min(rows, key=lambda n: rows[n]["error"]["mean"])
    plain = rows[FT_PLAIN]["error"]["mean"]
    return [
        "## Fine-tuning a pretrained model",
        "",
        f"Task A (pretraining): classes 0-4, {sizes_a} images (the "
        "subset's training, validation and test images of those classes), "
        f"{pretrain_epochs(args)} epochs of one cosine decay from lr "
        f"{args.lr} (median "
        f"{common.median(finetune['pretrain_seconds']['values']):.0f} s, "
        "not counted below: every row starts from the same pretrained "
        f"model). Task B (fine-tuning): classes 5-9 relabelled 0-4, "
        f"{sizes_b['train']} train / {sizes_b['val']} validation / "
        f"{sizes_b['test']} test images, the pretrained backbone under a "
        f"fresh 5-class head, {args.epochs} epochs for every row. Plain: "
        f"one cosine decay from {args.finetune_lr}. Snapshots: "
        f"{args.snapshots} `SnapshotSchedule` cycles, each restarting at "
        f"{args.finetune_lr} (the small restart rate keeps the cycles near "
        "the pretrained point); ensemble of all the snapshots, uniform "
        "soup (`average_weights`) and greedy soup "
        "(`average_weights(method='greedy')`, metric "
        f"{args.soup_metric} on task B's validation images), BatchNorm "
        "recalibrated on task B's training images.",
        "",
        table(rows),
        "",
        kept_line(
            rows["greedy soup of the snapshots (+BN)"], "fine-tuned snapshots"
        ),
        "",
        (
            "Lowest test error: plain fine-tuning "
            f"({100 * plain:.2f}%); no snapshot predictor beat it here."
            if best == FT_PLAIN
            else f"Lowest test error: **{best}** "
            f"({100 * rows[best]['error']['mean']:.2f}% vs "
            f"{100 * plain:.2f}% for plain fine-tuning)."
        ),
        "",
    ]


def markdown(args, hardware, seconds, parts) -> str:
    return "\n".join(
        [
            "# Which cheap ensemble should I use?",
            "",
            f"`{command_line(args)}`: CNN widths {args.widths} "
            "(Conv-BN-ReLU-MaxPool blocks, `bench_cnn`), "
            f"{args.epochs} epochs of batch {args.batch_size}, SGD momentum "
            f"0.9, lr {args.lr}, weight decay {args.weight_decay}, "
            f"{args.snapshots} snapshots/cycles per method, mean ± std over "
            f"{args.seeds} seed{'s' if args.seeds > 1 else ''}. "
            f"{hardware['cpu_count']} CPUs shared "
            f"(load {hardware['load_average']:.1f} at the start); the whole "
            f"run took {seconds / 60:.1f} min. Inference cost: measured "
            "predict time over the test set relative to one model. "
            + common.WEIGHT_DECAY_NOTE,
            "",
            *parts,
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
    task_a, task_b = split_tasks(data)
    scratch = args.scenario in ("all", "scratch")
    finetune = args.scenario in ("all", "finetune")
    largest = max(4, args.snapshots)
    hardware = common.hardware()
    workdir = tempfile.mkdtemp(prefix="methods_bench_")
    per_seed, ft_per_seed, costs, ft_costs = [], [], None, None
    one_seconds = None
    try:
        for seed in range(args.seeds):
            if scratch:
                out, singles, ensembles = run_seed(seed, args, data, workdir)
                per_seed.append(out)
                if costs is None:
                    fge = ensembles[ONE_X_ENSEMBLES[2]][1]
                    costs, one_seconds = inference_costs(
                        [*singles, *fge], data["x_test"], largest
                    )
            if finetune:
                out, models = run_finetune_seed(
                    seed, args, task_a, task_b, workdir
                )
                ft_per_seed.append(out)
                if ft_costs is None:
                    ft_costs, _ = inference_costs(
                        models, task_b["x_test"], largest
                    )
            print(
                f"seed {seed} done after "
                f"{(time.perf_counter() - started) / 60:.1f} min",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - started
    res = {"settings": vars(args), "hardware": hardware}
    parts = []
    if scratch:
        rows, goals = summarize(per_seed, costs, args)
        sizes = {k: len(data[f"y_{k}"]) for k in ("train", "val", "test")}
        parts += scratch_markdown(rows, goals, args, sizes)
        res.update(
            one_model_predict_seconds=one_seconds,
            rows=rows,
            goals=goals,
            per_seed=per_seed,
        )
    if finetune:
        summary = summarize_finetune(ft_per_seed, ft_costs)
        sizes_b = {k: len(task_b[f"y_{k}"]) for k in ("train", "val", "test")}
        parts += finetune_markdown(
            summary, args, len(task_a["y_train"]), sizes_b
        )
        res["finetune"] = {**summary, "per_seed": ft_per_seed}
    res["wall_seconds"] = seconds
    md = markdown(args, hardware, seconds, parts)
    name = args.name or (NAME if scratch else f"{NAME}_finetune")
    common.write_results(args.out, name, res, md)
    print(md)


if __name__ == "__main__":
    main()
