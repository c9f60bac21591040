"""Hugging Face reference tokenizers trained on the built-in corpus: no downloads.

Each reference is a checkpoint directory as ``transformers`` 5 writes it
(``save_pretrained``: tokenizer.json + tokenizer_config.json) or as older
checkpoints hold it (vocabulary files + tokenizer_config.json), with the
``transformers`` tokenizer loaded from it. SentencePiece directories also get the
``.model`` file, as checkpoints on the Hub have it (``transformers`` 5 does not
write it). Vocabularies are small (2,000) so that training takes seconds.
"""

import json
import pathlib
import shutil

from kerasllm_plugins.builtin import pydoc_topics, stdlib_docstrings

VOCABULARY_SIZE = 2000
BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "<pad>", "</s>", "<unk>", "<mask>"]
# Strings the corpus lacks: accents, CJK, emoji, whitespace of every kind, NUL,
# special-token strings, an over-long word, runs that tie in Unigram scoring.
HARD_STRINGS = [
    "Héllo wörld, café naïve Ångström ÅΣΑΣ ß İstanbul ǅ ﬁ ² ½ …",
    "日本語のテキスト 中文字符 한국어",
    "emoji 😀🎉 and newer ones 🥲🫠",
    "tab\there  two  spaces   three\n\nnew lines\r\nend",
    "  leading spaces", "trailing spaces  ", " ", "",
    "don't can't I'M we'LL it's 'quoted'",
    "12345 3.14159 1,000,000 0x1F 1e-10 000000 ======== 800080",
    "\u00a0no-break\u3000ideographic\u2028line\x0bvertical\x85next\u200bzero-width\ufeffbom",
    "a\x00b\ufffdc",
    "[CLS] [MASK] x[SEP]y [mask] <s> </s>x <unk> <pad> <mask> a  <mask>  b <|endoftext|>",
    "<extra_id_0> hello<extra_id_1>world",
    "▁x ▁ y",
    "x" * 150,
    "१२३ ६ a६",
]


def corpus_lines():
    """The corpus' non-blank lines, pydoc topics then docstrings."""
    return [line for document in pydoc_topics() + stdlib_docstrings()
            for line in document.splitlines() if line.strip()]


def build_references(root, corpus):
    """{name: directory} for every reference; ``corpus`` is a text file to train on."""
    root = pathlib.Path(root)
    directories = {}
    for lowercase, name in ((True, "bert-uncased"), (False, "bert-cased")):
        directories.update(_bert(root, corpus, lowercase, name))
    directories.update(_byte_level_bpe(root, corpus))
    directories.update(_t5(root, corpus))
    directories.update(_llama(root, corpus))
    return directories


def reference(directory):
    """The ``transformers`` tokenizer of a directory."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory)


def _folder(root, name, config, **files):
    folder = root / name
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for file_name, source in files.items():
        shutil.copy(source, folder / file_name.replace("_", "."))
    return folder


def _saved(root, name, folder, sentencepiece=None):
    """``folder`` loaded by ``transformers`` and saved again, as ``save_pretrained`` writes it."""
    saved = root / name
    reference(folder).save_pretrained(saved)
    if sentencepiece:
        shutil.copy(folder / sentencepiece, saved / sentencepiece)
    return saved


def _bert(root, corpus, lowercase, name):
    import tokenizers

    trainer = tokenizers.BertWordPieceTokenizer(lowercase=lowercase)
    trainer.train([str(corpus)], vocab_size=VOCABULARY_SIZE)
    trainer.save_model(str(root), name)
    files = _folder(root, f"{name}-vocab", {"tokenizer_class": "BertTokenizer",
                                            "do_lower_case": lowercase},
                    vocab_txt=root / f"{name}-vocab.txt")
    return {f"{name}-vocab": files, name: _saved(root, name, files)}


def _byte_level_bpe(root, corpus):
    import tokenizers

    trainer = tokenizers.ByteLevelBPETokenizer()
    trainer.train([str(corpus)], vocab_size=VOCABULARY_SIZE, special_tokens=BPE_SPECIAL_TOKENS)
    trainer.save_model(str(root), "bpe")
    vocabulary = {"vocab_json": root / "bpe-vocab.json", "merges_txt": root / "bpe-merges.txt"}
    gpt2 = _folder(root, "gpt2-vocab", {"tokenizer_class": "GPT2Tokenizer"}, **vocabulary)
    # RoBERTa's <mask> takes the space before it, as roberta-base's does.
    mask = {"__type": "AddedToken", "content": "<mask>", "lstrip": True, "rstrip": False,
            "normalized": False, "single_word": False, "special": True}
    roberta = _folder(root, "roberta-vocab", {"tokenizer_class": "RobertaTokenizer",
                                              "mask_token": mask}, **vocabulary)
    return {"gpt2-vocab": gpt2, "gpt2": _saved(root, "gpt2", gpt2),
            "roberta-vocab": roberta, "roberta": _saved(root, "roberta", roberta)}


def _sentencepiece(root, corpus, name, **options):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / name), vocab_size=VOCABULARY_SIZE,
        input_sentence_size=20000, shuffle_input_sentence=True, minloglevel=2, **options)
    return root / f"{name}.model"


def _t5(root, corpus):
    # T5's special ids: <pad> 0, </s> 1, <unk> 2, no <s>.
    model = _sentencepiece(root, corpus, "t5", model_type="unigram", pad_id=0, eos_id=1,
                           unk_id=2, bos_id=-1)
    files = _folder(root, "t5-model", {"tokenizer_class": "T5Tokenizer"}, spiece_model=model)
    return {"t5-model": files, "t5": _saved(root, "t5", files, "spiece.model")}


def _llama(root, corpus):
    # Llama's trainer settings: no normalization, spaces kept, byte fallback, digits split.
    model = _sentencepiece(root, corpus, "llama", model_type="bpe",
                           normalization_rule_name="identity", remove_extra_whitespaces=False,
                           byte_fallback=True, split_digits=True)
    files = _folder(root, "llama-model", {"tokenizer_class": "LlamaTokenizer",
                                          "add_bos_token": True}, tokenizer_model=model)
    saved = _saved(root, "llama", files, "tokenizer.model")
    # Llama checkpoints from transformers 4 ("legacy"): ▁ before every segment by the
    # normalizer. transformers 5's LlamaTokenizer rebuilds its own pipeline; the
    # generic class runs the file's, as the tokenizers library does.
    legacy = root / "llama-legacy"
    shutil.copytree(saved, legacy)
    pipeline = json.loads((legacy / "tokenizer.json").read_text())
    pipeline["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    pipeline["pre_tokenizer"] = None
    (legacy / "tokenizer.json").write_text(json.dumps(pipeline))
    config = json.loads((legacy / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (legacy / "tokenizer_config.json").write_text(json.dumps(config))
    return {"llama-model": files, "llama": saved, "llama-legacy": legacy}
