"""Integrity of a snapshot directory: damaged files, leftovers, bad manifests.

Every test works on a copy of the session's snapshot run (3 snapshots of
the tiny model, at steps 10, 20 and 30) and damages it on purpose.
"""

import glob
import json
import os
import re
import shutil

import keras
import numpy as np
import pytest
from helpers import compile_with_schedule
from helpers import make_data
from helpers import make_model
from helpers import train_snapshots

import keras_snapshot
from keras_snapshot import build_ensemble
from keras_snapshot import load_snapshots
from keras_snapshot import manifest as manifest_lib
from keras_snapshot import read_manifest
from keras_snapshot import snapshot_paths


@pytest.fixture
def snapshots(snapshot_run, tmp_path):
    """A private copy of the shared snapshot directory, free to damage."""
    directory = str(tmp_path / "snapshots")
    shutil.copytree(snapshot_run[0], directory)
    return directory


def edit_manifest(directory, change):
    """Rewrites manifest.json by hand, as a user or an attacker could."""
    path = manifest_lib.SnapshotDirectory(directory).manifest_path
    with open(path) as f:
        manifest = json.load(f)
    change(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def predictions(paths, x):
    models = [keras.saving.load_model(p, compile=False) for p in paths]
    return np.mean([m.predict(x, verbose=0) for m in models], axis=0)


def truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def corrupt(path):
    """Flips one byte in the middle; the size stays the same."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


DAMAGES = {
    "truncated": (truncate, ValueError, "truncated"),
    "corrupted": (corrupt, ValueError, "sha256"),
    "deleted": (os.remove, FileNotFoundError, "missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_snapshot_is_refused_by_name(snapshots, damage):
    damage_file, error, reason = DAMAGES[damage]
    bad = os.path.join(snapshots, "snapshot-02.keras")
    damage_file(bad)
    for entry_point in (
        build_ensemble,
        load_snapshots,
        snapshot_paths,
        keras_snapshot.select_snapshots,
    ):
        kwargs = {}
        if entry_point is keras_snapshot.select_snapshots:
            kwargs["validation_data"] = make_data(n=8)
        with pytest.raises(error, match=re.escape(bad)) as info:
            entry_point(snapshots, **kwargs)
        assert reason in str(info.value)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_skip_invalid_warns_and_uses_the_rest(snapshots, damage):
    DAMAGES[damage][0](os.path.join(snapshots, "snapshot-02.keras"))
    x, _ = make_data(n=16, seed=3)
    with pytest.warns(UserWarning, match="snapshot-02.keras"):
        ensemble = build_ensemble(snapshots, skip_invalid=True)
    good = [os.path.join(snapshots, f"snapshot-0{i}.keras") for i in (1, 3)]
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0), predictions(good, x), atol=1e-6
    )
    with pytest.warns(UserWarning, match="snapshot-02.keras"):
        assert snapshot_paths(snapshots, skip_invalid=True) == good
    with pytest.warns(UserWarning, match="snapshot-02.keras"):
        assert len(load_snapshots(snapshots, skip_invalid=True)) == 2


def test_skip_invalid_with_nothing_left_is_an_error(snapshots):
    for i in (1, 2, 3):
        truncate(os.path.join(snapshots, f"snapshot-0{i}.keras"))
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match="no usable snapshots"),
    ):
        build_ensemble(snapshots, skip_invalid=True)


def test_manifest_listing_a_file_that_is_not_there(snapshots):
    def add_entry(manifest):
        manifest["snapshots"].append(
            {
                **manifest["snapshots"][-1],
                "index": 4,
                "file": "snapshot-04.keras",
                "step": 40,
            }
        )

    edit_manifest(snapshots, add_entry)
    missing = os.path.join(snapshots, "snapshot-04.keras")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        build_ensemble(snapshots)
    with pytest.warns(UserWarning, match="snapshot-04.keras"):
        assert len(snapshot_paths(snapshots, skip_invalid=True)) == 3


def test_interrupted_write_leftovers_are_ignored_then_cleaned(snapshots):
    # What a write killed half-way leaves: a hidden scratch folder with a
    # truncated snapshot, and a half-written manifest under a hidden name.
    scratch = os.path.join(snapshots, ".partial-k1ll3d")
    os.mkdir(scratch)
    half = os.path.join(scratch, "snapshot-03.keras")
    shutil.copy(os.path.join(snapshots, "snapshot-03.keras"), half)
    truncate(half)
    stray_json = os.path.join(snapshots, ".partial-x1y2.json")
    with open(stray_json, "w") as f:
        f.write('{"format": "keras_snapshot.manif')
    # A kill after the rename, before the manifest: a complete file that
    # the manifest does not list yet.
    edit_manifest(snapshots, lambda m: m["snapshots"].pop())
    complete = [
        os.path.join(snapshots, f"snapshot-0{i}.keras") for i in (1, 2, 3)
    ]
    pattern = os.path.join(snapshots, "**", "*.keras")
    assert sorted(glob.glob(pattern, recursive=True)) == complete
    assert snapshot_paths(snapshots) == complete[:2]
    assert len(load_snapshots(snapshots)) == 2

    # Training again in the directory starts by removing the leftovers.
    # (A fresh run is at step 0, so the old snapshots are retaken too.)
    with pytest.warns(UserWarning, match="were moved to"):
        train_snapshots(snapshots)
    assert not [n for n in os.listdir(snapshots) if n.startswith(".partial")]
    entries = read_manifest(snapshots)["snapshots"]
    assert [e["index"] for e in entries] == [1, 2, 3]
    for entry in entries:
        manifest_lib.SnapshotDirectory(snapshots).verified_path(
            manifest_lib.SnapshotEntry(**entry)
        )


@pytest.mark.parametrize(
    "name",
    [
        "../snapshot-01.keras",
        "{outside}",
        "sub/snapshot-01.keras",
        "..",
        "",
        7,
    ],
    ids=["dotdot", "absolute", "subfolder", "parent", "empty", "not-a-string"],
)
def test_manifest_may_not_point_outside_its_directory(snapshots, name):
    outside = os.path.join(os.path.dirname(snapshots), "outside.keras")
    shutil.copy(os.path.join(snapshots, "snapshot-01.keras"), outside)
    if name == "{outside}":
        name = outside

    def point_away(manifest):
        manifest["snapshots"][0]["file"] = name

    edit_manifest(snapshots, point_away)
    for entry_point in (read_manifest, build_ensemble, snapshot_paths):
        with pytest.raises(ValueError, match="not a plain file name") as info:
            entry_point(snapshots)
        assert repr(name) in str(info.value)


def test_symlink_pointing_outside_is_refused(snapshots):
    link = os.path.join(snapshots, "snapshot-01.keras")
    outside = os.path.join(os.path.dirname(snapshots), "outside.keras")
    shutil.move(link, outside)  # Same bytes: the sha256 alone would pass.
    os.symlink(outside, link)
    for entry_point in (read_manifest, build_ensemble, load_snapshots):
        with pytest.raises(ValueError, match="points outside") as info:
            entry_point(snapshots)
        assert link in str(info.value)


BAD_MANIFESTS = {
    "not-json": ("{not json", "not valid JSON"),
    "empty-file": ("", "not valid JSON"),
    "a-list": ("[]", "not a keras_snapshot manifest"),
    "other-format": (
        '{"format": "other", "snapshots": []}',
        "not a keras_snapshot manifest",
    ),
    "entry-without-sha256": (
        lambda m: m["snapshots"][0].pop("sha256"),
        "malformed entry",
    ),
    "index-as-string": (
        lambda m: m["snapshots"][0].update(index="1"),
        "not an integer",
    ),
    "duplicate-index": (
        lambda m: m["snapshots"][1].update(index=1),
        "the same index more than once: [1]",
    ),
    "duplicate-file": (
        lambda m: m["snapshots"][1].update(file="snapshot-01.keras"),
        "the same file more than once: ['snapshot-01.keras']",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_malformed_manifest_gives_a_clear_error(snapshots, case):
    content, message = BAD_MANIFESTS[case]
    path = manifest_lib.SnapshotDirectory(snapshots).manifest_path
    if callable(content):
        edit_manifest(snapshots, content)
    else:
        with open(path, "w") as f:
            f.write(content)
    for entry_point in (read_manifest, build_ensemble):
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            entry_point(snapshots)
        assert path in str(info.value)


# Entries that SnapshotCheckpoint never writes: refused by the manifest's
# path, with the value received. Indices run from 1 and are unique; a
# -5 or 10**30 would reorder `last=`.
BAD_ENTRIES = {
    "index-zero": ("index", 0, "index out of range", "Received: index=0"),
    "negative-index": (
        "index",
        -5,
        "index out of range",
        "Received: index=-5",
    ),
    "huge-index": (
        "index",
        10**30,
        "index out of range",
        f"Received: index={10**30}",
    ),
    "negative-step": ("step", -1, "negative step", "Received: step=-1"),
    "backslash-in-file": (
        "file",
        "sub\\snapshot-01.keras",
        "not a plain file name",
        "Received: file='sub\\\\snapshot-01.keras'",
    ),
    "nul-in-file": (
        "file",
        "snapshot-01.keras\0",
        "not a plain file name",
        "Received: file='snapshot-01.keras\\x00'",
    ),
    "hidden-file": (
        "file",
        ".partial-snapshot-01.keras",
        "which is not a snapshot",
        "Received: file='.partial-snapshot-01.keras'",
    ),
    "not-a-keras-file": (
        "file",
        "manifest.json",
        "which is not a snapshot",
        "Received: file='manifest.json'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_bad_entry_is_refused_with_the_manifest_path(snapshots, case):
    key, value, message, received = BAD_ENTRIES[case]
    edit_manifest(snapshots, lambda m: m["snapshots"][0].update({key: value}))
    path = manifest_lib.SnapshotDirectory(snapshots).manifest_path
    for entry_point in (read_manifest, build_ensemble, snapshot_paths):
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            entry_point(snapshots)
        assert path in str(info.value)
        assert received in str(info.value)


def test_indices_of_long_plans_are_accepted(snapshots):
    """The bound never refuses an index within the manifest's cycle ends."""
    limit = manifest_lib.MAX_SNAPSHOT_INDEX

    def renumber(manifest, last_index):
        manifest["snapshots"][-1]["index"] = last_index

    edit_manifest(snapshots, lambda m: renumber(m, limit))
    assert [e["index"] for e in read_manifest(snapshots)["snapshots"]] == [
        1,
        2,
        limit,
    ]
    edit_manifest(snapshots, lambda m: renumber(m, limit + 1))
    with pytest.raises(ValueError, match=f"from 1 to {limit}"):
        read_manifest(snapshots)
    # A plan longer than the bound (cycle_end_steps) raises it.
    edit_manifest(
        snapshots,
        lambda m: m.update(cycle_end_steps=list(range(1, limit + 3))),
    )
    assert read_manifest(snapshots)["snapshots"][-1]["index"] == limit + 1


def test_snapshots_set_aside_by_a_crashed_rerun_are_named(snapshots):
    """A rerun that died before its first snapshot set the old ones aside."""

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("killed before the first snapshot")

    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    compile_with_schedule(model, total_steps=30, num_snapshots=3)
    callbacks = [keras_snapshot.SnapshotCheckpoint(snapshots, verbose=0)]
    with (
        pytest.warns(UserWarning, match="were moved to"),
        pytest.raises(RuntimeError, match="killed"),
    ):
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=5,
            verbose=0,
            callbacks=[*callbacks, Crash()],
        )
    assert read_manifest(snapshots)["snapshots"] == []
    (aside,) = glob.glob(
        os.path.join(snapshots, manifest_lib.SUPERSEDED_PREFIX + "*")
    )
    x_val = make_data(n=8)
    entry_points = {
        "build_ensemble": lambda: build_ensemble(snapshots),
        "load_snapshots": lambda: load_snapshots(snapshots),
        "snapshot_paths": lambda: snapshot_paths(snapshots),
        "select_snapshots": lambda: keras_snapshot.select_snapshots(
            snapshots, validation_data=x_val
        ),
        "average_weights": lambda: keras_snapshot.average_weights(snapshots),
    }
    for name, call in entry_points.items():
        with pytest.raises(ValueError, match="no usable snapshots") as info:
            call()
        message = str(info.value)
        assert f"{aside} (3 snapshots)" in message, name
        assert f"pass that folder instead of {snapshots}" in message, name
    assert len(snapshot_paths(aside)) == 3
    assert len(build_ensemble(aside).inputs) == 1


