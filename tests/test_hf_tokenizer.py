"""Hugging Face tokenizers imported by load_hf_tokenizer give the ids transformers gives.

References are trained here on the built-in corpus (tests/hf_fixtures.py) and
compared on a few thousand corpus lines plus hard strings, with and without the
special tokens that transformers adds around one sequence; kerasllm adds them
with the packer that data.py uses.
"""

import functools
import json
import zipfile

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")

import hf_fixtures  # noqa: E402
from kerasllm.data import start_end_packer  # noqa: E402
from kerasllm.errors import ConfigError  # noqa: E402
from kerasllm.hf_tokenizer import NO_FILES, load_hf_tokenizer  # noqa: E402
from kerasllm.tokenizer_layers import (  # noqa: E402
    BytePairTokenizer,
    SentencePieceTokenizer,
    WordPieceTokenizer,
)
from kerasllm.tokenizers import special_tokens  # noqa: E402

# Directories as transformers 5's save_pretrained writes them → the tokenizer they give.
KINDS = {"bert-uncased": WordPieceTokenizer, "bert-cased": WordPieceTokenizer,
         "gpt2": BytePairTokenizer, "roberta": BytePairTokenizer,
         "t5": SentencePieceTokenizer, "llama": SentencePieceTokenizer,
         "llama-legacy": SentencePieceTokenizer}
# Directories of vocabulary files (older checkpoints) → their save_pretrained twin.
TWINS = {"bert-uncased-vocab": "bert-uncased", "bert-cased-vocab": "bert-cased",
         "gpt2-vocab": "gpt2", "roberta-vocab": "roberta", "t5-model": "t5",
         "llama-model": "llama"}
# What transformers adds around one sequence: (start, end) tokens.
ADDED = {"bert": ("[CLS]", "[SEP]"), "gpt2": (None, None), "roberta": ("<s>", "</s>"),
         "t5": (None, "</s>"), "llama": ("<s>", None)}
LINES = 3000  # corpus lines per comparison


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(hf_fixtures.corpus_lines()), encoding="utf-8")
    return hf_fixtures.build_references(root, corpus)


@pytest.fixture(scope="session")
def load(references):
    """load_hf_tokenizer by reference name, each loaded once (its graphs traced once)."""
    return functools.cache(lambda name: load_hf_tokenizer(references[name]))


