"""Tests for kgpt.tokenizers: in-graph ids equal the trainer's, round trips, save/load, errors."""

import json
import sys

import numpy as np
import pytest
import tensorflow as tf

from kgpt import tokenizers as tk
from kgpt.tokenizers.encoders import tiktoken_encoding

SPECIALS = (tk.END_OF_TEXT, tk.PADDING)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's 2024; don't panic!",
    "Numbers 1234567 and 3.14159, dates 2024-01-01, and money $19.99.",
    "Unicode: café naïve résumé 日本語のテキスト Ελληνικά русский 😀🎉",
    "Whitespace   runs\tand\ttabs\n\n\nnewlines   \n  indented lines",
    "Punctuation!!! ??? ... --- (parens) [brackets] {braces} \"quotes\" 'single'",
] * 4

VARIED_TEXT = [
    "Hello world!",
    "  leading spaces and   runs of   spaces  ",
    "tabs\tand\nnewlines\n\n\nx\r\ny",
    "digits 1234567 3.14159 2024-01-01 007",
    "unicode: café naïve 日本語 emoji 😀🎉 Ελληνικά русский ÀÉÎ õü",
    "punct!!! ?? ... --- (x) [y] {z} \"q\" 'it's' don't I'll we've they're",
    "trailing space ",
    " \u00a0nbsp\u3000ideographic",
    "<|endoftext|>after a special token",
    "a<|endoftext|>b",
    "",
    "   ",
    "\n",
    "unseen words: zyxwvut quixotic",
]


@pytest.fixture(scope="module")
def bpe():
    return tk.train_bpe(TRAINING_TEXT, vocabulary_size=320)


