"""Fast out-of-graph encoders for byte-level BPE: the ids `kgpt.tokenizers.BytePairTokenizer` gives,
for tokenizing corpora (its `encode_documents`). tiktoken runs the vocabulary's own ranks when they
are in merge order (GPT-2's and `train_bpe`'s are), 4-5x faster than HF `tokenizers`, which is
the fallback; both use every core.
"""

import os

import numpy as np

# GPT-2's pre-tokenizer, the one `train_bpe` trains with and the graph tokenizer splits by.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_characters():
    """GPT-2's byte -> character map (its `encoder.json` is written in these characters): printable
    bytes stand for themselves, the other 68 for U+0100 onwards."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + list(range(256, 256 + len(others))))))


def tiktoken_encoding(vocabulary, merges, special_tokens):
    """A tiktoken `Encoding` with the ids of the byte-level BPE `(vocabulary, merges)`, or None:
    tiktoken not installed, or ids not ranked as tiktoken merges (every byte below every merge,
    and each merge's result above the one before). `special_tokens` are left out of the ranks."""
    try:
        import tiktoken
    except ImportError:
        return None
    byte_of = {character: byte for byte, character in byte_characters().items()}
    try:
        ranks = {bytes(byte_of[c] for c in token): index for token, index in vocabulary.items()
                 if token not in special_tokens}
        merged = [ranks[bytes(byte_of[c] for c in rule.replace(" ", ""))] for rule in merges]
    except KeyError:  # a symbol outside the byte alphabet, or a merge without its token
        return None
    single = [ranks.get(bytes([b]), -1) for b in range(256)]
    if min(single) < 0 or max(single) >= min(merged, default=256) or merged != sorted(set(merged)):
        return None
    return tiktoken.Encoding("kgpt-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


def hf_tokenizer(vocabulary, merges, end_of_text):
    """HF `tokenizers` with the same vocabulary, merges and pre-tokenizer; `end_of_text` special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[tuple(m.split(" ")) for m in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([end_of_text])
    return tokenizer


class ByteLevelEncoder:
    """`encode(texts)` -> int32 id arrays: tiktoken where it applies, else HF `tokenizers`, which
    also takes any batch holding a literal `end_of_text` (one special token, not its characters)."""

    def __init__(self, vocabulary, merges, end_of_text, special_tokens):
        self.vocabulary, self.merges, self.end_of_text = vocabulary, merges, end_of_text
        self.tiktoken = tiktoken_encoding(vocabulary, merges, special_tokens)
        self._hf = None

    def encode(self, texts):
        texts = list(texts)
        if self.tiktoken is not None and not any(self.end_of_text in t for t in texts):
            rows = self.tiktoken.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
            return [np.asarray(row, dtype=np.int32) for row in rows]
        if self._hf is None:
            self._hf = hf_tokenizer(self.vocabulary, self.merges, self.end_of_text)
        # encode_batch_fast: no offsets (tokenizers >= 0.21); the ids are encode_batch's.
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [np.asarray(e.ids, dtype=np.int32) for e in encode(texts)]
