"""The tokenizer of a Hugging Face checkpoint as a kerasllm tokenizer: :func:`load_hf_tokenizer`.

A directory written by ``transformers`` holds ``tokenizer.json`` (the ``tokenizers``
pipeline), ``tokenizer_config.json`` and ``special_tokens_map.json`` (special
tokens, flags), and, from older versions or the original upload, vocabulary
files: ``vocab.txt`` (WordPiece), ``vocab.json`` + ``merges.txt`` (byte-level BPE),
a SentencePiece ``.model``. The loader reads them, configures the matching layer
of :mod:`kerasllm.tokenizer_layers` so that packing one sequence gives the ids of
``tokenizer(text)["input_ids"]``, and raises :class:`~kerasllm.errors.ConfigError`
for any setting it cannot reproduce exactly. No network; ``transformers`` is not imported.

Where tokenizer.json is present it is followed: it is what ``tokenizers`` and
``transformers`` 4 run. ``transformers`` 5 rebuilds the pipelines of its BERT,
GPT-2, RoBERTa, T5 and Llama classes from tokenizer_config.json instead; for the
files it writes the two agree, but on a Llama checkpoint from ``transformers`` 4
(a "legacy" tokenizer.json that prepends ▁ to every segment) it puts ▁ only
before the text, and kerasllm keeps the file's behaviour, which the model was
trained with. Without tokenizer.json the loader builds what the ``transformers`` 5
class named in tokenizer_config.json builds from the vocabulary files.
"""

import base64
import json
import pathlib

from sentencepiece import sentencepiece_model_pb2

from kerasllm import tokenizer_layers
from kerasllm.errors import ConfigError

SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
# The special tokens of the transformers 5 classes when the config names none.
CLASS_DEFAULTS = {
    "BertTokenizer": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                      "cls_token": "[CLS]", "mask_token": "[MASK]"},
    "GPT2Tokenizer": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                      "eos_token": "<|endoftext|>"},
    "RobertaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
                         "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>",
                         "mask_token": "<mask>"},
    "T5Tokenizer": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
}
# config.json's model_type → the class AutoTokenizer takes when tokenizer_config.json names none.
MODEL_TYPES = {"bert": "BertTokenizer", "gpt2": "GPT2Tokenizer", "roberta": "RobertaTokenizer",
               "t5": "T5Tokenizer", "llama": "LlamaTokenizer"}
NO_FILES = ("no tokenizer files found (expected vocab.txt, vocab.json+merges.txt, "
            "tokenizer.json or a SentencePiece .model)")
# The 256 bytes as GPT-2's byte-level BPE writes them: printable ones as themselves,
# the others as the characters from U+0100 on.
_PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]
BYTE_CHARACTERS = ([chr(b) for b in _PRINTABLE]
                   + [chr(256 + i) for i in range(256 - len(_PRINTABLE))])


def load_hf_tokenizer(directory):
    """A kerasllm tokenizer that tokenizes as the Hugging Face tokenizer in ``directory``.

    Returns a :class:`~kerasllm.tokenizer_layers.WordPieceTokenizer` (BERT),
    :class:`~kerasllm.tokenizer_layers.BytePairTokenizer` (GPT-2, RoBERTa) or
    :class:`~kerasllm.tokenizer_layers.SentencePieceTokenizer` (T5, Llama; needs the
    ``.model`` file). Its ``add_start`` / ``add_end`` say what Hugging Face adds
    around a single sequence.
    """
    source = _Source(pathlib.Path(directory))
    pipeline = source.pipeline
    if pipeline is not None:
        model_type = pipeline["model"].get("type") or _model_type(pipeline["model"])
        if model_type == "WordPiece":
            return _wordpiece(source)
        if model_type == "BPE" and _is_byte_level(pipeline):
            return _byte_level_bpe(source)
        if model_type in ("BPE", "Unigram"):
            return _sentencepiece(source, model_type)
        raise source.error(f"tokenizer.json: model type {model_type!r} is not supported; "
                           "supported: WordPiece, BPE, Unigram")
    if (source.path / "vocab.txt").is_file():
        return _wordpiece(source)
    if (source.path / "vocab.json").is_file() and (source.path / "merges.txt").is_file():
        return _byte_level_bpe(source)
    if source.sentencepiece_file():
        return _sentencepiece(source, None)
    raise source.error(NO_FILES)


