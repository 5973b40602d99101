"""kgpt: GPT-style language models in Keras 3 / TensorFlow.

`import kgpt` does not import TensorFlow: the names below load their modules on first use, and
kgpt's Keras classes are registered as soon as Keras is imported (before or after kgpt), so
`keras.saving.load_model("checkpoints/run/final.keras")` works after `import kgpt`.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "kgpt.config",
    "GPT": "kgpt.model.gpt",
    "build_model": "kgpt.model.gpt",
    "count_parameters": "kgpt.model.gpt",
    "load_model": "kgpt.rundir",
    "save_model": "kgpt.model.saving",
}
# Importing them registers every kgpt class a `.keras` file may name: models and layers, and the
# training's metric, schedule and optimizer (a checkpoint holds its compiled state).
_REGISTRY_MODULES = ("kgpt.model.saving", "kgpt.training.metrics", "kgpt.training.schedule",
                     "kgpt.training.distribute")


def __getattr__(name):
    if name in _EXPORTS:
        if _EXPORTS[name] != "kgpt.config":
            # Keras first: its import registers kgpt's classes, which import the module below; from
            # inside it (half initialised) that would be a circular import.
            importlib.import_module("keras")
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kgpt' has no attribute {name!r}")


def _register():
    for module in _REGISTRY_MODULES:
        importlib.import_module(module)


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Imports kgpt's Keras classes right after `keras` itself: a documented lazy import, since
    registering needs TensorFlow (seconds to import), which `kgpt --help` must not pay for."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            sys.modules["keras"] = module
            _register()

        spec.loader.exec_module = exec_module
        return spec


if "keras" in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _RegisterAfterKeras())

__all__ = sorted(_EXPORTS)
