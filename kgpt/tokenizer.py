"""Tokenizers: kinds in a registry with capability flags (`TOKENIZER_KINDS`, `make_tokenizer`,
`load_tokenizer`), one `tf.Module` interface that runs eagerly, in `tf.data` and in a SavedModel,
and the text normalisation they apply, the same in the graph and in Python (`Normalization`)."""

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

from kgpt import keras_compat, tiktokens
from kgpt.encoders import ByteLevelEncoder
from kgpt.files import atomic_file

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|padding|>"
CONFIG_FILENAME = "tokenizer.json"
VOCABULARY_FILENAME = "vocab.json"
MERGES_FILENAME = "merges.txt"
BYTE_ALPHABET_SIZE = 256
FORMAT_VERSION = 2  # 2: tokenizer.json records the normalization


@functools.lru_cache(maxsize=1)
def _punctuation():
    """Unicode punctuation (P*) and symbols (S*) as a `str.translate` table to spaces and an RE2 class."""
    ranges = []
    for point in range(sys.maxunicode + 1):
        if unicodedata.category(chr(point))[0] in "PS":
            if ranges and ranges[-1][1] == point - 1:
                ranges[-1][1] = point
            else:
                ranges.append([point, point])
    table = {p: " " for first, last in ranges for p in range(first, last + 1)}
    pattern = "".join(rf"\x{{{a:x}}}" if a == b else rf"\x{{{a:x}}}-\x{{{b:x}}}" for a, b in ranges)
    return table, f"[{pattern}]"


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Text normalisation applied before splitting, in Python (`normalize`) and in the graph
    (`normalize_tensor`, so SavedModels and servers apply it too); `<|endoftext|>` is kept as it is.
    `strip_punctuation` turns every punctuation (P*) and symbol (S*) character into a space."""

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
        """Reads `to_dict`'s form; None (a file written before normalisation) is no normalisation."""
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"{source}: unknown normalization keys {unknown}; expected lowercase and "
                "strip_punctuation. The file is damaged or from a newer kgpt; save it again."
            )
        return cls(**values)

    def normalize(self, text):
        """Normalises a Python `str` (equal to `normalize_tensor` of its UTF-8 encoding)."""
        if self.identity:
            return text
        pieces = text.split(END_OF_TEXT)
        if self.lowercase:
            pieces = [p.lower() for p in pieces]
        if self.strip_punctuation:
            pieces = [p.translate(_punctuation()[0]) for p in pieces]
        return END_OF_TEXT.join(pieces)

    @tf.autograph.experimental.do_not_convert  # plain TensorFlow ops: tracing stays fast
    def normalize_tensor(self, strings):
        """Normalises `tf.string` `[batch]` (invalid UTF-8 becomes U+FFFD when lowercasing)."""
        if self.identity:
            return strings
        # `<|endoftext|>` is cut out and kept; so is NUL, at which ICU's lowercasing would stop.
        return _map_between(strings, END_OF_TEXT, lambda p: _map_between(p, "\x00", self._normalize_flat))

    def _normalize_flat(self, strings):
        if self.lowercase:
            strings = tf.strings.lower(strings, encoding="utf-8")
        if self.strip_punctuation:
            strings = tf.strings.regex_replace(strings, _punctuation()[1], " ")
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


# GPT-2's pre-tokenizer, `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
# in RE2, so in-graph ids equal HF `tokenizers`' and OpenAI's (keras-hub's splitter differs on
# trailing whitespace runs and rare Unicode spaces); `\s` is Unicode White_Space, as theirs. RE2 has
# no look-ahead, which leaves a run's last whitespace before a non-space to the next word: we insert
# a marker (the noncharacter U+FDD0) before that character, split it off as a word, and drop it.
_SPACE = r"\t\n\x{0b}\f\r \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_MARK = "\ufdd0"
_MARK_BEFORE_LAST_SPACE = (rf"([{_SPACE}])([{_SPACE}])([^{_SPACE}])", r"\1" + _MARK + r"\2\3")
_WORD = (
    rf"<\|endoftext\|>|\x{{fdd0}}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}+| ?\p{{N}}+"
    rf"| ?[^{_SPACE}\p{{L}}\p{{N}}\x{{fdd0}}]+|[{_SPACE}]+"
)


def split_words(strings):
    """GPT-2 pre-tokenizer words of `tf.string` [batch] as RaggedTensor [batch, words]; `<|endoftext|>`
    is cut out first and kept whole, as HF `tokenizers` does for special tokens."""
    import tensorflow_text as tf_text

    special = r"<\|endoftext\|>"
    pieces = tf_text.regex_split(strings, special, special)  # (batch, pieces)
    marked = tf.strings.regex_replace(pieces.flat_values, *_MARK_BEFORE_LAST_SPACE)
    words = tf_text.regex_split(marked, _WORD, _WORD)  # (pieces, words)
    words = tf.RaggedTensor.from_row_splits(words, pieces.row_splits).merge_dims(1, 2)
    return tf.ragged.boolean_mask(words, tf.not_equal(words, _MARK))