class _Source:
    """The files of one directory, and errors that name it."""

    def __init__(self, path):
        self.path = path
        if not path.is_dir():
            raise ConfigError(f"{path}: not a directory")
        self.pipeline = self.json("tokenizer.json")
        self.config = self.json("tokenizer_config.json") or {}
        self.special_map = self.json("special_tokens_map.json") or {}

    def json(self, name):
        file = self.path / name
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise self.error(f"{name} is not valid JSON: {error}") from None

    def error(self, message):
        return ConfigError(f"{self.path}: {message}")

    def unsupported(self, what, value, supported):
        return self.error(f"{what} {_describe(value)} is not supported (kerasllm cannot reproduce "
                          f"its ids exactly); supported: {supported}")

    def sentencepiece_file(self):
        for name in SENTENCEPIECE_FILES:
            if (self.path / name).is_file():
                return self.path / name
        return next(iter(sorted(self.path.glob("*.model"))), None)

    def class_name(self, default):
        """The ``transformers`` tokenizer class, as AutoTokenizer picks it."""
        name = self.config.get("tokenizer_class") or MODEL_TYPES.get(
            (self.json("config.json") or {}).get("model_type"))
        return (name or default or "").removesuffix("Fast")

    def named_tokens(self, class_name):
        """``{"bos_token": AddedToken dict, ...}``: tokenizer_config.json's, else
        special_tokens_map.json's, else the class's defaults."""
        named = {}
        for key in SPECIAL_KEYS:
            if key in self.config:
                value = self.config[key]
            else:
                value = self.special_map.get(key, CLASS_DEFAULTS.get(class_name, {}).get(key))
            if value is not None:
                named[key] = {"content": value} if isinstance(value, str) else value
        return named


def _describe(value):
    if isinstance(value, dict) and "type" in value:
        inner = value.get("normalizers") or value.get("pretokenizers") or value.get("processors")
        if inner:
            return f"{value['type']}[{', '.join(str(v.get('type')) for v in inner)}]"
        return repr(value["type"])
    return repr(value)


def _model_type(model):
    """The model type of a tokenizer.json written before the field existed."""
    if "merges" in model:
        return "BPE"
    if isinstance(model.get("vocab"), list):
        return "Unigram"
    if "continuing_subword_prefix" in model:
        return "WordPiece"
    return None


def _build(source, cls, **arguments):
    try:
        return cls(**arguments)
    except ValueError as error:
        raise source.error(str(error)) from None


# === Special and added tokens ===================================================


def _packing(source, ids, roles, default_template):
    """Roles with the tokens Hugging Face adds around one sequence, and (add_start, add_end).

    ``tokenizer.json``'s post-processor says what is added; without the file,
    ``default_template`` (start token or None, end token or None) is what the
    ``transformers`` class would set up.
    """
    processor = source.pipeline.get("post_processor") if source.pipeline else None
    if source.pipeline is not None:
        start, end = _template(source, processor, ids)
    else:
        start, end = default_template
    roles = {**roles, "start": start or roles.get("start"), "end": end or roles.get("end")}
    return roles, start is not None, end is not None


def _template(source, processor, ids):
    """(start token, end token) that a tokenizer.json post-processor puts around one sequence."""
    if processor is None or processor.get("type") == "ByteLevel":
        return None, None
    kind = processor.get("type")
    if kind in ("RobertaProcessing", "BertProcessing"):
        tokens = []
        for key in ("cls", "sep"):
            token, token_id = processor[key]
            _check_id(source, ids, token, token_id, f"post_processor.{key}")
            tokens.append(token)
        return tuple(tokens)
    if kind == "Sequence":
        found = [_template(source, p, ids) for p in processor.get("processors", [])]
        adding = [pair for pair in found if pair != (None, None)]
        if len(adding) > 1:
            raise source.unsupported("tokenizer.json: post_processor", processor,
                                     "one processor that adds tokens")
        return adding[0] if adding else (None, None)
    if kind != "TemplateProcessing":
        raise source.unsupported("tokenizer.json: post_processor", processor,
                                 "TemplateProcessing, RobertaProcessing, BertProcessing, ByteLevel")
    single = processor["single"]
    sequence = [i for i, item in enumerate(single) if "Sequence" in item]
    before, after = (single[:sequence[0]], single[sequence[0] + 1:]) if sequence else ([], [])
    if len(sequence) != 1 or len(before) > 1 or len(after) > 1:
        raise source.error("tokenizer.json: post_processor template "
                           f"{[next(iter(item.values()))['id'] for item in single]} is not "
                           "supported; supported: at most one special token before and one after "
                           "the sequence")
    return tuple(_template_token(source, processor, items, ids) for items in (before, after))


