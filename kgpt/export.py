"""SavedModels for TensorFlow Serving: string in, string out, tokenizer and decode loop in the graph.

`export(run_dir, name)` writes `saved_models/NAME/VERSION/` (TF Serving's layout) holding a
`tf.Module` with the model's variables, the tokenizer and four signatures:

- `serving_default`: `prompts` (tf.string `[batch]`) -> greedy continuations. Only `prompts`, so
  `{"instances": ["some text"]}` works as it is: TF Serving's REST API accepts a plain
  `instances` list only for a one-input signature, and its JSON parser asks for every input of
  a signature. The number of new tokens is fixed at export (`--max-new-tokens`).
- `generate`: `prompts` plus the scalars `max_new_tokens` and one per `SamplingOptions` field
  (`temperature`, `top_k`, `top_p`, `seed`; send them in the columnar `inputs` format). Their
  dtypes, bounds checks and defaults come from the fields; the defaults are recorded in the
  SignatureDef; `kgpt serve` fills the ones a request leaves out, but send all of them to TF
  Serving, which has historically refused requests missing a signature input. Greedy is `top_k=1`.
- `score`: `texts` -> `log_likelihood`, `token_count`, `perplexity` (each text scored after an
  end-of-text token, its last `sequence_length` tokens if longer).
- `logits`: `token_ids` (int32 `[batch, length]`) -> `logits`, for clients that tokenize.

The graph uses only TensorFlow and tensorflow-text ops, no `Xla*` op and no must-compile function
(`xla_findings` checks; `export` refuses to publish a graph that fails it), so it runs in TF
Serving with XLA off. Bad arguments fail with INVALID_ARGUMENT and a message, never garbage.

This module also owns TF Serving's folder layout (`version_numbers`, `saved_model_version_path`,
`is_saved_model`), which `kgpt.generate` and `kgpt.serve` read. Versions are published with a
rename, readable by other users (the umask's permissions), at the next free number.
"""

import errno
import inspect
import os
import re

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from kgpt.decoding import cached, check_options, decode, default_max_new_tokens
from kgpt.files import remove_stale, staged_directory
from kgpt.sampling import SamplingOptions, graph_checks, signature_defaults, signature_dtypes
from kgpt.rundir import RunDirectory

DEFAULT_BASE_DIR = "saved_models"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Concurrent exports of one model each take the next free version; give up after this many.
_PUBLISH_ATTEMPTS = 100


def version_numbers(model_dir):
    """The numbered version folders of a TF Serving model folder, ascending (none if absent).

    Args:
        model_dir: `saved_models/NAME`.

    Returns:
        A sorted list of ints.
    """
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(name) for name in os.listdir(model_dir) if name.isdigit())


