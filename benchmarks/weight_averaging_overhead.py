"""Per-update cost of the running weight average: host copy vs variables.

Trains one MLP three ways in one process, averaging after every optimizer
step: no averaging; the `StochasticWeightAveraging` of keras-snapshot
0.3.0 (read from git, `git show 27042e6:keras_snapshot/averaging.py`:
a float64 numpy copy of the weights on the host, updated after each device
-> host copy); and `WeightAveraging(mode="swa")` (the average in Keras
variables, updated on the device). Prints ms per step and the overhead
over plain training, and writes `results/weight_averaging_overhead.md`.

    python benchmarks/weight_averaging_overhead.py [--ref HEAD] [--width 512]
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

from common import RESULTS
from common import ROOT
from common import md_table

sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_snapshot.weight_averaging import WeightAveraging  # noqa: E402


def old_callback_class(ref: str):
    """The host-copy `StochasticWeightAveraging` of git `ref`."""
    source = subprocess.run(
        ["git", "show", f"{ref}:keras_snapshot/averaging.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "old_averaging.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("old_averaging", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StochasticWeightAveraging


def time_fit(callbacks, width: int, steps: int, repeats: int) -> float:
    """Median ms per step of `fit` over `repeats` runs (after a warm-up)."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(steps * 32, 64))
    y = np.random.default_rng(1).integers(0, 10, size=len(x))
    times = []
    for repeat in range(repeats + 1):
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(width, activation="relu"),
                keras.layers.Dense(width, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
        begin = time.perf_counter()
        model.fit(
            x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks()
        )
        if repeat:  # The first run compiles.
            times.append((time.perf_counter() - begin) * 1000 / steps)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="27042e6")  # 0.3.0
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    old = old_callback_class(args.ref)
    runs = {
        "no averaging": lambda: [],
        f"host copy ({args.ref})": lambda: [
            old(start_step=1, every_steps=1, verbose=0)
        ],
        "WeightAveraging (variables)": lambda: [
            WeightAveraging(start_step=1, every_steps=1, verbose=0)
        ],
    }
    timed = {
        name: time_fit(make, args.width, args.steps, args.repeats)
        for name, make in runs.items()
    }
    base = timed["no averaging"]
    params = 64 * args.width + args.width * args.width + args.width * 10
    rows = [
        [name, f"{ms:.2f}", f"{ms - base:+.2f}"] for name, ms in timed.items()
    ]
    table = md_table(["averaging every step", "ms / step", "overhead"], rows)
    text = (
        f"MLP of about {params / 1e6:.2f}M weights, batch 32, "
        f"{args.steps} steps, median of {args.repeats} runs, "
        f"Keras {keras.__version__} ({keras.backend.backend()}), "
        f"{os.cpu_count()} CPU cores.\n\n{table}\n"
    )
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "weight_averaging_overhead.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
