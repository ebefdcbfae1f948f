"""Python objects named by reference in a config: 'package.module:name' or 'path/to/file.py:name'.

Reward functions, tools, an environment class and a tool-call parser are all named this way in YAML and on
the command line; this module loads them, and its errors name the field, the reference and what is there.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os


class ReferenceError_(ValueError):
    """A reference could not be loaded; the message names what it was for."""


def resolve_reference(target: str, *, what: str, error=ReferenceError_, kind: str = "callable"):
    """The object `target` ('module:name' or 'path/file.py:name') names; `what` says which setting it is for."""
    if not isinstance(target, str) or ":" not in target:
        raise error(f"{what} {target!r}: expected 'package.module:name' or 'path/to/file.py:name'")
    # rsplit: a Windows path ("C:\\r.py:f") has a colon of its own.
    where, attr = target.rsplit(":", 1)
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    module = load_file(where, what=what, error=error) if is_file else import_module(where, what=what, error=error)
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise error(f"{what} {target!r}: {where!r} has no {kind} {attr!r}; callables there: {available}")
    return obj


def import_module(module_name: str, *, what: str, error=ReferenceError_):
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise error(f"cannot import {what} module {module_name!r}: {e}") from e


def load_file(path: str, *, what: str, error=ReferenceError_):
    """Execute a .py file as a fresh module (a unique name, so two files never collide)."""
    if not os.path.isfile(path):
        raise error(f"{what} file {path!r} does not exist")
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"gspo_ref_{stem}_{digest}", path)
    if spec is None or spec.loader is None:
        raise error(f"cannot load {what} file {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise error(f"{what} file {path!r} raised {type(e).__name__} while loading: {e}") from e
    return module
