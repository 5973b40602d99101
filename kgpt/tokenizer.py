"""Tokenizers: train or load them; one interface usable eagerly, in `tf.data` and in a SavedModel.

Every tokenizer is a `tf.Module` with the same interface:

- `tokenize(strings)`: `tf.string` `[batch]` -> `tf.RaggedTensor` int32 `[batch, None]`
  (a scalar string gives a 1-D int32 tensor). Runs eagerly, inside `tf.data.Dataset.map` and
  inside a `tf.function` / SavedModel with only TensorFlow and tensorflow-text ops.
- `detokenize(ids)`: ragged or dense int `[batch, length]` -> `tf.string` `[batch]` (1-D ids give
  a scalar). Padding ids are dropped; invalid UTF-8 (a multi-byte character cut in half) becomes
  U+FFFD, never an error.
- `vocabulary_size`, `end_of_text_id` (`<|endoftext|>`, the document separator), `padding_id`.
- `encode_documents(texts)`: the fast, out-of-graph path the data pipeline uses to fill its token
  cache (HF `tokenizers` for BPE, NumPy for characters); ids equal `tokenize`'s.
- `save(directory)`; `load_tokenizer(directory)` reads it back, dispatching on `tokenizer.json`.
- `normalization`: the text normalisation (`Normalization`: `lowercase`, `strip_punctuation`)
  applied before splitting, by `tokenize` inside the graph and by `encode_documents` in Python,
  with the same result; saved in `tokenizer.json` (files without it load as no normalisation).
  `<|endoftext|>` is never normalised.
- Capability flags, from the kind's `TokenizerKind`: `graph_compatible`, `has_bpe_files`,
  `trained_on_corpus`, `needs_tokenizer_path`.

Kinds (`kind`, also the `data.tokenizer` setting), registered in `TOKENIZER_KINDS` and looked up
with `tokenizer_kind(name)`; `make_tokenizer(name, ...)` builds one, `load_tokenizer` reads one:

- `"bpe"`: byte-level BPE trained with HF `tokenizers` (`train_bpe`), GPT-2's pre-tokenizer
  regex; run in the graph by keras-hub's `BytePairTokenizer`. Ids 0 and 1 are `<|endoftext|>`
  and `<|padding|>`, then the 256 byte symbols, then the merges. `<|padding|>` is never produced
  by `tokenize` (it is not matched in text), so padding can never collide with real text.
- `"gpt2"`: OpenAI GPT-2's `vocab.json` (or `encoder.json`) + `merges.txt`
  (`load_gpt2_tokenizer`), for imported GPT-2 weights. GPT-2 has no padding token, so
  `padding_id == end_of_text_id`; the data pipeline masks padding by position
  (`sample_weight = 0` past each document's end), never by comparing ids, so this is safe.
- `"char"`: one id per character of the training text (`train_characters`), sorted by code point
  (Tiny Shakespeare: ids 0-64 as in nanoGPT's shakespeare_char), then `<|endoftext|>`, `<unk>`
  (any character not seen in training) and `<|padding|>`.
- `"tiktoken:NAME"`: a tiktoken encoding (`gpt2`, `o200k_base`, ...) read from tiktoken's local
  cache; runs outside the graph only (a pre-tokenization step), so it can train models but
  cannot be exported. Needs the optional `tiktoken` package.

In-graph BPE: kgpt splits words with its own RE2 spelling of GPT-2's regex (`split_words`;
keras-hub's own splitter differs from GPT-2 on trailing whitespace runs and rare Unicode spaces)
and merges them with keras-hub's `BytePairTokenizer` tables, so in-graph ids equal HF
`tokenizers`' and OpenAI's encoding of the same text (tested on whitespace runs, Unicode, digits,
punctuation and special tokens). The noncharacter U+FDD0 is reserved as an internal marker.
"""

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import sys
import typing
import unicodedata

import numpy as np
import tensorflow as tf

from kgpt import keras_compat
from kgpt.files import atomic_file

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|padding|>"
UNKNOWN = "<unk>"
CONFIG_FILENAME = "tokenizer.json"
VOCABULARY_FILENAME = "vocab.json"
MERGES_FILENAME = "merges.txt"
BYTE_ALPHABET_SIZE = 256
FORMAT_VERSION = 2  # 2: tokenizer.json records the normalization


def _write_atomically(directory, files):
    """Writes `{name: text}` into `directory`, each file via a temporary name and a rename."""
    os.makedirs(directory, exist_ok=True)
    for name, text in files.items():
        with atomic_file(os.path.join(directory, name)) as temporary:
            with open(temporary, "w", encoding="utf-8") as file:
                file.write(text)


