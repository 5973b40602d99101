"""What a training step needs: a rough estimate of its memory against what this machine (or its
GPU) has, so that a recipe that cannot fit is a one-line error before the token store or the model
is built."""

import dataclasses
import os

import tensorflow as tf

from kgpt.model.gpt import count_parameters

# Bytes of the float32 weights, gradients and AdamW's two moments, per parameter.
_BYTES_PER_PARAMETER = 4 * 4


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """An estimate, in bytes, of what one training step holds at its peak (per replica); a lower
    bound of sorts: frameworks keep more (workspace, copies), never much less."""

    parameters: int  # weights, gradients, AdamW moments
    logits: int  # (batch, sequence, vocabulary) logits and their gradient
    attention: int  # (batch, heads, sequence, sequence) scores, kept per layer for the backward pass
    activations: int  # the residual stream and feed-forward activations per layer

    @property
    def total(self):
        return self.parameters + self.logits + self.attention + self.activations


def estimate_training_memory(model_config, batch_size, sequence_length, precision="float32"):
    """`MemoryEstimate` of one training step of a GPT of `model_config` on `batch_size` windows of
    `sequence_length` tokens (per replica).

    Example:
        estimate_training_memory(ModelConfig(vocabulary_size=65, sequence_length=64), 12, 64).total
    """
    c = model_config
    compute = 2 if precision.startswith("mixed") else 4  # bytes of an activation
    parameters = count_parameters(c)  # the GPT's; a GRU of the same sizes is of the same order
    tokens = batch_size * sequence_length
    return MemoryEstimate(
        parameters=parameters * _BYTES_PER_PARAMETER,
        logits=2 * tokens * c.vocabulary_size * 4,  # the loss is computed in float32
        attention=c.num_layers * batch_size * c.num_heads * sequence_length**2 * compute,
        activations=c.num_layers * tokens * (4 * c.hidden_dim + c.intermediate_dim) * compute,
    )


def available_memory():
    """`(bytes, where)` that one replica may use: the first GPU's memory when TensorFlow reports
    it, else the host's available memory (`MemAvailable`); `(None, None)` when unknown."""
    if tf.config.list_physical_devices("GPU"):
        try:
            from tensorflow.python.client import device_lib  # the one place TF reports a GPU's size

            limits = [d.memory_limit for d in device_lib.list_local_devices() if d.device_type == "GPU"]
        except Exception:  # noqa: BLE001  (no figure: no check, rather than a wrong refusal)
            limits = []
        return (min(limits), "on the GPU") if limits else (None, None)
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available on this machine"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available on this machine"
    except (ValueError, OSError, AttributeError):
        return None, None


def _size(count):
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB", "EB"):
        if count < 1000 or unit == "EB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000


def check_training_resources(recipe, model_config, replica_batch_size):
    """Raises `ValueError` when one training step's estimated memory (`estimate_training_memory`)
    exceeds what is available."""
    data = recipe.data
    estimate = estimate_training_memory(model_config, replica_batch_size, data.sequence_length,
                                        recipe.train.precision)
    available, where = available_memory()
    if available is None or estimate.total <= available:
        return
    raise ValueError(
        f"data.sequence_length={data.sequence_length} with train.batch_size={recipe.train.batch_size} "
        f"needs an estimated {_size(estimate.total)} for one training step (logits "
        f"{_size(estimate.logits)}, attention {_size(estimate.attention)}, activations "
        f"{_size(estimate.activations)}, parameters and optimizer {_size(estimate.parameters)}) but "
        f"{_size(available)} is {where}; lower data.sequence_length or train.batch_size (or the "
        "model's size)."
    )