def _trainer_encoding(texts, vocabulary_size):
    """HF `tokenizers`' own training and encoding, configured as GPT-2's byte-level BPE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    reference = Tokenizer(models.BPE())
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocabulary_size,
        special_tokens=[tk.END_OF_TEXT, tk.PADDING],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    reference.train_from_iterator(TRAINING_TEXT, trainer)
    return [reference.encode(t).ids for t in texts]


def test_bpe_in_graph_ids_equal_trainer_encoding(bpe):
    expected = _trainer_encoding(VARIED_TEXT, 320)
    in_graph = bpe.tokenize(tf.constant(VARIED_TEXT)).to_list()
    assert in_graph == expected
    assert [r.tolist() for r in bpe.encode_documents(VARIED_TEXT)] == expected


@pytest.mark.parametrize("tiktoken_installed", [True, False])
def test_bpe_out_of_graph_encoders_give_the_trainers_ids(monkeypatch, tiktoken_installed):
    if not tiktoken_installed:
        monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails as if not installed
    tokenizer = tk.train_bpe(TRAINING_TEXT, vocabulary_size=320)
    expected = _trainer_encoding(VARIED_TEXT, 320)
    # One at a time: texts without <|endoftext|> take tiktoken's path when it is there.
    assert [tokenizer.encode_documents([t])[0].tolist() for t in VARIED_TEXT] == expected
    assert (tokenizer._encoder.tiktoken is not None) == tiktoken_installed
    assert [r.tolist() for r in tokenizer.encode_documents(VARIED_TEXT + TRAINING_TEXT)] == (
        expected + _trainer_encoding(TRAINING_TEXT, 320))


def test_tiktoken_encodes_only_vocabularies_ranked_in_merge_order(bpe):
    vocabulary, merges = bpe.vocabulary, bpe.merges
    assert tiktoken_encoding(vocabulary, merges, SPECIALS) is not None
    assert tiktoken_encoding(vocabulary, merges[1:] + merges[:1], SPECIALS) is None  # merge ranks out of order
    first = merges[0].replace(" ", "")
    swapped = {**vocabulary, first: vocabulary["a"], "a": vocabulary[first]}
    assert tiktoken_encoding(swapped, merges, SPECIALS) is None  # a byte ranked after a merge


def test_bpe_special_ids_and_vocabulary(bpe):
    assert (bpe.end_of_text_id, bpe.padding_id) == (0, 1)
    assert bpe.vocabulary_size == 320
    assert bpe.tokenize("a<|endoftext|>b").numpy().tolist().count(bpe.end_of_text_id) == 1
    # The padding token is never produced from text, even its literal spelling.
    assert bpe.padding_id not in bpe.tokenize("<|padding|> text").numpy().tolist()


def test_bpe_round_trip_and_shapes(bpe):
    ids = bpe.tokenize(tf.constant(VARIED_TEXT))
    assert isinstance(ids, tf.RaggedTensor) and ids.dtype == tf.int32
    assert [t.decode() for t in bpe.detokenize(ids).numpy()] == VARIED_TEXT
    scalar = bpe.tokenize("Hello world!")
    assert scalar.shape.rank == 1 and scalar.numpy().tolist() == ids[0].numpy().tolist()
    assert bpe.detokenize(scalar).numpy().decode() == "Hello world!"
    # Dense input padded with padding_id: the padding is dropped.
    dense = ids[:2].to_tensor(default_value=bpe.padding_id)
    assert [t.decode() for t in bpe.detokenize(dense).numpy()] == VARIED_TEXT[:2]


def test_bpe_detokenize_replaces_invalid_utf8(bpe):
    lead_byte = bpe.vocabulary["Ã"]  # byte 0xC3 alone: the start of a 2-byte character
    ids = bpe.tokenize("ok").numpy().tolist() + [lead_byte]
    text = bpe.detokenize(tf.ragged.constant([ids]))
    assert text.numpy()[0].decode("utf-8") == "ok\ufffd"


@pytest.mark.slow
def test_tokenize_inside_tf_data_and_tf_function(bpe):
    dataset = tf.data.Dataset.from_tensor_slices(VARIED_TEXT).batch(4).map(bpe.tokenize)
    mapped = [row for batch in dataset for row in batch.to_list()]
    assert mapped == bpe.tokenize(tf.constant(VARIED_TEXT)).to_list()

    @tf.function
    def round_trip(strings):
        return bpe.detokenize(bpe.tokenize(strings))

    assert [t.decode() for t in round_trip(tf.constant(VARIED_TEXT)).numpy()] == VARIED_TEXT


def test_bpe_save_load_same_ids(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / tk.CONFIG_FILENAME).read_text())["kind"] == "bpe"
    loaded = tk.load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(loaded, tk.BytePairTokenizer)
    assert loaded.fingerprint == bpe.fingerprint
    assert loaded.tokenize(tf.constant(VARIED_TEXT)).to_list() == bpe.tokenize(
        tf.constant(VARIED_TEXT)
    ).to_list()
    assert not [p for p in (tmp_path / "tok").iterdir() if p.name.startswith(".")]


def test_gpt2_files_round_trip(bpe, tmp_path):
    # GPT-2's file layout: vocab.json + merges.txt with a "#version" header, no padding token.
    (tmp_path / "vocab.json").write_text(json.dumps(bpe.vocabulary), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(bpe.merges) + "\n", encoding="utf-8"
    )
    gpt2 = tk.load_gpt2_tokenizer(str(tmp_path))
    assert gpt2.kind == "gpt2" and gpt2.padding_id == gpt2.end_of_text_id
    ids = gpt2.tokenize(tf.constant(VARIED_TEXT))
    assert ids.to_list() == bpe.tokenize(tf.constant(VARIED_TEXT)).to_list()
    assert [t.decode() for t in gpt2.detokenize(ids).numpy()] == VARIED_TEXT
    gpt2.save(tmp_path / "saved")
    assert tk.load_tokenizer(str(tmp_path / "saved")).kind == "gpt2"


def test_gpt2_missing_files_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        tk.load_gpt2_tokenizer(str(tmp_path))


def test_character_tokenizer_round_trip_unknown_and_save(tmp_path):
    chars = tk.train_characters(["hello world", "abc"])
    assert chars.characters == " abcdehlorw"
    assert chars.vocabulary_size == len(" abcdehlorw") + 3
    assert chars.tokenize("hello").numpy().tolist() == [6, 5, 7, 7, 8]
    ids = chars.tokenize(tf.constant(["hello world", "héllo"]))
    assert ids[1].numpy().tolist()[1] == chars.unknown_id
    assert [t.decode() for t in chars.detokenize(ids).numpy()] == ["hello world", "h\ufffdllo"]
    assert [r.tolist() for r in chars.encode_documents(["hello world", "héllo"])] == ids.to_list()
    # Padding is distinct from every real id and dropped by detokenize.
    padded = ids.to_tensor(default_value=chars.padding_id)
    assert chars.detokenize(padded).numpy()[1].decode() == "h\ufffdllo"
    assert len({chars.end_of_text_id, chars.unknown_id, chars.padding_id}) == 3
    chars.save(tmp_path / "c")
    loaded = tk.load_tokenizer(str(tmp_path / "c"))
    assert loaded.tokenize(tf.constant(["hello"])).to_list() == chars.tokenize(
        tf.constant(["hello"])
    ).to_list()


def test_vocabulary_smaller_than_bytes_plus_specials_is_an_error():
    with pytest.raises(ValueError, match="at least 258"):
        tk.train_bpe(TRAINING_TEXT, vocabulary_size=200)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        tk.load_tokenizer(str(tmp_path))
    (tmp_path / tk.CONFIG_FILENAME).write_text('{"kind": "wordpiece"}')
    with pytest.raises(ValueError, match="kind='wordpiece'"):
        tk.load_tokenizer(str(tmp_path))


def test_tiktoken_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="pip install tiktoken"):
        tk.TiktokenTokenizer("gpt2")


UNICODE_SAMPLE = [
    "ROMEO: Don't stop! well-made, $19.99 <b>x</b> 50% off... «quotes» ¿qué? ¡sí!",
    "ΟΔΟΣ Σ AΣb İstanbul ǅemal Straße ÀÉÎ ＡＢＣ Ⅻ ⓐⒶ",
    "日本語のテキスト、句読点。「括弧」 русский — тире – dash · middot",
    "emoji 😀🎉 ✓ ™ © ° ± × ÷ → ← ♥ ♪ ¢ £ ¥ € ₹ ^ ` ~ | \\ @ # & * _ + = § ¶",
    "specials<|endoftext|>AFTER <|endoftext|>",
    "nul\x00INSIDE",
    "",
    "   Trailing SPACE ",
]


@pytest.mark.parametrize(
    "normalization",
    [tk.Normalization(lowercase=True), tk.Normalization(strip_punctuation=True),
     tk.Normalization(lowercase=True, strip_punctuation=True)],
    ids=["lowercase", "strip_punctuation", "both"],
)
def test_normalization_in_graph_equals_python(normalization):
    expected = [normalization.normalize(t).encode("utf-8") for t in UNICODE_SAMPLE]
    graph = tf.function(normalization.normalize_tensor)(tf.constant(UNICODE_SAMPLE)).numpy().tolist()
    assert graph == expected
    assert normalization.normalize_tensor(tf.constant(UNICODE_SAMPLE)).numpy().tolist() == expected
    # The special token and NUL survive; the text around them is normalised.
    assert expected[4].count(tk.END_OF_TEXT.encode()) == 2 and b"\x00" in expected[5]


def test_strip_punctuation_replaces_punctuation_and_symbols_with_spaces():
    strip = tk.Normalization(strip_punctuation=True)
    cases = {
        "well-made": "well made",
        "Don't stop!": "Don t stop ",
        "$5 <b>": " 5  b ",
        "日本、語。": "日本 語 ",
        "a\u00a0b\tc": "a\u00a0b\tc",  # whitespace, letters and controls are kept
    }
    assert {text: strip.normalize(text) for text in cases} == cases
    graph = tf.function(strip.normalize_tensor)(tf.constant(list(cases))).numpy().tolist()
    assert [g.decode("utf-8") for g in graph] == list(cases.values())
    both = tk.Normalization(lowercase=True, strip_punctuation=True)
    assert both.normalize("Don't STOP!") == "don t stop "
    assert tk.Normalization().identity and not both.identity


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_lowercase_tokenizer_gives_same_ids_for_any_case(kind):
    lowercase = tk.Normalization(lowercase=True)
    texts = ["romeo and juliet, said ROMEO.", "Romeo!"] * 3
    if kind == "char":
        tokenizer = tk.train_characters(texts, normalization=lowercase)
        assert tokenizer.characters == tokenizer.characters.lower()  # trained on normalised text
    else:
        tokenizer = tk.train_bpe(texts, vocabulary_size=300, normalization=lowercase)
    upper, lower = tokenizer.tokenize(tf.constant(["ROMEO", "romeo"])).to_list()
    assert upper == lower
    if kind == "char":  # (eager BPE already runs as a tf.function; a second trace costs ~20 s)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def in_graph(strings):
            return tokenizer.tokenize(strings).to_tensor(-1)

        graph_upper, graph_lower = in_graph(tf.constant(["ROMEO", "romeo"])).numpy().tolist()
        assert graph_upper == graph_lower == lower
    assert [r.tolist() for r in tokenizer.encode_documents(["ROMEO", "RoMeO"])] == [lower, lower]
    plain = tk.train_characters(texts) if kind == "char" else tk.train_bpe(texts, vocabulary_size=300)
    assert plain.tokenize("ROMEO").numpy().tolist() != plain.tokenize("romeo").numpy().tolist()


def test_normalised_tokenizers_encode_documents_equal_tokenize_on_unicode():
    both = tk.Normalization(lowercase=True, strip_punctuation=True)
    for tokenizer in (
        tk.train_characters(TRAINING_TEXT + UNICODE_SAMPLE, normalization=both),
        tk.train_bpe(TRAINING_TEXT + UNICODE_SAMPLE, vocabulary_size=320, normalization=both),
    ):
        # (In-graph BPE word splitting stops at a NUL byte, normalised or not: not compared.)
        sample = UNICODE_SAMPLE if tokenizer.kind == "char" else [t for t in UNICODE_SAMPLE if "\x00" not in t]
        in_graph = tokenizer.tokenize(tf.constant(sample)).to_list()
        assert [r.tolist() for r in tokenizer.encode_documents(sample)] == in_graph
        if tokenizer.kind == "bpe":  # the special token is still matched after normalisation
            assert in_graph[4].count(tokenizer.end_of_text_id) == 2


def test_normalization_is_saved_fingerprinted_and_legacy_files_have_none(tmp_path):
    both = tk.Normalization(lowercase=True, strip_punctuation=True)
    plain = tk.train_characters(["hello world"])
    normalized = tk.CharacterTokenizer(plain.characters, normalization=both)
    assert normalized.fingerprint != plain.fingerprint
    normalized.save(tmp_path / "n")
    saved = json.loads((tmp_path / "n" / tk.CONFIG_FILENAME).read_text())
    assert saved["normalization"] == {"lowercase": True, "strip_punctuation": True}
    loaded = tk.load_tokenizer(str(tmp_path / "n"))
    assert loaded.normalization == both and loaded.fingerprint == normalized.fingerprint
    assert loaded.tokenize("HELLO, world").numpy().tolist() == plain.tokenize("hello  world").numpy().tolist()
    # A tokenizer.json written before the normalisation was saved: no normalisation.
    del saved["normalization"]
    saved["format_version"] = 1
    (tmp_path / "n" / tk.CONFIG_FILENAME).write_text(json.dumps(saved))
    assert tk.load_tokenizer(str(tmp_path / "n")).normalization == tk.Normalization()
    saved["normalization"] = {"lowercase": True, "casefold": True}
    (tmp_path / "n" / tk.CONFIG_FILENAME).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"unknown normalization keys \['casefold'\]"):
        tk.load_tokenizer(str(tmp_path / "n"))
    saved["normalization"], saved["format_version"] = {"lowercase": "yes"}, 1
    (tmp_path / "n" / tk.CONFIG_FILENAME).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="lowercase='yes' must be true or false"):
        tk.load_tokenizer(str(tmp_path / "n"))
    saved["format_version"] = tk.FORMAT_VERSION + 1
    (tmp_path / "n" / tk.CONFIG_FILENAME).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="written by a newer kgpt"):
        tk.load_tokenizer(str(tmp_path / "n"))


def test_kind_registry_flags_on_kinds_and_instances(bpe, tmp_path):
    assert tk.TOKENIZER_NAMES == ("bpe", "gpt2", "char", "tiktoken:NAME")
    flags = {
        name: (kind.graph_compatible, kind.has_bpe_files, kind.trained_on_corpus, kind.needs_tokenizer_path)
        for name, kind in tk.TOKENIZER_KINDS.items()
    }
    assert flags == {
        "bpe": (True, True, True, False),
        "gpt2": (True, True, False, True),
        "char": (True, False, True, False),
        "tiktoken": (False, False, False, False),
    }
    assert tk.tokenizer_kind("tiktoken:o200k_base") is tk.TOKENIZER_KINDS["tiktoken"]
    assert bpe.graph_compatible and bpe.has_bpe_files and bpe.trained_on_corpus and not bpe.needs_tokenizer_path
    chars = tk.make_tokenizer("char", documents=["abc"])
    assert chars.graph_compatible and not chars.has_bpe_files and chars.kind_spec is tk.TOKENIZER_KINDS["char"]
    bpe.save(tmp_path / "gpt2")  # a folder with vocab.json + merges.txt, as GPT-2's
    (tmp_path / "gpt2" / tk.CONFIG_FILENAME).unlink()
    gpt2 = tk.make_tokenizer("gpt2", path=str(tmp_path / "gpt2"), normalization=tk.Normalization(lowercase=True))
    assert gpt2.kind == "gpt2" and gpt2.needs_tokenizer_path and gpt2.has_bpe_files
    assert gpt2.tokenize("HELLO").numpy().tolist() == bpe.tokenize("hello").numpy().tolist()
    with pytest.raises(ValueError, match=r"Unknown tokenizer='chars'\. Did you mean 'char'\?"):
        tk.tokenizer_kind("chars")
    with pytest.raises(ValueError, match="needs a tiktoken encoding name"):
        tk.tokenizer_kind("tiktoken:")
    with pytest.raises(ValueError, match="set data.tokenizer_path"):
        tk.make_tokenizer("gpt2")
    with pytest.raises(ValueError, match="pass documents"):
        tk.make_tokenizer("bpe", vocabulary_size=300)


@pytest.mark.export
def test_tokenizers_export_in_a_saved_model(bpe, tmp_path):
    both = tk.Normalization(lowercase=True, strip_punctuation=True)
    normalized = tk.train_characters(TRAINING_TEXT, normalization=both)
    for name, tokenizer in [("bpe", bpe), ("char", tk.train_characters(TRAINING_TEXT)), ("normalized", normalized)]:

        class Serving(tf.Module):
            def __init__(self, tokenizer):
                super().__init__()
                self.tokenizer = tokenizer

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
            def round_trip(self, strings):
                ids = self.tokenizer.tokenize(strings)
                return {"ids": ids.to_tensor(-1), "text": self.tokenizer.detokenize(ids)}

        tf.saved_model.save(Serving(tokenizer), str(tmp_path / name))
        loaded = tf.saved_model.load(str(tmp_path / name))
        outputs = loaded.round_trip(tf.constant(VARIED_TEXT[:6]))
        expected = tokenizer.tokenize(tf.constant(VARIED_TEXT[:6])).to_tensor(-1)
        np.testing.assert_array_equal(outputs["ids"].numpy(), expected.numpy())
        in_process = tokenizer.detokenize(tokenizer.tokenize(tf.constant(VARIED_TEXT[:6])))
        assert outputs["text"].numpy().tolist() == in_process.numpy().tolist()
    # The SavedModel normalises as the Python path does: the server gets the normalisation.
    loaded = tf.saved_model.load(str(tmp_path / "normalized"))
    served = loaded.round_trip(tf.constant(["ROMEO, it's", "romeo  it s"]))["ids"].numpy()
    np.testing.assert_array_equal(served[0], served[1])
    assert served[0].tolist() == normalized.encode_documents(["ROMEO, it's"])[0].tolist()
