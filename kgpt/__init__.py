"""kgpt: GPT-style language models in Keras 3 / TensorFlow.

The package imports TensorFlow lazily: `import kgpt` is cheap, and the public names below load
their modules on first use.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "kgpt.config",
    "GPT": "kgpt.model",
    "build_model": "kgpt.model",
    "count_parameters": "kgpt.model",
    "load_model": "kgpt.saving",
    "save_model": "kgpt.saving",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kgpt' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
