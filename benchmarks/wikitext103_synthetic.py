"""pipelines/wikitext103.toml, unchanged, on a synthetic corpus of WikiText-103's size.

WikiText-103 is not in ../shared/data. This writes a folder in its layout
(`wikitext-103-raw/wiki.{train,valid,test}.raw`): the training file is WikiText-2's training text
repeated (each copy's article titles numbered, so articles differ) to `--train-bytes` (default
WikiText-103's 541 MB), valid and test are WikiText-2's (WikiText-103 has the same ones). Then
it runs `kgpt train pipelines/wikitext103.toml --set data.dir=FOLDER` for a few steps in a child
process and reports the wall time of each phase (BPE training, tokenization, training steps), the
token store, and the child's peak resident memory.

Usage:
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/wikitext103_synthetic.py [--data-dir ../shared/data]
        [--train-bytes 541000000] [--steps 20]
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
RECIPE = pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "wikitext103.toml"


def write_corpus(source, folder, train_bytes):
    """WikiText-103's layout in `folder`, its training file `train_bytes` of WikiText-2 copies."""
    target = folder / "wikitext-103-raw"
    target.mkdir(parents=True)
    lines = (source / "wiki.train.raw").read_text(encoding="utf-8").split("\n")
    written, copy = 0, 0
    with open(target / "wiki.train.raw", "w", encoding="utf-8") as file:
        while written < train_bytes:
            # Copy n's article titles are " = Copy n Title = ": other articles, the same text.
            piece = "\n".join(
                line.replace(" = ", f" = Copy {copy} ", 1)
                if copy and line.startswith(" = ") and not line.startswith(" = =") else line
                for line in lines
            )
            file.write(piece)
            written += len(piece.encode("utf-8"))
            copy += 1
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        (target / name).write_bytes((source / name).read_bytes())
    return written, copy


def child(folder, steps):
    """Runs the recipe's phases in this process, timing each; prints one JSON line."""
    import kgpt.training.train
    from kgpt.data import pipeline as data
    from kgpt.recipe import load_recipe

    overrides = [f"data.dir={folder / 'data'}", f"data.cache_dir={folder / 'cache'}",
                 f"train.max_steps={steps}", f"train.eval_interval={steps}", "train.eval_steps=2",
                 f"train.steps_per_execution={steps // 2}", "train.sample_length=0",
                 f"train.warmup_steps={steps // 2}"]
    recipe = load_recipe(str(RECIPE), overrides)
    times, peaks = {}, {}

    def mark(name, started):
        times[name] = time.perf_counter() - started
        peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    started = time.perf_counter()
    tokenizer = kgpt.training.train.make_tokenizer(recipe)
    mark("bpe_training", started)
    started = time.perf_counter()
    store = data.tokenize_corpus(recipe.data, tokenizer, "train", progress=True)
    mark("tokenization", started)
    kgpt.training.train.make_tokenizer = lambda recipe: tokenizer  # the run reuses it, not trains it anew
    started = time.perf_counter()
    result = kgpt.training.train.train(recipe, str(folder / "run"), verbose=2)
    mark("training", started)
    print(json.dumps({"times": times, "peak_rss_mb": peaks, "tokens": store.num_tokens,
                      "shards": len(store.shards), "dtype": store.dtype, "steps": result.steps,
                      "history": {k: [float(x) for x in v] for k, v in result.history.items()}}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("KGPT_SHARED_DATA", str(DEFAULT_DATA)))
    parser.add_argument("--train-bytes", type=int, default=541_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(pathlib.Path(args.child), args.steps)
    source = pathlib.Path(args.data_dir) / "wikitext-2-raw"
    if not source.is_dir():
        print(f"skipped: no wikitext-2-raw under {args.data_dir} (pass --data-dir)")
        return 0
    with tempfile.TemporaryDirectory() as temporary:
        folder = pathlib.Path(temporary)
        started = time.perf_counter()
        written, copies = write_corpus(source, folder / "data", args.train_bytes)
        print(f"synthetic wiki.train.raw: {written:,} bytes ({copies} copies of WikiText-2's) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        command = [sys.executable, __file__, "--child", str(folder), "--steps", str(args.steps)]
        process = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if process.returncode:
            print(process.stdout[-3000:])
            return process.returncode
        report = json.loads(process.stdout.strip().splitlines()[-1])
    times, peaks = report["times"], report["peak_rss_mb"]
    print(f"token store: {report['tokens']:,} tokens, {report['shards']} shards of {report['dtype']}")
    for phase in ("bpe_training", "tokenization", "training"):
        extra = f", {report['tokens'] / times[phase]:,.0f} tokens/s" if phase == "tokenization" else ""
        print(f"{phase:>13}: {times[phase]:7.1f} s{extra}; peak RSS so far {peaks[phase]:,.0f} MB")
    print(f"trained {report['steps']} steps; loss {report['history']['loss']}, "
          f"val_loss {report['history']['val_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