def lambda_snapshot_directory(directory):
    """Trains a model with a `Lambda` layer and takes one snapshot of it."""
    keras.utils.set_random_seed(0)
    x, y = make_data(n=32)
    inputs = keras.Input((8,))
    scaled = keras.layers.Lambda(lambda t: t * 0.5)(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(scaled)
    model = keras.Model(inputs, outputs)
    compile_with_schedule(model, total_steps=2, num_snapshots=1)
    callback = keras_snapshot.SnapshotCheckpoint(directory, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    return model, x


def test_lambda_snapshot_needs_explicit_opt_in(tmp_path):
    directory = str(tmp_path / "lambda")
    model, x = lambda_snapshot_directory(directory)
    path = os.path.join(directory, "snapshot-01.keras")
    for entry_point in (build_ensemble, load_snapshots):
        with pytest.raises(ValueError, match=re.escape(path)) as info:
            entry_point(directory)
        assert "safe_mode=False" in str(info.value)
        assert "Lambda" in str(info.value)
    with pytest.raises(ValueError, match="safe_mode=False"):
        load_snapshots([path])
    ensemble = build_ensemble(directory, safe_mode=False)
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    # Opting in once changes nothing for the next call.
    with pytest.raises(ValueError, match="safe_mode=False"):
        build_ensemble(directory)


def test_disk_full_keeps_earlier_snapshots_and_manifest(tmp_path):
    """A real failed write: the kernel refuses to grow files (EFBIG).

    `RLIMIT_FSIZE` makes every write past a few kilobytes fail as a full
    disk would, without root or a tmpfs; it is set once snapshot 1 is on
    disk, so snapshot 2 (about 30 kB) cannot be written.
    """
    resource = pytest.importorskip("resource")
    import signal

    class FileSizeLimit(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:  # Snapshot 1 was taken in epoch index 1.
                resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))

    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    compile_with_schedule(model, total_steps=30, num_snapshots=3)
    directory = str(tmp_path / "snapshots")
    callbacks = [
        FileSizeLimit(),
        keras_snapshot.SnapshotCheckpoint(directory, verbose=0),
    ]
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Without this the kernel would kill the process with SIGXFSZ.
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with pytest.raises(OSError, match="could not write snapshot 2") as info:
            model.fit(
                x, y, batch_size=16, epochs=5, verbose=0, callbacks=callbacks
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    message = str(info.value)
    assert "snapshot-02.keras" in message and "File too large" in message
    assert "free some space" in message
    entries = read_manifest(directory)["snapshots"]
    assert [e["index"] for e in entries] == [1]
    manifest_lib.SnapshotDirectory(directory).verified_path(
        manifest_lib.SnapshotEntry(**entries[0])
    )
    # The failed fit still holds the lock (no on_train_end): only this
    # process could take it over.
    assert sorted(os.listdir(directory)) == [
        ".lock",
        "manifest.json",
        "snapshot-01.keras",
    ]
