"""Three tokenizer layers that reproduce Hugging Face tokenizers id for id.

They subclass keras-hub's and keep its tokenization (tf-text's WordPiece,
keras-hub's byte-pair merges, the sentencepiece library). What they add is the
Hugging Face behaviour around it that keras-hub does not reproduce exactly:

- added tokens (``[MASK]``, ``<s>``, ...) are found in the raw text first and never split;
- BERT's normalization: control characters dropped, Unicode lower-casing (not NFKC
  case folding), words of more than 100 characters (not bytes) unknown;
- GPT-2's pre-tokenization regex, whose look-ahead RE2 cannot express;
- Unigram ties broken as ``tokenizers`` does (float64 path scores, earliest start).

Every call runs the TensorFlow graph path, eager calls included, so tf.data,
``tf.function`` and eager calls give the same ids. ``get_config`` holds the whole
vocabulary: a saved model needs no asset files.
"""


import base64

import keras
import keras_hub
import tensorflow as tf
import tensorflow_text as tf_text
from keras_hub.src.tokenizers.word_piece_tokenizer import pretokenize
from keras_hub.src.utils.tensor_utils import (
    convert_to_ragged_batch,
    preprocessing_function,
)
from sentencepiece import sentencepiece_model_pb2

# === What the three tokenizers share ==========================================

ROLES = ("pad", "start", "end", "mask", "unknown")
# Unicode White_Space, as Rust's `char::is_whitespace` and Oniguruma's `\s` (which
# Hugging Face tokenizers use) define it; RE2's `\s` is ASCII only.
WHITESPACE_CHARACTERS = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
                         + "\u2028\u2029\u202f\u205f\u3000")
WHITESPACE = "".join(f"\\x{{{ord(c):X}}}" for c in WHITESPACE_CHARACTERS)  # for an RE2 [class]
_LAYER_KEYS = ("name", "trainable", "dtype", "config_file")


