"""The command line's one progress bar (`keras_snapshot.app.progress`)."""

import io
import sys

import pytest

from keras_snapshot.app.progress import CommandProgress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream_type", [io.StringIO, _Terminal])
def test_lines_printed_during_the_bar_go_above_it(stream_type, monkeypatch):
    stream = stream_type()
    monkeypatch.setattr(sys, "stdout", stream)
    with CommandProgress(4) as progress:
        (callback,) = progress.callbacks(4)
        callback.on_epoch_begin(0)
        callback.on_epoch_end(0, {"loss": 0.5})
        print("Snapshot 1/2 saved at step 10")
        callback.on_epoch_end(1, {"loss": 0.25})
        assert sys.stdout is not stream  # Lines pass through the bar.
    assert sys.stdout is stream
    text = stream.getvalue()
    if stream_type is _Terminal:
        # The bar is erased, the line written, the bar drawn again below.
        before, after = text.split("\r\x1b[KSnapshot 1/2 saved at step 10\n")
        assert "1/4" in after.split("\r")[1]
    else:
        # A log file: the bar's line ends before the snapshot line.
        before, after = text.split("\nSnapshot 1/2 saved at step 10\n")
    assert "1/4" in before and "loss: 0.5000" in before
    assert "2/4" in after and "loss: 0.2500" in after
    assert text.endswith("\n")


def test_two_fits_share_the_bar_and_a_skipped_fit_counts_as_done():
    with CommandProgress(6) as progress:
        progress.skip(3)  # A finished run: its fit does not run again.
        (callback,) = progress.callbacks(3)
        assert callback.offset == 3
        callback.on_epoch_end(0)
        assert progress._current == 4


def test_verbose_leaves_the_progress_to_keras():
    progress = CommandProgress(4, verbose=1)
    assert progress.callbacks(4) == [] and progress.fit_verbose == 1
    assert CommandProgress(4, verbose=3).fit_verbose == 2


def test_stdout_is_restored_when_the_fit_fails(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    with pytest.raises(KeyboardInterrupt):
        with CommandProgress(4) as progress:
            progress.callbacks(4)[0].on_epoch_end(0)
            raise KeyboardInterrupt
    assert sys.stdout is stream
    assert stream.getvalue().endswith("\n")
