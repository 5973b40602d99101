"""The tokenizer interface (`Tokenizer`, a `tf.Module` that runs eagerly, in `tf.data` and in a
SavedModel), the kind record with its capability flags (`TokenizerKind`) and the lookup of kinds
by name; the kinds themselves are registered in `kgpt.tokenizers.registry`."""

import dataclasses
import difflib
import hashlib
import json
import os
import typing

import tensorflow as tf

from kgpt.files import atomic_file
from kgpt.tokenizers.normalization import END_OF_TEXT, Normalization

PADDING = "<|padding|>"
CONFIG_FILENAME = "tokenizer.json"
VOCABULARY_FILENAME = "vocab.json"
MERGES_FILENAME = "merges.txt"
BYTE_ALPHABET_SIZE = 256
FORMAT_VERSION = 2  # 2: tokenizer.json records the normalization
__all__ = ["END_OF_TEXT", "Normalization", "Tokenizer", "TokenizerKind", "tokenizer_kind"]


@dataclasses.dataclass(frozen=True)
class TokenizerKind:
    """One kind of tokenizer: its capability flags, and how to make or load one. `spelling` is how
    `data.tokenizer` names it (`tiktoken:NAME` for kind `tiktoken`); `minimum_vocabulary_size` is None
    when the kind fixes its vocabulary; `make(name, documents, vocabulary_size, path, normalization)`
    and `load(directory, tokenizer.json as a dict, normalization)` return a `Tokenizer`."""

    name: str
    spelling: str
    make: typing.Callable
    load: typing.Callable
    graph_compatible: bool = True
    has_bpe_files: bool = False
    trained_on_corpus: bool = False
    needs_tokenizer_path: bool = False
    minimum_vocabulary_size: int | None = None



# kind name -> TokenizerKind, filled by `register_kind` (kgpt.tokenizers.registry).
TOKENIZER_KINDS = {}


def register_kind(kind):
    """Adds a `TokenizerKind` to `TOKENIZER_KINDS`; returns it."""
    TOKENIZER_KINDS[kind.name] = kind
    return kind


def tokenizer_names():
    """How `data.tokenizer` spells each registered kind (`tiktoken:NAME` for tiktoken's)."""
    return tuple(kind.spelling for kind in TOKENIZER_KINDS.values())


def tokenizer_kind(name):
    """The `TokenizerKind` that `data.tokenizer = name` selects (`"tiktoken:NAME"`: tiktoken's)."""
    name = str(name)
    if name in ("tiktoken", "tiktoken:"):
        raise ValueError(
            f"tokenizer={name!r} needs a tiktoken encoding name; set data.tokenizer to "
            "'tiktoken:NAME', e.g. 'tiktoken:o200k_base' or 'tiktoken:gpt2'."
        )
    kind = TOKENIZER_KINDS.get("tiktoken" if name.startswith("tiktoken:") else name)
    if kind:
        return kind
    close = difflib.get_close_matches(name, tokenizer_names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown tokenizer={name!r}.{hint} Set data.tokenizer to one of: "
        f"{', '.join(tokenizer_names())}."
    )



def _capability(flag):
    return property(lambda self: getattr(self.kind_spec, flag), doc=f"The kind's `{flag}` flag.")


