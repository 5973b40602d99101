"""SavedModels for TensorFlow Serving: string in, string out, tokenizer and decode loop in the graph.

`export(run_dir, name)` publishes `saved_models/NAME/VERSION/` with the signatures that
`kgpt.signatures` declares (`serving_default`, `generate`, `beam_search`, `score`, `logits`; see the
README), built from those declarations and checked against them, needing no XLA (`xla_findings`).
This module also owns TF Serving's folder layout, which `kgpt.generate` and `kgpt.serve` read.
"""

import errno
import inspect
import os
import re

import tensorflow as tf

from kgpt.files import remove_stale, staged_directory
from kgpt.generation.decoding import (
    MAX_NEW_TOKENS,
    beam_search,
    cached,
    check_options,
    decode,
    default_max_new_tokens,
    default_window,
)
from kgpt.generation.sampling import SamplingOptions, graph_checks, signature_dtypes
from kgpt.generation.stopping import continuations, graph_stop_checks, graph_stop_ids
from kgpt.rundir import RunDirectory
from kgpt.serving.signatures import (
    BEAM_SEARCH,
    GENERATE,
    LOGITS,
    SCORE,
    SERVING_DEFAULT,
    SIGNATURES,
    Name,
    generate_signature,
    read_saved_model,
    read_signature_defs,
)

DEFAULT_BASE_DIR = "saved_models"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Concurrent exports of one model each take the next free version; give up after this many.
_PUBLISH_ATTEMPTS = 100
# `beam_search`: beams per prompt at most (the default: `kgpt.signatures.DEFAULT_BEAMS`).
MAX_BEAMS = 16
_TAKEN = "{} already exists; versions are never overwritten. Leave --version out to write the next one."


def version_numbers(model_dir):
    """The numbered version folders of `saved_models/NAME`, ascending (none if absent)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(name) for name in os.listdir(model_dir) if name.isdigit())


def saved_model_version_path(path):
    """`path` if it holds `saved_model.pb`, else its highest version folder (FileNotFoundError: neither)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [
        v for v in version_numbers(path)
        if os.path.isfile(os.path.join(path, str(v), "saved_model.pb"))
    ]
    if not versions:
        raise FileNotFoundError(
            f"No SavedModel in {path}: expected saved_model.pb or numbered version folders "
            "written by 'kgpt export'."
        )
    return os.path.join(path, str(max(versions)))


def is_saved_model(path):
    """True if `path` is a SavedModel folder or a TF Serving model folder of versions."""
    try:
        saved_model_version_path(path)
        return True
    except FileNotFoundError:
        return False


def _checked(checks, structure):
    """`structure`'s tensors, computed only once the assertion ops `checks` have passed."""
    with tf.control_dependencies(checks):
        return tf.nest.map_structure(tf.identity, structure)


def _specs(signature):
    """The `tf.TensorSpec` of each input of a `kgpt.signatures.Signature`, in order."""
    return [tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=spec.name) for spec in signature.inputs]


def _function(python_function, signature):
    """A serving function of `signature`'s inputs: a `tf.function`, without XLA."""
    return tf.function(python_function, input_signature=_specs(signature), jit_compile=False)


def _function_with_defaults(python_function, signature, **export_values):
    """A serving function of `signature`'s inputs in order, those after the rows with the defaults
    the SignatureDef records (`kgpt.signatures.Signature.defaults`, `export_values` filling in
    what each export sets)."""
    defaults = signature.defaults(**export_values)

    def function(*inputs):
        return python_function(*inputs)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    function.__signature__ = inspect.Signature([
        inspect.Parameter(spec.name, kind) if spec.name not in defaults else inspect.Parameter(
            spec.name, kind, default=tf.constant(defaults[spec.name], tf.as_dtype(spec.dtype)))
        for spec in signature.inputs
    ])
    return _function(function, signature)