class BytePairTokenizer(Tokenizer):
    """Byte-level BPE (`bpe` or `gpt2`) in the graph via keras-hub's tables: `vocabulary` maps
    byte-level symbols to ids (GPT-2's `encoder.json`), `merges` are `"a b"` rules, highest priority
    first, and `padding` is the padding token, or None to pad with end-of-text."""

    def __init__(self, vocabulary, merges, kind="bpe", padding=PADDING, normalization=None):
        super().__init__(normalization=normalization)
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
        self._encoder = None  # the out-of-graph encoder, made when first used
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
        pieces = tf.strings.split(merged, sep=" ")  # (words, pieces)
        ids = keras_compat.byte_pair_token_to_id(layer).lookup(pieces)
        return tf.RaggedTensor.from_row_splits(
            tf.cast(ids.flat_values, tf.int32), tf.gather(ids.row_splits, words.row_splits)
        )

    def _detokenize(self, ids):
        return self._layer.detokenize(ids)

    def _encode(self, texts):
        if self._encoder is None:
            specials = (END_OF_TEXT, PADDING)
            self._encoder = ByteLevelEncoder(self.vocabulary, self.merges, END_OF_TEXT, specials)
        return self._encoder.encode(texts)

    def _files(self):
        return {
            VOCABULARY_FILENAME: self._vocabulary_json,
            MERGES_FILENAME: "#version: 0.2\n" + self._merges_text,
            **self._config_file(
                vocabulary_file=VOCABULARY_FILENAME, merges_file=MERGES_FILENAME, padding=self.padding
            ),
        }


def _read_bpe_files(vocabulary_path, merges_path):
    """`(vocabulary dict, merge lines)` from a `vocab.json` and a `merges.txt`."""
    with open(vocabulary_path, encoding="utf-8") as vocabulary, open(merges_path, encoding="utf-8") as merges:
        return json.load(vocabulary), [line.rstrip("\n") for line in merges]


