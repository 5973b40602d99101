"""How long `kgpt.serving.export.export` takes for a small run: a 2-layer GPT (hidden 16, context
32) with a 300-id byte-level BPE tokenizer, random weights (the graph, not the weights, sets the
cost: tracing the eight signatures and saving them).

Usage:
    python benchmarks/export_time.py [--rounds 2]
Prints one line per round. To compare two versions, run it from each checkout in turn
(`PYTHONPATH=OTHER_CHECKOUT python benchmarks/export_time.py`), interleaved.
"""

import argparse
import json
import os
import tempfile
import time

from kgpt import environment

environment.configure()

import keras  # noqa: E402  (after the environment's settings)

from kgpt.model.gpt import build_model  # noqa: E402
from kgpt.model.saving import save_model  # noqa: E402
from kgpt.serving.export import export  # noqa: E402
from kgpt.tokenizers import train_bpe  # noqa: E402

TEXT = "the cat sat on the mat. a dog ran!\n"


def write_run(path):
    """A run directory as `kgpt train` leaves it, with a random model."""
    tokenizer = train_bpe([TEXT * 20, "a dog ran to the cat. " * 20], vocabulary_size=300)
    keras.utils.set_random_seed(0)
    model = build_model(dict(vocabulary_size=tokenizer.vocabulary_size, sequence_length=32,
                             num_layers=2, num_heads=2, hidden_dim=16))
    os.makedirs(path)
    save_model(model, os.path.join(path, "final.keras"))
    tokenizer.save(os.path.join(path, "tokenizer"))
    with open(os.path.join(path, "config.json"), "w") as file:
        json.dump({"model": model.model_config.to_dict()}, file)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    run_dir = os.path.join(folder, "run")
    write_run(run_dir)
    for round_index in range(args.rounds):
        started = time.perf_counter()
        path = export(run_dir, "bpe", base_dir=folder, max_new_tokens=8)
        print(f"round {round_index + 1}: export {time.perf_counter() - started:.1f} s -> {path}", flush=True)


if __name__ == "__main__":
    main()