@pytest.fixture(scope="session")
def lines():
    corpus = hf_fixtures.corpus_lines()
    return corpus[::len(corpus) // LINES][:LINES] + hf_fixtures.HARD_STRINGS


def kerasllm_ids(tokenizer, texts):
    """Ids without and with the packed start and end tokens, and the ids detokenized,
    in one tf.data pass."""
    packer = start_end_packer(tokenizer, 4096)

    def tokenize(batch):
        ids = tokenizer(batch)
        packed, mask = packer(ids)
        return ids, tf.ragged.boolean_mask(packed, mask), tokenizer.detokenize(ids)

    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(len(texts)).map(tokenize)
    ids, packed, decoded = next(iter(dataset))
    return ids.to_list(), packed.to_list(), [text.decode() for text in decoded.numpy()]


def mismatches(texts, expected, got):
    return [f"{text!r}\n  transformers: {e}\n  kerasllm:     {g}"
            for text, e, g in zip(texts, expected, got) if e != g]


def config(tokenizer):
    return {k: v for k, v in tokenizer.get_config().items() if k != "name"}


# === Parity ==============================================================================


@pytest.mark.parametrize("name", list(KINDS))
def test_ids_match_transformers(references, load, lines, name):
    reference = hf_fixtures.reference(references[name])
    tokenizer = load(name)
    assert type(tokenizer) is KINDS[name]
    assert tokenizer.vocabulary_size() == len(reference)

    ids, packed, decoded = kerasllm_ids(tokenizer, lines)
    without = reference(lines, add_special_tokens=False)["input_ids"]
    with_special = reference(lines)["input_ids"]
    for expected, got in ((without, ids), (with_special, packed)):
        wrong = mismatches(lines, expected, got)
        assert not wrong, f"{len(wrong)} of {len(lines)} differ:\n" + "\n".join(wrong[:5])
    if isinstance(tokenizer, BytePairTokenizer):  # byte-level: decodes as transformers
        assert decoded == reference.batch_decode(without, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name", list(TWINS))
def test_vocabulary_files_load_as_their_tokenizer_json(references, load, lines, name):
    twin = TWINS[name]
    # transformers tokenizes both directories alike ...
    reference, twin_reference = (hf_fixtures.reference(references[n]) for n in (name, twin))
    assert reference(lines)["input_ids"] == twin_reference(lines)["input_ids"]
    # ... and kerasllm configures the same tokenizer from both.
    assert config(load_hf_tokenizer(references[name])) == config(load(twin))


@pytest.mark.parametrize("name", ["bert-uncased", "gpt2", "roberta", "t5", "llama"])
def test_special_tokens_as_transformers_adds_them(references, load, name):
    tokenizer = load(name)
    reference = hf_fixtures.reference(references[name])
    tokens = special_tokens(tokenizer)
    start, end = ADDED[name.split("-")[0]]
    assert (tokens.add_start, tokens.add_end) == (start is not None, end is not None)
    for token, token_id in ((start, tokens.start), (end, tokens.end)):
        if token is not None:
            assert token_id == reference.convert_tokens_to_ids(token)
    for role in ("pad", "mask"):
        token = getattr(reference, f"{role}_token")
        expected = reference.convert_tokens_to_ids(token) if token else None
        assert getattr(tokenizer, f"{role}_token_id") == expected
    if reference.pad_token is None:  # GPT-2, Llama: packing pads with the end token
        assert tokens.pad == tokens.end


def test_unigram_ties_go_to_the_earliest_start(references, load):
    # Runs of a character have segmentations of equal score ("=|==" and "==|="):
    # sentencepiece sums float32 scores, so they need not tie; transformers sums
    # float64 and keeps the candidate that starts first.
    import sentencepiece

    texts = [c * n for c in "0=-*#~" for n in range(2, 41)] + ["800080", "1000000000"]
    expected = hf_fixtures.reference(references["t5"])(texts, add_special_tokens=False)
    wrong = mismatches(texts, expected["input_ids"], load("t5")(texts).to_list())
    assert not wrong, "\n".join(wrong[:5])
    library = sentencepiece.SentencePieceProcessor(
        model_file=str(references["t5"] / "spiece.model"))
    assert [library.encode(text) for text in texts] != expected["input_ids"]  # the case at hand


def test_t5_sentinels_are_ids_after_the_model(references, load):
    tokenizer = load("t5")
    reference = hf_fixtures.reference(references["t5"])
    assert tokenizer.token_to_id("<extra_id_0>") == reference.convert_tokens_to_ids("<extra_id_0>")
    ids = tokenizer("a <extra_id_0> b")
    expected = reference("a <extra_id_0> b", add_special_tokens=False)["input_ids"]
    assert ids.numpy().tolist() == expected
    assert "<extra_id_0>" in tokenizer.detokenize(ids)


# === The layers ==========================================================================


@pytest.mark.parametrize("name", ["bert-uncased", "roberta", "t5"])
def test_saved_with_a_model_without_asset_files(references, load, lines, tmp_path, name):
    tokenizer = load(name)
    texts = lines[:100] + hf_fixtures.HARD_STRINGS
    reference = hf_fixtures.reference(references[name])
    expected = reference(texts, add_special_tokens=False)["input_ids"]

    serialized = keras.saving.serialize_keras_object(tokenizer)
    assert json.loads(json.dumps(serialized)) == serialized  # plain JSON: vocabulary inline

    TokenizerHolder(tokenizer).save(tmp_path / "holder.keras")
    with zipfile.ZipFile(tmp_path / "holder.keras") as archive:
        assert not [n for n in archive.namelist() if n.startswith("assets")]
    restored = keras.saving.load_model(tmp_path / "holder.keras").tokenizer  # safe mode
    assert type(restored) is type(tokenizer)
    assert config(restored) == config(tokenizer)
    assert restored.special_tokens == tokenizer.special_tokens
    assert restored(texts).to_list() == expected


@keras.saving.register_keras_serializable(package="kerasllm_tests")
class TokenizerHolder(keras.Model):
    """The smallest model that saves a tokenizer in its config."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.built = True

    def call(self, inputs):
        return inputs

    def get_config(self):
        return {**super().get_config(),
                "tokenizer": keras.saving.serialize_keras_object(self.tokenizer)}

    @classmethod
    def from_config(cls, config):
        tokenizer = keras.saving.deserialize_keras_object(config.pop("tokenizer"))
        return cls(tokenizer, **config)


@pytest.mark.parametrize("name", ["bert-uncased", "t5", "llama"])  # BPE: in the parity test
def test_detokenize_inverts_tokenize(load, name):
    tokenizer = load(name)
    texts = ["the quick brown fox jumps over the lazy dog", "Return the value, or None."]
    decoded = tokenizer.detokenize(tokenizer(texts))
    if tokenizer.get_config().get("lowercase"):
        texts = [text.lower() for text in texts]
    if isinstance(tokenizer, WordPieceTokenizer):  # words joined by spaces, as BERT decodes
        texts = [text.replace(",", " ,").replace(".", " .") for text in texts]
    assert decoded == texts


def test_eager_and_graph_calls_agree(load, lines):
    tokenizer = load("bert-cased")
    texts = lines[:50]
    ids, _, decoded = kerasllm_ids(tokenizer, texts)
    assert tokenizer(texts).to_list() == ids
    assert tokenizer.detokenize(tokenizer(texts)) == decoded
    assert tokenizer(texts[0]).numpy().tolist() == tokenizer(texts[:1]).to_list()[0]
    one, batch = tokenizer(texts[1]), tokenizer(texts[1:2])
    assert tokenizer.detokenize(one) == tokenizer.detokenize(batch)[0]


def test_a_special_token_missing_from_the_vocabulary_is_named():
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        WordPieceTokenizer(["[UNK]", "[CLS]", "a"], special_tokens={"mask": "[MASK]"})
    with pytest.raises(ValueError, match="special_tokens: unknown roles \\['cls'\\]"):
        WordPieceTokenizer(["[UNK]", "[CLS]"], special_tokens={"cls": "[CLS]"})


def test_special_tokens_of_a_keras_hub_bert_tokenizer():
    tokenizer = keras_hub.models.BertTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"])
    tokens = special_tokens(tokenizer)
    assert (tokens.start, tokens.end, tokens.pad, tokens.mask) == (
        tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
        tokenizer.mask_token_id)
    assert tokens.add_start and tokens.add_end


# === Errors ==============================================================================


def load_error(directory):
    with pytest.raises(ConfigError) as error:
        load_hf_tokenizer(directory)
    return str(error.value)


def test_a_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_error(tmp_path) == f"{tmp_path}: {NO_FILES}"


def test_an_unsupported_tokenizer_json_model(tmp_path):
    import tokenizers

    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    word_level.save(str(tmp_path / "tokenizer.json"))
    assert load_error(tmp_path) == (f"{tmp_path}: tokenizer.json: model type 'WordLevel' is not "
                                    "supported; supported: WordPiece, BPE, Unigram")


def edited(references, name, tmp_path, edit):
    """A copy of a reference directory with its tokenizer.json edited."""
    copy = tmp_path / name
    copy.mkdir()
    for file in references[name].iterdir():
        if file.name != "tokenizer.json":
            copy.joinpath(file.name).write_bytes(file.read_bytes())
    pipeline = json.loads((references[name] / "tokenizer.json").read_text())
    edit(pipeline)
    (copy / "tokenizer.json").write_text(json.dumps(pipeline))
    return copy


def test_sentencepiece_needs_its_model_file(references, tmp_path):
    directory = tmp_path / "t5"
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # as save_pretrained writes it
        directory.joinpath(name).write_bytes((references["t5"] / name).read_bytes())
    message = load_error(directory)
    assert message.startswith(f"{directory}: tokenizer.json has a Unigram model")
    assert "spiece.model or tokenizer.model" in message


@pytest.mark.parametrize("name, edit, message", [
    # Llama 3, Qwen: byte-level BPE after a Split with their own regex.
    ("gpt2", lambda p: p.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated",
         "invert": False}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                            "use_regex": False}]}),
     "tokenizer.json: pre_tokenizer Sequence[Split, ByteLevel] is not supported"),
    ("gpt2", lambda p: p.update(normalizer={"type": "NFC"}),
     "tokenizer.json: normalizer 'NFC' is not supported"),
    ("bert-uncased", lambda p: p["normalizer"].update(clean_text=False),
     "tokenizer.json: normalizer 'BertNormalizer' is not supported"),
    ("roberta", lambda p: p["added_tokens"][-1].update(single_word=True),
     "added token '<mask>' with single_word True is not supported"),
    ("t5", lambda p: p.update(normalizer={"type": "NFKC"}),
     "tokenizer.json: normalizer 'NFKC' with pre_tokenizer Sequence[WhitespaceSplit, "
     "Metaspace] is not supported"),
])
def test_settings_that_cannot_be_reproduced_are_refused(references, tmp_path, name, edit,
                                                        message):
    assert message in load_error(edited(references, name, tmp_path, edit))


def test_kerasllm_packing_matches_a_plain_start_end_packer():
    tokenizer = WordPieceTokenizer(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "a", "b"],
                                   special_tokens={"start": "[CLS]", "end": "[SEP]",
                                                   "pad": "[PAD]"},
                                   add_start=True, add_end=True)
    ids, mask = start_end_packer(tokenizer, 6)(tokenizer(["a b", "b"]))
    np.testing.assert_array_equal(ids, [[1, 4, 5, 2, 3, 3], [1, 5, 2, 3, 3, 3]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
