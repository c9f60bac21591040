"""Tokenizer plugins: trained on a tf.data dataset, they tokenize in graph as the library
that trained them does, and save, load and serialize without changing an id.

Each trainable plugin is trained once on the pydoc topics (79 documents) through the
registry and compared with its reference on held-out standard-library docstrings and
hard strings: ``tokenizers``' BERT WordPiece for ``wordpiece`` (the layer is Hugging
Face's BERT tokenizer; keras-hub only learns the vocabulary), sentencepiece's
``SentencePieceProcessor`` for ``sentencepiece``, the trained ``tokenizers.Tokenizer``
for ``byte_level_bpe``. The same plugins are then trained lowercased through
``build_tokenizer`` from a config, as ``kerasllm pretrain`` trains them.
"""

import functools
import io
import json

import hf_fixtures
import keras
import pytest
import sentencepiece
import tensorflow as tf
import tokenizers
from kerasllm_plugins import byte_level_bpe
from kerasllm_plugins.builtin import pydoc_topics, stdlib_docstrings
from kerasllm_plugins.hf_tokenizer import SAVED_FILE
from kerasllm_plugins.wordpiece import SPECIAL_TOKENS as BERT_TOKENS

import kerasllm
from kerasllm.builder import build_tokenizer
from kerasllm.errors import ConfigError
from kerasllm.hf_tokenizer import BYTE_CHARACTERS
from kerasllm.plugins import get_registry
from kerasllm.tokenizer_layers import (
    BytePairTokenizer,
    SentencePieceTokenizer,
    WordPieceTokenizer,
)
from kerasllm.tokenizers import (
    DEFAULT_SPECIAL_TOKENS,
    reserved_tokens,
    sentinel_ids,
    special_tokens,
)

VOCABULARY_SIZE = 1000
SENTINELS = 3
HELDOUT_LINES = 250
# Test id → (plugin, options, layer, special tokens by role).
PLUGINS = {
    "wordpiece": ("wordpiece", {}, WordPieceTokenizer, BERT_TOKENS),
    "sentencepiece-unigram": ("sentencepiece", {"model_type": "unigram"},
                              SentencePieceTokenizer, DEFAULT_SPECIAL_TOKENS),
    "sentencepiece-bpe": ("sentencepiece", {"model_type": "bpe"}, SentencePieceTokenizer,
                          DEFAULT_SPECIAL_TOKENS),
    "byte_level_bpe": ("byte_level_bpe", {}, BytePairTokenizer, DEFAULT_SPECIAL_TOKENS),
}
# keras-hub's WordPiece trainer (tf-text's) stops within 5% of the size asked for:
# it searches for a count threshold, not a size (tf-text's slack_ratio).
SIZE_TOLERANCE = {"wordpiece": 0.05}


def factory(name):
    return get_registry().get("tokenizer", name, "tokenizer.name")


def training_texts():
    return tf.data.Dataset.from_tensor_slices(pydoc_topics())


@functools.cache
def trained(plugin_id):
    """The plugin trained on the pydoc topics with sentinels, cased: each once per session."""
    name, options, _, _ = PLUGINS[plugin_id]
    return factory(name).train(training_texts(), VOCABULARY_SIZE, lowercase=False,
                               sentinels=SENTINELS, **options)


def sample():
    """Held-out texts for checks that a restored layer tokenizes as the original."""
    return heldout()[:50] + heldout()[HELDOUT_LINES:]


@functools.cache
def heldout():
    """Docstring lines (not trained on), hard strings, and the special-token strings in text."""
    lines = [line for document in stdlib_docstrings() for line in document.splitlines()
             if line.strip()]
    reserved = {token for tokens in (BERT_TOKENS, DEFAULT_SPECIAL_TOKENS)
                for token in reserved_tokens(tokens, SENTINELS)}
    specials = [f"a{token}b {token} x {token.upper()}" for token in sorted(reserved)]
    return (lines[::len(lines) // HELDOUT_LINES][:HELDOUT_LINES] + hf_fixtures.HARD_STRINGS
            + specials + ["<extra_id_0><extra_id_1> <mask><mask>x", "Mixed CASE Wörds ÅΣΑΣ"])


def reference(plugin_id, tokenizer):
    """The library's own tokenizer for a trained layer, as ``texts → [ids]``."""
    name = PLUGINS[plugin_id][0]
    if name == "sentencepiece":
        processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.proto)
        return processor.encode
    if name == "wordpiece":
        vocabulary = {token: i for i, token in enumerate(tokenizer.get_vocabulary())}
        library = tokenizers.BertWordPieceTokenizer(vocabulary, lowercase=tokenizer.lowercase)
        library.add_special_tokens([token for token in tokenizer.get_vocabulary()
                                    if token.startswith("<extra_id_")])
    else:
        library = byte_level_bpe.train_tokenizers(
            training_texts(), VOCABULARY_SIZE, tokenizer.lowercase, len(sentinel_ids(tokenizer)))
        assert library.get_vocab() == tokenizer.vocabulary  # training is deterministic
    return lambda texts: [e.ids for e in library.encode_batch(texts, add_special_tokens=False)]


