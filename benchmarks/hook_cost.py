"""Per-batch cost of the snapshot callback's batch hook, in microseconds.

`SnapshotCheckpoint.on_train_batch_begin` runs at every batch; it must stay
an integer comparison (no device read) until a snapshot may be due. This
attaches the callback with a real `fit`, then calls the hook `--calls`
times with the next snapshot far away and prints the best of `--repeats`
timings per call. Compare two versions side by side, alternating, e.g.:

    git worktree add /tmp/base 03046fb
    for i in 1 2 3; do
      (cd /tmp/base && PYTHONPATH=. python $OLDPWD/benchmarks/hook_cost.py)
      python benchmarks/hook_cost.py
    done
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_snapshot  # noqa: E402


def hook_microseconds(calls: int, repeats: int) -> float:
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = np.arange(64) % 3
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(3, activation="softmax")]
    )
    schedule = keras_snapshot.SnapshotSchedule(0.1, 10_000, 2)
    model.compile(
        keras.optimizers.SGD(schedule), "sparse_categorical_crossentropy"
    )
    with tempfile.TemporaryDirectory() as folder:
        callback = keras_snapshot.SnapshotCheckpoint(folder, verbose=0)
        model.fit(
            x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback]
        )
        callback.on_train_begin()
        callback.on_epoch_begin(1)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in range(calls):
                callback.on_train_batch_begin(batch)
            best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    us = hook_microseconds(args.calls, args.repeats)
    print(
        f"keras-snapshot {keras_snapshot.__version__}, Keras "
        f"{keras.version()}: {us:.3f} us per on_train_batch_begin"
    )


if __name__ == "__main__":
    main()
