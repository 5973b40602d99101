"""Streaming: time to the first streamed token, against the time of the whole continuation.

One random character model (`--size`, as `serve_load.py`), one 16-character prompt, greedy, no
end-of-text (so every run makes `--new-tokens` tokens), three ways:

- in-process: `Generator.stream` (what `kgpt generate RUN_DIR --stream` runs: a compiled prefill
  and a compiled one-token step driven from Python) against `Generator.generate` (one XLA loop);
- export: `SavedModelGenerator.stream` (the `prefill` signature, then one `step` call per
  token) against one `generate` call;
- server: `POST /v1/completions` with `"stream": true` to a `kgpt serve` process on the export
  (server-sent events over HTTP; time to the first event with text) against the same request
  without streaming.

Each row is timed `--rounds` times after a warm-up (which traces and compiles), rows interleaved
round by round; the table gives medians.

Usage:
    python benchmarks/stream_first_token.py [--size tiny|small] [--new-tokens 64] [--rounds 5]
"""

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `kgpt` sets it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_load import PROMPT_LENGTH, SIZES, Server  # noqa: E402

from kgpt.generation.generator import Generator  # noqa: E402
from kgpt.model.gpt import build_model, count_parameters  # noqa: E402
from kgpt.serving.saved_model_generator import SavedModelGenerator  # noqa: E402
from kgpt.serving.serving_module import ServingModule  # noqa: E402
from kgpt.tokenizers.char import CharacterTokenizer  # noqa: E402


def first_and_total(pieces):
    """Seconds to the first piece with text, and to the end, of an iterator started now."""
    start, first, text = time.perf_counter(), None, ""
    for piece in pieces:
        if piece.text and first is None:
            first = time.perf_counter() - start
        text += piece.text
    return first, time.perf_counter() - start, text


def whole(function):
    start = time.perf_counter()
    text = function()
    return time.perf_counter() - start, text


def completion(port, name, prompt, new_tokens, stream):
    """`(seconds to the first text event or None, seconds to the end, text)` of one request."""
    body = {"model": name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": stream}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        start, first, text = time.perf_counter(), None, ""
        connection.request("POST", "/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        if not stream:
            text = json.loads(response.read())["choices"][0]["text"]
            return None, time.perf_counter() - start, text
        while True:
            line = response.readline()
            if not line or line.strip() == b"data: [DONE]":
                break
            if line.startswith(b"data: "):
                piece = json.loads(line[6:])["choices"][0]["text"]
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece
        return first, time.perf_counter() - start, text
    finally:
        connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = SIZES[args.size]
    keras.utils.set_random_seed(0)
    model = build_model(dict(size, intermediate_dim=4 * size["hidden_dim"]))
    # No end-of-text among the characters a random model picks: every run makes all its tokens.
    tokenizer = CharacterTokenizer("".join(chr(0x100 + i) for i in range(size["vocabulary_size"] - 3)))
    prompt = "".join(tokenizer.characters[i] for i in np.random.default_rng(0).integers(0, 64, PROMPT_LENGTH))
    new = args.new_tokens
    results = {}  # row -> {"first": [...], "total": [...], "whole": [...]}

    with tempfile.TemporaryDirectory() as directory:
        module = ServingModule(model, tokenizer, max_new_tokens=new)
        model_dir = os.path.join(directory, "bench")
        tf.saved_model.save(module, os.path.join(model_dir, "1"), signatures=module.signatures())
        generator = Generator(model, tokenizer)
        exported = SavedModelGenerator(model_dir)
        server = Server(model_dir)
        rows = {
            "in-process (run directory)": (
                lambda: first_and_total(generator.stream(prompt, new)),
                lambda: whole(lambda: generator.generate(prompt, new)[0]),
            ),
            "export (SavedModelGenerator)": (
                lambda: first_and_total(exported.stream(prompt, new)),
                lambda: whole(lambda: exported.generate(prompt, new)[0]),
            ),
            "kgpt serve, /v1/completions (export)": (
                lambda: completion(server.port, "bench", prompt, new, True),
                lambda: completion(server.port, "bench", prompt, new, False)[1:],
            ),
        }
        try:
            for name, (streamed, unstreamed) in rows.items():  # warm-up: traces and compiles
                _, _, text = streamed()
                _, reference = unstreamed()
                if text != reference:
                    raise RuntimeError(f"{name}: the streamed text differs from the whole one")
                results[name] = {"first": [], "total": [], "whole": []}
            for round_index in range(args.rounds):
                for name, (streamed, unstreamed) in rows.items():
                    first, total, _ = streamed()
                    results[name]["first"].append(first)
                    results[name]["total"].append(total)
                    results[name]["whole"].append(unstreamed()[0])
                print(f"round {round_index + 1}/{args.rounds} done", flush=True)
        finally:
            server.stop()

    print(
        f"\nsize {args.size}: vocabulary {size['vocabulary_size']}, {size['num_layers']} layers x "
        f"{size['hidden_dim']} wide, context {size['sequence_length']}, "
        f"{count_parameters(model.model_config) / 1e6:.2f}M parameters; one {PROMPT_LENGTH}-character "
        f"prompt, {new} new tokens, greedy; medians of {args.rounds} interleaved rounds after warm-up\n"
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__}; streamed text equal to the whole text: yes\n"
    )
    print("| path | first token ms | streamed, all tokens ms | not streamed ms |")
    print("|---|---:|---:|---:|")
    for name, values in results.items():
        first, total, unstreamed = (statistics.median(values[k]) * 1000 for k in ("first", "total", "whole"))
        print(f"| {name} | {first:.0f} | {total:.0f} | {unstreamed:.0f} |")


if __name__ == "__main__":
    main()
