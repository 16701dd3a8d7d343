"""`keras-snapshot`: train, evaluate, export and distill snapshot ensembles.

Parses the command line and dispatches to the command's module, imported
only then: `--help` and `--version` import neither TensorFlow nor Keras.
"""

import argparse
import importlib
import logging
import os
import sys

import keras_snapshot
from keras_snapshot._checks import check_in_range
from keras_snapshot._checks import check_positive_int
from keras_snapshot._checks import check_positive_number
from keras_snapshot.app.distribute import STRATEGY_NAMES
from keras_snapshot.app.run import UsageError
from keras_snapshot.app.run import release_run_dirs

# Command name -> (module in keras_snapshot.app, function).
_COMMANDS = {
    "train": ("train", "train_command"),
    "evaluate": ("evaluate", "evaluate_command"),
    "export": ("export", "export_command"),
    "distill": ("distill_command", "distill_command"),
}


def _checked(check, convert, name):
    """An argparse `type` that converts the text, then applies `check`."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"`{name}` must be a number. Received: {name}={text!r}."
            ) from None
        try:
            return check(name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _positive_int(name):
    return _checked(check_positive_int, int, name)


def _positive_float(name):
    return _checked(check_positive_number, float, name)


def _alpha(name, value):
    """Distillation's label weight, in [0, 1] (1 included)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`{name}` must be between 0 and 1. Received: {name}={value}."
        )
    return value


def _in_range(name, low, high):
    return _checked(lambda n, v: check_in_range(n, v, low, high), float, name)


def _test_fraction(name, value):
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"`{name}` must be between 0 and 1 (both excluded), e.g. 0.2. "
            f"Received: {name}={value}."
        )
    return value


def _image_size(text):
    """`--image-size`: "64" (square) or "HEIGHTxWIDTH", e.g. "64x48"."""
    parts = text.lower().split("x")
    try:
        size = [int(p) for p in parts]
    except ValueError:
        size = []
    if len(parts) == 1 and size:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(
            "`image_size` must be HEIGHTxWIDTH in pixels, e.g. 64x48, or "
            f"one number for a square. Received: image_size={text!r}."
        )
    return size


