"""Generation throughput: kgpt vs Hugging Face transformers and keras-hub, and kgpt's SavedModels.

One process, one model size for all of them (same vocabulary, layers, width, context, parameter
count), greedy decoding of a 32-token prompt plus 224 new tokens (a 256-token
context), batch 1 and batch 8:

- kgpt: `kgpt.generation.decoder.Decoder` (what `kgpt generate RUN_DIR` runs): prefill, then the whole
  key/value-cached decode loop as one XLA-compiled `tf.while_loop`.
- keras-hub: `GPT2CausalLM.generate` on token ids (`preprocessor=None`, `GreedySampler`,
  `stop_token_ids=None`), twice: as its users run it (`compile()` defaults; Keras' "auto"
  turns XLA off on CPU-only machines, so the loop is a plain `tf.function`), and with
  `compile(jit_compile=True)`. Ratios ("vs keras-hub") are against the first.
- Hugging Face transformers: the same weights written by `kgpt.gpt2.export_gpt2`, loaded with
  `GPT2LMHeadModel.from_pretrained` (PyTorch, CPU) and run with `generate(do_sample=False,
  use_cache=True)` under `torch.inference_mode()`; its tokens must equal kgpt's ("vs HF" ratios).
  Needs the `gpt2` extra (`pip install -e '.[gpt2]'`); skipped with a note without it.
- SavedModel: `kgpt.serving.serving_module.ServingModule` saved with `tf.saved_model.save`, loaded with
  `tf.saved_model.load` and called through its `serving_default` signature, strings in and out
  (in-graph tokenization, XLA off: the graph TensorFlow Serving runs); and the same with
  `jit_compile=True` (`kgpt export --jit`: the decode loop compiled by XLA when loaded).

A character tokenizer with exactly `vocabulary_size` ids stands in for the real one, so a
32-character prompt is 32 tokens; every run is checked to have produced all 224 tokens (none
stopped at end-of-text), so all do the same work. Each timed call is one full generation after a
warm-up call (which traces and compiles); the systems are measured in turn (kgpt, keras-hub,
SavedModel, keras-hub XLA, kgpt, ...), round after round, and the table reports medians, so a
busy machine slows them alike.

Usage:
    python benchmarks/generate_throughput.py [--size small|tiny|gpt2] [--rounds 5]
        [--batch-sizes 1,8] [--systems kgpt,hf,...] [--intra-op-threads N] [--inter-op-threads N]
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `kgpt` sets it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kgpt.generation.decoder import Decoder  # noqa: E402
from kgpt.model.gpt import build_model, count_parameters  # noqa: E402
from kgpt.serving.export import xla_findings  # noqa: E402
from kgpt.serving.serving_module import ServingModule  # noqa: E402
from kgpt.tokenizers.char import CharacterTokenizer  # noqa: E402

PROMPT_LENGTH = 32
NEW_TOKENS = 224

SIZES = {
    # A quick check of the script itself.
    "tiny": dict(vocabulary_size=512, sequence_length=256, num_layers=2, num_heads=2, hidden_dim=64),
    # The default: GPT-2's shape scaled to 2 CPU cores (half the layers, half the width, a
    # BPE-sized vocabulary of 8192 as kgpt's wikitext2 recipe trains), so the transformer
    # blocks, not the output head, dominate a decode step as they do in GPT-2 small.
    "small": dict(vocabulary_size=8192, sequence_length=256, num_layers=6, num_heads=6, hidden_dim=384),
    # GPT-2 small (124M) at a 256-token context; minutes per round on 2 cores.
    "gpt2": dict(vocabulary_size=50257, sequence_length=256, num_layers=12, num_heads=12, hidden_dim=768),
}


def character_tokenizer(vocabulary_size):
    """A char tokenizer with exactly `vocabulary_size` ids (3 are special)."""
    return CharacterTokenizer("".join(chr(0x100 + i) for i in range(vocabulary_size - 3)))


def prompts(tokenizer, batch_size, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(tokenizer.characters), (batch_size, PROMPT_LENGTH))
    return [list(map(int, row)) for row in ids], ["".join(tokenizer.characters[i] for i in row) for row in ids]


class KgptRunner:
    name = "kgpt (XLA decode loop)"

    def __init__(self, model, tokenizer):
        # No end-of-text: every row makes all NEW_TOKENS tokens, as the other systems are asked to.
        self.decoder = Decoder(model, end_of_text_id=-1, jit_compile=True)
        self.tokens = None

    def __call__(self, ids, texts):
        self.tokens = self.decoder(ids, NEW_TOKENS)
        return [len(row) for row in self.tokens]


class TransformersRunner:
    name = "Hugging Face transformers GPT2LMHeadModel.generate (PyTorch, cache)"

    def __init__(self, model, tokenizer, directory):
        import torch
        from transformers import GPT2LMHeadModel

        from kgpt.gpt2 import export_gpt2

        export_gpt2(model, tokenizer, directory)
        self.torch = torch
        self.model = GPT2LMHeadModel.from_pretrained(directory).eval()
        self.tokens = None

    def __call__(self, ids, texts):
        with self.torch.inference_mode():
            out = self.model.generate(
                self.torch.tensor(ids), attention_mask=self.torch.ones(len(ids), len(ids[0]), dtype=self.torch.long),
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                pad_token_id=0,
            )
        self.tokens = out[:, PROMPT_LENGTH:].tolist()
        return [len(row) for row in self.tokens]


class KerasHubRunner:
    """`GPT2CausalLM.generate`; `jit_compile=None` keeps Keras' "auto" (XLA off on CPU-only machines)."""

    def __init__(self, size, jit_compile=None):
        import keras_hub

        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=size["vocabulary_size"], num_layers=size["num_layers"],
            num_heads=size["num_heads"], hidden_dim=size["hidden_dim"],
            intermediate_dim=4 * size["hidden_dim"], dropout=0.0,
            max_sequence_length=size["sequence_length"],
        )
        self.causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
        options = {} if jit_compile is None else {"jit_compile": jit_compile}
        self.causal_lm.compile(sampler="greedy", **options)
        # generate() wraps its loop in tf.function(jit_compile=model.jit_compile).
        xla = "XLA" if self.causal_lm.jit_compile else "XLA off"
        default = "default compile, " if jit_compile is None else ""
        self.name = f"keras-hub GPT2CausalLM.generate ({default}{xla})"
        self.parameters = backbone.count_params()

    def __call__(self, ids, texts):
        total = PROMPT_LENGTH + NEW_TOKENS
        token_ids = np.zeros((len(ids), total), "int32")
        token_ids[:, :PROMPT_LENGTH] = ids
        padding_mask = np.zeros((len(ids), total), bool)
        padding_mask[:, :PROMPT_LENGTH] = True
        # Without a preprocessor, generate fills every position the padding mask leaves free.
        out = self.causal_lm.generate(
            {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
        )
        return (np.asarray(out["padding_mask"]).sum(axis=1) - PROMPT_LENGTH).tolist()


class SavedModelRunner:
    def __init__(self, model, tokenizer, directory, jit_compile=False):
        self.name = f"kgpt SavedModel (signature, {'--jit: XLA loop' if jit_compile else 'XLA off'})"
        module = ServingModule(model, tokenizer, max_new_tokens=NEW_TOKENS, jit_compile=jit_compile)
        tf.saved_model.save(module, directory, signatures=module.signatures())
        findings = xla_findings(directory)
        if findings and not jit_compile:
            raise RuntimeError(f"The exported graph needs XLA: {findings}")
        self.signature = tf.saved_model.load(directory).signatures["serving_default"]

    def __call__(self, ids, texts):
        outputs = self.signature(prompts=tf.constant(texts))
        return outputs["token_count"].numpy().tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per system and batch")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument(
        "--systems", default="kgpt,hf,saved-model,saved-model-jit,keras-hub,keras-hub-xla",
        help="comma-separated, kgpt first: kgpt, hf, saved-model, saved-model-jit, keras-hub, keras-hub-xla",
    )
    parser.add_argument(
        "--intra-op-threads", type=int, default=0,
        help="TensorFlow's intra-op threads for every system (0: its default, one per core); "
        "TF Serving's --tensorflow_intra_op_parallelism",
    )
    parser.add_argument(
        "--inter-op-threads", type=int, default=0,
        help="TensorFlow's inter-op threads (0: its default); TF Serving's "
        "--tensorflow_inter_op_parallelism",
    )
    args = parser.parse_args()
    # Before any op runs: TensorFlow fixes its thread pools at the first one.
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    size = SIZES[args.size]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    keras.utils.set_random_seed(0)
    model = build_model(dict(size, intermediate_dim=4 * size["hidden_dim"]))
    tokenizer = character_tokenizer(size["vocabulary_size"])
    parameters = count_parameters(model.model_config)
    systems = args.systems.split(",")
    with tempfile.TemporaryDirectory() as directory:
        makers = {
            "kgpt": lambda: KgptRunner(model, tokenizer),
            "hf": lambda: TransformersRunner(model, tokenizer, os.path.join(directory, "hf")),
            "saved-model": lambda: SavedModelRunner(model, tokenizer, os.path.join(directory, "1")),
            "saved-model-jit": lambda: SavedModelRunner(
                model, tokenizer, os.path.join(directory, "2"), jit_compile=True
            ),
            "keras-hub": lambda: KerasHubRunner(size),
            "keras-hub-xla": lambda: KerasHubRunner(size, jit_compile=True),
        }
        unknown = sorted(set(systems) - set(makers))
        if unknown or "kgpt" not in systems:
            parser.error(f"--systems: unknown {unknown}; kgpt plus any of {sorted(makers)}")
        runners = []
        for system in systems:
            try:
                runners.append(makers[system]())
            except ImportError as error:  # the gpt2 extra is not installed
                print(f"Skipping {system}: {error}", flush=True)
        for runner in runners:
            if isinstance(runner, KerasHubRunner) and runner.parameters != parameters:
                raise RuntimeError(f"Sizes differ: kgpt {parameters:,} vs keras-hub {runner.parameters:,}")
        inputs = {b: prompts(tokenizer, b, seed=b) for b in batch_sizes}
        warm_up = {}
        for batch_size in batch_sizes:
            for runner in runners:
                start = time.perf_counter()
                counts = runner(*inputs[batch_size])
                warm_up[runner.name, batch_size] = time.perf_counter() - start
                if counts != [NEW_TOKENS] * batch_size:
                    raise RuntimeError(f"{runner.name} generated {counts} tokens, not {NEW_TOKENS}")
                if isinstance(runner, TransformersRunner) and runner.tokens != runners[0].tokens:
                    differing = sum(a != b for a, b in zip(runner.tokens, runners[0].tokens))
                    raise RuntimeError(f"transformers' tokens differ from kgpt's in {differing} rows")
        times = {key: [] for key in warm_up}
        for round_index in range(args.rounds):
            for batch_size in batch_sizes:
                for runner in runners:  # interleaved, so load changes hit every system
                    start = time.perf_counter()
                    runner(*inputs[batch_size])
                    times[runner.name, batch_size].append(time.perf_counter() - start)
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)

    print(
        f"\nsize {args.size}: vocabulary {size['vocabulary_size']}, {size['num_layers']} layers x "
        f"{size['hidden_dim']} wide, {size['num_heads']} heads, context {size['sequence_length']}, "
        f"{parameters / 1e6:.1f}M parameters; prompt {PROMPT_LENGTH} + {NEW_TOKENS} new tokens, "
        f"greedy; median of {args.rounds} interleaved rounds after warm-up\n"
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; intra-op threads "
        f"{args.intra_op_threads or 'default'}, inter-op threads {args.inter_op_threads or 'default'}\n"
    )
    references = [r for r in runners if isinstance(r, (TransformersRunner, KerasHubRunner))]
    print("| system | batch | new tokens/s | ms / decode step | "
          + "".join(f"vs {'HF' if isinstance(r, TransformersRunner) else r.name} | " for r in references)
          + "vs kgpt | warm-up s |")
    print("|---|---:|---:|---:|" + "---:|" * len(references) + "---:|---:|")
    for batch_size in batch_sizes:
        rate = {
            runner.name: batch_size * NEW_TOKENS / statistics.median(times[runner.name, batch_size])
            for runner in runners
        }
        for runner in runners:
            median = statistics.median(times[runner.name, batch_size])
            ratios = "".join(f"{rate[runner.name] / rate[r.name]:.2f}x | " for r in references)
            print(
                f"| {runner.name} | {batch_size} | {rate[runner.name]:,.0f} | "
                f"{1000 * median / NEW_TOKENS:.2f} | {ratios}"
                f"{rate[runner.name] / rate[runners[0].name]:.2f}x | "
                f"{warm_up[runner.name, batch_size]:.1f} |"
            )


if __name__ == "__main__":
    main()