@functools.lru_cache(maxsize=1)
def _punctuation_ranges():
    """[(first, last)] code point ranges of Unicode punctuation (P*) and symbols (S*), per Python's
    `unicodedata`; both the Python and the in-graph normalisation are built from them."""
    ranges = []
    for point in range(sys.maxunicode + 1):
        if unicodedata.category(chr(point))[0] in "PS":
            if ranges and ranges[-1][1] == point - 1:
                ranges[-1][1] = point
            else:
                ranges.append([point, point])
    return tuple((first, last) for first, last in ranges)


@functools.lru_cache(maxsize=1)
def _punctuation_table():
    """`str.translate` table: every punctuation or symbol code point -> a space."""
    return {p: " " for first, last in _punctuation_ranges() for p in range(first, last + 1)}


@functools.lru_cache(maxsize=1)
def _punctuation_pattern():
    """The same code points as an RE2 character class (338 ranges with Unicode 14)."""
    return "[" + "".join(
        rf"\x{{{a:x}}}" if a == b else rf"\x{{{a:x}}}-\x{{{b:x}}}" for a, b in _punctuation_ranges()
    ) + "]"


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Text normalisation a tokenizer applies before splitting text into tokens.

    The same in Python (`normalize`, used by `encode_documents` and tokenizer training) and in
    the TensorFlow graph (`normalize_tensor`, used by `tokenize`, so SavedModels and servers
    apply it too). `<|endoftext|>` is left as it is.

    Args:
        lowercase: lowercase with Unicode's full case mapping (Python's `str.lower`, ICU's
            `toLower` in the graph; both map a final capital sigma to `ς`).
        strip_punctuation: replace every punctuation (P*) and symbol (S*) character with a
            space, so `"well-made"` -> `"well made"` and `"$5"` -> `" 5"`.

    Example:
        Normalization(lowercase=True, strip_punctuation=True).normalize("Don't stop!")
        # "don t stop "
    """

    lowercase: bool = False
    strip_punctuation: bool = False

    def __post_init__(self):
        for name in ("lowercase", "strip_punctuation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"normalization {name}={getattr(self, name)!r} must be true or false; fix "
                    f"the tokenizer.json or the data.{name} setting."
                )

    @property
    def identity(self):
        """True when the normalisation changes nothing."""
        return not (self.lowercase or self.strip_punctuation)

    def to_dict(self):
        """The JSON form saved in `tokenizer.json`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values, source="tokenizer.json"):
        """Reads `to_dict`'s form; None (a file written before normalisation) is no normalisation.

        Raises:
            ValueError: naming `source` and the unknown keys.
        """
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"{source}: unknown normalization keys {unknown}; expected lowercase and "
                "strip_punctuation. The file is damaged or from a newer kgpt; save it again."
            )
        return cls(**values)

    def _normalize_piece(self, text):
        if self.lowercase:
            text = text.lower()
        if self.strip_punctuation:
            text = text.translate(_punctuation_table())
        return text

    def normalize(self, text):
        """Normalises a Python string.

        Args:
            text: a `str`.

        Returns:
            The normalised `str` (equal to `normalize_tensor` of its UTF-8 encoding).
        """
        if self.identity:
            return text
        return END_OF_TEXT.join(self._normalize_piece(p) for p in text.split(END_OF_TEXT))

    @tf.autograph.experimental.do_not_convert  # plain TensorFlow ops: tracing stays fast
    def normalize_tensor(self, strings):
        """Normalises a `tf.string` tensor `[batch]` with TensorFlow / tensorflow-text ops only.

        Args:
            strings: `tf.string` `[batch]` (UTF-8; invalid bytes become U+FFFD when lowercasing).

        Returns:
            `tf.string` `[batch]`.
        """
        if self.identity:
            return strings
        # `<|endoftext|>` is cut out and kept; so is NUL, at which ICU's lowercasing would stop.
        return _map_between(strings, END_OF_TEXT, lambda p: _map_between(p, "\x00", self._normalize_flat))

    def _normalize_flat(self, strings):
        if self.lowercase:
            strings = tf.strings.lower(strings, encoding="utf-8")
        if self.strip_punctuation:
            strings = tf.strings.regex_replace(strings, _punctuation_pattern(), " ")
        return strings


def _map_between(strings, separator, function):
    """Applies `function` to the pieces of `strings` [batch] between `separator`s, keeping them."""
    pieces = tf.strings.split(strings, sep=separator)  # (batch, pieces), empty pieces kept
    flat = pieces.flat_values  # (pieces,)
    row_ends = tf.gather(pieces.row_splits[1:], pieces.value_rowids())  # each piece's row end
    last = tf.equal(tf.range(tf.size(flat, out_type=row_ends.dtype)) + 1, row_ends)
    flat = function(flat)
    flat = tf.where(last, flat, flat + separator)
    return tf.strings.unsorted_segment_join(flat, pieces.value_rowids(), pieces.nrows())