def _check_t0(name, value):
    value = check_positive_number(name, value)
    if value > 1:
        raise ValueError(
            f"`{name}` must be in (0, 1]: the fraction of training after "
            f"which FreezeOut freezes the first layer group (before scaling)"
            f", e.g. 0.8. Received: {name}={value}."
        )
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" unless the help text states the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def _version() -> str:
    from keras_snapshot import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-snapshot",
        description="Snapshot Ensembles for Keras (Huang et al. 2017, "
        "arXiv:1704.00109): train 1, get M for free.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, **kwargs):
        return commands.add_parser(
            name, formatter_class=_HelpFormatter, **kwargs
        )

    train = command(
        "train",
        help="train with snapshots, evaluate, export and report",
        description="Train one model with a cyclic cosine learning rate, "
        "save a snapshot per cycle, evaluate the snapshots and their "
        "ensembles, export the ensemble and write a report. Running the "
        "same command again on the same --output-dir resumes an "
        "interrupted run.",
    )
    data = train.add_argument_group(
        "data",
        "your own data with --data, or a named dataset with --dataset "
        "(default: fashion_mnist_small)",
    )
    data.add_argument(
        "--data",
        metavar="PATH",
        help="a folder of images in class subfolders (PATH/cat/1.png, ...; "
        "or split folders PATH/train/<class>/ with PATH/test/<class>/, "
        "PATH/val/<class>/ or both, any case; val/ is the test split "
        "without test/), streamed from disk; or an .npz file with arrays x "
        "and y (or x_train, y_train, x_test, y_test) of uint8 or float "
        "images (0-255 in every split if any value is above 1) and labels "
        "0..K-1 (default: none, --dataset is used)",
    )
    data.add_argument(
        "--dataset",
        help="'fashion_mnist_small' (1,000 train / 5,000 test Fashion-MNIST "
        "images bundled with the package), 'digits' (scikit-learn's bundled "
        "8x8 digits, the quick option), "
        "'fashion_mnist_local' (Debian's dataset-fashion-mnist files) or "
        "any tensorflow-datasets image classification name (cifar10, ...), "
        "streamed (default: fashion_mnist_small, without --data)",
    )
    data.add_argument(
        "--image-size",
        type=_image_size,
        metavar="HxW",
        help="--data folder only: resize every image to HEIGHTxWIDTH "
        "(needed when the images differ in size; default: their own size)",
    )
    data.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="--data folder only: 1 (grayscale) or 3 (RGB) (default: 1 "
        "when every image is grayscale, else 3)",
    )
    data.add_argument(
        "--test-fraction",
        type=_checked(_test_fraction, float, "test_fraction"),
        default=0.2,
        help="--data without a test split of its own: the fraction held out "
        "for test, stratified by class, the same images whatever --seed",
    )
    train.add_argument(
        "--data-dir",
        help="tensorflow-datasets data directory (default: tfds's own)",
    )
    train.add_argument(
        "--model",
        default="flat_cnn",
        help="flat_cnn, small_cnn, resnet20, resnet56, resnet110, densenet40, "
        "wrn32_4, or the path of a .keras model file. A .keras model whose "
        "first layer after the Input (past resizing, cropping and "
        "augmentation) scales 0-255 down (Rescaling with |scale| <= 0.05, "
        "e.g. 1/255, or Normalization with a mean above 2) gets raw pixel "
        "values 0-255; any other model gets pixel values in [0, 1]",
    )
    train.add_argument(
        "--epochs", type=_positive_int("epochs"), default=100, help="epochs"
    )
    train.add_argument(
        "--snapshots",
        dest="num_snapshots",
        type=_positive_int("snapshots"),
        default=4,
        help="number of cycles and snapshots M",
    )
    train.add_argument(
        "--lr",
        dest="learning_rate",
        type=_positive_float("lr"),
        default=0.1,
        help="initial learning rate of every cycle",
    )
    train.add_argument(
        "--batch-size",
        type=_positive_int("batch_size"),
        default=64,
        help="batch size",
    )
    train.add_argument(
        "--momentum",
        type=_in_range("momentum", 0.0, 1.0),
        default=0.9,
        help="SGD momentum, in [0, 1)",
    )
    train.add_argument(
        "--weight-decay",
        type=_in_range("weight_decay", 0.0, 1.0),
        default=5e-3,
        help="decoupled weight decay of the SGD optimizer (Keras "
        "`SGD(weight_decay=...)`: each step multiplies the weights by "
        "1 - lr * weight_decay). It is the only weight decay: the models "
        "add no L2 regularizer. The papers' coupled L2 of 1e-4 with "
        "momentum 0.9 corresponds to about 1e-3 here",
    )
    train.add_argument(
        "--augment",
        action="store_true",
        help="random crop with 4-pixel padding and horizontal flip "
        "(the paper's CIFAR/SVHN augmentation)",
    )
    train.add_argument(
        "--validation-fraction",
        type=_in_range("validation_fraction", 0.0, 1.0),
        default=0.1,
        help="fraction of the training data held out for validation",
    )
    train.add_argument(
        "--no-recalibrate-bn",
        dest="recalibrate_bn",
        action="store_false",
        help="save snapshots with their BatchNorm moving averages as they "
        "are instead of recomputing them on training data (default: "
        "recompute)",
    )
    train.add_argument(
        "--select",
        choices=("all", "last_m", "greedy"),
        default="all",
        help="which ensemble to export: all snapshots, the best last m, "
        "or greedy weights, chosen on the validation split",
    )
    train.add_argument(
        "--temperature-scaling",
        action="store_true",
        help="calibrate the exported ensemble with a temperature fitted on "
        "the validation split",
    )
    train.add_argument(
        "--baseline",
        action="store_true",
        help="also train a single model with one cosine decay on the same "
        "budget, for comparison",
    )
    freezeout = train.add_argument_group(
        "FreezeOut (Brock et al. 2017, arXiv:1706.04983)",
        "train one model whose layer groups freeze one after the other, "
        "instead of snapshots; with --baseline, next to the same model "
        "trained normally",
    )
    freezeout.add_argument(
        "--freezeout",
        action="store_true",
        help="train a FreezeOut single model: one cosine anneal of --lr "
        "over the budget, per layer group, and no snapshots (--snapshots "
        "is not used)",
    )
    freezeout.add_argument(
        "--t0",
        type=_checked(_check_t0, float, "t0"),
        default=0.8,
        help="fraction of training after which the first group freezes, "
        "before scaling, in (0, 1]",
    )
    freezeout.add_argument(
        "--freezeout-scaling",
        choices=("cubic", "squared", "linear"),
        default="cubic",
        help="how the freeze times grow with depth",
    )
    freezeout.add_argument(
        "--no-scale-lr",
        dest="scale_lr",
        action="store_false",
        help="start every group at --lr instead of --lr / t_i (default: "
        "scaled)",
    )
    train.add_argument(
        "--method",
        choices=("snapshot", "fge", "swa", "sgdr"),
        default="snapshot",
        help="snapshot: SnapshotSchedule cycles; fge: a normal phase then "
        "Fast Geometric Ensembling cycles; swa: running weight average in "
        "the final phase, exported as one model; sgdr: CosineDecayRestarts "
        "with t_mul=2, a snapshot at each restart",
    )
    train.add_argument(
        "--strategy",
        default="default",
        choices=STRATEGY_NAMES,
        help="tf.distribute strategy",
    )
    train.add_argument(
        "--output-dir",
        help="run directory (default: runs/<data>_<model>_seed<seed>, with "
        "_<method> or _freezeout before _seed for other methods; <data> and "
        "<model> are the stems of --data and of a .keras --model)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an existing run directory instead of resuming it",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed")

    evaluate = command(
        "evaluate", help="re-evaluate a run's snapshots and ensembles"
    )
    evaluate.add_argument("run_dir", help="a run directory of `train`")
    evaluate.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="split to evaluate on",
    )
    evaluate.add_argument(
        "--data-dir",
        help="tensorflow-datasets data directory (default: tfds's own)",
    )

    export = command(
        "export", help="build an ensemble from a run and export it"
    )
    export.add_argument("run_dir", help="a run directory of `train`")
    export.add_argument(
        "output",
        help="new folder for ensemble.keras and the --format's saved_model/,"
        " ensemble.tflite or ensemble.onnx (an existing file or non-empty "
        "folder needs --overwrite)",
    )
    export.add_argument(
        "--format",
        choices=("saved_model", "tflite", "onnx"),
        default="saved_model",
        help="serving format; each names its output `probabilities` (onnx "
        'needs pip install "keras-snapshot[onnx]")',
    )
    export.add_argument(
        "--quantization",
        choices=("dynamic_range", "float16"),
        help="--format tflite only: weights as int8 or float16 (default: "
        "float32)",
    )
    export.add_argument(
        "--serving-version",
        type=_positive_int("serving_version"),
        metavar="N",
        help="--format saved_model only: write saved_model/N/, the numbered "
        "version folder TensorFlow Serving loads (default: saved_model/)",
    )
    export.add_argument(
        "--last",
        type=_positive_int("last"),
        help="keep only the last N chosen snapshots (default: all)",
    )
    export.add_argument(
        "--select",
        choices=("all", "last_m", "greedy"),
        default="all",
        help="which ensemble, chosen on the run's validation split",
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file, or the exported files in an "
        "existing folder",
    )
    export.add_argument(
        "--data-dir",
        help="tensorflow-datasets data directory (default: tfds's own)",
    )
    distill = command(
        "distill",
        help="distil a run's exported ensemble into one model",
        description="Train a fresh copy of the snapshot architecture on "
        "the exported ensemble's soft targets plus the labels (Hinton et "
        "al. 2015); saves RUN_DIR/student.keras and adds its test scores "
        "to report.json.",
    )
    distill.add_argument("run_dir", help="a run directory of `train`")
    distill.add_argument(
        "--temperature",
        type=_positive_float("temperature"),
        default=4.0,
        help="softmax temperature of the soft targets",
    )
    distill.add_argument(
        "--alpha",
        type=_checked(_alpha, float, "alpha"),
        default=0.1,
        help="weight of the hard-label loss, in [0, 1]",
    )
    distill.add_argument(
        "--epochs",
        type=_positive_int("epochs"),
        help="epochs of student training (default: the run's epochs)",
    )
    distill.add_argument(
        "--data-dir",
        help="tensorflow-datasets data directory (default: tfds's own)",
    )
    for sub in (evaluate, export):
        sub.add_argument(
            "--allow-unfinished",
            action="store_true",
            help="use the snapshots of a run whose training has not finished",
        )
    for sub in (train, distill):
        sub.add_argument(
            "--verbose",
            action="count",
            default=0,
            help="Keras's progress bar for every epoch, instead of one bar "
            "for the whole command, and TensorFlow's start-up log; twice "
            "(or --verbose 2): one line per epoch (default: off; "
            "--verbose 0 and 1 also work)",
        )
    for sub in (train, evaluate, export, distill):
        sub.add_argument(
            "--debug",
            action="store_true",
            help="show full tracebacks for errors",
        )
    return parser


