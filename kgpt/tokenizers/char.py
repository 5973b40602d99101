"""Character tokenizer: one id per character seen in training."""

import numpy as np
import tensorflow as tf

from kgpt.tokenizers.base import END_OF_TEXT, Normalization, Tokenizer


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

