"""Cost of Snapshot Ensembles: training overhead, inference, memory.

- Training overhead: throughput of `fit` with `SnapshotSchedule` +
  `SnapshotCheckpoint` against plain `fit` with a constant rate and no
  callback, same model and data, repetitions interleaved in one process
  (median of each). Also the time of one snapshot write, the overhead
  against the number of snapshots M = 1..10 in a fixed budget, and the
  overhead of the running weight average (`WeightAveraging`: SWA at epoch
  ends, SWA and EMA after every optimizer step; optionally the host-copy
  `StochasticWeightAveraging` of an older release, `--averaging-ref`).
- Inference: `build_ensemble` of M members against M separate `predict`
  calls and against one model, with and without `jit_compile`, at several
  batch sizes; ensemble latency against M = 1..10; peak memory of building
  and running an ensemble (a fresh subprocess per measurement).

Usage:
    python benchmarks/cost.py           # the committed result, ~13 min
    python benchmarks/cost.py --quick   # smoke test, ~1 min
    python benchmarks/cost.py --training-only   # overhead ratios only, ~11 min
    python benchmarks/cost.py --training-only --averaging-ref 27042e6
        # and the 0.3.0 host-copy average: 13 min on 2 shared cores
    python benchmarks/cost.py --averaging-only --averaging-ref 27042e6
        # only the weight average's overhead, printed
"""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import common
import keras
from common import md_table
from common import median

import keras_snapshot
from keras_snapshot.app.datasets import make_dataset

WIDTHS = (16, 32, 64)


def make_model(seed=0):
    keras.utils.set_random_seed(seed)
    return common.bench_cnn(WIDTHS)


# Training overhead -----------------------------------------------------------


class WriteTimer:
    """Times a `SnapshotCheckpoint`'s snapshot writes from outside it.

    `callbacks` brackets the checkpoint between two hooks (callbacks run in
    list order): each hook of the second measures the time since the same
    hook of the first, that is, the checkpoint's own hook. A hook after
    which the snapshot folder holds one more `.keras` file wrote a snapshot
    (file, sha256, fsync and manifest); its time is kept. Mid-epoch
    snapshots are written in the batch hook, the others at epoch end.
    """

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.times = []
        self._files = 0
        self._started = 0.0
        timer = self

        class Hook(keras.callbacks.Callback):
            def __init__(self, stop):
                super().__init__()
                self.hook = timer._stop if stop else timer._start

            def on_train_batch_begin(self, batch, logs=None):
                self.hook()

            def on_epoch_end(self, epoch, logs=None):
                self.hook()

            def on_train_end(self, logs=None):
                self.hook()

        self.callbacks = [Hook(False), checkpoint, Hook(True)]

    def _start(self):
        self._started = time.perf_counter()

    def _stop(self):
        seconds = time.perf_counter() - self._started
        if seconds < 1e-3:  # far too short for a write: skip the listing
            return
        directory = self.checkpoint.directory
        files = sum(f.endswith(".keras") for f in os.listdir(directory))
        if files > self._files:
            self._files = files
            self.times.append(seconds)


def compiled(learning_rate, weight_decay):
    return common.compile_sgd(make_model(), learning_rate, weight_decay)


def timed_fit(model, dataset, epochs, callbacks=()):
    """Seconds of one `fit`, always from the same start.

    Every timed fit starts from the weights and optimizer state the model
    had after its first (warm-up) fit, as a fresh run would: a model that
    trains on and on at a constant rate overfits, and its later epochs run
    at another speed, which would bias the comparison.
    """
    start = getattr(model, "_benchmark_start", None)
    if start is not None:
        weights, optimizer_values = start
        model.set_weights(weights)
        for variable, value in zip(model.optimizer.variables, optimizer_values):
            variable.assign(value)
    model.optimizer.iterations.assign(0)  # restarts the schedule
    started = time.perf_counter()
    model.fit(dataset, epochs=epochs, callbacks=list(callbacks), verbose=0)
    seconds = time.perf_counter() - started
    if start is None:  # the warm-up fit
        model._benchmark_start = (
            model.get_weights(),
            [v.numpy() for v in model.optimizer.variables],
        )
    return seconds


