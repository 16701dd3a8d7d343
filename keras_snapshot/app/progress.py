"""One progress bar over every `fit` a command runs: the quiet default.

Without `--verbose`, `fit` runs with `verbose=0` under one
`keras.utils.Progbar` over all the command's epochs, updated from an epoch
hook. Lines printed by callbacks go above the bar: `_BarStream` ends (or,
on a terminal, erases and redraws) the bar before anything else is written.
"""

import sys

import keras


class CommandProgress:
    """The command's progress bar, over `total_epochs` in all its fits.

    Use it as a context manager around the fits; `callbacks(epochs)` gives
    the callbacks of the next fit (none with `verbose`, when Keras draws
    its own bars). `fit_verbose` is the `verbose` to pass to `fit`.

    Args:
        total_epochs: The epochs of every fit the command may run.
        verbose: The command's `--verbose` count: 0 for this bar, 1 or 2
            for Keras's own progress output (`fit(verbose=...)`).
    """

    def __init__(self, total_epochs: int, verbose: int = 0):
        self.total_epochs = total_epochs
        self.verbose = verbose
        self._next_offset = 0
        self._bar = None
        self._current = 0
        self._values = []
        self._on_line = False  # The bar's line is the open line.
        self._drawing = False
        self._stdout = None

    @property
    def fit_verbose(self) -> int:
        return min(self.verbose, 2)

    def callbacks(self, epochs: int) -> list:
        """The callbacks of the next fit, of `epochs` epochs."""
        offset = self._next_offset
        self.skip(epochs)
        if self.verbose:
            return []
        return [_EpochProgress(self, offset)]

    def skip(self, epochs: int) -> None:
        """Counts a fit that does not run (its run finished) as done."""
        self._next_offset += epochs

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        if self._stdout is not None:
            sys.stdout = self._stdout
            self._stdout = None
        if self._bar is not None and exc_type is None:
            # The bar's last line, with the time the fits took.
            self._bar.update(self._current, self._values, finalize=True)
        elif self._on_line:
            sys.stdout.write("\n")
            sys.stdout.flush()
        self._on_line = False
        return False

    def update(self, current: int, logs=None) -> None:
        """Draws the bar at `current` epochs done, with the last `logs`."""
        if self._bar is None:
            self._bar = keras.utils.Progbar(
                self.total_epochs,
                interval=0.0,
                unit_name="epoch",
            )
            self._stdout = sys.stdout
            sys.stdout = _BarStream(self._stdout, self)
        self._current = min(current, self.total_epochs)
        if logs:
            self._values = [(k, float(v)) for k, v in logs.items()]
            # Shown as the epoch's value, not averaged over epochs (the
            # `stateless_metrics` argument is Keras 3.9+).
            self._bar.stateful_metrics.update(logs)
        self._draw()

    def _draw(self) -> None:
        self._drawing = True
        try:
            # Not finalized before the command ends: the bar keeps its ETA
            # and its line stays open for the next update.
            self._bar.update(self._current, self._values, finalize=False)
        finally:
            self._drawing = False
        self._on_line = True

    def _before_write(self, stream) -> None:
        """Ends (or, on a terminal, erases) the bar's line."""
        if self._drawing or not self._on_line:
            return
        self._on_line = False
        stream.write("\r\x1b[K" if _isatty(stream) else "\n")

    def _after_write(self, stream, text: str) -> None:
        """On a terminal, draws the bar again below a completed line."""
        if not self._drawing and text.endswith("\n") and _isatty(stream):
            self._draw()


def _isatty(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


class _BarStream:
    """`sys.stdout` while the bar is drawn: other lines go above the bar."""

    def __init__(self, stream, progress: CommandProgress):
        self._stream = stream
        self._progress = progress

    def write(self, text):
        self._progress._before_write(self._stream)
        written = self._stream.write(text)
        self._progress._after_write(self._stream, text)
        return written

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _EpochProgress(keras.callbacks.Callback):
    """Moves the command's bar at each epoch of one fit (an epoch hook)."""

    def __init__(self, progress: CommandProgress, offset: int):
        super().__init__()
        self.progress = progress
        self.offset = offset

    def on_epoch_begin(self, epoch, logs=None):
        if self.progress._bar is None:
            # The first epoch of the command (later if resumed): show the
            # bar before the first epoch ends.
            self.progress.update(self.offset + epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.progress.update(self.offset + epoch + 1, logs)
