"""Byte-level BPE (`bpe`, trained on the corpus, and `gpt2`, OpenAI's files) in the graph through
keras-hub's tables, with GPT-2's pre-tokenizer in RE2 and a fast out-of-graph encoder."""

import json
import os

import tensorflow as tf

from kgpt import keras_compat
from kgpt.tokenizers.base import (
    BYTE_ALPHABET_SIZE,
    END_OF_TEXT,
    MERGES_FILENAME,
    PADDING,
    VOCABULARY_FILENAME,
    Normalization,
    Tokenizer,
)
from kgpt.tokenizers.encoders import ByteLevelEncoder

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