class _KerasLLMTokenizer:
    """Special-token roles, packing flags and added tokens; the tokenize frame.

    A subclass implements ``_encode(texts, first)``: ragged ids for a batch of
    text segments that hold no added token; ``first`` marks the segments that
    start their text.
    """

    def _set_special_tokens(self, special_tokens, add_start, add_end, added_tokens):
        special_tokens = {role: token for role, token in (special_tokens or {}).items()
                          if token is not None}
        unknown = sorted(set(special_tokens) - set(ROLES))
        if unknown:
            raise ValueError(f"special_tokens: unknown roles {unknown}; known: {', '.join(ROLES)}")
        for flag, role in ((add_start, "start"), (add_end, "end")):
            if flag and role not in special_tokens:
                raise ValueError(f"add_{role}=True needs a '{role}' token in special_tokens")
        self.role_tokens = special_tokens
        for role in ROLES:
            if role in special_tokens:
                # keras-hub resolves the id once the vocabulary is set and raises
                # a ValueError naming the token if it is missing.
                self._add_special_token(special_tokens[role], f"{role}_token")
            else:
                setattr(self, f"{role}_token", None)
                setattr(self, f"{role}_token_id", None)
        self.add_start = bool(add_start)
        self.add_end = bool(add_end)
        self.added_tokens = [
            {"content": token} if isinstance(token, str) else
            {"content": token["content"], "lstrip": bool(token.get("lstrip")),
             "rstrip": bool(token.get("rstrip"))}
            for token in added_tokens or ()
        ]

    def _build_added_tokens(self):
        """The regex that finds added tokens in raw text, and their ids."""
        self._added_pattern = None
        if not self.added_tokens:
            return
        vocabulary = set(self.get_vocabulary())
        missing = [t["content"] for t in self.added_tokens if t["content"] not in vocabulary]
        if missing:
            raise ValueError(f"added tokens {missing} are not in the vocabulary")
        # Hugging Face matches the longest token first; RE2 takes the first alternative.
        tokens = sorted(self.added_tokens, key=lambda t: -len(t["content"]))
        self._added_pattern = "|".join(
            ("[" + WHITESPACE + "]*" if t.get("lstrip") else "") + _re2_literal(t["content"])
            + ("[" + WHITESPACE + "]*" if t.get("rstrip") else "")
            for t in tokens
        )
        contents = [t["content"] for t in tokens]
        self._added_ids = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                contents, tf.constant([self.token_to_id(c) for c in contents], tf.int32)),
            default_value=-1)

    def _added_token_ids(self, segments):
        """Each segment's id if it is an added token (with the whitespace it strips), else -1."""
        ids = self._added_ids.lookup(segments)
        stripped = tf.strings.regex_replace(segments, f"^[{WHITESPACE}]+|[{WHITESPACE}]+$", "")
        return tf.where(ids >= 0, ids, self._added_ids.lookup(stripped))

    def tokenize(self, inputs):
        """Ids of a string (a dense vector) or a batch of strings (a ragged matrix)."""
        inputs = tf.convert_to_tensor(inputs)
        if inputs.shape.rank not in (0, 1):
            raise ValueError(f"{type(self).__name__} takes a string or a batch of strings "
                             f"(rank 0 or 1), got rank {inputs.shape.rank}")
        if tf.executing_eagerly():
            # The graph path, compiled once: eager calls give the same ids as tf.data.
            if getattr(self, "_tokenize_function", None) is None:
                self._tokenize_function = tf.function(
                    self._tokenize_graph, input_signature=[tf.TensorSpec([None], tf.string)])
            tokens = self._tokenize_function(tf.reshape(inputs, [-1]))
        else:
            tokens = self._tokenize_graph(tf.reshape(inputs, [-1]))
        return tokens[0] if inputs.shape.rank == 0 else tokens

    @preprocessing_function
    def _tokenize_graph(self, texts):
        if self._added_pattern is None:
            tokens = self._encode(texts, tf.ones_like(texts, tf.bool))
        else:
            segments = _regex_split(texts, self._added_pattern)
            flat = segments.flat_values
            ids = self._added_token_ids(flat)
            is_added = ids >= 0
            first = _row_positions(segments) == 0
            encoded = self._encode(tf.where(is_added, "", flat), first)
            added = tf.RaggedTensor.from_row_lengths(tf.boolean_mask(ids, is_added),
                                                     tf.cast(is_added, tf.int64))
            tokens = segments.with_flat_values(tf.concat([added, encoded], axis=1))
            tokens = tokens.merge_dims(1, 2)
        return tokens

    def detokenize(self, inputs):
        return self._detokenize_tf(inputs)

    # The config holds the vocabulary: no asset files in a saved model.
    def save_assets(self, dir_path):
        pass

    def load_assets(self, dir_path):
        pass

    def get_config(self):
        config = {key: value for key, value in super().get_config().items() if key in _LAYER_KEYS}
        added = [token["content"] if not (token.get("lstrip") or token.get("rstrip")) else token
                 for token in self.added_tokens]
        return {**config, "special_tokens": dict(self.role_tokens), "add_start": self.add_start,
                "add_end": self.add_end, "added_tokens": added}


def _re2_literal(text):
    """``text`` as an RE2 pattern that matches it literally."""
    return "".join(c if c.isalnum() or ord(c) > 127 else f"\\x{{{ord(c):X}}}" for c in text)


def _regex_split(texts, pattern):
    """Split each string of a vector around the matches of ``pattern``, keeping them.

    tf-text's regex_split stops at the first NUL byte. Texts with one are split as
    a copy with NUL as \\x01 (both are "other" characters to every pattern here),
    the pieces then cut from the original.
    """
    def split_around_nul():
        safe = tf.strings.regex_replace(texts, r"\x00", "\x01")
        pieces, begin, end = tf_text.regex_split_with_offsets(safe, pattern, pattern)
        whole = tf.gather(texts, pieces.value_rowids())
        return pieces.with_flat_values(tf.strings.substr(
            whole, begin.flat_values, end.flat_values - begin.flat_values))

    has_nul = tf.reduce_any(tf.strings.regex_full_match(texts, r"(?s).*\x00.*"))
    return tf.cond(has_nul, split_around_nul,
                   lambda: tf_text.regex_split(texts, pattern, pattern))


def _previous(values, first):
    """Each element's predecessor in the flat vector; ``first`` for the first element."""
    return tf.concat([[first], values], axis=0)[:-1]


def _row_positions(ragged):
    """Each value's position within its row."""
    return tf.range(tf.size(ragged.flat_values, out_type=tf.int64)) - tf.gather(
        ragged.row_starts(), ragged.value_rowids())


# === WordPiece (BERT) ==========================================================