def _as_ragged_ids(ids):
    """Returns `(ids as RaggedTensor int32 [batch, None], was_1d)`."""
    if not isinstance(ids, tf.RaggedTensor):
        ids = tf.convert_to_tensor(ids)
        if ids.shape.rank == 1:
            return tf.RaggedTensor.from_tensor(ids[tf.newaxis]).with_values(
                tf.cast(ids, tf.int32)
            ), True
        if ids.shape.rank != 2:
            raise ValueError(
                f"detokenize expects ids of shape [batch, length] or [length]; got shape "
                f"{ids.shape}. Reshape the ids to rank 1 or 2."
            )
        ids = tf.RaggedTensor.from_tensor(ids)
    return tf.cast(ids, tf.int32), False


class Tokenizer(tf.Module):
    """Base class: the interface shared by every kgpt tokenizer (see the module docstring).

    Subclasses implement `_tokenize(strings [batch]) -> RaggedTensor int32` and
    `_encode(list of str) -> list of int32 arrays` (both on normalised text),
    `_detokenize(RaggedTensor int32) -> tf.string [batch]`, `_files()` (what `save` writes) and
    set `kind`, `vocabulary_size`, `end_of_text_id`, `padding_id`.

    Args:
        normalization: the `Normalization` applied before tokenizing; None: none.
    """

    kind = None

    def __init__(self, normalization=None, name=None):
        super().__init__(name=name)
        self.normalization = normalization or Normalization()

    @property
    def kind_spec(self):
        """This tokenizer's `TokenizerKind` (its capability flags and how to build one)."""
        return tokenizer_kind(self.kind)

    @property
    def graph_compatible(self):
        """True when `tokenize` / `detokenize` run inside a `tf.function` or SavedModel."""
        return self.kind_spec.graph_compatible

    @property
    def has_bpe_files(self):
        """True when the tokenizer is a `vocab.json` + `merges.txt` BPE (exportable to HF)."""
        return self.kind_spec.has_bpe_files

    @property
    def trained_on_corpus(self):
        """True when it is trained on the corpus' training split (`bpe`, `char`)."""
        return self.kind_spec.trained_on_corpus

    @property
    def needs_tokenizer_path(self):
        """True when it is loaded from files named by `data.tokenizer_path` (`gpt2`)."""
        return self.kind_spec.needs_tokenizer_path

    def normalize(self, text):
        """Applies this tokenizer's `normalization` to a Python string (what `tokenize` sees)."""
        return self.normalization.normalize(text)

    def tokenize(self, inputs):
        """Turns strings into token ids.

        Args:
            inputs: a `tf.string` tensor (or Python str / list of str) of shape `[batch]` or `[]`.

        Returns:
            A `tf.RaggedTensor` int32 `[batch, None]`, or a 1-D int32 tensor for a scalar input.

        Example:
            ids = tokenizer.tokenize(["Hello world", "Hi"])  # RaggedTensor [2, None]
        """
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
        """Turns token ids back into text; padding ids are dropped, bad UTF-8 becomes U+FFFD.

        Args:
            ids: int token ids, a `tf.RaggedTensor` or dense tensor `[batch, length]`, or `[length]`.

        Returns:
            A `tf.string` tensor `[batch]` (a scalar for 1-D ids).
        """
        ids, one_row = _as_ragged_ids(ids)
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
        """Tokenizes Python strings outside the graph, as fast as this tokenizer allows.

        Args:
            texts: a list of Python strings.

        Returns:
            A list of 1-D int32 NumPy arrays, equal to `tokenize(texts)` row by row.
        """
        return self._encode([self.normalization.normalize(text) for text in texts])

    def _encode(self, texts):
        raise NotImplementedError

    @property
    def fingerprint(self):
        """sha256 of what `save` writes: equal fingerprints mean equal token ids."""
        digest = hashlib.sha256()
        for name, text in sorted(self._files().items()):
            digest.update(name.encode() + b"\0" + text.encode("utf-8") + b"\0")
        return digest.hexdigest()

    def save(self, directory):
        """Writes the tokenizer into `directory` (plain JSON / text files, no pickle).

        Args:
            directory: a folder, created if needed (e.g. `checkpoints/<run>/tokenizer`).
        """
        _write_atomically(directory, self._files())

    def _files(self):
        raise NotImplementedError


# GPT-2's pre-tokenizer, `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
# rewritten for RE2 (no look-ahead). `\s` is spelled out as Unicode White_Space, which is what GPT-2
# (Python `regex`) and HF `tokenizers` match. The look-ahead keeps the last whitespace character
# of a run that precedes a non-space for the next word; we get the same split by inserting a
# marker (a Unicode noncharacter, never in real text) before that last character, splitting with
# the marker as its own word, and dropping it.
_SPACE = r"\t\n\x{0b}\f\r \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_MARK = "\ufdd0"
_MARK_BEFORE_LAST_SPACE = (rf"([{_SPACE}])([{_SPACE}])([^{_SPACE}])", r"\1" + _MARK + r"\2\3")
_WORD = (
    rf"<\|endoftext\|>|\x{{fdd0}}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}+| ?\p{{N}}+"
    rf"| ?[^{_SPACE}\p{{L}}\p{{N}}\x{{fdd0}}]+|[{_SPACE}]+"
)


