"""Old public names: they work for one more release, with a warning.

A module lists its old names in a dict and sets
`__getattr__ = module_getattr(__name__, OLD_NAMES)`. Each entry maps the old
name to `(replacement, target)`: `replacement` is what the warning tells the
user to write; `target` is what the old name gives: the new object, a small
adapter with the old signature, or `"module:name"` inside the package
(imported when first asked for). A `target` of None means the name is gone
(it gave different numbers from its replacement): `AttributeError` says what
to write instead.

Example:

```python
OLD_NAMES = {"error_rate": ("evaluate_predictions(probs, y)['error']",
                            _error_rate)}
__getattr__ = module_getattr(__name__, OLD_NAMES)
```
"""

import importlib
import warnings

REMOVED_IN = "0.7"


def module_getattr(module_name: str, old_names: dict):
    """A module `__getattr__` that serves `old_names` with a warning."""

    def __getattr__(name):
        if name not in old_names:
            raise AttributeError(
                f"module {module_name!r} has no attribute {name!r}"
            )
        replacement, target = old_names[name]
        if target is None:
            raise AttributeError(
                f"`{module_name}.{name}` was removed in keras-snapshot 0.6 "
                f"(see CHANGELOG.md): use `{replacement}`."
            )
        if isinstance(target, str):
            target = _resolve(target)
        warnings.warn(
            f"`{module_name}.{name}` is deprecated and will be removed in "
            f"keras-snapshot {REMOVED_IN}: use `{replacement}`.",
            DeprecationWarning,
            stacklevel=2,
        )
        return target

    return __getattr__


def _resolve(target: str):
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(f"keras_snapshot.{module_name}")
    if not attribute:
        return module
    with warnings.catch_warnings():  # The name may be an old one there too.
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(module, attribute)