def _template_token(source, processor, items, ids):
    if not items:
        return None
    name = items[0]["SpecialToken"]["id"]
    special = processor["special_tokens"][name]
    if len(special["ids"]) != 1:
        raise source.error(f"tokenizer.json: post_processor token {name!r} is several ids "
                           f"{special['ids']}; supported: one")
    _check_id(source, ids, special["tokens"][0], special["ids"][0], "post_processor")
    return special["tokens"][0]


def _check_id(source, ids, token, token_id, where):
    if ids.get(token) != token_id:
        raise source.error(f"tokenizer.json: {where} gives {token!r} the id {token_id}, "
                           f"the vocabulary {ids.get(token)}")


def _roles(source, class_name, defaults=None):
    """Role → token from the named special tokens; ``defaults`` fills the roles not named."""
    named = {key: value["content"] for key, value in source.named_tokens(class_name).items()}
    roles = {"pad": named.get("pad_token"), "mask": named.get("mask_token"),
             "unknown": named.get("unk_token"),
             "start": named.get("cls_token") or named.get("bos_token"),
             "end": named.get("sep_token") or named.get("eos_token")}
    return {role: roles[role] or (defaults or {}).get(role) for role in roles}


def _class_template(source, class_name, roles):
    """(start, end) tokens the class adds around one sequence when tokenizer.json is absent."""
    if class_name in ("BertTokenizer", "RobertaTokenizer"):
        return roles["start"], roles["end"]
    if class_name == "T5Tokenizer":
        return None, roles["end"]
    # GPT2Tokenizer, LlamaTokenizer and the generic class: what the config asks for.
    return (roles["start"] if source.config.get("add_bos_token") else None,
            roles["end"] if source.config.get("add_eos_token") else None)


def _specials(source, class_name, ids, roles, has_normalizer, also=()):
    """The tokenizer's special-token arguments, and the added tokens beyond ``ids``
    (``{token: id}``, ids 0 … n-1) that extend its vocabulary."""
    added, beyond = _added_tokens(source, class_name, ids, has_normalizer,
                                  also=[*roles.values(), *also])
    ids = {**ids, **{token: len(ids) + i for i, token in enumerate(beyond)}}
    roles, add_start, add_end = _packing(source, ids, roles,
                                         _class_template(source, class_name, roles))
    return ({"special_tokens": roles, "add_start": add_start, "add_end": add_end,
             "added_tokens": added}, beyond)


def _check_defaults(source, model, **extra):
    """Refuse a BPE model of tokenizer.json with settings kerasllm does not run."""
    defaults = {"dropout": None, "ignore_merges": False, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, **extra}
    for key, default in defaults.items():
        if (model.get(key) or default) != default:
            raise source.unsupported(f"tokenizer.json: model.{key}", model[key], repr(default))