def split_words(strings):
    """Splits `tf.string` `[batch]` into GPT-2 pre-tokenizer words: RaggedTensor `[batch, words]`.

    `<|endoftext|>` is cut out first and kept whole, as HF `tokenizers` does for special tokens.
    """
    import tensorflow_text as tf_text

    special = r"<\|endoftext\|>"
    pieces = tf_text.regex_split(strings, special, special)  # (batch, pieces)
    marked = tf.strings.regex_replace(pieces.flat_values, *_MARK_BEFORE_LAST_SPACE)
    words = tf_text.regex_split(marked, _WORD, _WORD)  # (pieces, words)
    words = tf.RaggedTensor.from_row_splits(words, pieces.row_splits).merge_dims(1, 2)
    return tf.ragged.boolean_mask(words, tf.not_equal(words, _MARK))


class BytePairTokenizer(Tokenizer):
    """Byte-level BPE (trained `"bpe"` or OpenAI `"gpt2"`), in-graph via keras-hub.

    Args:
        vocabulary: dict token -> id (byte-level symbols, as in GPT-2's `encoder.json`).
        merges: list of merge rules `"a b"`, highest priority first.
        kind: `"bpe"` or `"gpt2"`, recorded by `save`.
        padding: the padding token (must be in `vocabulary`), or None to pad with end-of-text.
        normalization: the `Normalization` applied before splitting; None: none.

    Example:
        tokenizer = train_bpe(["some text", "more text"], vocabulary_size=300)
        tokenizer.detokenize(tokenizer.tokenize(["hello"]))  # [b"hello"]
    """

    def __init__(self, vocabulary, merges, kind="bpe", padding=PADDING, normalization=None, name=None):
        super().__init__(normalization=normalization, name=name)
        merges = [m for m in merges if m and not m.startswith("#version")]
        for token in [END_OF_TEXT] + ([padding] if padding else []):
            if token not in vocabulary:
                raise ValueError(
                    f"The BPE vocabulary has no {token!r} token; add it to vocab.json "
                    "(GPT-2's has <|endoftext|> at id 50256) or retrain with train_bpe."
                )
        self.kind = kind
        # Kept as JSON text: tf.Module would wrap a dict / list attribute into trackable objects.
        self._vocabulary_json = json.dumps(dict(vocabulary), ensure_ascii=False)
        self._merges_text = "".join(f"{m}\n" for m in merges)
        self.padding = padding
        self.vocabulary_size = max(vocabulary.values()) + 1
        self.end_of_text_id = vocabulary[END_OF_TEXT]
        self.padding_id = vocabulary[padding] if padding else self.end_of_text_id
        self._layer = keras_compat.graph_byte_pair_layer(vocabulary, merges, [END_OF_TEXT])
        self._fast = None
        self._build_functions()

    @property
    def vocabulary(self):
        """dict token -> id (a fresh copy)."""
        return json.loads(self._vocabulary_json)

    @property
    def merges(self):
        """list of merge rules `"a b"`, highest priority first (a fresh copy)."""
        return self._merges_text.splitlines()

    def _tokenize(self, strings):
        layer = self._layer
        if not keras_compat.has_byte_pair_internals(layer):
            return tf.cast(layer.tokenize(strings), tf.int32)  # other keras-hub: its own split
        words = split_words(strings)  # (batch, words)
        flat = words.flat_values
        cached = keras_compat.byte_pair_cache(layer).lookup(flat)
        unseen = tf.equal(cached, "")

        def merge_unseen():
            keras_compat.byte_pair_merge_into_cache(layer, tf.boolean_mask(flat, unseen))
            return keras_compat.byte_pair_cache(layer).lookup(flat)

        merged = tf.cond(tf.reduce_any(unseen), merge_unseen, lambda: cached)
        ids = keras_compat.byte_pair_token_to_id(layer).lookup(tf.strings.split(merged, sep=" "))  # (words, pieces)
        return tf.RaggedTensor.from_row_splits(
            tf.cast(ids.flat_values, tf.int32), tf.gather(ids.row_splits, words.row_splits)
        )

    def _detokenize(self, ids):
        return self._layer.detokenize(ids)

    def _encode(self, texts):
        # HF tokenizers (Rust, all cores) with the same vocabulary, merges and GPT-2 regex.
        if self._fast is None:
            self._fast = _hf_byte_level_tokenizer(self.vocabulary, self.merges)
        return [np.asarray(e.ids, dtype=np.int32) for e in self._fast.encode_batch(list(texts))]

    def _files(self):
        return {
            VOCABULARY_FILENAME: self._vocabulary_json,
            MERGES_FILENAME: "#version: 0.2\n" + self._merges_text,
            CONFIG_FILENAME: json.dumps(
                {
                    "kind": self.kind,
                    "format_version": FORMAT_VERSION,
                    "vocabulary_file": VOCABULARY_FILENAME,
                    "merges_file": MERGES_FILENAME,
                    "padding": self.padding,
                    "normalization": self.normalization.to_dict(),
                },
                indent=2,
            ),
        }