def check_outputs(signature, function):
    """Raises `ValueError` unless the serving `function`'s outputs are `signature`'s: the same names,
    dtypes and compatible shapes."""
    outputs = function.get_concrete_function().structured_outputs
    declared = {spec.name: spec for spec in signature.outputs}
    if set(outputs) != set(declared):
        raise ValueError(
            f"The {signature.name} function returns {sorted(outputs)}, but kgpt.signatures declares "
            f"{sorted(declared)}; change the two together."
        )
    for name, tensor in outputs.items():
        spec = declared[name]
        if tensor.dtype != tf.as_dtype(spec.dtype) or not tensor.shape.is_compatible_with(spec.shape):
            raise ValueError(
                f"The {signature.name} output {name!r} is {tensor.dtype.name} {tensor.shape}; "
                f"kgpt.signatures declares {spec.dtype} {list(spec.shape)}."
            )


def _take_last(dense, lengths, room):
    """Keeps each row's last `min(length, room)` tokens, moved to the left; returns them + lengths."""
    kept = tf.minimum(lengths, room)
    width = tf.maximum(tf.reduce_max(kept), 1)
    dense = tf.pad(dense, [[0, 0], [0, 1]])  # at least one column, even for empty rows
    positions = (lengths - kept)[:, None] + tf.range(width)[None, :]
    valid = tf.range(width)[None, :] < kept[:, None]
    positions = tf.where(valid, positions, 0)
    return tf.where(valid, tf.gather(dense, positions, batch_dims=1), 0), kept