# BertNormalizer(clean_text=True) drops NUL, U+FFFD and control characters (Unicode
# category C except unassigned, with tab, newline and carriage return counted as
# whitespace) and turns whitespace into spaces.
_BERT_DROPPED = r"[\x00\x{FFFD}]|[^\P{C}\t\n\r]"


def bert_normalize(texts, lowercase, strip_accents):
    """Hugging Face's ``BertNormalizer`` in TensorFlow (Chinese characters are split later)."""
    texts = tf.strings.regex_replace(texts, _BERT_DROPPED, "")
    texts = tf.strings.regex_replace(texts, f"[{WHITESPACE}]", " ")
    if strip_accents:
        texts = tf.strings.regex_replace(tf_text.normalize_utf8(texts, "NFD"), r"\p{Mn}", "")
    if lowercase:
        texts = hf_lowercase(texts)
    return texts


def hf_lowercase(texts):
    """Hugging Face's lower-casing (``BertNormalizer``, ``Lowercase``) of a vector of strings."""
    def lower(texts):
        # Per character, as Rust's `char::to_lowercase`: ICU would make a word-final
        # capital sigma final (ς), Hugging Face does not.
        return tf.strings.lower(tf.strings.regex_replace(texts, "Σ", "σ"), encoding="utf-8")

    def lower_around_nul():
        # tf.strings.lower ends its output at the first NUL: lower the pieces between them.
        pieces = tf.strings.split(texts, "\x00")
        last = _row_positions(pieces) == tf.gather(pieces.row_lengths(), pieces.value_rowids()) - 1
        lowered = lower(pieces.flat_values)
        lowered = tf.where(last, lowered, tf.strings.join([lowered, "\x00"]))
        return tf.strings.reduce_join(pieces.with_flat_values(lowered), axis=-1)

    has_nul = tf.reduce_any(tf.strings.regex_full_match(texts, r"(?s).*\x00.*"))
    return tf.cond(has_nul, lower_around_nul, lambda: lower(texts))


@keras.saving.register_keras_serializable(package="kerasllm")
class WordPieceTokenizer(_KerasLLMTokenizer, keras_hub.tokenizers.WordPieceTokenizer):
    """WordPiece as BERT's Hugging Face tokenizer runs it.

    Args:
        vocabulary: list of tokens; a token's id is its index.
        lowercase: lower-case the text (BERT uncased).
        strip_accents: remove accents; ``None``: as ``lowercase`` (Hugging Face's default).
        split_on_cjk: put spaces around Chinese characters (``tokenize_chinese_chars``).
        suffix_indicator: prefix of word-continuing pieces.
        max_input_chars_per_word: longer words become the unknown token.
        special_tokens: dict role → token for the roles ``pad``, ``start``,
            ``end``, ``mask`` and ``unknown`` (default ``[UNK]``); absent roles
            have ``<role>_token_id`` ``None``.
        add_start, add_end: whether a packed sequence begins with the start token
            and ends with the end token.
        added_tokens: tokens found whole in the raw text before normalization, as
            Hugging Face's added tokens: strings, or dicts with ``content`` and
            ``lstrip`` / ``rstrip`` (the token swallows the whitespace on that side).

    Examples:
    >>> tokenizer = WordPieceTokenizer(
    ...     ["[UNK]", "[CLS]", "[SEP]", "the", "qu", "##ick", "fox"], lowercase=True,
    ...     special_tokens={"start": "[CLS]", "end": "[SEP]"}, add_start=True, add_end=True)
    >>> tokenizer("The quick fox").numpy().tolist()
    [3, 4, 5, 6]
    >>> tokenizer.start_token_id, tokenizer.end_token_id
    (1, 2)
    """

    def __init__(self, vocabulary=None, lowercase=False, strip_accents=None, split_on_cjk=True,
                 suffix_indicator="##", max_input_chars_per_word=100, special_tokens=None,
                 add_start=False, add_end=False, added_tokens=None, **kwargs):
        special_tokens = {"unknown": "[UNK]", **(special_tokens or {})}
        self.max_input_chars_per_word = max_input_chars_per_word
        self._set_special_tokens(special_tokens, add_start, add_end, added_tokens)
        super().__init__(vocabulary=vocabulary, split_on_cjk=split_on_cjk,
                         suffix_indicator=suffix_indicator, oov_token=special_tokens["unknown"],
                         **kwargs)
        # Applied by bert_normalize, not by keras-hub's NFKC case folding.
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self._build_added_tokens()

    def _set_vocabulary_tf(self):
        # The character limit is applied in `_encode`; tf-text counts bytes (UTF-8: at
        # most 4 a character).
        self._fast_word_piece = tf_text.FastWordpieceTokenizer(
            vocab=self.vocabulary, token_out_type=self.compute_dtype,
            suffix_indicator=self.suffix_indicator, unknown_token=self.oov_token,
            max_bytes_per_word=4 * self.max_input_chars_per_word,
            no_pretokenization=True, support_detokenization=True)

    def _encode(self, texts, first):
        self._maybe_initialized_tf()
        texts = bert_normalize(texts, self.lowercase, self.strip_accents)
        words = pretokenize(texts, lowercase=False, strip_accents=False, split=True,
                            split_on_cjk=self.split_on_cjk)
        length = tf.strings.length(words.flat_values, unit="UTF8_CHAR")
        too_long = length > self.max_input_chars_per_word
        # The unknown token is a whole word of the vocabulary, so WordPiece maps it to itself.
        words = words.with_flat_values(tf.where(too_long, self.oov_token, words.flat_values))
        return self._fast_word_piece.tokenize(words).merge_dims(-2, -1)

    def get_config(self):
        return {**super().get_config(), "vocabulary": list(self.vocabulary),
                "lowercase": self.lowercase, "strip_accents": self.strip_accents,
                "split_on_cjk": self.split_on_cjk, "suffix_indicator": self.suffix_indicator,
                "max_input_chars_per_word": self.max_input_chars_per_word}


