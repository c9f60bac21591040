"""Segment-pair objectives: next-sentence prediction (BERT) and sentence-order
prediction (ALBERT).

Both turn each row of the pipeline, a piece of one document, into a pair
``[start] A [end] B [end]`` with ``segment_ids`` 0 over ``[start] A [end]`` and 1
over ``B [end]``, and classify the pair from the backbone's ``pooled_output``
(BERT's NSP head: one dense layer with two outputs on the pooled output).

- ``nsp``: A is the beginning of the row; half of the time B is its true
  continuation (label 0, IsNext), half of the time a piece of another document
  of the batch (label 1, NotNext).
- ``sop``: A and B are consecutive pieces of the row; half of the time they are
  swapped (label 1), which ALBERT found a harder, more useful task than NSP,
  whose negatives differ in topic as well as in coherence.

BERT splits at a sentence boundary; kerasllm's rows are tokens, so the split is
a word beginning drawn uniformly from the middle half of the row's content
(each part gets at least a quarter, so both carry context, and the two parts'
lengths are distributed alike, so length says nothing about the order). The
pairs are built in the tf.data pipeline from the batch's seed: a row gets a new
split and partner every time it is seen.

Combine with ``mlm`` (``objectives: [{name: nsp}, {name: mlm}]``, BERT's recipe):
the pairs are built first, then masked.

An exported model serves neither objective: a pretraining task, not an answer
anyone asks for, and its second text input would burden every request.
``serving_default`` gives the encoder's ``embedding`` (and ``mlm``'s fillers
when it is combined with it).
"""

import keras
import tensorflow as tf

import kerasllm
from kerasllm.heads import Head, weighted_cross_entropy
from kerasllm.masking import word_start_table
from kerasllm.tokenizers import special_tokens

# [start], the separator and the final [end]: the pair adds them around the
# row's content. The pipeline's rows can hold content alone (the middle of a
# long document carries neither start nor end token), so every row leaves room
# for all three: a pair never exceeds sequence_length and never drops a token.
PAIR_TOKENS = 3


class SegmentPairHead(Head):
    """The pair construction and the two-way classifier that ``nsp`` and ``sop`` share.

    Encoders with a pooler and at least two segments only. Rows whose content
    has fewer than two tokens (the end of a document cut just before its end
    token) cannot be split in two; they keep their content as A, get an empty
    B, and carry weight 0: the loss and accuracy ignore them.
    """

    requires_causal = False
    packs_documents = False  # each row a piece of one document: a pair's A and B
    builds_sequences = True

    def __init__(self, backbone, tokenizer, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        if backbone.num_segments < 2:
            raise ValueError(
                f"{self.name} gives its two segments segment ids 0 and 1; set "
                f"model.num_segments to 2 or more (got {backbone.num_segments})")
        if not backbone.pooler:
            raise ValueError(
                f"{self.name} predicts from the backbone's pooled_output; set model.pooler: true")
        tokens = special_tokens(tokenizer)
        if tokens.start is None or tokens.end is None:
            raise ValueError(
                f"{self.name} builds [start] A [end] B [end] and needs a tokenizer with a "
                f"start and an end token; {type(tokenizer).__name__} lacks one")
        self.start, self.end, self.pad = tokens.start, tokens.end, tokens.pad
        try:
            self.word_starts = word_start_table(tokenizer, backbone.vocabulary_size)
        except ValueError:  # a tokenizer that does not mark words: split anywhere
            self.word_starts = tf.ones([backbone.vocabulary_size], tf.bool)
        self.classifier = keras.layers.Dense(
            2, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="classifier")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name=f"{self.name}_accuracy")

    def row_length(self, sequence_length):
        if sequence_length < PAIR_TOKENS + 2:
            raise ValueError(
                f"{self.name} needs sequence_length >= {PAIR_TOKENS + 2} (two content tokens "
                f"and [start] A [end] B [end]), got {sequence_length}")
        return sequence_length - PAIR_TOKENS

    def build(self, sequence_output_shape):
        self.classifier.build((None, sequence_output_shape[-1]))

    # === Data ===

    def prepare(self, features, seed):
        token_ids = features["token_ids"]
        content = ((features["padding_mask"] > 0) & (token_ids != self.start)
                   & (token_ids != self.end))
        # Each row's content tokens first, in order (a stable sort keeps the order).
        order = tf.argsort(tf.cast(~content, tf.int32), axis=1, stable=True)
        pieces = tf.gather(token_ids, order, batch_dims=1)
        lengths = tf.reduce_sum(tf.cast(content, tf.int32), axis=1)
        split_seed, coin_seed, partner_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), 3))
        splits = split_points(pieces, lengths, tf.gather(self.word_starts, pieces),
                              split_seed)
        coin = tf.random.stateless_uniform(tf.shape(lengths), coin_seed, alg="philox") < 0.5
        first, second, labels, weights = self.segments(
            lengths, splits, coin & (lengths >= 2), features["document"], partner_seed)
        pair = pack_pair(pieces, first, second, self.start, self.end, self.pad)
        return {**features, **pair}, {"labels": labels, "weights": weights}

    def segments(self, lengths, splits, flip, documents, seed):
        """``(first, second, labels, weights)``; a segment is ``(row, offset,
        length)`` into the rows' content, each int32 ``(batch,)``."""
        raise NotImplementedError

    # === Model ===

    def call(self, backbone_outputs, inputs, training=False):
        return self.classifier(backbone_outputs["pooled_output"])

    def compute_loss(self, targets, predictions):
        return weighted_cross_entropy(targets["labels"], predictions, targets["weights"])

    def update_metrics(self, targets, predictions):
        self.accuracy.update_state(targets["labels"], predictions,
                                   sample_weight=targets["weights"])


