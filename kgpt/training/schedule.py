"""The `WarmupCosine` learning-rate schedule (`keras.ops` only: it runs in `tf.function` and XLA)."""

import math
import numbers

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kgpt")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to a peak, cosine decay to a floor, flat afterwards (nanoGPT's `get_lr`).

    With `peak = learning_rate`, `floor = min_learning_rate`, `w = warmup_steps` and
    `d = decay_steps`:

        step < w:       peak * step / w
        w <= step <= d: floor + 0.5 * (1 + cos(pi * (step - w) / (d - w))) * (peak - floor)
        step > d:       floor

    Step 0 gives exactly 0 (nanoGPT: `peak / (w + 1)`), so the first update only feeds AdamW's
    moments. `warmup_steps=0` starts at the peak; `decay_steps == warmup_steps` drops to the floor.

    Args:
        decay_steps: where the cosine reaches the floor, counted from step 0 (>= `warmup_steps`).

    Example:
        schedule = WarmupCosine(1e-3, warmup_steps=100, decay_steps=2000,
                                min_learning_rate=1e-4)
        optimizer = keras.optimizers.AdamW(learning_rate=schedule)
    """

    def __init__(self, learning_rate, warmup_steps, decay_steps, min_learning_rate=0.0):
        for name, value in (("warmup_steps", warmup_steps), ("decay_steps", decay_steps)):
            is_count = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if not is_count or value < 0:
                raise ValueError(
                    f"{name}={value!r} is not a non-negative integer; pass a step count "
                    f"such as {name}=100."
                )
        if decay_steps < warmup_steps:
            raise ValueError(
                f"decay_steps={decay_steps} is smaller than warmup_steps={warmup_steps}; "
                "decay_steps is counted from step 0, so set it to at least warmup_steps "
                "(usually the total number of training steps)."
            )
        if not learning_rate >= 0:
            raise ValueError(
                f"learning_rate={learning_rate!r} is not a non-negative number; pass the "
                "peak learning rate, e.g. learning_rate=1e-3."
            )
        if not 0 <= min_learning_rate <= learning_rate:
            raise ValueError(
                f"min_learning_rate={min_learning_rate!r} is not between 0 and "
                f"learning_rate={learning_rate!r}; lower it (e.g. to learning_rate / 10)."
            )
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)
        self.min_learning_rate = float(min_learning_rate)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = self.learning_rate
        floor = self.min_learning_rate
        # max(.., 1) keeps both divisions finite when warmup_steps == 0 or
        # decay_steps == warmup_steps; the branch that would divide by 0 is never selected.
        warmup = peak * step / max(self.warmup_steps, 1)
        progress = (step - self.warmup_steps) / max(self.decay_steps - self.warmup_steps, 1)
        progress = ops.clip(progress, 0.0, 1.0)  # 1 after decay_steps: flat at the floor
        cosine = floor + 0.5 * (1.0 + ops.cos(math.pi * progress)) * (peak - floor)
        return ops.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "min_learning_rate": self.min_learning_rate,
        }