# === Byte-level BPE (GPT-2, RoBERTa) ===========================================

_NOT_WHITESPACE = f"[^{WHITESPACE}]"
# GPT-2's regex without its last two alternatives (`\s+(?!\S)|\s+`): applied to
# pieces that hold no whitespace except one leading space.
_GPT2_WORD = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"
              rf"| ?[^{WHITESPACE}\p{{L}}\p{{N}}]+")


def gpt2_pretokenize(texts):
    """GPT-2's pre-tokenization, exactly: ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+|
    ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``.

    RE2 has no look-ahead, so whitespace is placed first: in a run of whitespace
    followed by text, the last character goes with the text if it is a space
    (`` ?\\p{L}+`` takes it) and stands alone otherwise, and the rest of the run is
    one piece (``\\s+(?!\\S)``); a run that ends the text is one piece. keras-hub's
    approximation differs on trailing runs and deletes the character it uses as a
    marker (६) from the text.
    """
    runs = _regex_split(texts, f"[{WHITESPACE}]+|{_NOT_WHITESPACE}+")
    flat = runs.flat_values
    is_last = _row_positions(runs) == tf.gather(runs.row_lengths(), runs.value_rowids()) - 1
    splits = tf.strings.regex_full_match(flat, f"[{WHITESPACE}]+") & ~is_last
    length = tf.strings.length(flat, unit="UTF8_CHAR")
    head = tf.strings.substr(flat, tf.zeros_like(length), length - 1, unit="UTF8_CHAR")
    tail = tf.strings.substr(flat, length - 1, tf.ones_like(length), unit="UTF8_CHAR")
    joins = splits & (tail == " ")
    joined = _previous(joins, False)  # the run before is in the same row
    before = tf.where(splits, head, tf.where(joined, tf.strings.join([" ", flat]), flat))
    after = tf.where(splits & ~joins, tail, "")
    pieces = tf.RaggedTensor.from_row_lengths(tf.reshape(tf.stack([before, after], axis=1), [-1]),
                                              2 * runs.row_lengths())
    pieces = tf.ragged.boolean_mask(pieces, pieces != "")
    words = _regex_split(pieces.flat_values, _GPT2_WORD)
    return pieces.with_flat_values(words).merge_dims(-2, -1)


