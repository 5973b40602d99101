"""The `kgpt` command line: argparse subcommands that parse arguments and call library functions.

User errors (`ValueError`, any `OSError`) become one line on stderr and exit code 2. kgpt's
modules are imported inside the commands (documented lazy imports), so `kgpt --help` never waits
for TensorFlow.
"""

import argparse
import contextlib
import math
import os
import sys
import warnings

from kgpt import environment
from kgpt.files import describe_os_error
from kgpt.generation.sampling import add_sampling_arguments, sampling_from_arguments


class UsageError(ValueError):
    """A command-line mistake; reported like any other user error."""


def _command(subparsers, name, handler, help, description):
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(handler=handler)
    return parser


def _add_set(parser, metavar, help):
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)


def _add_recipe_arguments(parser, default_run_dir):
    parser.add_argument("recipe", help="a recipe such as pipelines/shakespeare_char.toml")
    _add_set(parser, "SECTION.KEY=VALUE", "override a recipe value, e.g. train.max_steps=500 (repeatable)")
    parser.add_argument("--run-dir", help=f"run directory (default: {default_run_dir})")


def _add_train(subparsers):
    parser = _command(
        subparsers, "train", _run_train, "train a GPT from a recipe with model.fit",
        "Train a GPT from a TOML recipe (pipelines/*.toml) into a run directory. Running the same "
        "command again resumes from the last backup.",
    )
    _add_recipe_arguments(parser, "checkpoints/<recipe name>")


def _add_generate(subparsers):
    parser = _command(
        subparsers, "generate", _run_generate, "generate text from a run directory or an exported SavedModel",
        "Continue prompts with a trained model: a run directory (in-process, XLA-compiled decode "
        "loop) or a SavedModel written by 'kgpt export' (the graph TF Serving runs). Greedy unless "
        "--temperature or --beams is given.",
    )
    parser.add_argument("path", help="a run directory, or saved_models/NAME[/VERSION]")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable; '' allowed)")
    parser.add_argument(
        "--max-new-tokens", type=int,
        help="tokens to add per prompt, past the context too (default: 64, or half a smaller "
        "context; for a SavedModel, the export's default)",
    )
    add_sampling_arguments(parser)  # --temperature, --top-k, --top-p, --seed, the penalties
    parser.add_argument(
        "--stop", action="append", metavar="TEXT",
        help="end a continuation before this text (repeatable; not printed)",
    )
    parser.add_argument(
        "--stop-token-id", action="append", type=int, metavar="ID",
        help="end a continuation at this token id, like end-of-text (repeatable)",
    )
    parser.add_argument("--beams", type=int, default=1, help="beam search width (1: none)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam score exponent")
    parser.add_argument("--num-return-sequences", type=int, default=1, help="continuations per prompt")
    parser.add_argument(
        "--no-truncate", action="store_true",
        help="fail on prompts too long for the context instead of keeping their end",
    )
    parser.add_argument("--continuation-only", action="store_true", help="print only the generated text")
    parser.add_argument(
        "--logprobs", type=int, metavar="K",
        help="after each text, every new token's log-probability and the K likeliest tokens (0 to 5)",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="print a JSON list of strings (with --logprobs: of {text, logprobs} objects)",
    )
    parser.add_argument(
        "--stream", action="store_true",
        help="print the text as it is produced (one prompt, one sequence, no beams)",
    )