def in_graph(tokenizer, texts):
    """Ids from a tf.data pipeline, as training sees them."""
    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(len(texts)).map(tokenizer)
    return next(iter(dataset)).to_list()


def assert_same_ids(texts, expected, got):
    wrong = [f"{text!r}\n  library: {e}\n  layer:   {g}"
             for text, e, g in zip(texts, expected, got) if e != g]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ:\n" + "\n".join(wrong[:5])


# === Training ============================================================================


@pytest.mark.parametrize("plugin_id", list(PLUGINS))
def test_trained_vocabulary_holds_the_special_tokens_and_sentinels(plugin_id):
    name, _, layer, tokens = PLUGINS[plugin_id]
    tokenizer = trained(plugin_id)
    assert type(tokenizer) is layer
    size = tokenizer.vocabulary_size()
    assert abs(size - VOCABULARY_SIZE) <= SIZE_TOLERANCE.get(name, 0) * VOCABULARY_SIZE, size
    reserved = reserved_tokens(tokens, SENTINELS)
    assert tokenizer.get_vocabulary()[:len(reserved)] == reserved
    ids = special_tokens(tokenizer)
    assert (ids.pad, ids.start, ids.end, ids.mask) == (0, 1, 2, 4)
    assert tokenizer.token_to_id(tokens["unknown"]) == 3
    assert ids.add_start and ids.add_end
    assert sentinel_ids(tokenizer) == [5, 6, 7]


@pytest.mark.parametrize("plugin_id", list(PLUGINS))
def test_ids_match_the_training_library(plugin_id):
    tokenizer = trained(plugin_id)
    texts = heldout()
    assert_same_ids(texts, reference(plugin_id, tokenizer)(texts), in_graph(tokenizer, texts))


def test_unigram_ties_follow_the_library_within_the_first_word():
    # Runs of a character segment in several ways of equal score ("0|000", "000|0");
    # sentencepiece sums float32 scores and keeps the earliest start, as the layer does.
    tokenizer = trained("sentencepiece-unigram")
    texts = [c * n for c in "0=-*#~." for n in range(2, 41)]
    expected = reference("sentencepiece-unigram", tokenizer)(texts)
    assert_same_ids(texts, expected, tokenizer(texts).to_list())


@pytest.mark.parametrize("plugin_id", list(PLUGINS))
def test_detokenize_inverts_tokenize(plugin_id):
    tokenizer = trained(plugin_id)
    simple = ["the quick brown fox jumps over the lazy dog", "return the value"]
    assert tokenizer.detokenize(tokenizer(simple)) == simple
    texts = heldout()
    decoded = tokenizer.detokenize(tokenizer(texts))
    if isinstance(tokenizer, BytePairTokenizer):  # bytes: every text comes back exactly
        assert decoded == texts
    elif isinstance(tokenizer, SentencePieceTokenizer):  # the normalized text, as the library's
        processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.proto)
        assert decoded == processor.decode(processor.encode(texts))


# === Save, load, serialize ===============================================================


# The file each plugin saves, which load also takes instead of the directory.
SAVED = {"wordpiece": "vocab.txt", "sentencepiece": "sentencepiece.model",
         "byte_level_bpe": "vocab.json"}


def config(tokenizer):
    return {k: v for k, v in tokenizer.get_config().items() if k != "name"}


@pytest.mark.parametrize("plugin_id", list(PLUGINS))
def test_save_then_load_restores_the_tokenizer(plugin_id, tmp_path):
    name = PLUGINS[plugin_id][0]
    tokenizer = trained(plugin_id)
    factory(name).save(tokenizer, tmp_path)
    texts = sample()
    expected = tokenizer(texts).to_list()
    restored = factory(name).load(tmp_path, lowercase=False)
    assert config(restored) == config(tokenizer)
    assert restored(texts).to_list() == expected
    assert sentinel_ids(restored) == sentinel_ids(tokenizer)
    # The config makes the layer: an equal config, equal ids.
    assert config(factory(name).load(tmp_path / SAVED[name], lowercase=False)) == config(tokenizer)