def snapshot_callbacks(workdir, tag) -> WriteTimer:
    """A `SnapshotCheckpoint` in a new folder, timed by a `WriteTimer`."""
    directory = tempfile.mkdtemp(prefix=f"{tag}-", dir=workdir)
    return WriteTimer(keras_snapshot.SnapshotCheckpoint(directory, verbose=0))


def training_overhead(args, x, y, workdir) -> dict:
    dataset = make_dataset(x, y, args.batch_size, shuffle=True, seed=0)
    steps_per_epoch = common.steps_per_epoch(len(x), args.batch_size)
    samples = len(x)

    def snapshot_model(epochs, num_snapshots):
        schedule = keras_snapshot.SnapshotSchedule.from_epochs(
            0.1, epochs, steps_per_epoch, num_snapshots
        )
        return compiled(schedule, args.weight_decay)

    # Main comparison: M snapshots in a fit of `epochs` epochs.
    plain = compiled(0.05, args.weight_decay)
    snap = snapshot_model(args.epochs, args.num_snapshots)
    timed_fit(plain, dataset, 1)  # tracing
    timed_fit(snap, dataset, 1, snapshot_callbacks(workdir, "warmup").callbacks)
    # "schedule": the snapshot model without the callback, which isolates
    # the callback's cost from differences between two model instances.
    variants = ("plain", "schedule", "snapshot")
    times = {k: [] for k in variants}
    writes, write_share = [], []
    for rep in range(args.reps):
        order = variants[rep % 3 :] + variants[: rep % 3]
        if rep % 2:
            order = order[::-1]
        for variant in order:
            if variant == "plain":
                times["plain"].append(timed_fit(plain, dataset, args.epochs))
            elif variant == "schedule":
                times["schedule"].append(timed_fit(snap, dataset, args.epochs))
            else:
                timer = snapshot_callbacks(workdir, f"rep{rep}")
                times["snapshot"].append(
                    timed_fit(snap, dataset, args.epochs, timer.callbacks)
                )
                writes += timer.times
                write_share.append(sum(timer.times) / times["snapshot"][-1])
                shutil.rmtree(timer.checkpoint.directory, ignore_errors=True)
        print(
            f"  rep {rep + 1}/{args.reps}: plain {times['plain'][-1]:.2f}s "
            f"schedule only {times['schedule'][-1]:.2f}s "
            f"snapshot {times['snapshot'][-1]:.2f}s",
            flush=True,
        )
    throughput = {
        k: samples * args.epochs / median(v) for k, v in times.items()
    }
    snapshot_file = None
    main = {
        "epochs_per_fit": args.epochs,
        "num_snapshots": args.num_snapshots,
        "samples_per_epoch": samples,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": args.batch_size,
        "seconds": times,
        "throughput_samples_per_s": throughput,
        "ratio": throughput["snapshot"] / throughput["plain"],
        "ratio_vs_schedule_only": throughput["snapshot"]
        / throughput["schedule"],
        # Paired per repetition, a check on the medians.
        "ratio_paired_median": median(
            [p / s for p, s in zip(times["plain"], times["snapshot"])]
        ),
        "write_seconds": writes,
        "write_seconds_median": median(writes),
        # Share of each snapshot fit spent writing: robust to outside load.
        "write_share_median": median(write_share),
        "snapshot_file_bytes": snapshot_file,
    }
    # One snapshot file's size.
    timer = snapshot_callbacks(workdir, "size")
    timed_fit(snapshot_model(1, 1), dataset, 1, timer.callbacks)
    directory = timer.checkpoint.directory
    files = [f for f in os.listdir(directory) if f.endswith(".keras")]
    main["snapshot_file_bytes"] = os.path.getsize(
        os.path.join(directory, files[0])
    )
    shutil.rmtree(directory, ignore_errors=True)

    # Overhead against M, fixed budget of `scaling_epochs` epochs.
    scaling = []
    plain_short = []
    for m in args.scaling_m:
        try:
            model = snapshot_model(args.scaling_epochs, m)
        except ValueError as e:  # (T, M) whose last cycle would be empty.
            print(f"  M={m}: skipped, {e}", flush=True)
            continue
        timed_fit(
            model, dataset, 1, snapshot_callbacks(workdir, "warmup").callbacks
        )
        snap_times, m_writes, shares = [], [], []
        for rep in range(args.scaling_reps):
            timer = snapshot_callbacks(workdir, f"m{m}")
            if rep % 2 == 0:
                plain_short.append(
                    timed_fit(plain, dataset, args.scaling_epochs)
                )
            snap_times.append(
                timed_fit(model, dataset, args.scaling_epochs, timer.callbacks)
            )
            if rep % 2 == 1:
                plain_short.append(
                    timed_fit(plain, dataset, args.scaling_epochs)
                )
            m_writes += timer.times
            shares.append(sum(timer.times) / snap_times[-1])
            shutil.rmtree(timer.checkpoint.directory, ignore_errors=True)
        scaling.append(
            {
                "M": m,
                "seconds": snap_times,
                "writes": len(m_writes) / args.scaling_reps,
                "write_seconds_median": median(m_writes) if m_writes else None,
                "write_share_median": median(shares),
            }
        )
        print(f"  M={m}: {median(snap_times):.2f}s per fit", flush=True)
        del model
    reference = median(plain_short)
    for row in scaling:
        row["ratio"] = reference / median(row["seconds"])
    return {
        "main": main,
        "scaling": {
            "epochs_per_fit": args.scaling_epochs,
            "plain_seconds": plain_short,
            "plain_seconds_median": reference,
            "rows": scaling,
        },
        "averaging": averaging_overhead(args, dataset, steps_per_epoch),
    }


