"""Peak memory of `keras-snapshot train --data` as the data grows.

Writes generated folders of 32x32 RGB PNG images in class subfolders (the
layout of `keras.utils.image_dataset_from_directory`) and the same images
as an `.npz` file, then runs the whole `keras-snapshot train` job on each
(training, evaluation, export, report) in a fresh process, and prints its
peak resident memory (`ru_maxrss` of the child) and wall time. A folder is
streamed from disk, batch by batch; an `.npz` is held in memory. Streamed
memory should stay flat as the folder grows ten times; in-memory grows.

Usage:
    python benchmarks/memory.py                  # 5,000 and 50,000 images
    python benchmarks/memory.py --sizes 500 2000 # quicker

Prints a Markdown table and writes results/memory.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = 10
SIZE = 32


def write_images(root: str, count: int, seed: int = 0):
    """`count` PNGs, class i bright in row band i; also returns the arrays."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    labels = np.arange(count) % CLASSES
    images = rng.integers(0, 120, (count, SIZE, SIZE, 3), dtype=np.uint8)
    for label in range(CLASSES):
        images[labels == label, 3 * label : 3 * label + 3] = 255
        os.makedirs(os.path.join(root, f"class_{label}"), exist_ok=True)
    paths = [
        os.path.join(root, f"class_{label}", f"{i:06d}.png")
        for i, label in enumerate(labels)
    ]

    def write(path, image):
        written = tf.io.write_file(path, tf.io.encode_png(image))
        with tf.control_dependencies([written]):
            return tf.identity(path)

    ds = tf.data.Dataset.from_tensor_slices((paths, images)).map(
        write, num_parallel_calls=tf.data.AUTOTUNE
    )
    for _ in ds:
        pass
    return images, labels


def run_job(data: str, output_dir: str) -> dict:
    """Runs `keras-snapshot train` in a child; its peak RSS and time."""
    command = [
        sys.executable,
        "-c",
        "import resource, subprocess, sys; "
        "code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(code)",
        sys.executable,
        "-m",
        "keras_snapshot",
        "train",
        "--data",
        data,
        "--epochs",
        "1",
        "--snapshots",
        "1",
        "--batch-size",
        "128",
        "--verbose",
        "0",
        "--output-dir",
        output_dir,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{data}: the job failed:\n{done.stderr[-3000:]}")
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    return {"peak_mib": round(peak_kib / 1024, 1), "seconds": round(seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for count in args.sizes:
            folder = os.path.join(scratch, f"images_{count}")
            images, labels = write_images(folder, count)
            npz = os.path.join(scratch, f"arrays_{count}.npz")
            np.savez(npz, x=images, y=labels)
            decoded_mib = count * SIZE * SIZE * 3 * 4 / 2**20  # as float32
            del images
            for kind, data in (
                ("folder (streamed)", folder),
                (".npz (in memory)", npz),
            ):
                result = run_job(
                    data, os.path.join(scratch, f"run_{kind[:3]}_{count}")
                )
                rows.append(
                    {
                        "images": count,
                        "data": kind,
                        "decoded_float32_mib": round(decoded_mib, 1),
                        **result,
                    }
                )
                print(rows[-1], flush=True)
    lines = [
        "| images | data | images as float32 (MiB) | peak RSS (MiB) "
        "| wall (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['images']:,} | {r['data']} | {r['decoded_float32_mib']} | "
            f"{r['peak_mib']} | {r['seconds']} |"
        )
    for kind in ("folder (streamed)", ".npz (in memory)"):
        peaks = [r["peak_mib"] for r in rows if r["data"] == kind]
        if len(peaks) > 1:
            lines.append(
                f"\n{kind}: peak RSS x{peaks[-1] / peaks[0]:.2f} for "
                f"x{args.sizes[-1] / args.sizes[0]:g} images."
            )
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump(
            {
                "sizes": args.sizes,
                "rows": rows,
                "machine": f"{os.cpu_count()} CPU cores",
            },
            f,
            indent=1,
        )
    with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write(
            "# Peak memory of `keras-snapshot train --data`\n\n"
            "`python benchmarks/memory.py` (1 epoch, 1 snapshot, flat_cnn, "
            "batch 128: training, evaluation, export and report).\n\n"
            + table
            + "\n"
        )


if __name__ == "__main__":
    main()