def _added_tokens(source, class_name, ids, has_normalizer, also=()):
    """The added tokens, and the ones beyond the vocabulary in id order.

    They come from tokenizer.json (else tokenizer_config.json's
    ``added_tokens_decoder``), then the special tokens that ``transformers`` adds
    when they are missing: the named ones, the extra ones, and ``also`` (the
    class's defaults).
    """
    if source.pipeline is not None:
        entries = [dict(token) for token in source.pipeline.get("added_tokens", [])]
    else:
        entries = [{**token, "id": int(i)} for i, token in
                   source.config.get("added_tokens_decoder", {}).items()]
    known = {entry["content"] for entry in entries}
    base_size = len(ids)
    next_id = max([base_size - 1] + [entry["id"] for entry in entries]) + 1
    extra = (source.config.get("extra_special_tokens")
             or source.config.get("additional_special_tokens") or [])
    for token in [*source.named_tokens(class_name).values(), *extra, *also]:
        token = {"content": token} if isinstance(token, str) else token
        if token is not None and token["content"] not in known:
            known.add(token["content"])
            token_id = ids.get(token["content"])
            if token_id is None:  # transformers appends it to the vocabulary
                token_id, next_id = next_id, next_id + 1
            entries.append({**token, "id": token_id})
    added, beyond = [], {}
    for entry in sorted(entries, key=lambda e: e["id"]):
        content = entry["content"]
        if entry.get("single_word"):
            raise source.unsupported(f"added token {content!r} with single_word", True, "False")
        if entry.get("normalized") and has_normalizer:
            raise source.error(f"added token {content!r} is matched after normalization "
                               "(normalized: true); supported: normalized: false")
        if content in ids:
            if ids[content] != entry["id"]:
                raise source.error(f"added token {content!r} has the id {entry['id']}, "
                                   f"the vocabulary {ids[content]}")
        else:
            beyond[entry["id"]] = content
        added.append({"content": content, "lstrip": bool(entry.get("lstrip")),
                      "rstrip": bool(entry.get("rstrip"))})
    if sorted(beyond) != list(range(base_size, base_size + len(beyond))):
        raise source.error(f"added tokens beyond the vocabulary have the ids {sorted(beyond)}; "
                           f"supported: {base_size}, {base_size + 1}, … in order")
    if source.config.get("split_special_tokens"):
        raise source.unsupported("tokenizer_config.json: split_special_tokens", True, "false")
    return added, [beyond[i] for i in sorted(beyond)]


def _ordered(source, vocab):
    """A ``{token: id}`` vocabulary as the list of its tokens, ids 0 … n-1."""
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise source.error("the vocabulary ids are not 0 … n-1, each used once")
    return tokens


# === WordPiece ====================================================================


def _wordpiece(source):
    pipeline = source.pipeline
    if pipeline is not None:
        model = pipeline["model"]
        vocabulary = _ordered(source, model["vocab"])
        normalizer = pipeline.get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer" or not normalizer.get("clean_text", True):
            raise source.unsupported("tokenizer.json: normalizer", normalizer or None,
                                     "BertNormalizer with clean_text")
        pre_tokenizer = pipeline.get("pre_tokenizer") or {}
        if pre_tokenizer.get("type") != "BertPreTokenizer":
            raise source.unsupported("tokenizer.json: pre_tokenizer", pre_tokenizer or None,
                                     "BertPreTokenizer")
        options = {"lowercase": normalizer.get("lowercase", True),
                   "strip_accents": normalizer.get("strip_accents"),
                   "split_on_cjk": normalizer.get("handle_chinese_chars", True),
                   "suffix_indicator": model.get("continuing_subword_prefix") or "##",
                   "max_input_chars_per_word": model.get("max_input_chars_per_word", 100)}
        unknown = model.get("unk_token", "[UNK]")
    else:
        lines = (source.path / "vocab.txt").read_text(encoding="utf-8").split("\n")
        vocabulary = lines[:-1] if lines[-1] == "" else lines
        if len(set(vocabulary)) != len(vocabulary):
            raise source.error("vocab.txt lists a token twice")
        config = source.config
        # BertTokenizer's defaults.
        options = {"lowercase": config.get("do_lower_case", True),
                   "strip_accents": config.get("strip_accents"),
                   "split_on_cjk": config.get("tokenize_chinese_chars", True)}
        unknown = None
    class_name = source.class_name("BertTokenizer")
    roles = _roles(source, class_name)
    roles["unknown"] = unknown or roles["unknown"] or "[UNK]"
    ids = {token: i for i, token in enumerate(vocabulary)}
    specials, beyond = _specials(source, class_name, ids, roles, has_normalizer=True)
    return _build(source, tokenizer_layers.WordPieceTokenizer, vocabulary=vocabulary + beyond,
                  **specials, **options)


# === Byte-level BPE ===============================================================


def _is_byte_level(pipeline):
    pre_tokenizer = pipeline.get("pre_tokenizer") or {}
    members = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    return any(member.get("type") == "ByteLevel" for member in members)