def host_copy_averaging(ref: str):
    """The `StochasticWeightAveraging` class of git `ref` (e.g. 27042e6,
    keras-snapshot 0.3.0: a float64 numpy copy of the weights on the
    host, updated after a device -> host copy each averaged step)."""
    source = subprocess.run(
        ["git", "show", f"{ref}:keras_snapshot/averaging.py"],
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "host_copy_averaging.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("host_copy_averaging", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StochasticWeightAveraging


def ms_per_update(callback, updates=200, repeats=5) -> float:
    """Milliseconds of one update of the running average, timed directly.

    The averaging callback of a finished `fit` (still attached to its
    model) updates its average `updates` times in a row, `repeats` times;
    the best run counts. This isolates the update from the noise of whole
    fits, which on shared CPUs is larger than the update itself.
    """
    step = 10**6
    callback._update(step, 0)  # Traces the compiled update, if any.
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(updates):
            step += 1
            callback._update(step, 0)
        best = min(best, time.perf_counter() - started)
    return 1000 * best / updates


def averaging_overhead(args, dataset, steps_per_epoch) -> dict:
    """`fit` with a `WeightAveraging` callback against plain `fit`.

    One model, one constant rate: the callback does not change training,
    so every variant times the same steps from the same start
    (`timed_fit`), interleaved, `--averaging-reps` times each. A fresh
    callback per fit, as in a real run: each fit traces the update once
    (included in the times).
    """
    variants = {
        "plain": lambda: [],
        "SWA, epoch ends": lambda: [
            keras_snapshot.WeightAveraging(start_epoch=1, verbose=0)
        ],
        "SWA, every step": lambda: [
            keras_snapshot.WeightAveraging(
                start_step=1, every_steps=1, verbose=0
            )
        ],
        "EMA, every step": lambda: [
            keras_snapshot.WeightAveraging(
                mode="ema", decay=0.99, warmup=True, verbose=0
            )
        ],
    }
    if args.averaging_ref:
        old = host_copy_averaging(args.averaging_ref)
        variants[f"host copy ({args.averaging_ref}), every step"] = lambda: [
            old(start_step=1, every_steps=1, verbose=0)
        ]
    model = compiled(0.05, args.weight_decay)
    epochs = args.averaging_epochs
    times = {k: [] for k in variants}
    names = list(variants)
    with warnings.catch_warnings():
        # Each timed fit restarts at step 0: the callback sees the average
        # of the previous fit ahead of the optimizer and starts anew.
        warnings.filterwarnings("ignore", message=".*starting a new average")
        for name in names:  # warm-up: tracing
            timed_fit(model, dataset, 1, variants[name]())
        last = {}  # The callbacks of each variant's last fit.
        for rep in range(args.averaging_reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            if rep % 2:
                order = order[::-1]
            for name in order:
                last[name] = variants[name]()
                times[name].append(
                    timed_fit(model, dataset, epochs, last[name])
                )
            print(
                f"  averaging rep {rep + 1}/{args.averaging_reps}: "
                + " ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                flush=True,
            )
    plain = median(times["plain"])
    steps = epochs * steps_per_epoch
    rows = [
        {
            "variant": name,
            "seconds": seconds,
            "ratio": plain / median(seconds),
            "ratio_paired_median": median(
                [p / t for p, t in zip(times["plain"], seconds)]
            ),
            "ms_per_step_over_plain": 1000 * (median(seconds) - plain) / steps,
            "ms_per_update": ms_per_update(last[name][0]),
        }
        for name, seconds in times.items()
        if name != "plain"
    ]
    return {
        "epochs_per_fit": epochs,
        "steps_per_fit": steps,
        "params": model.count_params(),
        "ms_per_step_plain": 1000 * plain / steps,
        "plain_seconds": times["plain"],
        "plain_seconds_median": plain,
        "rows": rows,
    }


# Inference -----------------------------------------------------------------


def make_members(m, directory):
    """M saved members (different initialisations), as `.keras` paths."""
    paths = []
    for i in range(m):
        path = os.path.join(directory, f"member-{i:02d}.keras")
        if not os.path.exists(path):
            make_model(seed=i).save(path)
        paths.append(path)
    return paths


def jit(model, jit_compile):
    model.compile(jit_compile=jit_compile)
    return model


def predictor(models, xs, batch):
    """A function that runs `predict` of each model over `xs`."""

    def run():
        for model in models:
            model.predict(xs, batch_size=batch, verbose=0)

    return run


def inference(args, x, workdir) -> dict:
    members_dir = os.path.join(workdir, "members")
    os.makedirs(members_dir, exist_ok=True)
    m = args.inference_m
    paths = make_members(max(m, max(args.scaling_m)), members_dir)
    rows = []
    for jit_compile in (False, True):
        members = [
            jit(keras.saving.load_model(p, compile=False), jit_compile)
            for p in paths[:m]
        ]
        ensemble = jit(keras_snapshot.build_ensemble(paths[:m]), jit_compile)
        for batch in args.batch_sizes:
            n = min(len(x), max(args.min_images, 8 * batch))
            if batch == 1:
                n = args.images_batch1
            xs = x[:n]

            t, medians = common.time_interleaved(
                {
                    "single": predictor([members[0]], xs, batch),
                    "separate": predictor(members, xs, batch),
                    "ensemble": predictor([ensemble], xs, batch),
                },
                args.inference_reps,
            )
            batches = -(-n // batch)
            row = {
                "jit_compile": jit_compile,
                "batch_size": batch,
                "images": n,
                "ms_per_batch": {k: 1000 * v / batches for k, v in t.items()},
                "median_ms_per_batch": {
                    k: 1000 * v / batches for k, v in medians.items()
                },
                "ensemble_over_single": t["ensemble"] / t["single"],
                "ensemble_over_separate": t["ensemble"] / t["separate"],
            }
            rows.append(row)
            print(
                f"  jit={jit_compile} batch {batch}: single "
                f"{row['ms_per_batch']['single']:.2f} ms, {m} separate "
                f"{row['ms_per_batch']['separate']:.2f} ms, ensemble "
                f"{row['ms_per_batch']['ensemble']:.2f} ms per batch",
                flush=True,
            )
        keras.backend.clear_session()

    # Ensemble latency against M.
    scaling = []
    xs = x[: args.min_images]
    batch = args.scaling_batch
    for jit_compile in (False, True):
        single = jit(
            keras.saving.load_model(paths[0], compile=False), jit_compile
        )
        for k in args.scaling_m:
            ensemble = jit(
                keras_snapshot.build_ensemble(paths[:k]), jit_compile
            )
            t, medians = common.time_interleaved(
                {
                    "single": predictor([single], xs, batch),
                    "ensemble": predictor([ensemble], xs, batch),
                },
                args.inference_reps,
            )
            batches = -(-len(xs) // batch)
            scaling.append(
                {
                    "jit_compile": jit_compile,
                    "M": k,
                    "ms_per_batch": 1000 * t["ensemble"] / batches,
                    "single_ms_per_batch": 1000 * t["single"] / batches,
                    "over_single": t["ensemble"] / t["single"],
                    "median_ms_per_batch": 1000 * medians["ensemble"] / batches,
                }
            )
        print(
            f"  jit={jit_compile}: ensemble/single at M="
            + ", ".join(
                f"{r['M']}: {r['over_single']:.2f}"
                for r in scaling
                if r["jit_compile"] == jit_compile
            ),
            flush=True,
        )
        keras.backend.clear_session()
    return {
        "members": m,
        "rows": rows,
        "scaling": {"batch_size": batch, "rows": scaling},
    }


# Memory --------------------------------------------------------------------

_MEMORY_CHILD = r"""
import json, os, sys, threading, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, {root!r})
import numpy as np, psutil, keras, keras_snapshot
paths, n, batch = {paths!r}, {n}, {batch}
x = np.random.default_rng(0).random((n, 28, 28, 1), dtype=np.float32)
# Warm up TensorFlow's runtime with a model that is then dropped.
warm = keras.saving.load_model(paths[0], compile=False)
warm.predict(x, batch_size=batch, verbose=0)
del warm
process = psutil.Process()
base = process.memory_info().rss
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.002)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
if len(paths) == 1:
    model = keras.saving.load_model(paths[0], compile=False)
else:
    model = keras_snapshot.build_ensemble(paths)
built = process.memory_info().rss
model.predict(x, batch_size=batch, verbose=0)
done.set()
thread.join()
peak = max(peak[0], process.memory_info().rss)
print(json.dumps({{"base": base, "built": built, "peak": peak}}))
"""


def memory(args, workdir) -> dict:
    paths = make_members(max(args.scaling_m), os.path.join(workdir, "members"))
    rows = []
    for k in args.memory_m:
        code = _MEMORY_CHILD.format(
            root=common.ROOT, paths=paths[:k], n=args.min_images, batch=256
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "M": k,
                "build_mib": (r["built"] - r["base"]) / 2**20,
                "peak_over_base_mib": (r["peak"] - r["base"]) / 2**20,
                "base_rss_mib": r["base"] / 2**20,
                "peak_rss_mib": r["peak"] / 2**20,
            }
        )
        print(
            f"  M={k}: build +{rows[-1]['build_mib']:.1f} MiB, peak "
            f"+{rows[-1]['peak_over_base_mib']:.1f} MiB over the warmed-up "
            f"process (peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB)",
            flush=True,
        )
    return {"images": args.min_images, "batch_size": 256, "rows": rows}


# Report --------------------------------------------------------------------


def markdown(res) -> str:
    tr = res["training"]["main"]
    sc = res["training"]["scaling"]
    inf = res["inference"]
    hw = res["hardware"]
    lines = [
        "# Cost: training overhead, inference latency, memory",
        "",
        f"CPU: {hw['cpu']}, {hw['cpu_count']} cores (shared with other "
        "jobs, so absolute times are noisy; every comparison is interleaved "
        "in one process: training as a median, inference latency as the best"
        " of the repetitions, medians in cost.json). TensorFlow "
        f"{hw['tensorflow']}, Keras "
        f"{hw['keras']}. Model: the accuracy benchmark's CNN {WIDTHS} "
        f"({res['params']} parameters) on {tr['samples_per_epoch']} "
        "Fashion-MNIST images. Wall time of this benchmark: "
        f"{res['wall_seconds'] / 60:.1f} min.",
        "",
        "## Training overhead",
        "",
        f"`fit` of {tr['epochs_per_fit']} epochs ({tr['steps_per_epoch']} "
        f"steps each, batch {tr['batch_size']}), {len(tr['seconds']['plain'])}"
        " repetitions of each, interleaved. Snapshot: `SnapshotSchedule` + "
        f"`SnapshotCheckpoint`, M = {tr['num_snapshots']} snapshots per fit "
        "(one write every "
        f"{tr['epochs_per_fit'] // tr['num_snapshots']} epochs, more often than"
        " a real run). Plain: constant rate, no callback. Schedule: the"
        " snapshot model and schedule, no callback.",
        "",
        md_table(
            ["variant", "median s per fit", "samples/s"],
            [
                [
                    k,
                    f"{median(tr['seconds'][k]):.2f}",
                    f"{tr['throughput_samples_per_s'][k]:.0f}",
                ]
                for k in ("plain", "schedule", "snapshot")
            ],
        ),
        "",
        f"- Throughput ratio snapshot / plain: **{tr['ratio']:.3f}** (ratio "
        f"of medians; median of the paired ratios "
        f"{tr['ratio_paired_median']:.3f}). Target >= 0.98: "
        f"**{'met' if tr['ratio'] >= 0.98 else 'missed'}**. Against the "
        "same model and schedule without the callback (*schedule*): "
        f"**{tr['ratio_vs_schedule_only']:.3f}**, the cost of the callback "
        "alone.",
        f"- One snapshot write (save `.keras` + sha256 + fsync + manifest): "
        f"median **{1000 * tr['write_seconds_median']:.0f} ms** over "
        f"{len(tr['write_seconds'])} writes (min "
        f"{1000 * min(tr['write_seconds']):.0f}, max "
        f"{1000 * max(tr['write_seconds']):.0f} ms); file "
        f"{tr['snapshot_file_bytes'] / 1024:.0f} KiB. Writes take "
        f"{100 * tr['write_share_median']:.1f}% of a snapshot fit (median), "
        "so the throughput ratio without them would be about "
        f"{tr['ratio'] / (1 - tr['write_share_median']):.3f}.",
        "",
        f"Overhead against M, fit of {sc['epochs_per_fit']} epochs "
        f"(plain: median {sc['plain_seconds_median']:.2f} s):",
        "",
        md_table(
            [
                "M",
                "median s per fit",
                "throughput ratio (measured)",
                "share of fit spent writing",
                "1 - share",
                "writes per fit",
            ],
            [
                [
                    r["M"],
                    f"{median(r['seconds']):.2f}",
                    f"{r['ratio']:.3f}",
                    f"{100 * r['write_share_median']:.1f}%",
                    f"{1 - r['write_share_median']:.3f}",
                    f"{r['writes']:.0f}",
                ]
                for r in sc["rows"]
            ],
        ),
        "",
        "![training overhead vs M](cost_training.png)",
        "",
        *averaging_markdown(res["training"].get("averaging")),
        "## Inference",
        "",
        f"{inf['members']} members; `predict` over a fixed set of images, "
        f"milliseconds per batch (best of {res['settings']['inference_reps']}"
        " interleaved repetitions). *separate*: one `predict` call per"
        " member; *ensemble*: one `predict` on the `build_ensemble` model.",
        "",
    ]
    rows = []
    for r in inf["rows"]:
        ms = r["ms_per_batch"]
        rows.append(
            [
                "on" if r["jit_compile"] else "off",
                r["batch_size"],
                f"{ms['single']:.2f}",
                f"{ms['separate']:.2f}",
                f"{ms['ensemble']:.2f}",
                f"{r['ensemble_over_single']:.2f}",
                f"{r['ensemble_over_separate']:.2f}",
            ]
        )
    m = inf["members"]
    lines.append(
        md_table(
            [
                "jit_compile",
                "batch",
                "single ms",
                f"{m} separate ms",
                "ensemble ms",
                f"ensemble / single (target <= {m})",
                "ensemble / separate (target < 1)",
            ],
            rows,
        )
    )
    ok_m = all(r["ensemble_over_single"] <= m for r in inf["rows"])
    ok_sep = all(r["ensemble_over_separate"] < 1 for r in inf["rows"])
    lines += [
        "",
        f"- Ensemble <= {m} x single in every row: "
        f"**{'met' if ok_m else 'missed'}**; faster than {m} separate calls "
        f"in every row: **{'met' if ok_sep else 'missed'}**.",
        "",
        f"Ensemble latency against M (batch {inf['scaling']['batch_size']}):",
        "",
    ]
    by_m = {}
    for r in inf["scaling"]["rows"]:
        by_m.setdefault(r["M"], {})[r["jit_compile"]] = r
    rows = [
        [
            k,
            f"{v[False]['ms_per_batch']:.2f}",
            f"{v[False]['over_single']:.2f}",
            f"{v[True]['ms_per_batch']:.2f}",
            f"{v[True]['over_single']:.2f}",
        ]
        for k, v in sorted(by_m.items())
    ]
    lines += [
        md_table(
            ["M", "ms (no jit)", "x single", "ms (jit)", "x single"], rows
        ),
        "",
        "![ensemble latency vs M](cost_inference.png)",
        "",
        "## Memory",
        "",
        f"A fresh process per row: after a warm-up `predict` of one model "
        "(TensorFlow's runtime loaded; that model then dropped), it loads "
        "the M members, builds the ensemble (M=1: loads the model) and "
        f"predicts {res['memory']['images']} images at batch "
        f"{res['memory']['batch_size']}. Resident-set growth over that base, "
        "sampled every 2 ms; the peak includes tracing the predict function.",
        "",
        md_table(
            [
                "M",
                "after build (MiB)",
                "peak over base (MiB)",
                "base RSS (MiB)",
                "peak RSS (MiB)",
            ],
            [
                [
                    r["M"],
                    f"{r['build_mib']:.1f}",
                    f"{r['peak_over_base_mib']:.1f}",
                    f"{r['base_rss_mib']:.0f}",
                    f"{r['peak_rss_mib']:.0f}",
                ]
                for r in res["memory"]["rows"]
            ],
        ),
    ]
    return "\n".join(lines)


def averaging_markdown(av) -> list:
    """The weight-averaging overhead lines (none in older cost.json)."""
    if not av:
        return []
    return [
        "### Weight averaging",
        "",
        f"`fit` of {av['epochs_per_fit']} epochs ({av['steps_per_fit']} "
        "steps, constant rate) with a `WeightAveraging` callback against "
        f"the same fit without it (median {av['plain_seconds_median']:.2f}"
        f" s), {len(av['plain_seconds'])} interleaved repetitions of each, "
        "a fresh callback per fit (its one tracing included). Every step: "
        "`every_steps=1` (EMA's default). One update is also timed "
        "directly (best of 5 runs of 200 updates)"
        + (
            f": {av['ms_per_step_plain']:.1f} ms per training step of "
            f"{av['params']} weights without averaging."
            if "ms_per_update" in av["rows"][0]
            else "."
        ),
        "",
        md_table(
            [
                "averaging",
                "median s per fit",
                "throughput ratio (vs plain)",
                "paired median ratio",
                "ms per step over plain",
                "ms per update (direct)",
            ],
            [
                [
                    r["variant"],
                    f"{median(r['seconds']):.2f}",
                    f"{r['ratio']:.3f}",
                    f"{r['ratio_paired_median']:.3f}",
                    f"{r['ms_per_step_over_plain']:+.2f}",
                    f"{r['ms_per_update']:.3f}"
                    if "ms_per_update" in r
                    else "-",
                ]
                for r in av["rows"]
            ],
        ),
        "",
    ]


def plot(res, out_dir):
    plt = common.pyplot()
    sc = res["training"]["scaling"]["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(
        [r["M"] for r in sc],
        [r["ratio"] for r in sc],
        "o-",
        label="measured ratio",
    )
    ax.plot(
        [r["M"] for r in sc],
        [1 - r["write_share_median"] for r in sc],
        "s--",
        label="1 - share of fit spent writing",
    )
    ax.axhline(0.98, color="gray", ls=":", label="target 0.98")
    ax.set_xlabel("snapshots M per fit")
    ax.set_ylabel("throughput, snapshot / plain")
    ax.set_title(
        f"{res['training']['scaling']['epochs_per_fit']}-epoch fit, "
        "incl. writes"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cost_training.png"), dpi=110)
    plt.close(fig)

    rows = res["inference"]["scaling"]["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for jit_compile in (False, True):
        r = [x for x in rows if x["jit_compile"] == jit_compile]
        ms = [x["M"] for x in r]
        line = ax.plot(
            ms,
            [x["ms_per_batch"] for x in r],
            "o-",
            label=f"ensemble, jit={jit_compile}",
        )
        ax.plot(
            ms,
            [x["M"] * x["single_ms_per_batch"] for x in r],
            ":",
            color=line[0].get_color(),
            label=f"M x single, jit={jit_compile}",
        )
    ax.set_xlabel("members M")
    ax.set_ylabel("ms per batch")
    ax.set_title(f"batch {res['inference']['scaling']['batch_size']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cost_inference.png"), dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--training-only",
        action="store_true",
        help="measure and print only the training overhead (no files)",
    )
    p.add_argument(
        "--averaging-only",
        action="store_true",
        help="measure and print only the weight-averaging overhead (no files)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the table, plots and README block from cost.json",
    )
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--num-snapshots", type=int, default=4)
    p.add_argument(
        "--weight-decay",
        type=float,
        default=5e-3,
        help="the SGD optimizer's decoupled weight decay (no L2 penalty)",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--averaging-epochs", type=int, default=4)
    p.add_argument("--averaging-reps", type=int, default=4)
    p.add_argument(
        "--averaging-ref",
        default=None,
        help="also time the host-copy StochasticWeightAveraging of this "
        "git commit (27042e6: keras-snapshot 0.3.0)",
    )
    p.add_argument("--scaling-epochs", type=int, default=2)
    p.add_argument("--scaling-reps", type=int, default=2)
    p.add_argument(
        "--scaling-m", type=int, nargs="+", default=list(range(1, 11))
    )
    p.add_argument("--inference-m", type=int, default=4)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--min-images", type=int, default=1024)
    p.add_argument("--images-batch1", type=int, default=128)
    p.add_argument("--inference-reps", type=int, default=7)
    p.add_argument("--scaling-batch", type=int, default=256)
    p.add_argument("--memory-m", type=int, nargs="+", default=[1, 4, 10])
    p.add_argument("--out", default=common.RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.epochs, args.reps = 1024, 4, 2
        args.averaging_epochs, args.averaging_reps = 2, 2
        args.scaling_epochs, args.scaling_reps = 2, 1
        args.scaling_m = [1, 2, 4]
        args.batch_sizes, args.min_images, args.images_batch1 = [1, 64], 256, 16
        args.inference_reps, args.memory_m = 2, [1, 2]
        args.out = os.path.join(tempfile.gettempdir(), "keras_snapshot_bench")
    return args


def report(res, args):
    """Writes cost.json, cost.md, the plots and the README block."""
    os.makedirs(args.out, exist_ok=True)
    md = markdown(res)
    common.write_results(args.out, "cost", res, md)
    plot(res, args.out)
    if not args.quick:
        common.update_readme_block(
            "cost", md.split("\n", 2)[2].replace("](cost_", "](results/cost_")
        )
    print(md)


def print_training(training) -> None:
    """The overhead figures of `training_overhead`, one per line."""
    main = training["main"]
    for key in ("ratio", "ratio_paired_median", "ratio_vs_schedule_only"):
        print(f"{key}: {main[key]:.3f}")
    for variant, seconds in main["seconds"].items():
        print(f"{variant}: median {median(seconds):.2f} s per fit {seconds}")
    print_averaging(training["averaging"])


def print_averaging(averaging) -> None:
    """The figures of `averaging_overhead`, one per line."""
    print(
        f"weight averaging, {averaging['steps_per_fit']} steps per fit, "
        f"{averaging['params']} weights: plain median "
        f"{averaging['plain_seconds_median']:.2f} s, "
        f"{averaging['ms_per_step_plain']:.2f} ms per step"
    )
    for row in averaging["rows"]:
        print(
            f"{row['variant']}: ratio {row['ratio']:.3f} (paired "
            f"{row['ratio_paired_median']:.3f}), "
            f"{row['ms_per_step_over_plain']:+.2f} ms per step; one update "
            f"timed directly: {row['ms_per_update']:.3f} ms"
        )


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, "cost.json")) as f:
            report(json.load(f), args)
        return
    started = time.perf_counter()
    data = common.load_fashion()
    x, y = data["x_train"][: args.images], data["y_train"][: args.images]
    workdir = tempfile.mkdtemp(prefix="keras_snapshot_cost_")
    try:
        if args.averaging_only:
            dataset = make_dataset(x, y, args.batch_size, shuffle=True, seed=0)
            steps_per_epoch = common.steps_per_epoch(len(x), args.batch_size)
            print_averaging(averaging_overhead(args, dataset, steps_per_epoch))
            return
        print("Training overhead", flush=True)
        training = training_overhead(args, x, y, workdir)
        if args.training_only:
            print_training(training)
            return
        keras.backend.clear_session()
        print("Inference", flush=True)
        inf = inference(args, data["x_test"], workdir)
        print("Memory", flush=True)
        mem = memory(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res = {
        "settings": vars(args),
        "hardware": common.hardware(),
        "filesystem_of_snapshots": tempfile.gettempdir(),
        "params": make_model().count_params(),
        "training": training,
        "inference": inf,
        "memory": mem,
        "peak_rss_of_benchmark_mib": resource.getrusage(
            resource.RUSAGE_SELF
        ).ru_maxrss
        / 1024,
        "wall_seconds": time.perf_counter() - started,
    }
    report(res, args)


if __name__ == "__main__":
    main()