class Tokenizer(tf.Module):
    """Base class: subclasses set `kind`, `vocabulary_size`, `end_of_text_id`, `padding_id`, and
    implement `_tokenize`, `_encode` (both on normalised text), `_detokenize` and `_files`."""

    graph_compatible = _capability("graph_compatible")
    has_bpe_files = _capability("has_bpe_files")
    trained_on_corpus = _capability("trained_on_corpus")
    needs_tokenizer_path = _capability("needs_tokenizer_path")

    def __init__(self, normalization=None):
        super().__init__()
        self.normalization = normalization or Normalization()

    @property
    def kind_spec(self):
        """This tokenizer's `TokenizerKind`."""
        return tokenizer_kind(self.kind)

    def graph_problem(self):
        """Why this tokenizer cannot run in a TensorFlow graph (a SavedModel), or None if it can."""
        return None if self.graph_compatible else f"tokenizer {self.kind!r} runs outside the TensorFlow graph"

    def tokenize(self, inputs):
        """Turns strings (`tf.string` or Python, `[batch]` or `[]`) into a `tf.RaggedTensor` int32
        `[batch, None]` (a 1-D int32 tensor for a scalar input)."""
        inputs = tf.convert_to_tensor(inputs, dtype=tf.string)
        scalar = inputs.shape.rank == 0
        batch = inputs[tf.newaxis] if scalar else inputs
        if batch.shape.rank != 1:
            raise ValueError(
                f"tokenize expects a string tensor of shape [batch] or []; got shape "
                f"{inputs.shape}. Flatten it first (tf.reshape(inputs, [-1]))."
            )
        if not self.graph_compatible:
            ids = self._tokenize(batch)  # eager only; normalises in Python
        elif tf.executing_eagerly():
            ids = self._tokenize_function(batch)
        else:
            ids = self._normalize_and_tokenize(batch)
        return ids[0] if scalar else ids

    def _normalize_and_tokenize(self, strings):
        return self._tokenize(self.normalization.normalize_tensor(strings))

    def detokenize(self, ids):
        """Turns int ids (ragged or dense `[batch, length]`, or `[length]`) back into `tf.string`
        `[batch]` (a scalar for 1-D ids); padding ids are dropped, bad UTF-8 becomes U+FFFD."""
        one_row = False
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.convert_to_tensor(ids)
            one_row = ids.shape.rank == 1
            if one_row:
                ids = ids[tf.newaxis]
            if ids.shape.rank != 2:
                raise ValueError(
                    f"detokenize expects ids of shape [batch, length] or [length]; got shape "
                    f"{ids.shape}. Reshape the ids to rank 1 or 2."
                )
            ids = tf.RaggedTensor.from_tensor(ids)
        ids = tf.cast(ids, tf.int32)
        if self.padding_id != self.end_of_text_id:
            ids = tf.ragged.boolean_mask(ids, tf.not_equal(ids, self.padding_id))
        if tf.executing_eagerly() and self.graph_compatible:
            text = self._detokenize_function(ids)
        else:
            text = self._detokenize(ids)
        text = tf.strings.unicode_transcode(
            text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
        )
        return text[0] if one_row else text

    def _build_functions(self):
        # Eager calls go through compiled functions: faster, and keras-hub's layer returns
        # TensorFlow tensors (not Python lists) when traced.
        self._tokenize_function = tf.function(
            self._normalize_and_tokenize, input_signature=[tf.TensorSpec([None], tf.string)]
        )
        self._detokenize_function = tf.function(
            self._detokenize,
            input_signature=[tf.RaggedTensorSpec([None, None], tf.int32, ragged_rank=1)],
        )

    def encode_documents(self, texts):
        """Tokenizes Python strings outside the graph, fast: 1-D int32 arrays equal to `tokenize`'s."""
        return self._encode([self.normalization.normalize(text) for text in texts])

    @property
    def fingerprint(self):
        """sha256 of what `save` writes: equal fingerprints mean equal token ids."""
        digest = hashlib.sha256()
        for name, text in sorted(self._files().items()):
            digest.update(name.encode() + b"\0" + text.encode("utf-8") + b"\0")
        return digest.hexdigest()

    def _config_file(self, **fields):
        """`{tokenizer.json: text}`: the kind, the format version, `fields` and the normalisation."""
        config = {"kind": self.kind, "format_version": FORMAT_VERSION, **fields}
        config["normalization"] = self.normalization.to_dict()
        return {CONFIG_FILENAME: json.dumps(config, indent=2, ensure_ascii=False)}

    def save(self, directory):
        """Writes the tokenizer's JSON / text files into `directory`, each atomically."""
        os.makedirs(directory, exist_ok=True)
        for name, text in self._files().items():
            with atomic_file(os.path.join(directory, name)) as temporary:
                with open(temporary, "w", encoding="utf-8") as file:
                    file.write(text)

