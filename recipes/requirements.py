"""The recipes' own dependencies (kerasbn's ``recipes`` extra), checked before they start.

The recipes live in the repository, not in the kerasbn wheel: run them from a
clone with ``pip install -e '.[recipes]'`` (``make demo`` does it).
"""

from __future__ import annotations

import importlib.util
import sys

from recipes.inception_bn import ending

# Module name -> the distribution the `recipes` extra installs.
RECIPE_MODULES = {
    "tensorflow_datasets": "tensorflow-datasets",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
}


def missing_recipe_modules() -> list[str]:
    missing = []
    for module, distribution in RECIPE_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules
            found = False
        if not found:
            missing.append(distribution)
    return missing


def require_recipe_extra() -> None:
    """Exits with one line naming what to install when the `recipes` extra is missing."""
    missing = missing_recipe_modules()
    if missing:
        print(f"error: the recipes need kerasbn's `recipes` extra (missing: {', '.join(missing)}); "
              "from the repository: pip install -e '.[recipes]'", file=sys.stderr)
        sys.exit(ending.REFUSED)