class ServingModule(tf.Module):
    """The exported object: model variables, tokenizer and the four serving functions.

    Args:
        model: a `kgpt.model.GPT`, or a causal model without a cache (decoded by recomputation).
        tokenizer: a graph-compatible kgpt tokenizer (`bpe`, `gpt2`, `char`, `tiktoken:gpt2`).
        max_new_tokens: new tokens per prompt for `serving_default`, and the `generate` default.
        sampling_type: the options class whose fields become `generate`'s scalar inputs.
        jit_compile: mark the decode loop for XLA (`kgpt export --jit`); the tokenizer and the rest
            stay TensorFlow ops. Only servers that run XLA can serve such a graph.
    """

    def __init__(self, model, tokenizer, max_new_tokens=None, sampling_type=SamplingOptions,
                 jit_compile=False):
        super().__init__(name="kgpt")
        config = model.model_config
        if max_new_tokens is None:
            max_new_tokens = default_max_new_tokens(config.sequence_length)
        check_options(max_new_tokens, config.sequence_length)
        self.model = model
        self.tokenizer = tokenizer
        self._decoding_model = cached(model)
        self._sampling_type = sampling_type
        self._sequence_length = config.sequence_length
        self._vocabulary_size = config.vocabulary_size
        self._max_new_tokens = max_new_tokens
        self.jit_compile = jit_compile
        self._window = default_window(config.sequence_length)
        readable = dict(sequence_length=config.sequence_length, vocabulary_size=config.vocabulary_size,
                        end_of_text_id=tokenizer.end_of_text_id, default_max_new_tokens=max_new_tokens)
        for name, value in readable.items():  # readable after loading, without kgpt
            setattr(self, name, tf.Variable(value, trainable=False, name=name))

        self.serving_default = _function(self._greedy, SERVING_DEFAULT)
        self.generate = self._generate_function(max_new_tokens)
        self.score = _function(self._score, SCORE)
        self.logits = _function(self._logits, LOGITS)
        self.beam_search = _function_with_defaults(
            self._beam_search, BEAM_SEARCH, max_new_tokens=min(max_new_tokens, self._sequence_length - 1),
        )

    def contract(self):
        """The `kgpt.signatures.Signature` of each serving function (`generate`'s has this module's
        sampling fields)."""
        return [generate_signature(self._sampling_type) if s is GENERATE else s for s in SIGNATURES]

    def signatures(self):
        """The `signatures` argument of `tf.saved_model.save`, each checked against the contract."""
        functions = {}
        for signature in self.contract():
            functions[signature.name] = getattr(self, signature.name)
            check_outputs(signature, functions[signature.name])
        return functions

    def _greedy(self, prompts):
        return self._run(prompts, self._max_new_tokens, SamplingOptions().graph_inputs())

    def _generate_function(self, default_max_new_tokens):
        """`generate(prompts, max_new_tokens, *options, stop, stop_token_ids)`, defaults recorded."""
        dtypes = signature_dtypes(self._sampling_type)

        def generate(prompts, max_new_tokens, *options):
            options, (stop, stop_token_ids) = dict(zip(dtypes, options[:-2])), options[-2:]
            options = _checked(graph_checks(options, self._sampling_type), options)
            stop, stop_token_ids = _checked(
                graph_stop_checks(stop, stop_token_ids, self._vocabulary_size), (stop, stop_token_ids)
            )
            return self._run(prompts, max_new_tokens, options, stop, stop_token_ids)

        signature = generate_signature(self._sampling_type)
        return _function_with_defaults(generate, signature, max_new_tokens=default_max_new_tokens)

    def _run(self, prompts, max_new_tokens, sampling, stop=None, stop_token_ids=None):
        max_new_tokens = tf.convert_to_tensor(max_new_tokens, tf.int32)
        max_new_tokens = _checked(self._length_checks(prompts, max_new_tokens), max_new_tokens)
        stop = tf.constant([], tf.string) if stop is None else stop
        stop_token_ids = tf.constant([], tf.int32) if stop_token_ids is None else stop_token_ids
        # A prompt keeps what leaves room for max_new_tokens, and at least the window that
        # generation past the context keeps (`kgpt.decoding.prompt_room`).
        room = tf.maximum(self._sequence_length - max_new_tokens, self._window)
        dense, lengths, truncated = self._prompt_ids(prompts, room)
        stop_ids = graph_stop_ids(self.tokenizer, stop, stop_token_ids)
        end = self.tokenizer.end_of_text_id
        tokens, ends = self._decode(dense, lengths, max_new_tokens, end, sampling, stop_ids)
        outputs = self._continuations(tokens, ends, lengths, max_new_tokens, stop, stop_token_ids)
        return {**outputs, Name.PROMPT_TOKEN_COUNT: lengths, Name.TRUNCATED: truncated}

    def _length_checks(self, prompts, max_new_tokens):
        return [
            tf.debugging.assert_positive(tf.size(prompts), message="prompts is empty; send a prompt"),
            tf.debugging.assert_greater(max_new_tokens, 0, message="max_new_tokens must be >= 1"),
            tf.debugging.assert_less_equal(
                max_new_tokens, MAX_NEW_TOKENS, message=f"max_new_tokens must be <= {MAX_NEW_TOKENS}",
            ),
        ]

    def _prompt_ids(self, prompts, room):
        """Right-padded prompt ids, each prompt's last `room` tokens (an empty one: end-of-text);
        returns `(ids, lengths, truncated)`."""
        end = self.tokenizer.end_of_text_id
        ids = self.tokenizer.tokenize(prompts)  # ragged (batch, None)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        truncated = lengths > room
        # An empty prompt starts from end-of-text, as GPT-2 does.
        empty = tf.equal(lengths, 0)
        dense, lengths = _take_last(ids.to_tensor(default_value=0), lengths, room)
        dense = tf.where(empty[:, None] & tf.equal(tf.range(tf.shape(dense)[1]), 0), end, dense)
        return dense, tf.where(empty, 1, lengths), truncated

    def _continuations(self, tokens, ends, lengths, max_new_tokens, stop, stop_token_ids):
        """`text`, `token_ids` (padded), `token_count` and `stopped` of rows `tokens[lengths:ends]`:
        `kgpt.generation.stopping.continuations`, as `Generator` runs it."""
        rows = continuations(self.tokenizer, tokens, ends, lengths, max_new_tokens, stop, stop_token_ids)
        return {Name.TEXT: rows.text, Name.TOKEN_IDS: rows.token_ids, Name.TOKEN_COUNT: rows.token_count,
                Name.STOPPED: rows.stopped}

    def _beam_search(self, prompts, max_new_tokens, num_beams, length_penalty, stop, stop_token_ids):
        """Every prompt's `num_beams` best continuations by beam search (`kgpt.decoding.beam_search`,
        as `Decoder` runs it in-process), within the context; the best one as `generate`'s outputs."""
        checks = self._length_checks(prompts, max_new_tokens) + [
            tf.debugging.assert_less(
                max_new_tokens, self._sequence_length,
                message=f"max_new_tokens must be < the context of {self._sequence_length}: beam search "
                "stays within it (generate continues past it)",
            ),
            tf.debugging.assert_greater(num_beams, 0, message="num_beams must be >= 1"),
            tf.debugging.assert_less_equal(
                num_beams, MAX_BEAMS, message=f"num_beams must be <= {MAX_BEAMS}",
            ),
            tf.debugging.assert_all_finite(length_penalty, message="length_penalty must be a finite number"),
        ] + graph_stop_checks(stop, stop_token_ids, self._vocabulary_size)
        max_new_tokens, num_beams, length_penalty, stop, stop_token_ids = _checked(
            checks, (max_new_tokens, num_beams, length_penalty, stop, stop_token_ids)
        )
        dense, lengths, truncated = self._prompt_ids(prompts, self._sequence_length - max_new_tokens)
        stop_ids = graph_stop_ids(self.tokenizer, stop, stop_token_ids)
        tokens, ends, _ = beam_search(
            self._decoding_model, dense, lengths, max_new_tokens, num_beams,
            self.tokenizer.end_of_text_id, length_penalty, stop_ids,
        )
        batch_size = tf.shape(tokens)[0]
        flat = self._continuations(
            tf.reshape(tokens, [batch_size * num_beams, -1]), tf.reshape(ends, [-1]),
            tf.repeat(lengths, num_beams), max_new_tokens, stop, stop_token_ids,
        )
        beams = {
            key: tf.reshape(value, tf.concat([[batch_size, num_beams], tf.shape(value)[1:]], 0))
            for key, value in flat.items()
        }
        count = beams[Name.TOKEN_COUNT][:, 0]
        return {
            Name.TEXT: beams[Name.TEXT][:, 0],
            Name.TOKEN_IDS: beams[Name.TOKEN_IDS][:, 0, : tf.reduce_max(count)],
            Name.TOKEN_COUNT: count,
            Name.PROMPT_TOKEN_COUNT: lengths,
            Name.TRUNCATED: truncated,
            Name.BEAM_TEXT: beams[Name.TEXT],
            Name.BEAM_TOKEN_COUNT: beams[Name.TOKEN_COUNT],
            Name.STOPPED: beams[Name.STOPPED][:, 0],
            Name.BEAM_STOPPED: beams[Name.STOPPED],
        }

    def _decode(self, *args):
        """`decoding.decode` on the cached model; with `jit_compile`, a call XLA must compile."""

        def function(*inputs):
            return decode(self._decoding_model, *inputs, self._sequence_length, self._window)

        if self.jit_compile:
            function = tf.function(function, jit_compile=True)
        return function(*args)

    def _score(self, texts):
        tokenizer = self.tokenizer
        ids = tokenizer.tokenize(texts)
        start = tf.fill([tf.shape(texts)[0], 1], tokenizer.end_of_text_id)
        ids = tf.concat([tf.RaggedTensor.from_tensor(start), ids], axis=1)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        lengths = _checked([
            tf.debugging.assert_positive(tf.size(texts), message="texts is empty: send at least one text"),
            tf.debugging.assert_greater(lengths, 1, message="empty text: every text needs a token"),
        ], lengths)
        dense, lengths = _take_last(ids.to_tensor(default_value=0), lengths, self._sequence_length + 1)
        inputs, targets = dense[:, :-1], dense[:, 1:]
        log_probabilities = tf.nn.log_softmax(tf.cast(self.model(inputs), tf.float32))
        picked = tf.gather(log_probabilities, targets, batch_dims=2)  # (batch, length)
        counts = lengths - 1
        mask = tf.range(tf.shape(targets)[1])[None, :] < counts[:, None]
        log_likelihood = tf.reduce_sum(tf.where(mask, picked, 0.0), axis=1)
        return {
            Name.LOG_LIKELIHOOD: log_likelihood,
            Name.TOKEN_COUNT: counts,
            Name.PERPLEXITY: tf.exp(-log_likelihood / tf.cast(counts, tf.float32)),
        }

    def _logits(self, token_ids):
        length = tf.shape(token_ids)[1]
        token_ids = _checked([
            tf.debugging.assert_positive(length, message="token_ids needs at least one token"),
            tf.debugging.assert_less_equal(
                length, self._sequence_length,
                message=f"token_ids is longer than the context of {self._sequence_length}",
            ),
            tf.debugging.assert_non_negative(token_ids, message="token ids must be >= 0"),
            tf.debugging.assert_less(
                token_ids, self._vocabulary_size,
                message=f"token ids must be < vocabulary_size={self._vocabulary_size}",
            ),
        ], token_ids)
        return {Name.LOGITS: tf.cast(self.model(token_ids), tf.float32)}