def _hf_byte_level_tokenizer(vocabulary, merges):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    pairs = [tuple(m.split(" ")) for m in merges]
    fast = HFTokenizer(models.BPE(vocab=dict(vocabulary), merges=pairs))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([END_OF_TEXT])
    return fast


def train_bpe(texts, vocabulary_size, min_frequency=0, normalization=None):
    """Trains a byte-level BPE tokenizer (GPT-2 pre-tokenization) with HF `tokenizers`.

    Args:
        texts: an iterable of Python strings (the training split's documents).
        vocabulary_size: total ids, including `<|endoftext|>`, `<|padding|>` and the 256 bytes.
        min_frequency: merges seen fewer times than this are not learned.
        normalization: a `Normalization` applied to `texts` before training and kept by the
            tokenizer; None: none.

    Returns:
        A `BytePairTokenizer` of kind `"bpe"`. Its `vocabulary_size` may be below the request
        when the text has fewer distinct merges.

    Example:
        tokenizer = train_bpe(documents, vocabulary_size=8192)
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    minimum = BYTE_ALPHABET_SIZE + 2
    if vocabulary_size < minimum:
        raise ValueError(
            f"vocabulary_size={vocabulary_size} is smaller than the byte alphabet (256) plus the "
            f"2 special tokens; set data.vocabulary_size to at least {minimum} (e.g. 8192)."
        )
    trainee = HFTokenizer(models.BPE())
    trainee.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocabulary_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT, PADDING],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    normalization = normalization or Normalization()
    trainee.train_from_iterator((normalization.normalize(t) for t in texts), trainer)
    model = json.loads(trainee.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return BytePairTokenizer(model["vocab"], merges, kind="bpe", padding=PADDING, normalization=normalization)


def load_gpt2_tokenizer(directory, normalization=None):
    """Loads OpenAI GPT-2's BPE from `vocab.json` (or `encoder.json`) and `merges.txt`.

    Args:
        directory: a folder holding the two files (e.g. a downloaded GPT-2 checkpoint).
        normalization: an optional `Normalization` the tokenizer applies (GPT-2's own: none).

    Returns:
        A `BytePairTokenizer` of kind `"gpt2"` (50,257 ids; padding = `<|endoftext|>`).

    Raises:
        FileNotFoundError: when either file is missing.
        ValueError: when `merges.txt` holds no merge rules.
    """
    names = [VOCABULARY_FILENAME, "encoder.json"]
    vocabulary_path = next(
        (os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))),
        None,
    )
    merges_path = os.path.join(directory, MERGES_FILENAME)
    if vocabulary_path is None or not os.path.isfile(merges_path):
        raise FileNotFoundError(
            f"GPT-2 tokenizer files not found in {directory!r}: expected vocab.json (or "
            "encoder.json) and merges.txt. Point data.tokenizer_path at the folder holding them."
        )
    with open(vocabulary_path, encoding="utf-8") as file:
        vocabulary = json.load(file)
    with open(merges_path, encoding="utf-8") as file:
        merges = [line.rstrip("\n") for line in file]
    if not any(m and not m.startswith("#version") for m in merges):
        raise ValueError(
            f"{merges_path} has no merge rules (GPT-2's has 50,000 lines such as 'Ġ t'); the "
            "file is empty or truncated. Download merges.txt again."
        )
    return BytePairTokenizer(vocabulary, merges, kind="gpt2", padding=None, normalization=normalization)


class CharacterTokenizer(Tokenizer):
    """One id per character seen in training, then `<|endoftext|>`, `<unk>`, `<|padding|>`.

    In the graph: `tf.strings.unicode_decode` + `tf.searchsorted` over the sorted code points
    (no lookup-table resources); detokenize is a `tf.gather` of strings and a `reduce_join`.
    Unknown characters (and invalid UTF-8 bytes, decoded as U+FFFD) map to `unknown_id`, which
    detokenizes to U+FFFD.

    Args:
        characters: the vocabulary, a string of distinct characters (sorted on construction).
        normalization: the `Normalization` applied before tokenizing; None: none.

    Example:
        tokenizer = train_characters(["hello"])  # ids: e=0, h=1, l=2, o=3
    """

    kind = "char"

    def __init__(self, characters, normalization=None, name=None):
        super().__init__(normalization=normalization, name=name)
        self.characters = "".join(sorted(set(characters)))
        if not self.characters:
            raise ValueError(
                "The character vocabulary is empty: the training text has no characters. "
                "Check data.files / data.corpus point at non-empty text."
            )
        count = len(self.characters)
        self.end_of_text_id = count
        self.unknown_id = count + 1
        self.padding_id = count + 2
        self.vocabulary_size = count + 3
        self._code_points_np = np.array([ord(c) for c in self.characters], dtype=np.int32)
        self._code_points = tf.constant(self._code_points_np)
        self._strings = tf.constant(list(self.characters) + [END_OF_TEXT, "\ufffd", ""])
        self._build_functions()

    def _tokenize(self, strings):
        code_points = tf.strings.unicode_decode(
            strings, "UTF-8", errors="replace", replacement_char=0xFFFD
        )
        flat = code_points.flat_values
        position = tf.searchsorted(self._code_points, flat, side="left", out_type=tf.int32)
        position = tf.minimum(position, len(self.characters) - 1)
        found = tf.equal(tf.gather(self._code_points, position), flat)
        ids = tf.where(found, position, self.unknown_id)
        return code_points.with_flat_values(ids)

    def _detokenize(self, ids):
        flat = ids.flat_values
        valid = (flat >= 0) & (flat < self.vocabulary_size)
        ids = ids.with_flat_values(tf.where(valid, flat, self.unknown_id))
        return tf.strings.reduce_join(tf.gather(self._strings, ids), axis=-1)

    def _encode(self, texts):
        result = []
        for text in texts:
            points = np.frombuffer(text.encode("utf-32-le", "replace"), dtype=np.uint32)
            points = points.astype(np.int32)
            position = np.minimum(np.searchsorted(self._code_points_np, points), len(self.characters) - 1)
            found = self._code_points_np[position] == points
            result.append(np.where(found, position, self.unknown_id).astype(np.int32))
        return result

    def _files(self):
        config = {
            "kind": "char",
            "format_version": FORMAT_VERSION,
            "characters": self.characters,
            "normalization": self.normalization.to_dict(),
        }
        return {CONFIG_FILENAME: json.dumps(config, indent=2, ensure_ascii=False)}


def train_characters(texts, normalization=None):
    """Builds a character tokenizer from the distinct characters of `texts`.

    Args:
        texts: an iterable of Python strings (the training split).
        normalization: a `Normalization` applied to `texts` first and kept by the tokenizer.

    Returns:
        A `CharacterTokenizer` (Tiny Shakespeare: 65 characters + 3 specials = 68 ids).
    """
    normalization = normalization or Normalization()
    characters = set()
    for text in texts:
        characters.update(normalization.normalize(text))
    return CharacterTokenizer("".join(characters), normalization=normalization)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding as an out-of-graph pre-tokenizer (`data.tokenizer = "tiktoken:NAME"`).

    `tokenize`/`detokenize` work eagerly only; inside a `tf.function` they raise, since tiktoken
    is not a TensorFlow op. Padding reuses `<|endoftext|>` (masked by position in the loss).

    Args:
        encoding: a tiktoken encoding name, e.g. `"gpt2"`, `"cl100k_base"`, `"o200k_base"`.
        normalization: the `Normalization` applied (in Python) before encoding; None: none.
    """

    def __init__(self, encoding, normalization=None, name=None):
        super().__init__(normalization=normalization, name=name)
        try:
            import tiktoken
        except ImportError as error:
            raise ValueError(
                f"tokenizer 'tiktoken:{encoding}' needs the optional tiktoken package, which is "
                "not installed; run `pip install tiktoken`, or use tokenizer 'gpt2' / 'bpe'."
            ) from error
        try:
            self._encoding = tiktoken.get_encoding(encoding)
        except ValueError as error:
            raise ValueError(
                f"Unknown tiktoken encoding {encoding!r}; choose one of "
                f"{tiktoken.list_encoding_names()}."
            ) from error
        except Exception as error:  # network failure while fetching the BPE file
            raise FileNotFoundError(
                f"tiktoken could not load the BPE file of {encoding!r} ({error}). It must be in "
                "tiktoken's local cache (TIKTOKEN_CACHE_DIR, default <tmp>/data-gym-cache); load it "
                "once with network access or copy the file there."
            ) from error
        self.kind = f"tiktoken:{encoding}"
        self.encoding = encoding
        self.vocabulary_size = self._encoding.n_vocab
        self.end_of_text_id = self._encoding.eot_token
        self.padding_id = self.end_of_text_id

    def _check_eager(self):
        if not tf.executing_eagerly():
            raise ValueError(
                f"tokenizer {self.kind!r} runs outside the TensorFlow graph only; it cannot be "
                "used in tf.function or a SavedModel. Use tokenizer 'gpt2' (same ids as "
                "tiktoken:gpt2) or 'bpe' for models you export."
            )

    def _tokenize(self, strings):
        self._check_eager()
        texts = [s.decode("utf-8", "replace") for s in strings.numpy()]
        return tf.ragged.constant(
            [list(r) for r in self.encode_documents(texts)], dtype=tf.int32, ragged_rank=1
        )

    def _detokenize(self, ids):
        self._check_eager()
        return tf.constant([self._encoding.decode(row, errors="replace") for row in ids.to_list()])

    def _encode(self, texts):
        rows = self._encoding.encode_ordinary_batch(list(texts))
        return [np.asarray(r, dtype=np.int32) for r in rows]

    def _files(self):
        config = {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "encoding": self.encoding,
            "normalization": self.normalization.to_dict(),
        }
        return {CONFIG_FILENAME: json.dumps(config, indent=2)}


def _make_bpe(name, documents, vocabulary_size, path, normalization):
    return train_bpe(documents, vocabulary_size, normalization=normalization)


def _make_gpt2(name, documents, vocabulary_size, path, normalization):
    if os.path.isfile(os.path.join(path, CONFIG_FILENAME)):
        return load_tokenizer(path)  # a tokenizer kgpt saved: its own normalisation
    return load_gpt2_tokenizer(path, normalization=normalization)


def _make_characters(name, documents, vocabulary_size, path, normalization):
    return train_characters(documents, normalization=normalization)


def _make_tiktoken(name, documents, vocabulary_size, path, normalization):
    return TiktokenTokenizer(name.split(":", 1)[1], normalization=normalization)


def _load_bpe(directory, saved, normalization):
    with open(os.path.join(directory, saved["vocabulary_file"]), encoding="utf-8") as file:
        vocabulary = json.load(file)
    with open(os.path.join(directory, saved["merges_file"]), encoding="utf-8") as file:
        merges = [line.rstrip("\n") for line in file]
    return BytePairTokenizer(
        vocabulary, merges, kind=saved["kind"], padding=saved.get("padding"), normalization=normalization
    )


def _load_characters(directory, saved, normalization):
    return CharacterTokenizer(saved["characters"], normalization=normalization)


def _load_tiktoken(directory, saved, normalization):
    return TiktokenTokenizer(saved["encoding"], normalization=normalization)


@dataclasses.dataclass(frozen=True)
class TokenizerKind:
    """One kind of tokenizer: what it can do, and how to make or load one.

    Args:
        name: the kind, as `tokenizer.kind` and `data.tokenizer` spell it (`tiktoken` stands for
            every `tiktoken:NAME`).
        spelling: how `data.tokenizer` names it (`"tiktoken:NAME"` for tiktoken).
        graph_compatible: runs inside a `tf.function` / SavedModel (can be exported).
        has_bpe_files: a byte-level BPE with `vocab.json` + `merges.txt` (`vocabulary`,
            `merges`), so it can be written as a Hugging Face GPT-2 tokenizer.
        trained_on_corpus: trained on the corpus' training split by `make`.
        needs_tokenizer_path: loaded from the folder `data.tokenizer_path` names.
        minimum_vocabulary_size: the smallest `data.vocabulary_size` it trains; None when the
            kind fixes its own vocabulary.
        make: `(name, documents, vocabulary_size, path, normalization) -> Tokenizer`.
        load: `(directory, tokenizer.json as a dict, normalization) -> Tokenizer`.
    """

    name: str
    spelling: str
    graph_compatible: bool
    has_bpe_files: bool
    trained_on_corpus: bool
    needs_tokenizer_path: bool
    minimum_vocabulary_size: typing.Optional[int]
    make: typing.Callable
    load: typing.Callable


TOKENIZER_KINDS = {
    kind.name: kind
    for kind in (
        TokenizerKind(
            "bpe", "bpe", graph_compatible=True, has_bpe_files=True, trained_on_corpus=True,
            needs_tokenizer_path=False, minimum_vocabulary_size=BYTE_ALPHABET_SIZE + 2,
            make=_make_bpe, load=_load_bpe,
        ),
        TokenizerKind(
            "gpt2", "gpt2", graph_compatible=True, has_bpe_files=True, trained_on_corpus=False,
            needs_tokenizer_path=True, minimum_vocabulary_size=None,
            make=_make_gpt2, load=_load_bpe,
        ),
        TokenizerKind(
            "char", "char", graph_compatible=True, has_bpe_files=False, trained_on_corpus=True,
            needs_tokenizer_path=False, minimum_vocabulary_size=None,
            make=_make_characters, load=_load_characters,
        ),
        TokenizerKind(
            "tiktoken", "tiktoken:NAME", graph_compatible=False, has_bpe_files=False,
            trained_on_corpus=False, needs_tokenizer_path=False, minimum_vocabulary_size=None,
            make=_make_tiktoken, load=_load_tiktoken,
        ),
    )
}
TOKENIZER_NAMES = tuple(kind.spelling for kind in TOKENIZER_KINDS.values())


def tokenizer_kind(name):
    """The `TokenizerKind` that `data.tokenizer = name` selects.

    Args:
        name: `"bpe"`, `"gpt2"`, `"char"` or `"tiktoken:NAME"` (e.g. `"tiktoken:o200k_base"`).

    Returns:
        A `TokenizerKind` from `TOKENIZER_KINDS`.

    Raises:
        ValueError: for an unknown name, with the closest known one and the list.
    """
    name = str(name)
    if name.startswith("tiktoken:") and name != "tiktoken:":
        return TOKENIZER_KINDS["tiktoken"]
    if name in TOKENIZER_KINDS and name != "tiktoken":
        return TOKENIZER_KINDS[name]
    if name in ("tiktoken", "tiktoken:"):
        raise ValueError(
            f"tokenizer={name!r} needs a tiktoken encoding name; set data.tokenizer to "
            "'tiktoken:NAME', e.g. 'tiktoken:o200k_base' or 'tiktoken:gpt2'."
        )
    close = difflib.get_close_matches(name, TOKENIZER_NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown tokenizer={name!r}.{hint} Set data.tokenizer to one of: "
        f"{', '.join(TOKENIZER_NAMES)}."
    )


def make_tokenizer(name, documents=None, vocabulary_size=None, path=None, normalization=None):
    """Makes a tokenizer of the kind `name`: trains it on `documents` or loads it.

    Args:
        name: a `data.tokenizer` value (`"bpe"`, `"gpt2"`, `"char"`, `"tiktoken:NAME"`).
        documents: iterable of training strings, for kinds `trained_on_corpus`.
        vocabulary_size: ids to train, for kinds with a `minimum_vocabulary_size` (`bpe`).
        path: the folder of the files, for kinds that `needs_tokenizer_path` (`gpt2`).
        normalization: the `Normalization` the tokenizer applies; None: none. (A `gpt2` path that
            holds a tokenizer kgpt saved keeps that tokenizer's own.)

    Returns:
        A `Tokenizer`.

    Raises:
        ValueError: for an unknown name, or a missing `documents` / `vocabulary_size` / `path`.

    Example:
        tokenizer = make_tokenizer("char", documents=["hello"], normalization=Normalization(lowercase=True))
    """
    kind = tokenizer_kind(name)
    if kind.trained_on_corpus and documents is None:
        raise ValueError(f"tokenizer {name!r} is trained on text; pass documents=[...].")
    if kind.minimum_vocabulary_size is not None and vocabulary_size is None:
        raise ValueError(f"tokenizer {name!r} needs a vocabulary_size (e.g. 8192).")
    if kind.needs_tokenizer_path and not path:
        raise ValueError(
            f"tokenizer {name!r} is loaded from files; set data.tokenizer_path to the folder "
            "holding vocab.json (or encoder.json) and merges.txt."
        )
    return kind.make(name, documents, vocabulary_size, path, normalization)


def load_tokenizer(directory):
    """Loads a tokenizer written by `Tokenizer.save`, dispatching on its `tokenizer.json`.

    Files written before kgpt saved the normalisation load with none.

    Args:
        directory: the folder passed to `save` (e.g. `checkpoints/<run>/tokenizer`).

    Returns:
        A `BytePairTokenizer`, `CharacterTokenizer` or `TiktokenTokenizer`.

    Example:
        tokenizer = load_tokenizer("checkpoints/shakespeare_char/tokenizer")
    """
    path = os.path.join(directory, CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No tokenizer in {directory!r}: {CONFIG_FILENAME} is missing. Pass the folder that "
            "Tokenizer.save wrote (a run directory's tokenizer/)."
        )
    with open(path, encoding="utf-8") as file:
        saved = json.load(file)
    version = saved.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={version!r}; this kgpt reads up to {FORMAT_VERSION}. "
            "It was written by a newer kgpt; upgrade kgpt or save the tokenizer again."
        )
    kind = saved.get("kind", "")
    try:
        spec = tokenizer_kind(kind)
    except ValueError:
        raise ValueError(
            f"{path} has kind={kind!r}; expected one of {', '.join(TOKENIZER_NAMES)}. "
            "The file is damaged or from a newer kgpt; save the tokenizer again."
        ) from None
    normalization = Normalization.from_dict(saved.get("normalization"), path)
    return spec.load(directory, saved, normalization)