@pytest.mark.parametrize("plugin_id", list(PLUGINS))
def test_layer_survives_keras_serialization(plugin_id):
    tokenizer = trained(plugin_id)
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(tokenizer)))
    restored = keras.saving.deserialize_keras_object(serialized, safe_mode=True)
    assert type(restored) is type(tokenizer)
    assert config(restored) == config(tokenizer)
    texts = sample()
    assert restored(texts).to_list() == tokenizer(texts).to_list()
    assert special_tokens(restored) == special_tokens(tokenizer)


# === From a config, lowercased ===========================================================


@functools.cache
def from_config(plugin_id):
    """The plugin trained by build_tokenizer on the built-in topics, lowercased (the default)."""
    name, options, _, _ = PLUGINS[plugin_id]
    config = kerasllm.load_config({
        "tokenizer": {"name": name, "vocabulary_size": VOCABULARY_SIZE, "options": options},
        "data": {"source": "builtin", "options": {"parts": ["topics"]}},
    })
    assert config.tokenizer.lowercase and config.tokenizer.sentinels == 0
    return build_tokenizer(config)


@pytest.mark.parametrize("plugin_id", list(PLUGINS))
def test_build_tokenizer_trains_lowercased_from_a_config(plugin_id):
    tokenizer = from_config(plugin_id)
    assert type(tokenizer) is PLUGINS[plugin_id][2]
    assert sentinel_ids(tokenizer) == []
    texts = heldout()
    assert_same_ids(texts, reference(plugin_id, tokenizer)(texts), in_graph(tokenizer, texts))
    upper, lower = "The Quick Brown FOX Über", "the quick brown fox über"
    assert tokenizer(upper).numpy().tolist() == tokenizer(lower).numpy().tolist()
    # Byte-level BPE's 256 base tokens are bytes, capitals' included; its tokens
    # spell bytes as characters (Ġ a space), so they are compared as text.
    kept = set(reserved_tokens(PLUGINS[plugin_id][3])) | set(BYTE_CHARACTERS)
    learned = [token for token in tokenizer.get_vocabulary() if token not in kept]
    if isinstance(tokenizer, BytePairTokenizer):
        learned = [tokenizers.decoders.ByteLevel().decode([token]) for token in learned]
    assert not [token for token in learned if token != token.lower()]


def test_build_tokenizer_passes_options_and_reports_bad_ones():
    config = kerasllm.load_config({
        "tokenizer": {"name": "sentencepiece", "vocabulary_size": 300, "lowercase": False,
                      "sentinels": 2, "options": {"model_type": "bpe", "split_digits": True}},
        "data": {"source": "builtin", "options": {"parts": ["topics"]}},
    })
    tokenizer = build_tokenizer(config)
    assert tokenizer.vocabulary_size() == 300 and len(sentinel_ids(tokenizer)) == 2
    processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.proto)
    assert processor.encode("12345", out_type=str) == ["▁", "1", "2", "3", "4", "5"]
    bad = config.to_dict()
    bad["tokenizer"]["options"] = {"model_type": "word"}
    with pytest.raises(ConfigError, match=r"tokenizer\.options: invalid value for tokenizer "
                                          r"'sentencepiece': model_type must be one of "
                                          r"unigram, bpe, got 'word'"):
        build_tokenizer(kerasllm.load_config(bad))
    bad["tokenizer"]["options"] = {"model_typ": "bpe"}
    with pytest.raises(ConfigError, match="unknown option 'model_typ'.*allowed: byte_fallback, "
                                          "character_coverage, input_sentence_size, model_type"):
        build_tokenizer(kerasllm.load_config(bad))


# === Hugging Face directories ============================================================


@pytest.fixture
def hf_directory(tmp_path):
    """A BERT checkpoint's tokenizer files (vocab.txt + tokenizer_config.json)."""
    directory = tmp_path / "bert"
    directory.mkdir()
    factory("wordpiece").save(trained("wordpiece"), directory)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": False}))
    return directory


