"""`python -m keras_snapshot` runs the `keras-snapshot` command line."""

import sys

from keras_snapshot.app.cli import main

sys.exit(main())
