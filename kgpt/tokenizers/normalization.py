"""Text normalisation applied before tokenizing, the same in Python and in the graph (`Normalization`)."""

import dataclasses
import functools
import sys
import unicodedata

import tensorflow as tf

END_OF_TEXT = "<|endoftext|>"

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