def _byte_level_bpe(source):
    pipeline = source.pipeline
    if pipeline is not None:
        model = pipeline["model"]
        if pipeline.get("normalizer") is not None:
            raise source.unsupported("tokenizer.json: normalizer", pipeline["normalizer"], "none")
        pre_tokenizer = pipeline["pre_tokenizer"]
        if pre_tokenizer.get("type") != "ByteLevel" or not pre_tokenizer.get("use_regex", True):
            raise source.unsupported("tokenizer.json: pre_tokenizer", pre_tokenizer,
                                     "ByteLevel with GPT-2's regex (use_regex: true)")
        _check_defaults(source, model, byte_fallback=False)
        vocab, merges = model["vocab"], model["merges"]
        add_prefix_space = pre_tokenizer.get("add_prefix_space", False)
    else:
        vocab = source.json("vocab.json")
        merges = [line for line in (source.path / "merges.txt").read_text(encoding="utf-8")
                  .split("\n") if line and not line.startswith("#version")]
        add_prefix_space = source.config.get("add_prefix_space", False)
    missing = [c for c in BYTE_CHARACTERS if c not in vocab]
    if missing:
        raise source.error(f"the vocabulary lacks the byte tokens {missing[:5]}…; "
                           "byte-level BPE needs all 256")
    vocabulary = _ordered(source, vocab)
    class_name = source.class_name("GPT2Tokenizer")
    specials, beyond = _specials(source, class_name, vocab, _roles(source, class_name),
                                 has_normalizer=False)
    return _build(source, tokenizer_layers.BytePairTokenizer, vocabulary=vocabulary + beyond,
                  merges=merges, add_prefix_space=add_prefix_space, **specials)


# === SentencePiece ================================================================

_TYPES = {"Unigram": sentencepiece_model_pb2.TrainerSpec.UNIGRAM,
          "BPE": sentencepiece_model_pb2.TrainerSpec.BPE}


def _sentencepiece(source, model_type):
    path = source.sentencepiece_file()
    if path is None:
        raise source.error(
            f"tokenizer.json has a {model_type} model, which kerasllm runs with sentencepiece: "
            "it needs the SentencePiece model (spiece.model or tokenizer.model). transformers 5's "
            "save_pretrained does not write it; copy it from the original checkpoint")
    proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    pieces = [piece.piece for piece in proto.pieces]
    ids = {piece: i for i, piece in enumerate(pieces)}
    if source.pipeline is not None:
        prepend_scheme = _check_pipeline(source, proto, pieces, model_type)
    else:
        prepend_scheme = _class_pipeline(source, proto)
    # T5: sentencepiece collapses the spaces that Hugging Face's WhitespaceSplit splits on.
    whitespace_split = proto.normalizer_spec.remove_extra_whitespaces
    spec = proto.trainer_spec
    class_name = source.class_name(None)
    roles = _roles(source, class_name, {role: pieces[i] for role, i in (
        ("unknown", spec.unk_id), ("start", spec.bos_id), ("end", spec.eos_id),
        ("pad", spec.pad_id)) if 0 <= i < len(pieces)})
    # T5Tokenizer's sentinels, ids after the model's, <extra_id_99> first.
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(source.config.get("extra_ids", 100)))]
    specials, _ = _specials(source, class_name, ids, roles,
                            has_normalizer=proto.normalizer_spec.name != "identity",
                            also=sentinels if class_name == "T5Tokenizer" else ())
    return _build(source, tokenizer_layers.SentencePieceTokenizer, proto=proto.SerializeToString(),
                  prepend_scheme=prepend_scheme, whitespace_split=whitespace_split, **specials)


