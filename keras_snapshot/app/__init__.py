"""The `keras-snapshot` application: command line, report, data and models.

The top layer of the package. It only calls the public API of the core
(`keras_snapshot.schedule`, `checkpoint`, `manifest`, `loading`, `ensemble`,
`batchnorm`) and of the analysis layer (`keras_snapshot.metrics`,
`keras_snapshot.selection`); nothing below imports it.
"""
