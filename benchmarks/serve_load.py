"""`kgpt serve` under load: throughput and p50/p95 latency with 1, 8 and 32 concurrent clients,
request batching on and off.

The script exports a small random character model itself (`kgpt.serving.serving_module.ServingModule`, the graph
`kgpt export` writes) and starts two `kgpt serve` processes on it, `--batching` and
`--no-batching`, with the same other settings (4 concurrent model calls). Each client is a thread
that sends `serving_default` requests of one prompt (`{"instances": [prompt]}`, greedy, a fixed
number of new tokens) one after another on its own keep-alive connection (`--api openai`: greedy
`/v1/completions` requests, `temperature` 0, `max_tokens` the same count). The two servers and the
client counts are measured in turn, round after round, so a busy machine slows them alike; the
table gives the median throughput over rounds and the latency percentiles over every request of
every round. Both servers must answer every prompt with the same text (batching must not change
an answer), or the script fails.

Usage:
    python benchmarks/serve_load.py [--size tiny|small] [--clients 1,8,32] [--requests 4]
        [--rounds 3] [--new-tokens 32] [--api tf-serving|openai]
"""

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kgpt.model.gpt import build_model, count_parameters  # noqa: E402
from kgpt.serving.serving_module import ServingModule  # noqa: E402
from kgpt.tokenizers.char import CharacterTokenizer  # noqa: E402

PROMPT_LENGTH = 16

SIZES = {
    # A quick check of the script itself, and the default on a 2-core machine.
    "tiny": dict(vocabulary_size=256, sequence_length=128, num_layers=2, num_heads=2, hidden_dim=64),
    "small": dict(vocabulary_size=4096, sequence_length=256, num_layers=6, num_heads=6, hidden_dim=384),
}


def export_model(size, new_tokens, directory):
    """Exports a random model of `size` to `directory/bench/1`; returns the model folder."""
    keras.utils.set_random_seed(0)
    model = build_model(dict(size, intermediate_dim=4 * size["hidden_dim"]))
    tokenizer = CharacterTokenizer("".join(chr(0x100 + i) for i in range(size["vocabulary_size"] - 3)))
    module = ServingModule(model, tokenizer, max_new_tokens=new_tokens)
    model_dir = os.path.join(directory, "bench")
    tf.saved_model.save(module, os.path.join(model_dir, "1"), signatures=module.signatures())
    rng = np.random.default_rng(0)
    prompts = ["".join(tokenizer.characters[i] for i in rng.integers(0, 64, PROMPT_LENGTH)) for _ in range(64)]
    return model_dir, count_parameters(model.model_config), prompts


class Server:
    """A `kgpt serve` process on a free port."""

    def __init__(self, model_dir, *flags):
        command = [sys.executable, "-m", "kgpt", "serve", model_dir, "--port", "0", *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()  # the banner: "... at http://127.0.0.1:PORT/v1/models/bench"
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.process.kill()
            raise RuntimeError(f"kgpt serve did not start: {line!r}")
        self.port = int(match.group(1))

    def stop(self):
        self.process.terminate()
        self.process.wait(30)


def request(api, prompt, new_tokens):
    """`(path, body, text of the answer)` of one greedy request in `api`'s form."""
    if api == "openai":
        body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
        return "/v1/completions", body, lambda answer: answer["choices"][0]["text"]
    return "/v1/models/bench:predict", {"instances": [prompt]}, lambda answer: answer["predictions"][0]["text"]


def client(port, prompts, latencies, texts, api="tf-serving", new_tokens=32):
    """Sends one request per prompt, in turn, on one connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        for prompt in prompts:
            path, body, text = request(api, prompt, new_tokens)
            start = time.perf_counter()
            connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {answer}")
            latencies.append(time.perf_counter() - start)
            texts[prompt] = text(answer)
    finally:
        connection.close()


def load(port, clients, prompts, requests, api="tf-serving", new_tokens=32):
    """`clients` threads of `requests` requests each; returns (seconds, latencies, {prompt: text})."""
    latencies, texts, errors = [], {}, []
    work = [[prompts[(c * requests + r) % len(prompts)] for r in range(requests)] for c in range(clients)]

    def run(mine):
        try:
            client(port, mine, latencies, texts, api, new_tokens)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=run, args=(mine,)) for mine in work]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed, e.g. {errors[0]}")
    return seconds, latencies, texts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=4, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--api", choices=["tf-serving", "openai"], default="tf-serving",
                        help="serving_default requests, or greedy /v1/completions requests")
    args = parser.parse_args()
    size = SIZES[args.size]
    client_counts = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as directory:
        model_dir, parameters, prompts = export_model(size, args.new_tokens, directory)
        modes = {"on": ["--batching"], "off": ["--no-batching"]}
        servers = {mode: Server(model_dir, *flags) for mode, flags in modes.items()}
        try:
            for server in servers.values():  # warm-up: the first call traces the graph
                load(server.port, 1, prompts, 2, args.api, args.new_tokens)
            seconds = {(m, c): [] for m in modes for c in client_counts}
            latencies = {key: [] for key in seconds}
            answers = {mode: {} for mode in modes}
            for round_index in range(args.rounds):
                for clients in client_counts:
                    for mode, server in servers.items():  # interleaved: load changes hit both
                        took, waits, texts = load(server.port, clients, prompts, args.requests, args.api,
                                                  args.new_tokens)
                        seconds[mode, clients].append(took)
                        latencies[mode, clients] += waits
                        answers[mode].update(texts)
                print(f"round {round_index + 1}/{args.rounds} done", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    if answers["on"] != answers["off"]:
        different = [p for p in answers["on"] if answers["on"][p] != answers["off"].get(p)]
        raise RuntimeError(f"batching changed the answers to {len(different)} prompt(s)")

    print(
        f"\nsize {args.size}: vocabulary {size['vocabulary_size']}, {size['num_layers']} layers x "
        f"{size['hidden_dim']} wide, context {size['sequence_length']}, {parameters / 1e6:.2f}M "
        f"parameters; {'serving_default' if args.api == 'tf-serving' else '/v1/completions'}, one "
        f"{PROMPT_LENGTH}-character prompt per request, "
        f"{args.new_tokens} new tokens (greedy); {args.requests} requests per client per round, "
        f"{args.rounds} interleaved rounds after warm-up; kgpt serve defaults (4 model calls at once, "
        "batches of up to 32 rows, 5 ms batch window)\n"
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__}; answers identical with batching on and off: yes\n"
    )
    print("| clients | batching | requests/s (median) | p50 latency ms | p95 latency ms | vs off |")
    print("|---:|---|---:|---:|---:|---:|")
    for clients in client_counts:
        rate = {m: clients * args.requests / statistics.median(seconds[m, clients]) for m in modes}
        for mode in modes:
            waits = np.array(latencies[mode, clients]) * 1000
            print(
                f"| {clients} | {mode} | {rate[mode]:.1f} | {np.percentile(waits, 50):.0f} | "
                f"{np.percentile(waits, 95):.0f} | {rate[mode] / rate['off']:.2f}x |"
            )


if __name__ == "__main__":
    main()
