"""Printing the way Keras callbacks do, in one place for every callback."""

import keras


def print_msg(message: str) -> None:
    """Prints `message` on its own line, or logs it when Keras is quiet.

    Like Keras's own callbacks: stdout while interactive logging is on,
    absl logging otherwise.

    Example:

    ```python
    print_msg("Snapshot 1/4 saved at step 200")
    ```
    """
    if keras.config.is_interactive_logging_enabled():
        print(message, flush=True)
    else:
        from absl import logging

        logging.info(message)
