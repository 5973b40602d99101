"""Times the same training step configuration several times in one process (a fresh model and
compile each time), to show the per-program step-time modes described in RESULTS.md.

Usage:
    python benchmarks/train_step_modes.py shakespeare_char 200 kgpt,kgpt,kgpt,hub,hub,hub
    python benchmarks/train_step_modes.py larger 5 hub,plain,kgpt,clip,schedule,exclude

Configurations: `hub` (keras-hub GPT2Backbone + tied head, keras AdamW), `plain` (kgpt model,
keras AdamW), `kgpt` (kgpt model and `kgpt.training.train.make_optimizer`), and kgpt's model with keras
AdamW plus one feature of kgpt's optimiser: `clip` (global-norm clip 1.0), `schedule`
(WarmupCosine) or `exclude` (weight decay 0.1 with 1-D weights excluded). Each runs `fit` with
XLA and `steps_per_execution=1`, two warm-up steps, then STEPS timed steps.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
from train_throughput import SIZES, dataset, keras_hub_model  # noqa: E402

from kgpt.config import ModelConfig, TrainConfig  # noqa: E402
from kgpt.model.gpt import build_model  # noqa: E402
from kgpt.training.schedule import WarmupCosine  # noqa: E402
from kgpt.training.train import make_optimizer  # noqa: E402


def configurations(config, size):
    def kgpt_optimizer():
        model = build_model(config)
        return model, make_optimizer(TrainConfig(learning_rate=1e-4, max_steps=1000), model)

    def excluded():
        model = build_model(config)
        optimizer = keras.optimizers.AdamW(1e-4, weight_decay=0.1)
        optimizer.exclude_from_weight_decay(var_list=[w for w in model.trainable_weights if len(w.shape) < 2])
        return model, optimizer

    schedule = WarmupCosine(1e-4, warmup_steps=10, decay_steps=1000, min_learning_rate=1e-5)
    return {
        "hub": lambda: (keras_hub_model(size), keras.optimizers.AdamW(1e-4)),
        "plain": lambda: (build_model(config), keras.optimizers.AdamW(1e-4)),
        "kgpt": kgpt_optimizer,
        "clip": lambda: (build_model(config), keras.optimizers.AdamW(1e-4, global_clipnorm=1.0)),
        "schedule": lambda: (build_model(config), keras.optimizers.AdamW(schedule)),
        "exclude": excluded,
    }


def main():
    name, steps, which = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    size = SIZES[name]
    config = ModelConfig(**{k: v for k, v in size.items() if k != "batch_size"})
    data = dataset(size, steps)
    builders = configurations(config, size)
    for label in which:
        keras.utils.set_random_seed(0)
        model, optimizer = builders[label]()
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
        )
        model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)
        start = time.perf_counter()
        model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
        print(f"{label:<9} {(time.perf_counter() - start) / steps * 1e3:8.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