def signature_functions(path, module=None):
    """An export's signatures as Python functions whose inputs may be left out, as in REST requests.

    `tf.saved_model.load(path).signatures[name]` needs every input: TensorFlow's loader drops the
    defaults that the SignatureDef records, which TF Serving's REST API (and `kgpt serve`) fill in.
    These functions fill them in too. Without kgpt, the loaded module's functions of the same names
    apply the same defaults: `tf.saved_model.load(path).beam_search(prompts=...)`.

    Args:
        path: a version folder or a model folder (its highest version).
        module: the SavedModel at `path`, already loaded (else it is loaded).

    Returns:
        `{signature name: function(**inputs) -> {output: tensor}}`, inputs as tensors, NumPy arrays
        or Python values.

    Example:
        signature_functions("saved_models/tiny")["beam_search"](prompts=["ROMEO:"])["beam_text"]
    """
    path = saved_model_version_path(path)
    module = tf.saved_model.load(path) if module is None else module
    signature_defs = read_signature_defs(path)

    def with_defaults(name):
        function, signature_def = module.signatures[name], signature_defs[name]

        def call(**inputs):
            unknown = sorted(set(inputs) - set(signature_def.inputs))
            missing = sorted(set(signature_def.inputs) - set(inputs) - set(signature_def.defaults))
            if unknown or missing:
                raise ValueError(
                    f"Signature {name!r} takes the inputs {sorted(signature_def.inputs)}, of which "
                    f"{sorted(signature_def.defaults)} have defaults; got unknown {unknown}, missing "
                    f"{missing}."
                )
            defaults = {key: tf.make_ndarray(value) for key, value in signature_def.defaults.items()}
            return function(**{
                key: tf.constant(value, tf.dtypes.as_dtype(signature_def.inputs[key].dtype))
                for key, value in {**defaults, **inputs}.items()
            })

        return call

    return {name: with_defaults(name) for name in module.signatures}


