"""tiktoken encodings and the `tiktoken:NAME` tokenizer (`TiktokenTokenizer`): loading an encoding
from tiktoken's cache (offline: `TIKTOKEN_CACHE_DIR`) or from the copy a run keeps in its
`tokenizer/` folder, its ids for Python strings, and, for the encodings that split text with GPT-2's
pattern, the byte-level BPE (vocabulary and merges) that gives those ids in the graph.
"""

import base64
import functools
import json
import os

import numpy as np
import tensorflow as tf

from kgpt.files import atomic_file
from kgpt.tokenizers.base import END_OF_TEXT, Tokenizer
from kgpt.tokenizers.bpe import BytePairTokenizer
from kgpt.tokenizers.encoders import GPT2_PATTERN, byte_characters

CACHE_VARIABLE = "TIKTOKEN_CACHE_DIR"
# The encoding as a saved tokenizer keeps it: its ranks in tiktoken's own format (a base64 token
# and its rank per line), and its pre-tokenizer pattern and special tokens.
RANKS_FILENAME = "encoding.tiktoken"
ENCODING_FILENAME = "encoding.json"
# GPT-2's pre-tokenizer as tiktoken >= 0.8 spells it (possessive quantifiers: the same splits,
# faster) and as GPT-2 and older tiktoken releases do.
GPT2_PATTERNS = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    GPT2_PATTERN,
)
ALTERNATIVES = (
    "train with tokenizer 'tiktoken:gpt2', 'gpt2' or 'bpe' to export, or run the Keras model in-process "
    "(kgpt generate RUN_DIR, kgpt.generation.generator.Generator)"
)


def _tiktoken(name):
    try:
        import tiktoken
    except ImportError as error:
        raise ValueError(
            f"tokenizer 'tiktoken:{name}' needs the optional tiktoken package, which is not "
            "installed; run `pip install tiktoken`, or use tokenizer 'gpt2' / 'bpe'."
        ) from error
    return tiktoken


def load_encoding(name):
    """tiktoken's `Encoding` `name` (`"gpt2"`, `"o200k_base"`, ...), read from its cache folder:
    `$TIKTOKEN_CACHE_DIR`, else `<tmp>/data-gym-cache`, else downloaded.

    Raises ValueError for an unknown name or tiktoken not installed, FileNotFoundError when the
    BPE file is neither cached nor downloadable (offline).
    """
    tiktoken = _tiktoken(name)
    names = tiktoken.list_encoding_names()
    if name not in names:
        raise ValueError(
            f"Unknown tiktoken encoding {name!r}; set data.tokenizer to 'tiktoken:NAME' with NAME one "
            f"of {', '.join(sorted(names))}."
        )
    try:
        return tiktoken.get_encoding(name)
    except Exception as error:  # no network (requests' errors), a damaged download, ...
        where = os.environ.get(CACHE_VARIABLE)
        cache = f"{CACHE_VARIABLE}={where}" if where is not None else f"{CACHE_VARIABLE} is not set"
        raise FileNotFoundError(
            f"tiktoken could not load the BPE file of encoding {name!r} ({type(error).__name__}: "
            f"{error}); {cache}. Offline, set {CACHE_VARIABLE} to a folder holding tiktoken's cached "
            "files (named by the sha1 of their URL), or load the encoding once with network; a run "
            "trained with it keeps its own copy in tokenizer/."
        ) from error


def save_encoding(encoding, directory):
    """Writes `encoding` into `directory` (`RANKS_FILENAME`, `ENCODING_FILENAME`), each atomically,
    so that `read_encoding` needs neither tiktoken's cache nor a network."""
    ranks = sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1])
    description = {"name": encoding.name, "pattern": encoding._pat_str,
                   "special_tokens": encoding._special_tokens}
    texts = {
        RANKS_FILENAME: b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks),
        ENCODING_FILENAME: json.dumps(description, indent=2, ensure_ascii=False).encode("utf-8"),
    }
    for name, data in texts.items():
        with atomic_file(os.path.join(directory, name)) as temporary:
            with open(temporary, "wb") as file:
                file.write(data)


