"""SavedModels for TensorFlow Serving: string in, string out, tokenizer and decode loop in the graph.

`export(run_dir, name)` writes `saved_models/NAME/VERSION/` (TF Serving's layout) holding a
`tf.Module` with the model's variables, the tokenizer and four signatures:

- `serving_default`: `prompts` (tf.string `[batch]`) -> greedy continuations. Only `prompts`, so
  `{"instances": ["some text"]}` works as it is: TF Serving's REST API accepts a plain
  `instances` list only for a one-input signature, and its JSON parser asks for every input of
  a signature. The number of new tokens is fixed at export (`--max-new-tokens`).
- `generate`: `prompts` plus the scalars `max_new_tokens`, `temperature`, `top_k`, `top_p`,
  `seed` (send them in the columnar `inputs` format). Their defaults are recorded in the
  SignatureDef; `kgpt serve` fills the ones a request leaves out, but send all of them to TF
  Serving, which has historically refused requests missing a signature input. Greedy is `top_k=1`.
- `score`: `texts` -> `log_likelihood`, `token_count`, `perplexity` (each text scored after an
  end-of-text token, its last `sequence_length` tokens if longer).
- `logits`: `token_ids` (int32 `[batch, length]`) -> `logits`, for clients that tokenize.

The graph uses only TensorFlow and tensorflow-text ops, no `Xla*` op and no must-compile function
(`xla_findings` checks; `export` refuses to publish a graph that fails it), so it runs in TF
Serving with XLA off. Bad arguments fail with INVALID_ARGUMENT and a message, never garbage.
"""

import os
import re

import tensorflow as tf

from kgpt.files import staged_directory
from kgpt.generate import check_options, decode, default_max_new_tokens, version_numbers
from kgpt.rundir import RunDirectory

DEFAULT_BASE_DIR = "saved_models"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
        model: a `kgpt.model.GPT`.
        tokenizer: a graph-compatible kgpt tokenizer (`bpe`, `gpt2` or `char`).
        max_new_tokens: new tokens per prompt for `serving_default`, and the `generate` default.
    """

    def __init__(self, model, tokenizer, max_new_tokens=None):
        super().__init__(name="kgpt")
        config = model.model_config
        if max_new_tokens is None:
            max_new_tokens = default_max_new_tokens(config.sequence_length)
        check_options(max_new_tokens, config.sequence_length)
        self.model = model
        self.tokenizer = tokenizer
        self._sequence_length = config.sequence_length
        self._vocabulary_size = config.vocabulary_size
        self._max_new_tokens = max_new_tokens
        # Readable after loading, without kgpt.
        self.sequence_length = tf.Variable(config.sequence_length, trainable=False, name="sequence_length")
        self.vocabulary_size = tf.Variable(config.vocabulary_size, trainable=False, name="vocabulary_size")
        self.end_of_text_id = tf.Variable(tokenizer.end_of_text_id, trainable=False, name="end_of_text_id")
        self.default_max_new_tokens = tf.Variable(max_new_tokens, trainable=False, name="default_max_new_tokens")
        prompts = tf.TensorSpec([None], tf.string, name="prompts")
        scalar = lambda dtype, name: tf.TensorSpec([], dtype, name=name)  # noqa: E731
        self.serving_default = tf.function(
            self._greedy, input_signature=[prompts], jit_compile=False
        )
        defaults = self._generate_with_defaults(max_new_tokens)
        self.generate = tf.function(
            defaults,
            input_signature=[
                prompts,
                scalar(tf.int32, "max_new_tokens"),
                scalar(tf.float32, "temperature"),
                scalar(tf.int32, "top_k"),
                scalar(tf.float32, "top_p"),
                scalar(tf.int32, "seed"),
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
        return self._run(prompts, self._max_new_tokens, 0.0, 0, 1.0, 0)

    def _generate_with_defaults(self, default_max_new_tokens):
        # Tensor defaults of a signature function are recorded in its SignatureDef.
        def generate(
            prompts,
            max_new_tokens=tf.constant(default_max_new_tokens, tf.int32),
            temperature=tf.constant(1.0),
            top_k=tf.constant(0),
            top_p=tf.constant(1.0),
            seed=tf.constant(0),
        ):
            return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, seed)

        return generate

    def _generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed):
        checks = [
            tf.debugging.assert_greater(
                temperature, 0.0,
                message="temperature must be > 0; for greedy decoding use top_k=1 or the "
                "serving_default signature",
            ),
            tf.debugging.assert_non_negative(top_k, message="top_k must be >= 0 (0 keeps all)"),
            tf.debugging.assert_greater(top_p, 0.0, message="top_p must be in (0, 1]"),
            tf.debugging.assert_less_equal(top_p, 1.0, message="top_p must be in (0, 1]"),
        ]
        with tf.control_dependencies(checks):
            temperature = tf.identity(temperature)
        return self._run(prompts, max_new_tokens, temperature, top_k, top_p, seed)

    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, seed):
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
            self.model, dense, lengths, max_new_tokens, tokenizer.end_of_text_id,
            temperature, top_k, top_p, seed,
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


def xla_findings(saved_model_dir):
    """Returns what in `saved_model.pb` would need XLA: `Xla*` ops and must-compile functions."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as file:
        proto.ParseFromString(file.read())
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
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as file:
        proto.ParseFromString(file.read())
    ops = set()
    for meta_graph in proto.meta_graphs:
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


def export(run_dir, name, base_dir=DEFAULT_BASE_DIR, version=None, max_new_tokens=None):
    """Exports a run directory's model and tokenizer as `base_dir/name/version/`.

    Args:
        run_dir: a run directory written by `kgpt train` (model + `tokenizer/`).
        name: the model name TF Serving serves it under (`/v1/models/NAME`).
        base_dir: the folder of served models.
        version: a positive int; default: one more than the highest existing version.
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
    if version is None:
        version = (version_numbers(model_dir) or [0])[-1] + 1
    elif int(version) < 1:
        raise ValueError(f"version={version} must be a positive integer.")
    final = os.path.join(model_dir, str(int(version)))
    if os.path.exists(final):
        raise ValueError(
            f"{final} already exists; versions are never overwritten. Leave --version out to "
            "write the next one."
        )
    run = RunDirectory(run_dir)
    tokenizer = run.load_tokenizer()
    if not tokenizer.graph_compatible:
        raise ValueError(
            f"Tokenizer {tokenizer.kind!r} runs outside the TensorFlow graph and cannot be "
            "exported; train with tokenizer 'bpe', 'gpt2' or 'char'."
        )
    module = ServingModule(run.load_model(), tokenizer, max_new_tokens=max_new_tokens)
    # Staged in a dot-folder beside the versions, which TF Serving ignores (not a number), so a
    # half-written export is never loaded; the rename publishes it at once and, should another
    # export have taken this version meanwhile, fails rather than replace it.
    try:
        with staged_directory(final, replace=False) as staging:
            tf.saved_model.save(module, staging, signatures=module.signatures())
            findings = xla_findings(staging)
            if findings:
                raise RuntimeError(
                    f"The serving graph needs XLA, which TF Serving runs without: {findings}"
                )
    except OSError as error:
        raise ValueError(f"Could not publish {final}: {error}") from error
    return final
