"""SentencePiece (T5, Llama) tokenizer: trained with the sentencepiece library, run in graph."""

import io
import pathlib

import sentencepiece
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

import kerasllm
from kerasllm.tokenizer_layers import SentencePieceTokenizer
from kerasllm.tokenizers import (
    DEFAULT_SPECIAL_TOKENS,
    find_reserved_tokens,
    reserved_tokens,
    text_iterator,
)

MODEL_TYPES = ("unigram", "bpe")
MODEL_FILE = "sentencepiece.model"
# sentencepiece skips longer lines (its default is 4,192 bytes, less than a long paragraph).
MAX_LINE_BYTES = 1 << 16
# sentencepiece's control pieces by their trainer names, with kerasllm's roles.
_CONTROL = {"pad": "pad", "bos": "start", "eos": "end", "unk": "unknown"}
_TYPE_NAMES = {sentencepiece_model_pb2.TrainerSpec.UNIGRAM: "unigram",
               sentencepiece_model_pb2.TrainerSpec.BPE: "bpe"}


class SentencePiece(kerasllm.TokenizerFactory):
    """A :class:`kerasllm.tokenizer_layers.SentencePieceTokenizer` that packs ``<s> … </s>``.

    The model's pieces begin ``<pad> <s> </s> <unk> <mask>``, then the sentinels
    ``<extra_id_0>`` …; ``<mask>`` and the sentinels are user-defined pieces, which
    sentencepiece finds whole in the text. ``lowercase`` trains with the
    case-folding normalization rule ``nmt_nfkc_cf`` (else ``nmt_nfkc``): the model
    file itself lowercases, in TensorFlow as in any sentencepiece. ``save`` writes
    ``sentencepiece.model``; ``load`` reads a directory holding one ``.model``
    file, or the file itself.

    Tokenization gives the library's ids (``SentencePieceProcessor.encode``), with
    one exception in Unigram models: a run that splits into pieces of equal total
    score in several ways (``0|000`` or ``000|0``) after a text's first word. The
    library breaks such ties by float32 rounding of its running total over the
    whole text; the layer segments word by word (else it could not reuse a word's
    segmentation) and takes the earliest start. Measured on a 1,000-piece model:
    0 of 5,017 held-out docstring lines differ, about 15% of synthetic runs
    (``"x = 0000 00000"``).
    """

    @classmethod
    def train(cls, texts, vocabulary_size, lowercase, sentinels=0, model_type="unigram",
              character_coverage=0.9995, byte_fallback=False, split_digits=False,
              input_sentence_size=0):
        """Train on ``texts`` line by line; the model has exactly ``vocabulary_size`` pieces.

        Args:
            model_type: ``unigram`` (T5) or ``bpe`` (Llama).
            character_coverage: the share of the text's characters that get a
                piece; the rarest others are unknown. 1.0 for small alphabets.
            byte_fallback: the UTF-8 bytes of unknown characters as pieces
                instead of ``<unk>`` (Llama); takes 256 pieces of the vocabulary.
            split_digits: every digit a piece of its own (Llama).
            input_sentence_size: train on a random sample of this many lines
                (sentencepiece holds them all in memory); 0: every line.
        """
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, "
                             f"got {model_type!r}")
        tokens = DEFAULT_SPECIAL_TOKENS
        reserved = reserved_tokens(tokens, sentinels)
        control = [tokens[role] for role in _CONTROL.values()]
        model = io.BytesIO()
        try:
            # Ids as reserved_tokens lays them out: the control pieces, then the
            # user-defined ones (mask, sentinels) that the library finds in any text.
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=_lines(texts), model_writer=model,
                vocab_size=vocabulary_size, model_type=model_type,
                normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
                **{f"{name}_id": reserved.index(tokens[role]) for name, role in _CONTROL.items()},
                **{f"{name}_piece": tokens[role] for name, role in _CONTROL.items()},
                user_defined_symbols=[t for t in reserved if t not in control],
                character_coverage=character_coverage, byte_fallback=byte_fallback,
                split_digits=split_digits, input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True, max_sentence_length=MAX_LINE_BYTES, minloglevel=2)
        except RuntimeError as error:  # the trainer's checks (sizes, coverage) fail as this
            raise ValueError(f"sentencepiece cannot train a {model_type} model of "
                             f"{vocabulary_size} pieces on this text: {error}") from None
        return _tokenizer(model.getvalue(), f"the trained {model_type} model")

    @classmethod
    def load(cls, path, lowercase):
        """Load ``path``: a ``.model`` file, or a directory holding one. ``lowercase``
        must be what the model's normalizer does: it cannot change after training."""
        file = _model_file(pathlib.Path(path))
        try:
            proto = sentencepiece_model_pb2.ModelProto.FromString(file.read_bytes())
        except DecodeError:
            raise ValueError(f"{file} is not a SentencePiece model") from None
        if proto.trainer_spec.model_type not in _TYPE_NAMES:
            kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
            raise ValueError(f"{file} is a {kind} model; supported: {', '.join(MODEL_TYPES)}")
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        lowercases = processor.normalize("HELLO") == processor.normalize("hello")
        if lowercases != lowercase:
            does = "lowercases" if lowercases else "does not lowercase"
            raise ValueError(f"{file}: the model's normalizer ({proto.normalizer_spec.name}) {does} "
                             f"text; set tokenizer.lowercase: {str(lowercases).lower()}")
        return _tokenizer(proto.SerializeToString(), str(file))

    @classmethod
    def save(cls, tokenizer, directory):
        (pathlib.Path(directory) / MODEL_FILE).write_bytes(tokenizer.proto)


def _lines(texts):
    # sentencepiece learns from lines (no piece spans one), and skips over-long ones.
    for text in text_iterator(texts):
        yield from (line for line in text.splitlines() if line.strip())


def _model_file(path):
    if not path.is_dir():
        if not path.is_file():
            raise ValueError(f"sentencepiece: {path} not found")
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    models = sorted(path.glob("*.model"))
    if len(models) != 1:
        raise ValueError(f"sentencepiece: {path} holds {len(models) or 'no'} .model files "
                         f"{[m.name for m in models] if models else ''}; give the model file, "
                         "or the directory that training saved")
    return models[0]


def _tokenizer(proto, where):
    pieces = [piece.piece for piece in sentencepiece_model_pb2.ModelProto.FromString(proto).pieces]
    find_reserved_tokens(pieces, DEFAULT_SPECIAL_TOKENS, where)
    # The library's segmentation (float32 path scores), not Hugging Face's: ids as
    # SentencePieceProcessor gives them for the model file this plugin writes.
    return SentencePieceTokenizer(proto, special_tokens=DEFAULT_SPECIAL_TOKENS, add_start=True,
                                  add_end=True, segmentation="sentencepiece")


@kerasllm.hookimpl
def kerasllm_tokenizers():
    return {"sentencepiece": SentencePiece}