def read_encoding(name, directory):
    """The `Encoding` that `save_encoding` wrote into `directory`, or None when it holds none
    (a run saved before kgpt kept its encoding: tiktoken's cache then)."""
    ranks_path, path = os.path.join(directory, RANKS_FILENAME), os.path.join(directory, ENCODING_FILENAME)
    if not (os.path.isfile(ranks_path) and os.path.isfile(path)):
        return None
    tiktoken = _tiktoken(name)
    try:
        with open(path, encoding="utf-8") as file:
            description = json.load(file)
        ranks = {}
        with open(ranks_path, "rb") as file:
            for line in file.read().splitlines():
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        return tiktoken.Encoding(description["name"], pat_str=description["pattern"], mergeable_ranks=ranks,
                                 special_tokens=description["special_tokens"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{directory} holds a damaged copy of tiktoken encoding {name!r} ({type(error).__name__}: "
            f"{error}); delete {RANKS_FILENAME} and {ENCODING_FILENAME} there to use tiktoken's cache."
        ) from None


def encode(encoding, texts):
    """tiktoken's ids of `texts` as int32 arrays; a literal `<|endoftext|>` is the end-of-text id, as
    in kgpt's other tokenizers, and any other special token's text is plain text."""
    rows = encoding.encode_batch(
        list(texts), num_threads=os.cpu_count() or 1, allowed_special={END_OF_TEXT}, disallowed_special=()
    )
    return [np.asarray(row, dtype=np.int32) for row in rows]


def graph_problem(encoding):
    """Why `encoding` cannot run in a TensorFlow graph, or None when kgpt runs it there (GPT-2's
    pattern: `gpt2`, `r50k_base`, `p50k_base`, `p50k_edit`)."""
    if encoding._pat_str in GPT2_PATTERNS:  # tiktoken keeps its constructor's arguments
        return None
    return (
        f"tiktoken encoding {encoding.name!r} splits text with a regular expression that needs a "
        r"look-ahead (\s+(?!\S)), which RE2, TensorFlow's regex engine, does not have; kgpt rewrites "
        "that look-ahead for GPT-2's pattern only (tiktoken:gpt2, r50k_base, p50k_base)"
    )


def _split(ranks, token, rank):
    """The two parts that BPE with the merges ranked below `rank` leaves of `token` (bytes)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.lru_cache(maxsize=4)
def byte_level_bpe(encoding):
    """`(vocabulary, merges)` of `encoding` as GPT-2's files hold them (`encoder.json`, `vocab.bpe`):
    tokens in GPT-2's byte characters -> ids, with `<|endoftext|>`, and `"a b"` merge rules, highest
    priority first. tiktoken's rank `r` is made by the merge of rank `r`: its two parts under the
    merges ranked below it (for `gpt2`, exactly the lines of `vocab.bpe`)."""
    ranks = encoding._mergeable_ranks
    characters = byte_characters()

    def spell(token):
        return "".join(characters[byte] for byte in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(
                f"tiktoken encoding {encoding.name!r}: token {token!r} (rank {rank}) is not one merge of "
                f"lower-ranked tokens, so it has no byte-level BPE merges; {ALTERNATIVES}."
            )
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    vocabulary = {spell(token): rank for token, rank in ranks.items()}
    vocabulary[END_OF_TEXT] = encoding.eot_token
    return vocabulary, merges


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding (`"gpt2"`, `"o200k_base"`, ...) read from `directory`'s copy of it
    (`save` writes one), else from tiktoken's cache (`load_encoding`).
    Encodings with GPT-2's pre-tokenizer also run in the graph, as the byte-level BPE of their ranks
    (so they export); the others run eagerly only. Padding is `<|endoftext|>`."""

    def __init__(self, encoding, normalization=None, directory=None):
        super().__init__(normalization=normalization)
        self._encoding = (directory and read_encoding(encoding, directory)) or load_encoding(encoding)
        self.kind = f"tiktoken:{encoding}"
        self.encoding = encoding
        self.vocabulary_size = self._encoding.n_vocab
        self.end_of_text_id = self._encoding.eot_token
        self.padding_id = self.end_of_text_id
        self._graph_problem = graph_problem(self._encoding)
        if self._graph_problem is None:
            vocabulary, merges = byte_level_bpe(self._encoding)
            self._graph = BytePairTokenizer(vocabulary, merges, kind="gpt2", padding=None)
            self._build_functions()

    @property
    def graph_compatible(self):
        """True for encodings with GPT-2's pre-tokenizer (the kind's flag is False: not all are)."""
        return self._graph_problem is None

    def graph_problem(self):
        return self._graph_problem and f"{self._graph_problem}; {ALTERNATIVES}"

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
        return encode(self._encoding, texts)

    def _files(self):  # special_tokens: a literal <|endoftext|> is one token (since this was saved)
        return self._config_file(encoding=self.encoding, special_tokens=[END_OF_TEXT])

    def save(self, directory):
        """Writes `tokenizer.json` and a copy of the encoding, so that the folder loads offline."""
        super().save(directory)
        save_encoding(self._encoding, directory)