def _graphs(saved_model_dir):
    """`(name, attributes, nodes)` of every graph of `saved_model.pb` and of every library function."""
    for meta_graph in read_saved_model(saved_model_dir).meta_graphs:
        yield "graph", {}, meta_graph.graph_def.node
        for function in meta_graph.graph_def.library.function:
            yield function.signature.name, function.attr, function.node_def


def xla_findings(saved_model_dir):
    """Returns what in `saved_model.pb` would need XLA: `Xla*` ops and must-compile functions."""
    findings = []
    for where, attributes, nodes in _graphs(saved_model_dir):
        for key in ("_XlaMustCompile", "_noinline_xla_compile"):
            if key in attributes and attributes[key].b:
                findings.append(f"function {where} has {key}")
        for node in nodes:
            if node.op.startswith("Xla") or node.op == "_XlaCompile":
                findings.append(f"op {node.op} ({node.name} in {where})")
            if "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b:
                findings.append(f"node {node.name} in {where} is must-compile")
    return findings


def operations(saved_model_dir):
    """The set of op names used in `saved_model.pb`, function library included."""
    return {node.op for _, _, nodes in _graphs(saved_model_dir) for node in nodes}


def publish(module, model_dir, version=None):
    """Saves a `ServingModule` as `model_dir/VERSION/`, atomically; returns that path.

    Written into a staging folder (TF Serving ignores it: not a number), checked to need no XLA
    (unless the module's `jit_compile` asks for it), and renamed into place with the umask's
    permissions, so TF Serving running as another user can read it. Without `version`, the next
    free number, moving on if another export takes it meanwhile.
    """
    model_dir = os.fspath(model_dir)
    fixed = version is not None
    if fixed and int(version) < 1:
        raise ValueError(f"version={version} must be a positive integer.")
    remove_stale(model_dir)
    version = int(version) if fixed else (version_numbers(model_dir) or [0])[-1] + 1
    for _ in range(_PUBLISH_ATTEMPTS):
        final = os.path.join(model_dir, str(version))
        if not os.path.exists(final):
            try:
                with staged_directory(final, replace=False) as staging:
                    tf.saved_model.save(module, staging, signatures=module.signatures())
                    findings = xla_findings(staging)
                    if findings and not module.jit_compile:
                        raise RuntimeError(f"The graph needs XLA, which TF Serving runs without: {findings}")
                return final
            except OSError as error:
                # Another export published this version while we wrote ours.
                taken = error.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(final)
                if not taken:
                    raise ValueError(f"Could not publish {final}: {error}") from error
        if fixed:
            raise ValueError(_TAKEN.format(final))
        version = max(version_numbers(model_dir) + [version]) + 1
    raise ValueError(
        f"Could not publish a version of {model_dir}: {_PUBLISH_ATTEMPTS} versions were taken by "
        "other exports while this one was written; retry."
    )