def _add_export(subparsers):
    parser = _command(
        subparsers, "export", _run_export,
        "export a run as a SavedModel for TensorFlow Serving (or a Hugging Face folder)",
        "Write BASE_DIR/NAME/VERSION/ (TF Serving's layout): a SavedModel with the tokenizer and "
        "the cached decode loop in the graph; signatures serving_default, generate, beam_search, "
        "score, logits, and prefill, step and detokenize for streaming token by token. Versions are "
        "never overwritten. With --format hf, write a Hugging Face GPT-2 "
        "folder to --out instead.",
    )
    parser.add_argument("run_dir", help="a run directory written by 'kgpt train'")
    parser.add_argument(
        "--format", choices=("saved_model", "hf"), default="saved_model",
        help="saved_model (default, for TF Serving) or hf (GPT2LMHeadModel.from_pretrained)",
    )
    parser.add_argument("--name", help="the served model name (required for saved_model)")
    parser.add_argument("--out", help="the folder to write (required for --format hf)")
    parser.add_argument("--base-dir", default="saved_models", help="default saved_models")
    parser.add_argument("--version", type=int, help="default: the next free version")
    parser.add_argument("--max-new-tokens", type=int, help="serving_default new tokens (min(64, context/2))")
    parser.add_argument(
        "--jit", action="store_true",
        help="compile the decode loop with XLA: faster, for servers that run XLA (TF Serving with "
        "--xla_cpu_compilation_enabled on CPUs; GPUs by default); the default export needs no XLA",
    )


def _add_serve(subparsers):
    parser = _command(
        subparsers, "serve", _run_serve,
        "a local development server: TF Serving's REST API, OpenAI completions, a playground",
        "Serve the highest version of an exported model over TF Serving's REST API "
        "(/v1/models/NAME, :predict), and an export or a run directory over OpenAI's completions "
        "API (/v1/completions, /v1/models) with a playground page at /. For development; "
        "TensorFlow Serving is the production path.",
    )
    parser.add_argument(
        "model_dir", help="saved_models/NAME (its highest version is served), or a run directory",
    )
    parser.add_argument("--port", type=int, default=8501, help="default 8501, as TF Serving")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (local only)")
    parser.add_argument("--name", help="model name in URLs (default: the folder name)")
    parser.add_argument("--max-concurrent-requests", type=int, default=4, help="model calls run at once")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body")
    parser.add_argument(
        "--batching", action=argparse.BooleanOptionalAction, default=True,
        help="run concurrent greedy requests of one signature and equal options as one model call "
        "(default on; the answers are the same)",
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="rows per batched call (default 32)")
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests (default 5)")
    parser.add_argument("--max-queued-requests", type=int, default=64,
                        help="requests waiting for a model call; more get 503 (default 64)")
    parser.add_argument("--request-timeout", type=float, default=30.0,
                        help="seconds a request may wait for a model call before 503 (default 30)")
    parser.add_argument("--max-connections", type=int, default=100,
                        help="connections open at once (default 100); one more closes the connection that "
                        "has waited longest for its request, or gets 503 when all are being answered")
    parser.add_argument("--read-timeout", type=float, default=10.0,
                        help="seconds to receive a request before 408 and disconnecting (default 10)")


