"""`DataConfig`, the `[data]` section: what to read, how to tokenize it and how to cut it into
windows; corpus and tokenizer names are checked against their registries."""

import dataclasses

from kgpt.config import Config
from kgpt.data import corpora
from kgpt.tokenizers.registry import tokenizer_kind

MODES = ("packed", "document")
WINDOW_OFFSETS = ("aligned", "random")
DOCUMENT_SEPARATORS = ("file", "blank_line", "line")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """What to read, how to tokenize it and how to cut it into windows (the `[data]` section).

    Example:
        config = DataConfig(corpus="tinyshakespeare", tokenizer="char", sequence_length=64)
    """

    corpus: str = "text"  # a name in kgpt.data.corpora.CORPORA
    dir: str | None = None  # else $KGPT_DATA_DIR, else the Keras cache (downloads)
    files: tuple[str, ...] = ()  # `text`: paths or globs, relative ones under `dir`
    validation_files: tuple[str, ...] = ()  # `text`: else validation_fraction of the documents
    tokenizer: str = "bpe"  # bpe (trained byte-level BPE), gpt2, char or tiktoken:NAME
    tokenizer_path: str | None = None  # gpt2: folder of vocab.json + merges.txt
    vocabulary_size: int = 8192  # bpe: ids to train, at least 258 (256 bytes + 2 specials)
    sequence_length: int = 256  # tokens per example; at most the model's
    mode: str = "packed"  # documents joined and cut into windows, or `document`: one per example
    lowercase: bool = False  # the tokenizer's normalisation, applied wherever it runs
    strip_punctuation: bool = False  # likewise: punctuation and symbols become spaces
    strip_html: bool = False  # `<br />` -> space when reading (IMDB always does)
    document_separator: str = "blank_line"  # `text`: file, blank_line or line
    validation_fraction: float = 0.1  # `text`: documents held out; tinyshakespeare: last characters
    validation_count: int = 2500  # imdb: reviews per polarity carved from test for validation
    imdb_unsupervised: bool = False  # imdb: add train/unsup to the training split
    errors: str = "strict"  # invalid UTF-8: an error naming file and byte, or `replace`
    window_offsets: str = "aligned"  # packed training windows: aligned, or `random` (nanoGPT's)
    cache_dir: str | None = None  # token stores, any tf.io.gfile path; default $KGPT_CACHE_DIR
    shard_bytes: int = 32 * 2**20  # text per token-store shard (UTF-8 bytes; whole documents)
    shuffle_buffer_size: int | None = None  # None shuffles all windows
    seed: int = 1337  # seeds the splits and the shuffle

    section = "data"

    def validate(self):
        corpus = corpora.get_corpus(self.corpus)
        kind = tokenizer_kind(self.tokenizer)
        self.check_choice("mode", MODES)
        self.check_choice("document_separator", DOCUMENT_SEPARATORS)
        self.check_choice("errors", ("strict", "replace"))
        self.check_choice("window_offsets", WINDOW_OFFSETS)
        minimum = kind.minimum_vocabulary_size
        if minimum is not None and self.vocabulary_size < minimum:
            raise ValueError(
                f"data.vocabulary_size={self.vocabulary_size} is too small for tokenizer "
                f"{self.tokenizer!r} (for bpe: the byte alphabet (256) plus 2 special tokens); "
                f"set it to at least {minimum} (e.g. 8192)."
            )
        self.check_positive("sequence_length", "validation_count", "shard_bytes")
        self.check_range("validation_fraction", 0.0, 1.0, "; 0.1 holds out a tenth")
        self.check_range("shuffle_buffer_size", 1, float("inf"), ", or unset to shuffle all windows")
        if corpus.needs_files and not self.files:
            raise ValueError(
                f"data.corpus = \"{self.corpus}\" needs data.files: a list of paths or globs, e.g. "
                "[\"shards/wiki_books_*.txt\"]."
            )
        if kind.needs_tokenizer_path and not self.tokenizer_path:
            raise ValueError(
                f"data.tokenizer = \"{self.tokenizer}\" needs data.tokenizer_path: the folder "
                "holding GPT-2's vocab.json (or encoder.json) and merges.txt."
            )


