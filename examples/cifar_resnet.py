"""The paper's CIFAR setup: ResNet-110, M=5 snapshots, 200 epochs, rate 0.2.

Huang et al. 2017 (arXiv:1704.00109), Table 1: ResNet-110 on CIFAR-100,
28.02% single model -> 24.19% snapshot ensemble (alpha0 = 0.2). Batch 64,
standard augmentation (4-pixel padding, random crop, horizontal flip).
As in the paper, the network trains on all 50,000 training images: no
validation images are held out (`--validation-fraction 0`), the test set
is only watched during training, and the ensemble averages all M
snapshots, so nothing is chosen on the test set. Pass
`--validation-fraction 0.1` to hold out 5,000 training images instead.
Needs a GPU (about a day on one V100-class GPU for 200 epochs) and
downloads CIFAR through tensorflow-datasets on first use (offline, pass
`--data-dir` the folder where it was downloaded).

    python examples/cifar_resnet.py --dataset cifar100
    python examples/cifar_resnet.py --dataset cifar10 --strategy mirrored
    python examples/cifar_resnet.py --epochs 2 --depth 20   # a quick check

Killed or disconnected? Run the same command again: training resumes from
the last epoch (keras.callbacks.BackupAndRestore) and snapshots already
taken are kept.
"""

import argparse
import os

import keras
import numpy as np

import keras_snapshot
from keras_snapshot.app.datasets import load_dataset
from keras_snapshot.app.datasets import make_dataset
from keras_snapshot.app.distribute import get_strategy
from keras_snapshot.app.models import resnet

parser = argparse.ArgumentParser()
parser.add_argument("--dataset", default="cifar100")
parser.add_argument("--data-dir")
parser.add_argument("--validation-fraction", type=float, default=0.0)
parser.add_argument("--depth", type=int, default=110)
parser.add_argument("--epochs", type=int, default=200)
parser.add_argument("--snapshots", type=int, default=5)
parser.add_argument("--lr", type=float, default=0.2)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--strategy", default="default")
parser.add_argument("--output-dir", default="cifar_run")
args = parser.parse_args()

data = load_dataset(
    args.dataset,
    data_dir=args.data_dir,
    validation_fraction=args.validation_fraction,
)
print(
    f"Training on {len(data.x_train)} images, validating on "
    f"{len(data.x_val)}, testing on {len(data.x_test)}."
)
strategy = get_strategy(args.strategy)
batch_size = args.batch_size * strategy.num_replicas_in_sync
steps_per_epoch = int(np.ceil(len(data.x_train) / batch_size))
schedule = keras_snapshot.SnapshotSchedule.from_epochs(
    args.lr, args.epochs, steps_per_epoch, args.snapshots
)
with strategy.scope():
    model = resnet(args.depth, data.input_shape, data.num_classes)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
train = make_dataset(
    data.x_train, data.y_train, batch_size, shuffle=True, augment=True
)
test = make_dataset(data.x_test, data.y_test, 500)
snapshots = os.path.join(args.output_dir, "snapshots")
logs = os.path.join(args.output_dir, "logs")
model.fit(
    train,
    epochs=args.epochs,
    validation_data=test
    if len(data.x_val) == 0
    else make_dataset(data.x_val, data.y_val, 500),
    callbacks=[
        keras.callbacks.BackupAndRestore(
            os.path.join(args.output_dir, "backup")
        ),
        keras_snapshot.SnapshotCheckpoint(snapshots, log_dir=logs),
        keras.callbacks.TensorBoard(logs),
    ],
)
members = keras_snapshot.load_snapshots(snapshots)
probs = np.stack([m.predict(data.x_test, verbose=0) for m in members])
for m in range(1, len(members) + 1):
    error = keras_snapshot.metrics.evaluate_predictions(
        probs[-m:].mean(axis=0), data.y_test
    )["error"]
    print(f"ensemble of the last {m} snapshots: test error {100 * error:.2f}%")
ensemble = keras_snapshot.build_ensemble(snapshots)
ensemble.save(os.path.join(args.output_dir, "ensemble.keras"))
keras_snapshot.export_ensemble(
    ensemble, os.path.join(args.output_dir, "saved_model")
)