class NextSentencePrediction(SegmentPairHead):
    """Next-sentence prediction (BERT): is B the continuation of A (label 0) or
    a piece of another document (label 1)? No options.

    A negative's B comes from a random row of the batch whose ``document``
    differs (BERT draws a random document of the corpus). It is cut to the
    length the true continuation would have had, starting at that row's own
    split point (moved back if the row is too short to fill it), so a
    negative's segments are as long as a positive's and B begins at a word
    drawn the same way in both: neither length nor B's start tells the label. The true
    continuation a negative replaces is not used in that pair; the row is
    paired afresh the next time it is seen (BERT put such sentences back into
    its stream; a transform of one batch cannot).

    When no other row of the batch comes from another document (a long
    document filling a whole unshuffled batch), a row drawn negative stays
    positive with weight 0: counting it would tilt the 50/50 label prior.
    Shuffle the rows (``data.shuffle_buffer``) so that batches mix documents.
    """

    def segments(self, lengths, splits, flip, documents, seed):
        batch = tf.shape(lengths)[0]
        rows = tf.range(batch)
        # A random other-document row with content to share: BERT's random document.
        candidate = (documents[None, :] != documents[:, None]) & (lengths[None, :] >= 2)
        score = tf.random.stateless_uniform([batch, batch], seed, alg="philox")
        partner = tf.argmin(tf.where(candidate, score, 2.0), axis=1, output_type=tf.int32)
        paired = tf.reduce_any(candidate, axis=1)
        negative = flip & paired
        partner_length = tf.gather(lengths, partner)
        length_b = tf.where(negative, tf.minimum(lengths - splits, partner_length),
                            lengths - splits)
        offset_b = tf.where(negative, tf.minimum(tf.gather(splits, partner),
                                                 partner_length - length_b), splits)
        first = (rows, tf.zeros_like(rows), splits)
        second = (tf.where(negative, partner, rows), offset_b, length_b)
        weights = tf.cast((lengths >= 2) & (paired | ~flip), tf.float32)
        return first, second, tf.cast(negative, tf.int32), weights