@keras.saving.register_keras_serializable(package="kerasllm")
class BytePairTokenizer(_KerasLLMTokenizer, keras_hub.tokenizers.BytePairTokenizer):
    """Byte-level BPE as GPT-2's and RoBERTa's Hugging Face tokenizers run it.

    Args:
        vocabulary: dict token → id (ids 0 … n-1), or a list of tokens in id order.
        merges: merge rules in priority order, ``"a b"`` strings or ``[a, b]`` pairs.
        add_prefix_space: put a space before each text (and each text segment
            between added tokens) that does not start with one.
        lowercase: lower-case each text segment between added tokens first, as
            Hugging Face's ``Lowercase`` normalizer does.
        special_tokens, add_start, add_end, added_tokens: as for :class:`WordPieceTokenizer`
            (no ``unknown`` is needed: every byte is in the vocabulary).

    Examples:
    >>> merges = ["Ġ t", "h e", "Ġt he"]
    >>> vocabulary = ["<|endoftext|>", "t", "h", "e", "Ġ", "Ġt", "he", "Ġthe"]
    >>> tokenizer = BytePairTokenizer(vocabulary, merges,
    ...                               special_tokens={"end": "<|endoftext|>"})
    >>> tokenizer("he the").numpy().tolist()
    [6, 7]
    >>> tokenizer.detokenize([6, 7])
    'he the'
    """

    def __init__(self, vocabulary=None, merges=None, add_prefix_space=False, special_tokens=None,
                 add_start=False, add_end=False, added_tokens=None, lowercase=False, **kwargs):
        if isinstance(vocabulary, (list, tuple)):
            vocabulary = {token: i for i, token in enumerate(vocabulary)}
        if vocabulary is not None and sorted(vocabulary.values()) != list(range(len(vocabulary))):
            raise ValueError("vocabulary ids must be 0 … n-1, each used once")
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges or ()]
        self._set_special_tokens(special_tokens, add_start, add_end, added_tokens)
        self.lowercase = lowercase
        kwargs.setdefault("_allow_python_workflow", False)  # no `tokenizers` copy: never used
        super().__init__(vocabulary, merges, add_prefix_space=add_prefix_space,
                         unsplittable_tokens=[], **kwargs)
        self._build_added_tokens()

    def get_vocabulary(self):
        return sorted(self.vocabulary, key=self.vocabulary.get)

    def _encode(self, texts, first):
        self._maybe_initialized_tf()
        if self.lowercase:
            texts = hf_lowercase(texts)
        if self.add_prefix_space:
            keep = (texts == "") | (tf.strings.substr(texts, 0, 1) == " ")
            texts = tf.where(keep, texts, tf.strings.join([" ", texts]))
        words = gpt2_pretokenize(texts)
        # keras-hub's byte-pair merges, through its cache of merged words.
        flat = words.flat_values
        cached = self.cache.lookup(flat)

        def merge_unseen():
            # keras-hub merges all words in lock step until the longest is done: short
            # words apart from long ones (each once) take a fraction of the time.
            unseen = tf.unique(tf.boolean_mask(flat, cached == "")).y
            short = tf.strings.length(unseen) <= 12

            def merge(group):
                self._bpe_merge_and_update_cache_tf(tf.boolean_mask(unseen, short == (group == 0)))
                return group + 1

            with tf.control_dependencies([tf.while_loop(lambda group: group < 2, merge, [0])[0]]):
                return self.cache.lookup(flat)

        merged = tf.cond(tf.reduce_any(cached == ""), merge_unseen, lambda: cached)
        ids = self.token_to_id_map.lookup(tf.strings.split(merged, sep=" "))
        return words.with_flat_values(ids).merge_dims(-2, -1)

    def get_config(self):
        return {**super().get_config(), "vocabulary": self.get_vocabulary(),
                "merges": list(self.merges), "add_prefix_space": self.add_prefix_space,
                "lowercase": self.lowercase}


# === SentencePiece (T5, Llama) =================================================

_KEPT_TYPES = (sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN,
               sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL,
               sentencepiece_model_pb2.ModelProto.SentencePiece.BYTE)
_UNK_PENALTY = 10.0  # tokenizers' Unigram: the unknown token scores min(scores) - 10
_SCORE_TYPES = {"tokenizers": tf.float64, "sentencepiece": tf.float32}  # Unigram path scores