def saved_model_version_path(path):
    """Returns `path` if it holds `saved_model.pb`, else its highest numeric version folder.

    Raises:
        FileNotFoundError: neither.
    """
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
        model: a `kgpt.model.GPT`, or a causal model without a cache (the GRU baseline), which
            decodes by full recomputation (`kgpt.decoding.CausalRecomputation`).
        tokenizer: a graph-compatible kgpt tokenizer (`bpe`, `gpt2` or `char`).
        max_new_tokens: new tokens per prompt for `serving_default`, and the `generate` default.
        sampling_type: the options class whose fields become the `generate` signature's scalar
            inputs (after `prompts` and `max_new_tokens`), with their dtypes and defaults.
    """

    def __init__(self, model, tokenizer, max_new_tokens=None, sampling_type=SamplingOptions):
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
        # Readable after loading, without kgpt.
        self.sequence_length = tf.Variable(config.sequence_length, trainable=False, name="sequence_length")
        self.vocabulary_size = tf.Variable(config.vocabulary_size, trainable=False, name="vocabulary_size")
        self.end_of_text_id = tf.Variable(tokenizer.end_of_text_id, trainable=False, name="end_of_text_id")
        self.default_max_new_tokens = tf.Variable(max_new_tokens, trainable=False, name="default_max_new_tokens")
        prompts = tf.TensorSpec([None], tf.string, name="prompts")
        self.serving_default = tf.function(
            self._greedy, input_signature=[prompts], jit_compile=False
        )
        self.generate = tf.function(
            self._generate_with_defaults(max_new_tokens),
            input_signature=[
                prompts,
                tf.TensorSpec([], tf.int32, name="max_new_tokens"),
                *(
                    tf.TensorSpec([], dtype, name=name)
                    for name, dtype in signature_dtypes(sampling_type).items()
                ),
            ],
            jit_compile=False,
        )
        self.score = tf.function(
            self._score, input_signature=[tf.TensorSpec([None], tf.string, name="texts")],
            jit_compile=False,
        )
        self.logits = tf.function(
            self._logits,
            input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")],
            jit_compile=False,
        )

    def signatures(self):
        """The `signatures` argument of `tf.saved_model.save`."""
        return {
            "serving_default": self.serving_default,
            "generate": self.generate,
            "score": self.score,
            "logits": self.logits,
        }

    def _greedy(self, prompts):
        return self._run(prompts, self._max_new_tokens, SamplingOptions().graph_inputs())

    def _generate_with_defaults(self, default_max_new_tokens):
        """`generate(prompts, max_new_tokens, <one argument per sampling field>)`.

        Tensor defaults of a signature function are recorded in its SignatureDef; the
        parameters (names and defaults) come from the sampling fields, so the function takes
        `*arguments` and carries an explicit `__signature__`.
        """
        dtypes = signature_dtypes(self._sampling_type)
        defaults = signature_defaults(self._sampling_type)
        names = list(dtypes)

        def generate(prompts, max_new_tokens, *options):
            return self._generate(prompts, max_new_tokens, dict(zip(names, options)))

        parameter = inspect.Parameter
        generate.__signature__ = inspect.Signature([
            parameter("prompts", parameter.POSITIONAL_OR_KEYWORD),
            parameter(
                "max_new_tokens", parameter.POSITIONAL_OR_KEYWORD,
                default=tf.constant(default_max_new_tokens, tf.int32),
            ),
            *(
                parameter(name, parameter.POSITIONAL_OR_KEYWORD, default=tf.constant(defaults[name], dtypes[name]))
                for name in names
            ),
        ])
        return generate

    def _generate(self, prompts, max_new_tokens, options):
        with tf.control_dependencies(graph_checks(options, self._sampling_type)):
            options = {name: tf.identity(value) for name, value in options.items()}
        return self._run(prompts, max_new_tokens, options)

    def _run(self, prompts, max_new_tokens, sampling):
        max_new_tokens = tf.convert_to_tensor(max_new_tokens, tf.int32)
        checks = [
            tf.debugging.assert_positive(
                tf.size(prompts), message="prompts is empty: send at least one prompt"
            ),
            tf.debugging.assert_greater(
                max_new_tokens, 0, message="max_new_tokens must be >= 1"
            ),
            tf.debugging.assert_less(
                max_new_tokens, self._sequence_length,
                message=f"max_new_tokens must be < the context of {self._sequence_length} tokens",
            ),
        ]
        with tf.control_dependencies(checks):
            max_new_tokens = tf.identity(max_new_tokens)
        tokenizer = self.tokenizer
        ids = tokenizer.tokenize(prompts)  # ragged (batch, None)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        dense = ids.to_tensor(default_value=0)
        room = self._sequence_length - max_new_tokens
        truncated = lengths > room
        # An empty prompt starts from end-of-text, as GPT-2 does.
        empty = tf.equal(lengths, 0)
        dense, lengths = _take_last(dense, lengths, room)
        first = tf.equal(tf.range(tf.shape(dense)[1]), 0)[None, :]
        dense = tf.where(empty[:, None] & first, tokenizer.end_of_text_id, dense)
        lengths = tf.where(empty, 1, lengths)
        tokens, ends = decode(
            self._decoding_model, dense, lengths, max_new_tokens, tokenizer.end_of_text_id, sampling
        )
        # The continuation, without the end-of-text that stopped a row.
        stopped = tf.equal(
            tf.gather(tokens, tf.maximum(ends - 1, 0), batch_dims=1), tokenizer.end_of_text_id
        )
        counts = ends - lengths - tf.cast(stopped, tf.int32)
        width = tf.reduce_max(counts)
        positions = lengths[:, None] + tf.range(width)[None, :]
        valid = tf.range(width)[None, :] < counts[:, None]
        new = tf.gather(tokens, tf.where(valid, positions, 0), batch_dims=1)
        new = tf.where(valid, new, tokenizer.padding_id)
        text = tokenizer.detokenize(tf.RaggedTensor.from_tensor(new, lengths=counts))
        return {
            "text": text,
            "token_ids": new,
            "token_count": counts,
            "prompt_token_count": lengths,
            "truncated": truncated,
        }

    def _score(self, texts):
        tokenizer = self.tokenizer
        ids = tokenizer.tokenize(texts)
        start = tf.fill([tf.shape(texts)[0], 1], tokenizer.end_of_text_id)
        ids = tf.concat([tf.RaggedTensor.from_tensor(start), ids], axis=1)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        checks = [
            tf.debugging.assert_positive(
                tf.size(texts), message="texts is empty: send at least one text"
            ),
            tf.debugging.assert_greater(
                lengths, 1, message="every text needs at least one token; got an empty text"
            ),
        ]
        with tf.control_dependencies(checks):
            lengths = tf.identity(lengths)
        dense, lengths = _take_last(ids.to_tensor(default_value=0), lengths, self._sequence_length + 1)
        inputs, targets = dense[:, :-1], dense[:, 1:]
        log_probabilities = tf.nn.log_softmax(tf.cast(self.model(inputs), tf.float32))
        picked = tf.gather(log_probabilities, targets, batch_dims=2)  # (batch, length)
        counts = lengths - 1
        mask = tf.range(tf.shape(targets)[1])[None, :] < counts[:, None]
        log_likelihood = tf.reduce_sum(tf.where(mask, picked, 0.0), axis=1)
        return {
            "log_likelihood": log_likelihood,
            "token_count": counts,
            "perplexity": tf.exp(-log_likelihood / tf.cast(counts, tf.float32)),
        }

    def _logits(self, token_ids):
        length = tf.shape(token_ids)[1]
        checks = [
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
        ]
        with tf.control_dependencies(checks):
            token_ids = tf.identity(token_ids)
        return {"logits": tf.cast(self.model(token_ids), tf.float32)}


def _read_saved_model(saved_model_dir):
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as file:
        proto.ParseFromString(file.read())
    return proto


def xla_findings(saved_model_dir):
    """Returns what in `saved_model.pb` would need XLA: `Xla*` ops and must-compile functions."""

    proto = _read_saved_model(saved_model_dir)
    findings = []
    for meta_graph in proto.meta_graphs:
        graph = meta_graph.graph_def
        nodes = [("graph", node) for node in graph.node]
        for function in graph.library.function:
            name = function.signature.name
            for key in ("_XlaMustCompile", "_noinline_xla_compile"):
                if key in function.attr and function.attr[key].b:
                    findings.append(f"function {name} has {key}")
            nodes += [(name, node) for node in function.node_def]
        for where, node in nodes:
            if node.op.startswith("Xla") or node.op == "_XlaCompile":
                findings.append(f"op {node.op} ({node.name} in {where})")
            if "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b:
                findings.append(f"node {node.name} in {where} is must-compile")
    return findings


def operations(saved_model_dir):
    """The set of op names used in `saved_model.pb`, function library included."""

    proto = _read_saved_model(saved_model_dir)
    ops = set()
    for meta_graph in proto.meta_graphs:
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


def publish(module, model_dir, version=None):
    """Saves a `ServingModule` as the version folder `model_dir/VERSION/`, atomically.

    Stale staging folders of killed exports in `model_dir` are removed first. The SavedModel is
    written into a staging folder beside the versions (TF Serving ignores it: not a number),
    checked to need no XLA, and renamed into place, with the user's umask permissions so a TF
    Serving process running as another user can read it. Without `version`, the next free
    number is taken, and a version that another export publishes meanwhile makes this one move
    on to the next number.

    Args:
        module: a `ServingModule`.
        model_dir: `saved_models/NAME`.
        version: a positive int; default: one more than the highest existing version.

    Returns:
        The path of the new version folder.

    Raises:
        ValueError: `version` exists already or is not positive, or the folder cannot be written.
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
                    if findings:
                        raise RuntimeError(
                            f"The serving graph needs XLA, which TF Serving runs without: {findings}"
                        )
                return final
            except OSError as error:
                # Another export published this version while we wrote ours.
                taken = error.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(final)
                if not taken:
                    raise ValueError(f"Could not publish {final}: {error}") from error
        if fixed:
            raise ValueError(
                f"{final} already exists; versions are never overwritten. Leave --version out to "
                "write the next one."
            )
        version = max(version_numbers(model_dir) + [version]) + 1
    raise ValueError(
        f"Could not publish a version of {model_dir}: {_PUBLISH_ATTEMPTS} versions were taken by "
        "other exports while this one was written; retry."
    )


def export(run_dir, name, base_dir=DEFAULT_BASE_DIR, version=None, max_new_tokens=None):
    """Exports a run directory's model and tokenizer as `base_dir/name/version/`.

    Args:
        run_dir: a run directory written by `kgpt train` (model + `tokenizer/`).
        name: the model name TF Serving serves it under (`/v1/models/NAME`).
        base_dir: the folder of served models.
        version: a positive int; default: one more than the highest existing version (the next
            free one, should another export take that one meanwhile).
        max_new_tokens: new tokens per prompt of `serving_default` (and `generate`'s default);
            default `min(64, sequence_length // 2)`.

    Returns:
        The path of the new version folder.

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
            raise ValueError(
                f"{final} already exists; versions are never overwritten. Leave --version out "
                "to write the next one."
            )
    run = RunDirectory(run_dir)
    tokenizer = run.load_tokenizer()
    if not tokenizer.graph_compatible:
        raise ValueError(
            f"Tokenizer {tokenizer.kind!r} runs outside the TensorFlow graph and cannot be "
            "exported; train with tokenizer 'bpe', 'gpt2' or 'char'."
        )
    module = ServingModule(run.load_model(), tokenizer, max_new_tokens=max_new_tokens)
    return publish(module, model_dir, version)