def _verbose_counts(argv: list) -> list:
    """`--verbose N` (N = 0, 1, 2; the old integer option) as N flags.

    `--verbose` is a count (`--verbose --verbose` is 2); an integer after it
    would otherwise be refused, or taken for `distill`'s RUN_DIR.
    """
    out = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return out + argv[i:]
        value = None
        if word.startswith("--verbose="):
            value = word.split("=", 1)[1]
        elif word == "--verbose" and i + 1 < len(argv):
            if argv[i + 1] in ("0", "1", "2"):
                value = argv[i + 1]
                i += 1
        if value is None:
            out.append(word)
        elif value in ("0", "1", "2"):
            out += ["--verbose"] * int(value)
        else:
            out.append(word)  # argparse refuses `--verbose=x` in one line.
        i += 1
    return out


# TensorFlow's start-up lines, which no log level hides: each of the two
# shared libraries that `import tensorflow` loads (libtensorflow_framework
# and, for `tf.profiler`, _pywrap_profiler_plugin) has its own copy of absl
# logging and of the oneDNN notice, so each line comes twice.
_TENSORFLOW_STARTUP_LINES = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on.",
    "cpu_feature_guard.cc",
    "To enable the following instructions:",
    "failed call to cuInit",
)


def quiet_tensorflow() -> None:
    """Sets TensorFlow's C++ log level, unless the user has set one.

    INFO and WARNING are hidden; without an NVIDIA driver also ERROR, whose
    only line there is "failed call to cuInit".
    """
    gpu_driver = os.path.exists("/dev/nvidiactl")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if gpu_driver else "3")


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow without its start-up lines on stderr.

    TensorFlow writes some from C++ to fd 2 whatever the log level: fd 2
    goes to a temporary file during the import, and the other lines are
    written back. Without effect when `TF_CPP_MIN_LOG_LEVEL` is 0.
    """
    import tempfile

    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        importlib.import_module("tensorflow")
        return
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # No file descriptor 2: nothing to keep quiet.
        importlib.import_module("tensorflow")
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            importlib.import_module("tensorflow")
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            for line in text.splitlines(keepends=True):
                if not any(s in line for s in _TENSORFLOW_STARTUP_LINES):
                    sys.stderr.write(line)
            sys.stderr.flush()


def main(argv=None) -> int:
    """Entry point of `keras-snapshot` and `python -m keras_snapshot`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_verbose_counts(argv))
    verbose = getattr(args, "verbose", 0)
    if not verbose:
        quiet_tensorflow()
    # TensorFlow's Python warnings (e.g. retracing while predicting with
    # several snapshots) are noise on the command line.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        try:
            keras_snapshot.require_tensorflow()
        except ImportError as e:
            raise UsageError(str(e)) from None
        if not verbose:
            import_tensorflow_quietly()
        # Importing the command imports Keras, and with it the package's
        # Keras objects (see `keras_snapshot/__init__.py`).
        module, function = _COMMANDS[args.command]
        run = getattr(
            importlib.import_module(f"keras_snapshot.app.{module}"), function
        )
        return run(args)
    except UsageError as e:
        # Bad input, in one line. Any other exception is a bug: it keeps
        # its traceback and exit code 1.
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"keras-snapshot {args.command}: error: {message or repr(e)}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            "\nInterrupted. Run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    finally:
        release_run_dirs()


if __name__ == "__main__":
    sys.exit(main())