@keras.saving.register_keras_serializable(package="kerasllm")
class SentencePieceTokenizer(_KerasLLMTokenizer, keras_hub.tokenizers.SentencePieceTokenizer):
    """A SentencePiece model as Hugging Face's T5 and Llama tokenizers run it.

    The sentencepiece library normalizes and segments. For Unigram models the
    segmentation is then redone as ``tokenizers`` does it: the library sums scores
    in float32 and so breaks ties between equal-scoring segmentations (``0|00`` and
    ``00|0``) by rounding; ``tokenizers`` sums in float64 and takes the earliest start.

    Args:
        proto: the serialized ``ModelProto`` (bytes, or base64 text as ``get_config`` stores it).
        prepend_scheme: ``"first"``: put a space before the text unless it starts
            with one (or with ▁); ``"always"``: so too after each added token;
            ``"never"``. Hugging Face's Metaspace pre-tokenizer does this for
            models whose own ``add_dummy_prefix`` is off (Llama).
        whitespace_split: split on every Unicode whitespace character that the
            model's normalizer keeps, as Hugging Face's WhitespaceSplit does after
            normalizing (T5): such characters become spaces, which the model collapses.
        special_tokens, add_start, add_end, added_tokens: as for :class:`WordPieceTokenizer`.
            Added tokens that are not pieces of the model get the ids after the
            model's, in the order given (T5's ``<extra_id_…>``).
        segmentation: whose Unigram segmentation to reproduce: ``"tokenizers"``
            (Hugging Face's: float64 path scores) or ``"sentencepiece"`` (the
            library's: float32 path scores). Both take the earliest start among
            equal scores; the op of tensorflow-text, an older sentencepiece, does not.
    """

    def __init__(self, proto=None, prepend_scheme="never", whitespace_split=False,
                 special_tokens=None, add_start=False, add_end=False, added_tokens=None,
                 segmentation="tokenizers", **kwargs):
        if prepend_scheme not in ("never", "first", "always"):
            raise ValueError("prepend_scheme must be never, first or always, "
                             f"got {prepend_scheme!r}")
        if segmentation not in _SCORE_TYPES:
            raise ValueError(f"segmentation must be tokenizers or sentencepiece, "
                             f"got {segmentation!r}")
        self.segmentation = segmentation
        if isinstance(proto, str):
            proto = base64.b64decode(proto)
        model = sentencepiece_model_pb2.ModelProto.FromString(proto)
        pieces = {piece.piece for piece in model.pieces}
        self.prepend_scheme = prepend_scheme
        self.whitespace_split = whitespace_split
        self._set_special_tokens(special_tokens, add_start, add_end, added_tokens)
        self._extra_tokens = [t["content"] for t in self.added_tokens if t["content"] not in pieces]
        kwargs.setdefault("_allow_python_workflow", False)
        super().__init__(proto=proto, **kwargs)
        self._build_added_tokens()
        normalize = self._sentence_piece_spm.normalize
        self._kept_whitespace = "".join(
            f"\\x{{{ord(c):X}}}" for c in WHITESPACE_CHARACTERS
            if whitespace_split and set(normalize(f"a{c}b")) & set(WHITESPACE_CHARACTERS))
        self._unigram = model.trainer_spec.model_type == model.trainer_spec.UNIGRAM
        if self._unigram:
            self._build_unigram(model)

    # The vocabulary: the model's pieces, then the added tokens it lacks.

    def vocabulary_size(self):
        return super().vocabulary_size() + len(self._extra_tokens)

    def get_vocabulary(self):
        return super().get_vocabulary() + self._extra_tokens

    def token_to_id(self, token):
        if token in self._extra_tokens:
            return super().vocabulary_size() + self._extra_tokens.index(token)
        return super().token_to_id(token)

    def id_to_token(self, id):
        return self.get_vocabulary()[id]

    def _encode(self, texts, first):
        self._maybe_initialized_tf()
        if self._kept_whitespace:
            texts = tf.strings.regex_replace(texts, f"[{self._kept_whitespace}]", " ")
        if self.prepend_scheme != "never":
            initial = tf.strings.substr(texts, 0, 1, unit="UTF8_CHAR")
            prefix = (texts != "") & (initial != " ") & (initial != "▁")
            if self.prepend_scheme == "first":
                prefix &= first
            texts = tf.where(prefix, tf.strings.join([" ", texts]), texts)
        ids = self._sentence_piece.tokenize(texts)
        return self._resegment(ids) if self._unigram else ids

    # Unigram: the segmentation of `tokenizers`.

    def _build_unigram(self, model):
        normal = [(i, p.piece) for i, p in enumerate(model.pieces) if p.type not in _KEPT_TYPES]
        self._piece_ids = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer([p for _, p in normal],
                                                tf.constant([i for i, _ in normal], tf.int32)),
            default_value=-1)
        scores = [p.score for p in model.pieces] + [0.0] * len(self._extra_tokens)
        dtype = _SCORE_TYPES[self.segmentation]
        self._scores = tf.constant(scores, dtype)
        self._unknown_score = tf.constant(min(scores) - _UNK_PENALTY, dtype)
        self._kept = tf.constant([p.type in _KEPT_TYPES for p in model.pieces])
        self._max_piece_length = max(len(p) for _, p in normal)
        self._unknown_id = model.trainer_spec.unk_id

    def _resegment(self, ids):
        """Split the library's segmentation into words (a piece starting with ▁, an
        unknown or byte piece alone) and segment each word again."""
        flat = ids.flat_values
        pieces = self._sentence_piece.id_to_string(flat)
        kept = tf.gather(self._kept, flat)
        new_word = ((tf.strings.substr(pieces, 0, 1, unit="UTF8_CHAR") == "▁") | kept
                    | _previous(kept, False) | (_row_positions(ids) == 0))
        word = tf.cumsum(tf.cast(new_word, tf.int32)) - 1
        count = tf.reduce_sum(tf.cast(new_word, tf.int32))
        kept_id = tf.math.unsorted_segment_max(tf.where(kept, flat, -1), word, count)
        text = tf.strings.unsorted_segment_join(pieces, word, count)
        # Each distinct word once: text repeats its words.
        distinct, index = tf.unique(tf.where(kept_id >= 0, "", text))
        segmented = tf.gather(self._viterbi(distinct), index)
        kept_rows = tf.RaggedTensor.from_row_lengths(tf.boolean_mask(kept_id, kept_id >= 0),
                                                     tf.cast(kept_id >= 0, tf.int64))
        words = tf.concat([kept_rows, segmented], axis=1)
        words_per_row = tf.reduce_sum(ids.with_flat_values(tf.cast(new_word, tf.int64)), axis=1)
        return tf.RaggedTensor.from_row_lengths(words, words_per_row).merge_dims(1, 2)

    def _viterbi(self, words):
        """The best segmentation of each word, ties to the earliest start (tokenizers' Unigram)."""
        chars = tf.strings.unicode_split(words, "UTF-8")
        lengths = tf.cast(chars.row_lengths(), tf.int32)
        # Longest words first: the words still being extended at step t are a prefix.
        order = tf.argsort(lengths, direction="DESCENDING", stable=True)
        lengths = tf.gather(lengths, order)
        chars = tf.gather(chars, order)
        starts = tf.cast(chars.row_starts(), tf.int32)
        letters = chars.flat_values
        size = tf.size(letters)
        room = tf.gather(lengths, tf.cast(chars.value_rowids(), tf.int32)) - tf.cast(
            _row_positions(chars), tf.int32)  # characters left in the word from each position
        # Candidates by start character and length: piece ids (-1: none) and scores.
        piece_ids, text = [], letters
        for length in range(1, self._max_piece_length + 1):
            if length > 1:
                text = tf.strings.join([text[:-1], letters[length - 1:]])
            found = self._piece_ids.lookup(text)
            found = tf.pad(found, [[0, size - tf.size(found)]], constant_values=-1)
            piece_ids.append(tf.where(room >= length, found, -1))
        piece_ids = tf.stack(piece_ids, axis=1)
        scores = tf.where(piece_ids >= 0, tf.gather(self._scores, tf.maximum(piece_ids, 0)),
                          tf.constant(-float("inf"), self._scores.dtype))
        # A character that is no piece by itself can always be the unknown token.
        no_single = piece_ids[:, 0] < 0
        piece_ids = tf.concat([tf.where(no_single, self._unknown_id, piece_ids[:, 0])[:, None],
                               piece_ids[:, 1:]], axis=1)
        scores = tf.concat([tf.where(no_single, self._unknown_score, scores[:, 0])[:, None],
                            scores[:, 1:]], axis=1)
        num_words = tf.size(lengths)
        longest = tf.reduce_max(tf.concat([lengths, [0]], axis=0))
        span = tf.range(1, self._max_piece_length + 1)

        def forward(t, best, chosen):
            active = tf.reduce_sum(tf.cast(lengths >= t, tf.int32))
            begin = t - span  # where each candidate piece starts
            previous = tf.stack([
                best.read(tf.maximum(b, 0))[:active] for b in tf.unstack(begin)], axis=1)
            index = tf.maximum(starts[:active, None] + begin[None, :], 0)
            lengths_index = tf.broadcast_to(span - 1, tf.shape(index))
            score = tf.gather_nd(scores, tf.stack([index, lengths_index], -1))
            total = tf.where(begin[None, :] >= 0, previous + score, -float("inf"))
            # Ties go to the earliest start, i.e. the longest piece: reversed, the first maximum.
            length = self._max_piece_length - tf.cast(tf.argmax(total[:, ::-1], axis=1), tf.int32)
            return t + 1, best.write(t, tf.reduce_max(total, axis=1)), chosen.write(t, length)

        best = tf.TensorArray(self._scores.dtype, size=longest + 1, element_shape=[None],
                              infer_shape=False)
        chosen = tf.TensorArray(tf.int32, size=longest + 1, element_shape=[None], infer_shape=False)
        _, _, chosen = tf.while_loop(
            lambda t, *_: t <= longest, forward,
            (1, best.write(0, tf.zeros([num_words], self._scores.dtype)),
             chosen.write(0, tf.zeros([num_words], tf.int32))))
        # Back from each word's end; chosen step t holds the words of length >= t.
        active = tf.reduce_sum(
            tf.cast(lengths[None, :] >= tf.range(longest + 1)[:, None], tf.int32), axis=1)
        offsets = tf.cumsum(active, exclusive=True)
        chosen = chosen.concat()
        rows = tf.range(num_words)

        def backward(position, emitted):
            live = position > 0
            length = tf.gather(chosen, tf.gather(offsets, position) + rows)
            begin = position - length
            # Finished words read a valid place, then drop what they read.
            where = tf.stack([tf.minimum(starts + begin, size - 1), tf.maximum(length - 1, 0)], -1)
            piece = tf.gather_nd(piece_ids, where)
            emitted = emitted.write(emitted.size(), tf.where(live, piece, -1))
            return tf.where(live, begin, position), emitted

        _, emitted = tf.while_loop(
            lambda position, _: tf.reduce_any(position > 0), backward,
            (lengths, tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None],
                                     infer_shape=False).write(0, tf.fill([num_words], -1))))
        emitted = tf.transpose(emitted.stack())[:, ::-1]  # each word's pieces, in order
        segmented = tf.ragged.boolean_mask(emitted, emitted >= 0)
        # Consecutive unknown characters are one unknown token (tokenizers' fuse_unk).
        flat = segmented.flat_values
        unknown = flat == self._unknown_id
        repeated = unknown & _previous(unknown, False) & (_row_positions(segmented) > 0)
        segmented = tf.ragged.boolean_mask(segmented, segmented.with_flat_values(~repeated))
        return tf.gather(segmented, tf.argsort(order))

    @preprocessing_function
    def _detokenize_tf(self, inputs):
        self._maybe_initialized_tf()
        ids, unbatched, _ = convert_to_ragged_batch(inputs)
        ids = tf.cast(ids, tf.int32)
        base = super().vocabulary_size()
        if not self._extra_tokens:
            text = self._sentence_piece.detokenize(ids)
        else:
            # Added tokens outside the model decode to themselves, the runs between them
            # through the library.
            flat = ids.flat_values
            extra = flat >= base
            run = tf.cumsum(tf.cast(extra | _previous(extra, True) | (_row_positions(ids) == 0),
                                   tf.int32)) - 1
            count = tf.reduce_max(tf.concat([run, [-1]], 0)) + 1
            decoded = self._sentence_piece.detokenize(tf.RaggedTensor.from_value_rowids(
                tf.boolean_mask(flat, ~extra), tf.boolean_mask(run, ~extra), nrows=count))
            extra_id = tf.math.unsorted_segment_max(tf.where(extra, flat - base, -1), run, count)
            names = tf.gather(tf.constant(self._extra_tokens), tf.maximum(extra_id, 0))
            row = tf.cast(ids.value_rowids(), tf.int32)
            run_row = tf.math.unsorted_segment_max(row, run, count)
            text = tf.strings.unsorted_segment_join(
                tf.where(extra_id >= 0, names, decoded), run_row, tf.cast(ids.nrows(), tf.int32))
        if self.prepend_scheme != "never":
            text = tf.strings.regex_replace(text, "^ ", "")  # the space `_encode` put first
        return tf.squeeze(text, 0) if unbatched else text

    def get_config(self):
        return {**super().get_config(), "proto": base64.b64encode(self.proto).decode("ascii"),
                "prepend_scheme": self.prepend_scheme, "whitespace_split": self.whitespace_split,
                "segmentation": self.segmentation}