def train_bpe(texts, vocabulary_size, normalization=None):
    """Trains a byte-level BPE (GPT-2's pre-tokenizer) on normalised `texts` with HF `tokenizers`;
    `vocabulary_size` counts the 2 special tokens and 256 bytes (fewer ids if there are fewer merges)."""
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
        special_tokens=[END_OF_TEXT, PADDING],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    normalization = normalization or Normalization()
    trainee.train_from_iterator((normalization.normalize(t) for t in texts), trainer)
    model = json.loads(trainee.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return BytePairTokenizer(model["vocab"], merges, normalization=normalization)


def load_gpt2_tokenizer(directory, normalization=None):
    """Loads OpenAI GPT-2's BPE (kind `"gpt2"`, padding = end-of-text) from `vocab.json` (or
    `encoder.json`) and `merges.txt` in `directory`."""
    vocabulary_path = os.path.join(directory, VOCABULARY_FILENAME)
    if not os.path.isfile(vocabulary_path):
        vocabulary_path = os.path.join(directory, "encoder.json")
    merges_path = os.path.join(directory, MERGES_FILENAME)
    if not (os.path.isfile(vocabulary_path) and os.path.isfile(merges_path)):
        raise FileNotFoundError(
            f"GPT-2 tokenizer files not found in {directory!r}: expected vocab.json (or "
            "encoder.json) and merges.txt. Point data.tokenizer_path at the folder holding them."
        )
    vocabulary, merges = _read_bpe_files(vocabulary_path, merges_path)
    if not any(m and not m.startswith("#version") for m in merges):
        raise ValueError(
            f"{merges_path} has no merge rules (GPT-2's has 50,000 lines such as 'Ġ t'); the "
            "file is empty or truncated. Download merges.txt again."
        )
    return BytePairTokenizer(vocabulary, merges, kind="gpt2", padding=None, normalization=normalization)


class CharacterTokenizer(Tokenizer):
    """One id per character seen in training (sorted), then `<|endoftext|>`, `<unk>`, `<|padding|>`;
    unknown characters and invalid UTF-8 map to `unknown_id`, which detokenizes to U+FFFD."""

    kind = "char"

    def __init__(self, characters, normalization=None):
        super().__init__(normalization=normalization)
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
            points = np.frombuffer(text.encode("utf-32-le", "replace"), dtype=np.uint32).astype(np.int32)
            position = np.minimum(np.searchsorted(self._code_points_np, points), len(self.characters) - 1)
            found = self._code_points_np[position] == points
            result.append(np.where(found, position, self.unknown_id).astype(np.int32))
        return result

    def _files(self):
        return self._config_file(characters=self.characters)


def train_characters(texts, normalization=None):
    """A `CharacterTokenizer` of the distinct characters of normalised `texts`."""
    normalization = normalization or Normalization()
    characters = set()
    for text in texts:
        characters.update(normalization.normalize(text))
    return CharacterTokenizer("".join(characters), normalization=normalization)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding (`"gpt2"`, `"o200k_base"`, ...) read from tiktoken's cache (`kgpt.tiktokens`).
    Encodings with GPT-2's pre-tokenizer also run in the graph, as the byte-level BPE of their ranks
    (so they export); the others run eagerly only. Padding is `<|endoftext|>`."""

    def __init__(self, encoding, normalization=None):
        super().__init__(normalization=normalization)
        self._encoding = tiktokens.load_encoding(encoding)
        self.kind = f"tiktoken:{encoding}"
        self.encoding = encoding
        self.vocabulary_size = self._encoding.n_vocab
        self.end_of_text_id = self._encoding.eot_token
        self.padding_id = self.end_of_text_id
        self._graph_problem = tiktokens.graph_problem(self._encoding)
        if self._graph_problem is None:
            vocabulary, merges = tiktokens.byte_level_bpe(self._encoding)
            self._graph = BytePairTokenizer(vocabulary, merges, kind="gpt2", padding=None)
            self._build_functions()

    @property
    def graph_compatible(self):
        """True for encodings with GPT-2's pre-tokenizer (the kind's flag is False: not all are)."""
        return self._graph_problem is None

    def graph_problem(self):
        return self._graph_problem and f"{self._graph_problem}; {tiktokens.ALTERNATIVES}"

    def _eager_only(self):
        if not tf.executing_eagerly():
            raise ValueError(f"{self.graph_problem()}.")

    def _tokenize(self, strings):
        if self.graph_compatible:
            return self._graph._tokenize(strings)
        self._eager_only()
        rows = self.encode_documents([s.decode("utf-8", "replace") for s in strings.numpy()])
        return tf.ragged.constant([list(r) for r in rows], dtype=tf.int32, ragged_rank=1)

    def _detokenize(self, ids):
        if self.graph_compatible:
            return self._graph._detokenize(ids)
        self._eager_only()
        # dtype: a batch of no rows is a string tensor too (TensorFlow's default for [] is float32).
        return tf.constant([self._encoding.decode(row, errors="replace") for row in ids.to_list()], tf.string)

    def _encode(self, texts):
        return tiktokens.encode(self._encoding, texts)

    def _files(self):  # special_tokens: a literal <|endoftext|> is one token (since this was saved)
        return self._config_file(encoding=self.encoding, special_tokens=[END_OF_TEXT])


def _make_gpt2(name, documents, vocabulary_size, path, normalization):
    if os.path.isfile(os.path.join(path, CONFIG_FILENAME)):
        return load_tokenizer(path)  # a tokenizer kgpt saved: its own normalisation
    return load_gpt2_tokenizer(path, normalization=normalization)


def _load_bpe(directory, saved, normalization):
    vocabulary, merges = _read_bpe_files(
        os.path.join(directory, saved["vocabulary_file"]), os.path.join(directory, saved["merges_file"])
    )
    return BytePairTokenizer(
        vocabulary, merges, kind=saved["kind"], padding=saved.get("padding"), normalization=normalization
    )


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


TOKENIZER_KINDS = {
    kind.name: kind
    for kind in (
        TokenizerKind(
            "bpe", "bpe", has_bpe_files=True, trained_on_corpus=True,
            minimum_vocabulary_size=BYTE_ALPHABET_SIZE + 2, load=_load_bpe,
            make=lambda name, texts, size, path, normalization: train_bpe(texts, size, normalization),
        ),
        TokenizerKind(
            "gpt2", "gpt2", has_bpe_files=True, needs_tokenizer_path=True, make=_make_gpt2, load=_load_bpe
        ),
        TokenizerKind(
            "char", "char", trained_on_corpus=True,
            make=lambda name, texts, size, path, normalization: train_characters(texts, normalization),
            load=lambda folder, saved, normalization: CharacterTokenizer(saved["characters"], normalization),
        ),
        TokenizerKind(
            "tiktoken", "tiktoken:NAME", graph_compatible=False,
            make=lambda name, texts, size, path, normalization: TiktokenTokenizer(
                name.partition(":")[2], normalization
            ),
            load=lambda folder, saved, normalization: TiktokenTokenizer(saved["encoding"], normalization),
        ),
    )
}
TOKENIZER_NAMES = tuple(kind.spelling for kind in TOKENIZER_KINDS.values())


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
    close = difflib.get_close_matches(name, TOKENIZER_NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown tokenizer={name!r}.{hint} Set data.tokenizer to one of: "
        f"{', '.join(TOKENIZER_NAMES)}."
    )


def make_tokenizer(name, documents=None, vocabulary_size=None, path=None, normalization=None):
    """Makes a tokenizer of the kind `name` (a `data.tokenizer` value) applying `normalization`: trains
    it on `documents` with at most `vocabulary_size` ids, or loads it from `path` (`gpt2`; a tokenizer
    kgpt saved there keeps its own normalisation).

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
    """Loads a tokenizer written by `Tokenizer.save` (without a saved normalisation: none).

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
