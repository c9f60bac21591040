"""From raw labelled examples to fixed-length rows: the pieces task heads share.

- ``encode_segments``: one or more text fields (a sentence pair) → ``[CLS] A
  [SEP] B [SEP]`` rows with ``segment_ids``, as keras-hub's packers build them.
  Texts too long for the row are truncated round-robin: the longer segment loses
  a token first (keras-hub's ``MultiSegmentPacker``), the end tokens stay.
- ``split_words`` and ``word_pieces``: text → words with character offsets →
  each word's sub-word tokens, for heads that label or point at words (token
  classification, extractive QA). Words are tokenized one by one, as Hugging
  Face's ``is_split_into_words``.
- ``label_vocabulary``, ``label_options`` and ``label_encoder``: label vocabularies,
  checked, built from the training data and saved with the model as the head's
  ``labels`` option, and names turned into ids in the pipeline.
"""

import keras_hub
import numpy as np
import tensorflow as tf

from kerasllm.data import TOKENIZE_BATCH, start_end_packer
from kerasllm.tokenizers import special_tokens

# A word is a run of letters, digits and marks, or one punctuation or symbol
# character (BERT's basic tokenizer splits punctuation off the same way).
WORD_DELIMITERS = r"\s+|[\p{P}\p{S}]"
KEPT_DELIMITERS = r"[\p{P}\p{S}]"