def export(run_dir, name, base_dir=DEFAULT_BASE_DIR, version=None, max_new_tokens=None,
           jit_compile=False):
    """Exports a run directory's model and tokenizer as `base_dir/name/version/`; returns that path.

    Args:
        name: the model name TF Serving serves it under (`/v1/models/NAME`).
        version: a positive int; default: the next free one (see `publish`).
        max_new_tokens: new tokens per prompt of `serving_default`, and `generate`'s default.
        jit_compile: an XLA-compiled decode loop, for servers that run XLA (see `ServingModule`).

    Example:
        export("checkpoints/shakespeare_char", "shakespeare")  # saved_models/shakespeare/1
    """
    if not _NAME.match(name or ""):
        raise ValueError(
            f"Model name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a folder "
            "and a URL path element)."
        )
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(
            f"No run directory at {run_dir}; pass a folder written by 'kgpt train' (or "
            "'kgpt import-gpt2')."
        )
    model_dir = os.path.join(base_dir, name)
    if version is not None:
        if int(version) < 1:
            raise ValueError(f"version={version} must be a positive integer.")
        final = os.path.join(model_dir, str(int(version)))
        if os.path.exists(final):  # before the model is loaded
            raise ValueError(_TAKEN.format(final))
    run = RunDirectory(run_dir)
    tokenizer = run.load_tokenizer()
    problem = tokenizer.graph_problem()
    if problem:
        raise ValueError(f"Cannot export {run_dir}: the SavedModel tokenizes in its graph, and {problem}.")
    module = ServingModule(
        run.load_model(), tokenizer, max_new_tokens=max_new_tokens, jit_compile=jit_compile
    )
    return publish(module, model_dir, version)
