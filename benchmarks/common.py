"""Helpers shared by the benchmark scripts: one home for each.

Paths and machine facts, the Fashion-MNIST data, the benchmark CNN and its
optimizer, the three learning-rate schedules, training one run, the
`keras-snapshot train` command, timing, statistics, and the one Markdown
table writer every script uses.

Weight decay is applied once, as the SGD optimizer's decoupled
`weight_decay` (`w -= lr * weight_decay * w` each step); the models carry
no L2 kernel regularizer (`weight_decay=0.0` to the package's builders).
"""

import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WEIGHT_DECAY_NOTE = (
    "Weight decay is the SGD optimizer's decoupled `weight_decay` "
    "(applied once; the model has no L2 regularizer)."
)


# Machine ----------------------------------------------------------------------


def hardware() -> dict:
    """The machine and library versions, for the result files."""
    import keras
    import numpy as np
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# Data -------------------------------------------------------------------------


def load_fashion(subset=0, val_size=0, test_size=0, seed=0) -> dict:
    """Fashion-MNIST (Debian's files) as a dict of numpy arrays.

    `subset` training images (a fixed random subset; 0: all), the first
    `val_size` of a validation split carved from the training split (0:
    all 6000), the first `test_size` test images (0: all 10000).
    """
    import numpy as np

    from keras_snapshot.app.datasets import load_dataset

    data = load_dataset("fashion_mnist_local", validation_fraction=0.1, seed=0)
    rng = np.random.default_rng(seed)
    train = np.sort(rng.permutation(len(data.x_train))[: subset or None])
    val = slice(0, val_size or None)
    test = slice(0, test_size or None)
    return {
        "x_train": data.x_train[train],
        "y_train": data.y_train[train],
        "x_val": data.x_val[val],
        "y_val": data.y_val[val],
        "x_test": data.x_test[test],
        "y_test": data.y_test[test],
    }


# Model and training ---------------------------------------------------------


def bench_cnn(widths=(16, 32, 64), num_classes=10, input_shape=(28, 28, 1)):
    """The package's `flat_cnn` (the default job's model), no regularizer.

    Weight decay is the optimizer's (see `compile_sgd`).
    """
    from keras_snapshot.app.models import flat_cnn

    return flat_cnn(input_shape, num_classes, widths=tuple(widths))


def compile_sgd(model, learning_rate, weight_decay=0.0, momentum=0.9):
    """SGD with momentum and decoupled weight decay; returns `model`."""
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate, momentum=momentum, weight_decay=weight_decay or None
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def make_schedule(kind, lr, epochs, steps, num_snapshots=1):
    """The learning rate of a run: `kind` is "snapshot", "cosine" or "step".

    "snapshot": `SnapshotSchedule` of `num_snapshots` cycles (Huang et al.
    2017); "cosine": one cosine decay over the budget (the baseline single
    model); "step": the paper's standard schedule, lr / 10 at 50% and 75%.
    """
    import keras

    import keras_snapshot

    total = epochs * steps
    if kind == "snapshot":
        return keras_snapshot.SnapshotSchedule.from_epochs(
            lr, epochs, steps, num_snapshots
        )
    if kind == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, total)
    if kind == "step":
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [total // 2, (3 * total) // 4], [lr, lr / 10, lr / 100]
        )
    raise ValueError(
        f"`kind` must be 'snapshot', 'cosine' or 'step'. Received: {kind!r}"
    )


def train_run(kind, lr, data, epochs, batch_size, seed, **options):
    """Trains one benchmark CNN; returns `(model, train_seconds)`.

    `options`: `num_snapshots` (for "snapshot"), `weight_decay`, `widths`,
    `augment`, `callbacks` (e.g. a `SnapshotCheckpoint`), `schedule` (any
    Keras learning-rate schedule, used instead of `kind`'s), `model` (a
    built model to train, e.g. a pretrained one, instead of a fresh
    `bench_cnn`; it is compiled anew).
    """
    import keras

    from keras_snapshot.app.datasets import make_dataset

    keras.utils.set_random_seed(seed)
    x, y = data["x_train"], data["y_train"]
    steps = steps_per_epoch(len(x), batch_size)
    schedule = options.get("schedule") or make_schedule(
        kind, lr, epochs, steps, options.get("num_snapshots", 1)
    )
    model = options.get("model") or bench_cnn(
        options.get("widths", (16, 32, 64))
    )
    compile_sgd(model, schedule, options.get("weight_decay", 0.0))
    train = make_dataset(
        x,
        y,
        batch_size,
        shuffle=True,
        augment=options.get("augment", False),
        seed=seed,
    )
    started = time.perf_counter()
    model.fit(
        train,
        epochs=epochs,
        callbacks=list(options.get("callbacks", ())),
        verbose=0,
        shuffle=False,  # The tf.data pipeline shuffles every epoch.
    )
    return model, time.perf_counter() - started


def run_cli_train(options, run_dir) -> dict:
    """Runs `keras-snapshot train OPTIONS --output-dir RUN_DIR`.

    The package's command line, in a child process.
    Returns its `report.json` with the command's wall time, CPU time
    (user + system, of the child process) and the load average before and
    after, under "benchmark".
    """
    command = [sys.executable, "-m", "keras_snapshot", "train"]
    command += [*options, "--output-dir", run_dir]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    report["benchmark"] = {
        "command": "keras-snapshot train " + " ".join(options),
        "wall_seconds": wall,
        "cpu_seconds": (after.ru_utime - before.ru_utime)
        + (after.ru_stime - before.ru_stime),
        "load_average": [load_before, os.getloadavg()[0]],
    }
    return report


# Timing and statistics -------------------------------------------------------


def median(values) -> float:
    return float(statistics.median(values))


def time_interleaved(fns: dict, reps: int) -> tuple[dict, dict]:
    """Best and median seconds of each function over `reps` calls.

    Calls are interleaved (order reversed every other repetition), after
    one warm-up call of each (tracing, XLA compilation). The machine is
    shared: interleaving spreads outside load over the variants compared,
    and the minimum (what `timeit` reports) drops the repetitions that
    other jobs slowed down.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - started)
    best = {name: min(v) for name, v in times.items()}
    return best, {name: median(v) for name, v in times.items()}


def mean_std(values) -> dict:
    """Mean, sample standard deviation, count and values."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values.tolist(),
    }


def pct(stat: dict) -> str:
    """A `mean_std` of fractions as "mean ± std" in percent."""
    if stat["n"] > 1:
        return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"
    return f"{100 * stat['mean']:.2f}"


# Output -----------------------------------------------------------------------


def md_table(header: list, rows: list) -> str:
    """The Markdown table of every benchmark: a header and rows of cells.

    Short rows are padded with empty cells.
    """
    width = len(header)
    lines = [
        "| " + " | ".join(str(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        cells = [str(c) for c in row] + [""] * (width - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=float)
        f.write("\n")


def write_results(out_dir: str, name: str, res: dict, md: str) -> None:
    """Writes `NAME.json` and `NAME.md` in `out_dir`."""
    write_json(os.path.join(out_dir, f"{name}.json"), res)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md if md.endswith("\n") else md + "\n")


def update_readme_block(name: str, text: str, readme: str = README) -> bool:
    """Replaces the text between `<!-- name:begin -->` and `<!-- name:end -->`.

    The README's result tables are written by the scripts, never typed.
    Headings go one level down, under the README's own section heading.
    Returns whether the block was found.
    """
    text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if not os.path.isfile(readme):
        return False
    with open(readme) as f:
        content = f.read()
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (scripts only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