def test_hf_loads_a_directory_and_saves_what_load_needs(hf_directory, tmp_path):
    hf = factory("hf")
    tokenizer = hf.load(hf_directory, lowercase=True)  # the files say cased
    assert type(tokenizer) is WordPieceTokenizer and not tokenizer.lowercase
    # BertTokenizer keeps its own special tokens whole, not kerasllm's sentinels.
    texts = [text for text in heldout() if "<extra_id_" not in text]
    assert tokenizer(texts).to_list() == trained("wordpiece")(texts).to_list()
    saved = tmp_path / "saved"
    saved.mkdir()
    hf.save(tokenizer, saved)
    assert [path.name for path in saved.iterdir()] == [SAVED_FILE]
    restored = hf.load(saved, lowercase=True)
    assert config(restored) == config(tokenizer)
    assert restored(texts).to_list() == tokenizer(texts).to_list()
    config_ = kerasllm.load_config({"tokenizer": {"name": "hf", "vocabulary": str(hf_directory)}})
    assert config(build_tokenizer(config_)) == config(tokenizer)


def test_hf_tokenizers_are_not_trained():
    config = kerasllm.load_config({"tokenizer": {"name": "hf"},
                                   "data": {"source": "builtin", "options": {"parts": ["topics"]}}})
    with pytest.raises(ConfigError, match="hf tokenizers are loaded, not trained: set "
                                          "tokenizer.vocabulary .*wordpiece, sentencepiece, "
                                          "byte_level_bpe"):
        build_tokenizer(config)


# === Errors ==============================================================================


def test_a_missing_file_is_named(tmp_path):
    for name, message in (("wordpiece", "wordpiece: no vocab.txt in"),
                          ("sentencepiece", "holds no .model files"),
                          ("byte_level_bpe", "lacks vocab.json and merges.txt")):
        with pytest.raises(ValueError, match=message):
            factory(name).load(tmp_path, lowercase=False)
    with pytest.raises(ValueError, match="sentencepiece: .*missing.model not found"):
        factory("sentencepiece").load(tmp_path / "missing.model", lowercase=False)
    with pytest.raises(ConfigError, match="not a directory"):
        factory("hf").load(tmp_path / "missing", lowercase=False)


def test_a_vocabulary_without_the_special_tokens_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[CLS]\n[SEP]\n[UNK]\nthe\n")
    with pytest.raises(ValueError, match=r"vocab.txt lacks the special tokens \['\[MASK\]'\]; "
                                         r"kerasllm needs pad \[PAD\], .* mask \[MASK\]"):
        factory("wordpiece").load(tmp_path, lowercase=False)

    # sentencepiece's defaults: <unk>, <s>, </s>; no <pad>, no <mask>.
    written = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(pydoc_topics()[0].splitlines()), model_writer=written,
        vocab_size=100, minloglevel=2)
    model = tmp_path / "plain.model"
    model.write_bytes(written.getvalue())
    with pytest.raises(ValueError, match=r"plain.model lacks the special tokens "
                                         r"\['<pad>', '<mask>'\]"):
        factory("sentencepiece").load(model, lowercase=False)

    bpe = tmp_path / "gpt2"
    bpe.mkdir()
    factory("byte_level_bpe").save(trained("byte_level_bpe"), bpe)
    vocabulary = json.loads((bpe / "vocab.json").read_text())
    del vocabulary["<mask>"]
    (bpe / "vocab.json").write_text(json.dumps(
        {token: i for i, token in enumerate(sorted(vocabulary, key=vocabulary.get))}))
    with pytest.raises(ValueError, match=r"gpt2 lacks the special tokens \['<mask>'\]"):
        factory("byte_level_bpe").load(bpe, lowercase=False)
    del vocabulary["Ġ"]
    (bpe / "vocab.json").write_text(json.dumps(vocabulary))
    with pytest.raises(ValueError, match="lacks the byte tokens .*needs all 256"):
        factory("byte_level_bpe").load(bpe, lowercase=False)


def test_sentencepiece_lowercase_must_match_the_model(tmp_path):
    factory("sentencepiece").save(trained("sentencepiece-bpe"), tmp_path)
    with pytest.raises(ValueError, match=r"normalizer \(nmt_nfkc\) does not lowercase text; "
                                         r"set tokenizer.lowercase: false"):
        factory("sentencepiece").load(tmp_path, lowercase=True)


def test_sizes_the_trainers_cannot_reach_are_refused():
    texts = training_texts().take(2)
    with pytest.raises(ValueError, match="vocabulary_size must be at least 262, got 100"):
        factory("byte_level_bpe").train(texts, 100, lowercase=False)
    with pytest.raises(ValueError, match="sentencepiece cannot train a unigram model of "
                                         "100000 pieces"):
        factory("sentencepiece").train(texts, 100_000, lowercase=False)