def encode_segments(examples, tokenizer, sequence_length, keys=("text", "text_pair")):
    """Rows of packed text segments: ``token_ids``, ``padding_mask``, ``segment_ids``.

    ``keys`` present in the examples are the segments, in order (``text_pair``
    is optional); the examples' other fields are kept, the segments' strings not.
    """
    present = [key for key in keys if key in examples.element_spec]
    if not present:
        raise ValueError(f"the examples have none of the text fields {', '.join(keys)}; "
                         f"they have: {', '.join(examples.element_spec)}")
    keys = present
    pack = segment_packer(tokenizer, sequence_length, len(keys))

    def encode(batch):
        packed = pack([tokenizer(batch[key]) for key in keys])
        return {**{k: v for k, v in batch.items() if k not in keys}, **packed}

    return examples.ragged_batch(TOKENIZE_BATCH).map(
        encode, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def pack_texts(batch, tokenizer, sequence_length, keys=("text", "text_pair")):
    """A batch of strings (``text`` and, if present, ``text_pair``) → packed rows,
    as :func:`encode_segments` packs them; in graph, for exported models."""
    keys = [key for key in keys if key in batch]
    pack = segment_packer(tokenizer, sequence_length, len(keys))
    return pack([tokenizer(batch[key]) for key in keys])


def require_fields(examples, keys, what):
    """ValueError unless the examples have every field of ``keys``; ``what`` names
    whose examples they are (``question_answering``)."""
    fields = examples.element_spec
    missing = [key for key in keys if key not in fields]
    if missing:
        raise ValueError(f"{what} examples need the fields {', '.join(keys)}; they lack "
                         f"{', '.join(missing)} (they have: {', '.join(fields)})")


def segment_packer(tokenizer, sequence_length, count):
    """A function packing ``count`` ragged batches of token ids into a dict of
    ``token_ids``, ``padding_mask`` and ``segment_ids``, each ``(batch, sequence_length)``."""
    if count == 1:
        packer = start_end_packer(tokenizer, sequence_length)

        def pack_one(segments):
            token_ids, padding_mask = packer(segments[0])
            return {"token_ids": token_ids, "padding_mask": tf.cast(padding_mask, tf.int32),
                    "segment_ids": tf.zeros_like(token_ids)}
        return pack_one
    tokens = special_tokens(tokenizer)
    # Decoders without a start token (GPT-2) begin and separate pairs with their end token.
    start = tokens.start if tokens.start is not None else tokens.end
    ids_packer = keras_hub.layers.MultiSegmentPacker(
        sequence_length, start_value=start, end_value=tokens.end, pad_value=tokens.pad)
    # The same packing of ones gives the padding mask, which pad == end (GPT-2)
    # would hide in the ids.
    mask_packer = keras_hub.layers.MultiSegmentPacker(
        sequence_length, start_value=1, end_value=1, pad_value=0)

    def pack_many(segments):
        segments = [tf.cast(segment, tf.int32) for segment in segments]
        token_ids, segment_ids = ids_packer(tuple(segments))
        padding_mask, _ = mask_packer(tuple(tf.ones_like(segment) for segment in segments))
        return {"token_ids": token_ids, "padding_mask": tf.cast(padding_mask, tf.int32),
                "segment_ids": tf.cast(segment_ids, tf.int32)}
    return pack_many


def split_words(texts):
    """Words of a batch of strings with their character offsets.

    Returns ``(words, starts, ends)``, ragged ``(batch, words)``; offsets count
    Unicode characters (Python ``str`` indices), ``ends`` exclusive.
    """
    import tensorflow_text as tf_text

    words, starts, ends = tf_text.regex_split_with_offsets(
        texts, WORD_DELIMITERS, KEPT_DELIMITERS)
    # Byte offsets → character offsets: each character's first byte, then the
    # text's length, searched per row.
    character_bytes = tf.strings.length(tf.strings.unicode_split(texts, "UTF-8"))
    first_bytes = tf.concat([tf.zeros_like(character_bytes[:, :1]),
                             tf.cumsum(character_bytes, axis=1)], axis=1)
    first_bytes = tf.cast(first_bytes.to_tensor(default_value=tf.int32.max), tf.int64)

    def characters(offsets):
        found = tf.searchsorted(first_bytes, offsets.to_tensor(default_value=0))
        return tf.RaggedTensor.from_tensor(tf.cast(found, tf.int32),
                                           lengths=offsets.row_lengths())

    return words, characters(starts), characters(ends)


def word_pieces(tokenizer, words):
    """Sub-word token ids of each word: ragged ``(batch, words)`` strings →
    ragged ``(batch, words, pieces)`` int32."""
    pieces = tokenizer(words.flat_values)
    if not isinstance(pieces, tf.RaggedTensor):
        pieces = tf.RaggedTensor.from_tensor(pieces)
    return words.with_flat_values(tf.cast(pieces, tf.int32))


def label_vocabulary(labels, count, count_option, noun):
    """``(labels, count)`` of a head's ``labels`` option (names in id order, or
    None) and its count option (``num_classes``, ``num_labels``; default: the
    number of names), checked; ``noun`` names one label in messages (class, tag).
    Raises ValueError for duplicate names, a count that disagrees with them, or
    neither given."""
    if labels is not None:
        if not isinstance(labels, list) or len(set(map(str, labels))) != len(labels):
            raise ValueError(f"labels must be a list of distinct {noun} names, got {labels!r}")
        labels = [str(label) for label in labels]
        if count is None:
            count = len(labels)
        elif count != len(labels):
            raise ValueError(f"{count_option} ({count}) differs from the number of labels "
                             f"({len(labels)}); give one of them")
    if count is None:
        raise ValueError(f"give {count_option}, or labels (the {noun} names)")
    if not isinstance(count, int) or count < 2:
        raise ValueError(f"{count_option} must be an integer >= 2, got {count!r}")
    return labels, count


def collect_labels(examples, key="label"):
    """The distinct values of ``key`` in the training examples (lists flattened):
    sorted strings for label names, else sorted ints."""
    values = set()
    for value in examples.map(lambda example: example[key]).as_numpy_iterator():
        values.update(np.atleast_1d(value).tolist())
    if not values:
        raise ValueError(f"the training examples hold no {key!r}")
    if all(isinstance(value, bytes) for value in values):
        return sorted(value.decode("utf-8") for value in values)
    return sorted(int(value) for value in values)


def label_options(examples, options, key, count_option):
    """A labelling head's options completed from its training examples' ``key``:
    ``labels`` when the values are names, else ``count_option`` (the largest id
    + 1) unless given; unchanged when ``labels`` is given or the examples lack ``key``."""
    if "labels" in options or key not in examples.element_spec:
        return options
    found = collect_labels(examples, key)
    if isinstance(found[0], str):
        return {**options, "labels": found}
    return {count_option: max(max(found) + 1, 2), **options}


def label_encoder(labels, key="label"):
    """A function mapping label values (names or ids, any shape, ragged too) to
    int32 ids. With ``labels`` (the vocabulary, a list of names), names are
    looked up, and an unknown one fails the pipeline naming it; without, the
    values must be ids already. Call it eagerly: it makes the lookup table."""
    table = None
    if labels and isinstance(labels[0], str):
        table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(labels), tf.range(len(labels), dtype=tf.int32)), -1)

    def lookup(names):
        ids = table.lookup(names)
        check = tf.debugging.Assert(tf.reduce_all(ids >= 0), [
            # No quotes: TensorFlow escapes them in the error message.
            f"a {key} is not one of the labels of this head ({', '.join(labels)}); "
            "give the head its full `labels` list. Unknown:",
            tf.boolean_mask(tf.reshape(names, [-1]), tf.reshape(ids < 0, [-1]))], summarize=5)
        with tf.control_dependencies([check]):
            return tf.identity(ids)

    def encode(values):
        if values.dtype != tf.string:
            return tf.cast(values, tf.int32)
        if table is None:
            raise ValueError(f"{key!r} holds names, but the head has no label vocabulary; "
                             "give its `labels` option, or let `kerasllm finetune` build it")
        if isinstance(values, tf.RaggedTensor):
            return tf.ragged.map_flat_values(lookup, values)
        return lookup(values)

    return encode
