"""Tokenizers usable eagerly, in `tf.data` and inside a SavedModel: the kinds (`char`, `bpe`, `gpt2`,
`tiktoken:NAME`) and their registry. The public names are re-exported here."""

from kgpt.tokenizers.base import (
    CONFIG_FILENAME,
    END_OF_TEXT,
    FORMAT_VERSION,
    PADDING,
    TOKENIZER_KINDS,
    Tokenizer,
    TokenizerKind,
    tokenizer_kind,
)
from kgpt.tokenizers.bpe import BytePairTokenizer, load_gpt2_tokenizer, split_words, train_bpe
from kgpt.tokenizers.char import CharacterTokenizer, train_characters
from kgpt.tokenizers.normalization import Normalization
from kgpt.tokenizers.registry import TOKENIZER_NAMES, load_tokenizer, make_tokenizer
from kgpt.tokenizers.tiktokens import TiktokenTokenizer

__all__ = [
    "CONFIG_FILENAME", "END_OF_TEXT", "FORMAT_VERSION", "PADDING", "TOKENIZER_KINDS", "TOKENIZER_NAMES",
    "BytePairTokenizer", "CharacterTokenizer", "Normalization", "TiktokenTokenizer", "Tokenizer",
    "TokenizerKind", "load_gpt2_tokenizer", "load_tokenizer", "make_tokenizer", "split_words",
    "tokenizer_kind", "train_bpe", "train_characters",
]