def _check_pipeline(source, proto, pieces, model_type):
    """Set ``proto``'s normalizer to what tokenizer.json does; returns the prepend scheme.

    Supported, as ``transformers`` writes them: T5 (Precompiled normalizer,
    WhitespaceSplit + Metaspace always), Llama (no normalizer, Metaspace first
    without split) and legacy Llama (Prepend ▁ + Replace " " → ▁, no pre-tokenizer).
    """
    pipeline, spec, normalizer_spec = source.pipeline, proto.trainer_spec, proto.normalizer_spec
    model = pipeline["model"]
    if spec.model_type != _TYPES[model_type]:
        name = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type)
        raise source.error(f"tokenizer.json has a {model_type} model but the SentencePiece model "
                           f"is {name}")
    if model_type == "Unigram":
        vocab = [entry[0] for entry in model["vocab"]]
        same = vocab[:len(pieces)] == pieces and model.get("unk_id") == spec.unk_id
    else:
        same = all(model["vocab"].get(piece) == i for i, piece in enumerate(pieces))
        _check_defaults(source, model)
    if not same:
        raise source.error("tokenizer.json's vocabulary is not the SentencePiece model's")
    if bool(model.get("byte_fallback")) != spec.byte_fallback:
        raise source.error(f"tokenizer.json has byte_fallback {model.get('byte_fallback')}, "
                           f"the SentencePiece model {spec.byte_fallback}")
    normalizers = _members(pipeline.get("normalizer"), "normalizers")
    pre_tokenizers = _members(pipeline.get("pre_tokenizer"), "pretokenizers")
    kinds = [n["type"] for n in normalizers], [p["type"] for p in pre_tokenizers]
    if kinds[1] == ["WhitespaceSplit", "Metaspace"] and _prepend(pre_tokenizers[-1]) == "always" \
            and kinds[0] in ([], ["Precompiled"], ["Precompiled", "Replace"]) \
            and all(_collapses_spaces(n) for n in normalizers if n["type"] == "Replace"):
        # T5: sentencepiece collapses spaces and adds the ▁ itself.
        charsmap = [base64.b64decode(n["precompiled_charsmap"]) for n in normalizers
                    if n["type"] == "Precompiled"]
        if charsmap and charsmap[0] != normalizer_spec.precompiled_charsmap:
            raise source.error("tokenizer.json's Precompiled normalizer is not the "
                               "SentencePiece model's")
        if not charsmap:
            _identity(normalizer_spec)
        normalizer_spec.add_dummy_prefix = True
        normalizer_spec.remove_extra_whitespaces = True
        return "never"
    _identity(normalizer_spec)
    normalizer_spec.remove_extra_whitespaces = False
    if kinds == ([], ["Metaspace"]) and not pre_tokenizers[0].get("split", True) \
            and _prepend(pre_tokenizers[0]) in ("first", "always", "never"):
        normalizer_spec.add_dummy_prefix = False
        return _prepend(pre_tokenizers[0])
    if kinds == (["Prepend", "Replace"], []) and normalizers[0]["prepend"] == "▁" \
            and (normalizers[1]["pattern"], normalizers[1]["content"]) == ({"String": " "}, "▁"):
        normalizer_spec.add_dummy_prefix = True  # legacy Llama: ▁ before every segment
        return "never"
    raise source.error(
        f"tokenizer.json: normalizer {_describe(pipeline.get('normalizer'))} with pre_tokenizer "
        f"{_describe(pipeline.get('pre_tokenizer'))} is not supported (kerasllm cannot reproduce "
        "its ids exactly); supported: T5's (Precompiled; WhitespaceSplit + Metaspace always), "
        "Llama's (none; Metaspace first, no split), legacy Llama's (Prepend ▁ + Replace; none)")


def _class_pipeline(source, proto):
    """What ``transformers`` 5 builds from the .model alone, for T5 and Llama."""
    name = source.class_name(None)
    if name == "T5Tokenizer":
        proto.normalizer_spec.add_dummy_prefix = True
        proto.normalizer_spec.remove_extra_whitespaces = True
        return "never"
    if name == "LlamaTokenizer":
        _identity(proto.normalizer_spec)
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.add_dummy_prefix = False
        if not source.config.get("add_prefix_space", True):
            return "never"
        return "always" if source.config.get("legacy") else "first"
    raise source.error(f"tokenizer_class {name!r} with only a SentencePiece model: kerasllm "
                       "knows how T5Tokenizer and LlamaTokenizer convert it; add the "
                       "checkpoint's tokenizer.json")


def _collapses_spaces(replace):
    """Replace(" {2,}", " "): what T5's older tokenizer.json adds to the Precompiled normalizer."""
    return replace.get("pattern") == {"Regex": " {2,}"} and replace.get("content") == " "


def _members(component, key):
    if component is None:
        return []
    return component.get(key, [component]) if component.get("type") == "Sequence" else [component]


def _prepend(metaspace):
    if "prepend_scheme" in metaspace:
        return metaspace["prepend_scheme"]
    return "always" if metaspace.get("add_prefix_space", True) else "never"


def _identity(normalizer_spec):
    normalizer_spec.name = "identity"
    normalizer_spec.precompiled_charsmap = b""