class SentenceOrderPrediction(SegmentPairHead):
    """Sentence-order prediction (ALBERT): are A and B, consecutive pieces of
    one row, in their order (label 0) or swapped (label 1)? No options."""

    def segments(self, lengths, splits, flip, documents, seed):
        rows = tf.range(tf.shape(lengths)[0])
        zeros = tf.zeros_like(rows)
        head = (rows, zeros, splits)
        tail = (rows, splits, lengths - splits)
        first = tuple(tf.where(flip, t, h) for h, t in zip(head, tail))
        second = tuple(tf.where(flip, h, t) for h, t in zip(head, tail))
        return first, second, tf.cast(flip, tf.int32), tf.cast(lengths >= 2, tf.float32)


def split_points(pieces, lengths, word_starts, seed):
    """Where each row's content splits into A and B: uniform over the word
    beginnings of its middle half (each part at least a quarter of the content,
    and at least one token), or over the whole middle half if no word begins
    there; rows of fewer than two tokens keep everything in A.

    BERT splits between sentences; splitting inside a word would give the order
    away (in SOP, a segment starting with ``##ing`` right after ``[start]`` is
    the swapped tail).
    """
    positions = tf.range(tf.shape(pieces)[1])[None, :]
    low = tf.maximum(1, lengths // 4)[:, None]
    middle = (positions >= low) & (positions <= lengths[:, None] - low)
    allowed = middle & word_starts
    allowed = tf.where(tf.reduce_any(allowed, axis=1, keepdims=True), allowed, middle)
    # The smallest of independent uniform scores falls on each allowed position alike.
    score = tf.random.stateless_uniform(tf.shape(pieces), seed, alg="philox")
    splits = tf.argmin(tf.where(allowed, score, 2.0), axis=1, output_type=tf.int32)
    return tf.where(lengths >= 2, splits, lengths)


def pack_pair(pieces, first, second, start, end, pad):
    """Rows ``[start] first [end] second [end] pad…`` of ``pieces``' length + 3.

    ``pieces``: ``(batch, n)`` content tokens, left-aligned; ``first`` and
    ``second``: ``(row, offset, length)`` segments of it whose lengths sum to
    ``n`` or less. Returns ``token_ids``, ``segment_ids`` (0 over ``[start]
    first [end]``, 1 over ``second [end]``, 0 for padding) and ``padding_mask``
    (1 over the pair, 0 for padding).
    """
    row_length = pieces.shape[1] if pieces.shape[1] is not None else tf.shape(pieces)[1]
    positions = tf.range(row_length + PAIR_TOKENS)[None, :]
    (row_a, offset_a, length_a), (row_b, offset_b, length_b) = [
        [part[:, None] for part in segment] for segment in (first, second)]
    in_a = (positions >= 1) & (positions <= length_a)
    separator = length_a + 1
    in_b = (positions > separator) & (positions <= separator + length_b)
    final = separator + length_b + 1
    source_row = tf.where(in_a, row_a, row_b)
    source_column = tf.where(in_a, offset_a + positions - 1, offset_b + positions - separator - 1)
    source_column = tf.clip_by_value(source_column, 0, tf.maximum(tf.shape(pieces)[1] - 1, 0))
    taken = tf.gather_nd(pieces, tf.stack(
        [tf.broadcast_to(source_row, tf.shape(source_column)), source_column], axis=-1))
    token_ids = tf.where(
        in_a | in_b, taken,
        tf.where(positions == 0, start,
                 tf.where((positions == separator) | (positions == final), end, pad)))
    return {
        "token_ids": tf.cast(token_ids, pieces.dtype),
        "segment_ids": tf.cast((positions > separator) & (positions <= final), tf.int32),
        "padding_mask": tf.cast(positions <= final, tf.int32),
    }


@kerasllm.hookimpl
def kerasllm_objectives():
    return {"nsp": NextSentencePrediction, "sop": SentenceOrderPrediction}