def _add_build(subparsers):
    parser = _command(
        subparsers, "build", _run_build, "build a randomly initialised model and save it as a .keras file",
        "Build a GPT from ModelConfig fields given as --set key=value (vocabulary_size and "
        "sequence_length are required) and save it, randomly initialised, as a .keras file.",
    )
    parser.add_argument("output", help="path of the .keras file to write")
    _add_set(parser, "KEY=VALUE", "a ModelConfig field, e.g. num_layers=2 (repeatable; 'model.' allowed)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def _add_info(subparsers):
    parser = _command(
        subparsers, "info", _run_info, "print a model's configuration, parameter count and layers",
        "Load a .keras model (or a run directory) and print its configuration, parameter count "
        "and layer summary.",
    )
    parser.add_argument("path", help="a .keras file or a run directory holding one")


def _add_import_gpt2(subparsers):
    parser = _command(
        subparsers, "import-gpt2", _run_import_gpt2, "import a Hugging Face GPT-2 checkpoint as a run",
        "Import a Hugging Face GPT-2 folder (config.json, model.safetensors or pytorch_model.bin, "
        "vocab.json, merges.txt) as a run directory for generate, evaluate, export and "
        "train (--set train.init_from=RUN_DIR).",
    )
    parser.add_argument("hf_dir", help="the Hugging Face GPT-2 folder")
    parser.add_argument("--out", required=True, help="run directory to write, e.g. checkpoints/gpt2")
    parser.add_argument("--force", action="store_true", help="replace an existing run directory")


def _add_evaluate(subparsers):
    parser = _command(
        subparsers, "evaluate", _run_evaluate,
        "sliding-window perplexity, bits per byte and word-level perplexity of runs",
        "Score run directories (trained, imported GPT-2, or baselines) on one split with sliding "
        "windows, each with its own tokenizer, and print one table.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--data", help="wikitext2, imdb, tinyshakespeare, ... or a text file (default: each run's corpus)"
    )
    parser.add_argument("--data-dir", help="corpus directory (default: the run's data.dir)")
    parser.add_argument(
        "--split", choices=("train", "validation", "test"),
        help="default test (validation for corpora without a test split)",
    )
    parser.add_argument("--stride", type=int, help="tokens between window starts (default: the context)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
    parser.add_argument("--jit", action="store_true", help="compile scoring with XLA")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_baseline(subparsers):
    parser = _command(
        subparsers, "baseline", _run_baseline,
        "fit a bigram or train a GRU baseline into a run directory for 'kgpt evaluate'",
        "Baselines on a recipe's data: 'bigram' counts add-k smoothed bigrams on the training split "
        "(k tuned on validation unless --k is given); 'gru' is the recipe with [model] kind = \"gru\", "
        "trained like 'kgpt train'.",
    )
    parser.add_argument("kind", choices=("bigram", "gru"), help="which baseline")
    _add_recipe_arguments(parser, "checkpoints/<kind>_<recipe name>")
    parser.add_argument("--k", type=float, help="bigram: add-k constant (default: tuned)")
    parser.add_argument(
        "--tokenizer-from", metavar="RUN_DIR",
        help="bigram: use this run's tokenizer (default: build it from [data], as 'kgpt train')",
    )


def make_parser():
    parser = argparse.ArgumentParser(
        prog="kgpt",
        description="Train GPT-style language models with Keras 3, generate text, and export "
        "SavedModels for TensorFlow Serving.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_train, _add_generate, _add_export, _add_serve, _add_import_gpt2, _add_evaluate,
                _add_baseline, _add_info, _add_build):
        add(subparsers)
    return parser


class TrainingStopped(RuntimeError):
    """Training ended without a usable result (a NaN loss); exit code 1."""


def _default_run_dir(args, prefix=""):
    name = os.path.splitext(os.path.basename(args.recipe))[0]
    return args.run_dir or os.path.join("checkpoints", prefix + name)


def _run_train(args):
    from kgpt.recipe import load_recipe
    from kgpt.training.train import train

    _report_training(train(load_recipe(args.recipe, args.overrides), _default_run_dir(args)))


def _report_training(result, what=""):
    """Prints a `TrainResult`; raises `TrainingStopped` when the run left no final model."""
    from kgpt.rundir import RunDirectory

    if not result.trained_steps:
        print(
            f"Nothing left to train in {result.run_dir}: its {result.steps} steps were already "
            "done (use another --run-dir for a new run)."
        )
    else:
        summary = f"Trained {what}{result.trained_steps} steps into {result.run_dir}"
        if result.initial_steps:
            summary += f" (resumed at step {result.initial_steps}; {result.steps} in all)"
        if result.history.get("val_loss"):
            best = min(result.history["val_loss"])
            summary += f"; best val_loss {best:.4f} (ppl {math.exp(best):.2f})"
        print(summary)
    if result.stopped:
        print(f"Stopped early: {result.stopped}")
        if not os.path.exists(RunDirectory(result.run_dir).final_model_path):
            raise TrainingStopped(result.stopped)


def _run_build(args):
    from kgpt.config import ModelConfig
    from kgpt.recipe import parse_override

    values = {}
    for text in args.overrides:
        key, value = parse_override(text)
        values[key.removeprefix("model.")] = value
    config = ModelConfig.from_dict(values)
    if os.path.exists(args.output) and not args.force:
        raise UsageError(f"{args.output} already exists; choose another path or pass --force.")
    if not args.output.endswith(".keras"):
        raise UsageError(f"output path {args.output!r} must end in .keras.")

    import keras

    from kgpt.model.gpt import build_model
    from kgpt.model.saving import save_model

    keras.utils.set_random_seed(args.seed)
    save_model(build_model(config), args.output)
    print(f"Saved a randomly initialised model to {args.output}")


def _run_import_gpt2(args):
    from kgpt.gpt2 import import_gpt2

    model = import_gpt2(args.hf_dir, args.out, force=args.force)
    print(f"Imported {args.hf_dir} ({model.count_params():,} parameters) into {args.out}")


def _run_evaluate(args):
    import json

    from kgpt.evaluate import evaluate_runs, format_table

    results = evaluate_runs(
        args.run_dirs, data=args.data, split=args.split, stride=args.stride,
        batch_size=args.batch_size, data_dir=args.data_dir,
        progress=not args.json and sys.stderr.isatty(), jit_compile=args.jit,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(format_table(results))


def _run_baseline(args):
    from kgpt.recipe import load_recipe
    from kgpt.training.baselines import train_bigram, train_recurrent

    if args.kind == "gru" and (args.k is not None or args.tokenizer_from):
        raise UsageError(
            "--k and --tokenizer-from apply to 'kgpt baseline bigram' only; the GRU takes its "
            "tokenizer from the recipe's [data], as 'kgpt train' does."
        )
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = _default_run_dir(args, f"{args.kind}_")
    if args.kind == "bigram":
        bigram = train_bigram(recipe, run_dir, k=args.k, tokenizer_from=args.tokenizer_from)
        print(f"Fitted a bigram model (vocabulary {bigram.vocabulary_size}, k={bigram.k:g}) into {run_dir}")
        return
    _report_training(train_recurrent(recipe, run_dir), what="the GRU baseline ")


@contextlib.contextmanager
def _warnings_after(command):
    """Holds the warnings raised inside, then prints each as one `kgpt COMMAND: warning:` line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        print(f"kgpt {command}: warning: {warning.message}", file=sys.stderr)


def _run_generate(args):
    import json

    from kgpt.generation.generator import well_formed
    from kgpt.generation.logprobs import check_logprobs, format_logprobs
    from kgpt.serving.saved_model_generator import load_generator

    sampling = sampling_from_arguments(args)  # checked before a model is loaded
    check_logprobs(args.logprobs)
    if args.stream:
        return _stream_generate(args, sampling)
    with _warnings_after("generate"):
        completions = load_generator(args.path).complete(
            args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, num_beams=args.beams,
            length_penalty=args.length_penalty, num_return_sequences=args.num_return_sequences,
            truncate=not args.no_truncate, stop=args.stop, stop_token_ids=args.stop_token_id,
            logprobs=args.logprobs,
        )
    count = len(completions) // len(args.prompt)  # num_return_sequences
    texts = [("" if args.continuation_only else well_formed(args.prompt[i // count])) + completion.text
             for i, completion in enumerate(completions)]
    if args.logprobs is None:
        print(json.dumps(texts, ensure_ascii=False) if args.json else "\n\n".join(texts))
    elif args.json:
        print(json.dumps([{"text": text, "logprobs": [token.to_json() for token in completion.logprobs]}
                          for text, completion in zip(texts, completions)], ensure_ascii=False))
    else:
        print("\n\n".join(text + "\n" + format_logprobs(completion.logprobs)
                           for text, completion in zip(texts, completions)))


def _stream_generate(args, sampling):
    from kgpt.generation.generator import well_formed
    from kgpt.serving.saved_model_generator import load_generator

    if (len(args.prompt) > 1 or args.beams > 1 or args.num_return_sequences > 1 or args.json
            or args.logprobs is not None):
        raise UsageError(
            "--stream prints one continuation as it is produced: give one --prompt, and leave out "
            "--beams, --num-return-sequences, --json and --logprobs."
        )
    generator = load_generator(args.path)
    pieces = generator.stream(args.prompt[0], args.max_new_tokens, sampling=sampling,
                              truncate=not args.no_truncate)
    if not args.continuation_only:
        print(well_formed(args.prompt[0]), end="", flush=True)
    with _warnings_after("generate"):
        for piece in pieces:
            print(piece.text, end="", flush=True)
        print()


def _run_export(args):
    if args.format == "hf":
        from kgpt.gpt2 import export_hf

        if not args.out:
            raise UsageError("--format hf needs --out DIR, the Hugging Face folder to write.")
        print(f"Exported {args.run_dir} to {export_hf(args.run_dir, args.out)}")
        return
    from kgpt.serving.export import export

    if not args.name:
        raise UsageError("--name NAME is required: the model name TF Serving serves it under.")
    if args.jit and args.format != "saved_model":
        raise UsageError("--jit is for --format saved_model (the decode loop of the SavedModel).")
    path = export(args.run_dir, args.name, base_dir=args.base_dir, version=args.version,
                  max_new_tokens=args.max_new_tokens, jit_compile=args.jit)
    print(f"Exported {args.run_dir} to {path}")


# `kgpt serve`'s numeric flags: (argparse dest, smallest value, whether the smallest is allowed, fix).
_SERVE_LIMITS = (
    ("port", 0, True, "0 picks a free port"),
    ("max_concurrent_requests", 1, True, "at least 1 model call must run"),
    ("max_request_bytes", 1, True, "e.g. 1048576 for 1 MiB"),
    ("max_batch_size", 1, True, "1 runs each request alone, or pass --no-batching"),
    ("batch_timeout_ms", 0, True, "0 runs a batch without waiting for more requests"),
    ("max_queued_requests", 1, True, "e.g. 64"),
    ("request_timeout", 0, False, "e.g. 30 seconds"),
    ("max_connections", 1, True, "e.g. 100"),
    ("read_timeout", 0, False, "e.g. 10 seconds"),
)


def check_serve_arguments(args):
    """Raises `UsageError` for a `kgpt serve` flag out of range (before any model is loaded)."""
    for name, minimum, inclusive, fix in _SERVE_LIMITS:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value) or (value < minimum if inclusive else value <= minimum) or (
                name == "port" and value > 65535):
            bound = "from 0 to 65535" if name == "port" else f"{'>=' if inclusive else '>'} {minimum}"
            kind = "a finite number" if isinstance(value, float) else "an integer"
            raise UsageError(f"{flag} {value:g} is out of range: it must be {kind} {bound}; {fix}.")


def _run_serve(args):
    check_serve_arguments(args)

    from kgpt.serving.server import serve

    serve(args.model_dir, port=args.port, host=args.host, name=args.name,
          max_concurrent_requests=args.max_concurrent_requests, max_request_bytes=args.max_request_bytes,
          batching=args.batching, max_batch_size=args.max_batch_size,
          batch_timeout=args.batch_timeout_ms / 1000, max_queued_requests=args.max_queued_requests,
          queue_timeout=args.request_timeout, max_connections=args.max_connections,
          read_timeout=args.read_timeout)


def _run_info(args):
    from kgpt.model.saving import describe_model
    from kgpt.rundir import load_model

    print(describe_model(load_model(args.path)))


def console_main():
    """The `kgpt` console script and `python -m kgpt`: `main()`, with TensorFlow's runtime noise
    (beyond its import's) dropped from stderr for the whole command."""
    environment.configure()
    environment.filter_stderr()
    return main()


def main(argv=None):
    """Entry point of the `kgpt` console script; returns the exit code.

    User errors print `kgpt COMMAND: error: ...` and return 2; a run stopped by a NaN loss
    returns 1; Ctrl-C prints `kgpt COMMAND: interrupted...` (what to do, for training) and returns
    130, as a shell does; other exceptions are bugs and keep their traceback.
    """
    # Before TensorFlow is imported: its settings, and a first import without its start-up noise.
    environment.configure()
    args = make_parser().parse_args(argv)
    try:
        args.handler(args)
    except (OSError, ValueError) as error:
        message = describe_os_error(error) if isinstance(error, OSError) else error
        print(f"kgpt {args.command}: error: {message}", file=sys.stderr)
        return 2
    except TrainingStopped:
        return 1
    except KeyboardInterrupt as interrupt:
        print(f"\nkgpt {args.command}: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
