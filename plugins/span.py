"""Span corruption (T5): drop random spans of a row, predict them after sentinels.

Raffel et al. 2020 (§3.1.4, §3.3.4) corrupt ``noise_density`` (15%) of the
tokens of each row in spans of mean length ``mean_span_length`` (3), replace
each span by one sentinel and train the model to emit the dropped spans, each
after its sentinel::

    row:      Thank you for inviting me to your party last week .
    inputs:   Thank you <extra_id_0> me to your party <extra_id_1> week . </s>
    targets:  <extra_id_0> for inviting <extra_id_1> last </s>

The noise mask is T5's ``random_spans_noise_mask`` (t5/data/preprocessors.py):
``round(n * noise_density)`` noise tokens, ``round(noise / mean_span_length)``
spans; the noise tokens and the other tokens are each cut into that many
non-empty spans at uniformly random places, and the spans alternate, other
tokens first, so a row starts with kept tokens and ends with a noise span.
The draws are stateless, from the batch's seed.

Rows are packed as in T5, which concatenates documents (``reduce_concat_tokens``)
before cutting them into chunks: a row holds several documents, each closed by
the tokenizer's end token (or opened by its start token), and spans may cross a
boundary. The corrupted sequences are one attention segment each, as in T5.

Two layouts, chosen from ``model.kind``:

- ``encoder_decoder`` (T5): the encoder reads the inputs, the decoder reads the
  targets shifted right behind the pad token (T5's ``decoder_start_token_id``)
  and predicts the targets.
- ``prefix_lm`` (decoder-only, T5's "prefix LM" baseline in §3.2): one sequence
  ``inputs targets``; the loss covers the targets only. The inputs are a prefix
  that attends both ways (``padding_mask`` -1 there), the targets attend
  causally, as T5's prefix LM.
"""

import keras
import tensorflow as tf

import kerasllm
from kerasllm.heads import TokenPredictionHead
from kerasllm.tokenizers import SENTINEL_TOKEN, sentinel_ids, special_tokens

VARIANTS = ("encoder_decoder", "prefix_lm")


class SpanCorruption(TokenPredictionHead):
    """T5's span corruption; its own loss: cross-entropy on the target tokens.

    A row of ``row_length(sequence_length)`` tokens becomes inputs of at most
    ``sequence_length`` tokens (T5's ``random_spans_helper``: 568 raw tokens for
    512 inputs and 114 targets at the defaults). The tokenizer needs a sentinel
    (``<extra_id_0>``, ``<extra_id_1>``, …) per span of the longest row:
    ``tokenizer.sentinels`` in the config.

    Args:
        noise_density: fraction of each row's tokens that are dropped and predicted.
        mean_span_length: mean length of the dropped spans.
        variant: ``encoder_decoder`` or ``prefix_lm``; default: the one the
            backbone's ``kind`` takes (``encoder_decoder`` or ``decoder``).
    """

    requires_causal = True
    builds_sequences = True

    def __init__(self, backbone, tokenizer, noise_density=0.15, mean_span_length=3.0,
                 variant=None, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        if not 0 < noise_density < 1:
            raise ValueError(f"noise_density must be between 0 and 1 (exclusive), "
                             f"got {noise_density}")
        if not mean_span_length >= 1:
            raise ValueError(f"mean_span_length must be at least 1, got {mean_span_length}")
        expected = "encoder_decoder" if backbone.kind == "encoder_decoder" else "prefix_lm"
        if variant is None:
            variant = expected
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
        if variant != expected:
            needs = {"encoder_decoder": "encoder_decoder", "prefix_lm": "decoder"}[variant]
            raise ValueError(f"variant '{variant}' needs model.kind: {needs}, but the model "
                             f"is {backbone.kind}; leave variant out to follow model.kind")
        tokens = special_tokens(tokenizer)
        if tokens.end is None:
            raise ValueError("span corruption ends inputs and targets with the tokenizer's "
                             "end token, and this tokenizer has none")
        self.backbone = backbone
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.variant = variant
        self.pad, self.end = tokens.pad, tokens.end
        # What the pipeline asked for each row length (see `row_length`).
        self._sequence_lengths = {}
        needed = self._shapes(self._row_length(backbone.max_sequence_length))[2]
        self.sentinels = sentinel_ids(tokenizer)[:needed]
        if len(self.sentinels) < needed:
            raise ValueError(
                f"rows of up to {backbone.max_sequence_length} tokens (model."
                f"max_sequence_length) can have {needed} noise spans, each needing a "
                f"sentinel token, but the tokenizer has {len(self.sentinels)} "
                f"({SENTINEL_TOKEN.format(0)}, …); train the tokenizer with "
                f"`tokenizer.sentinels: {needed}`")

    # === Lengths (T5's random_spans_helper) ===

    def counts(self, length):
        """(noise tokens, noise spans) of a row of ``length`` real tokens.

        ``random_spans_noise_mask``'s arithmetic, in float64 as Python's
        ``round`` (half to even, as ``tf.round``) so that the pipeline and
        ``row_length`` agree. A one-token row stays uncorrupted (T5 corrupts a
        two-token row and keeps the first token)."""
        if length < 2:
            return 0, 0
        noise = min(max(round(length * self.noise_density), 1), length - 1)
        # At most one span per kept token, or two noise spans would touch
        # (T5's segmentation fails there; the defaults never come near).
        return noise, min(max(round(noise / self.mean_span_length), 1), length - noise)

    def lengths(self, length):
        """(model sequence, targets) lengths for a row of ``length`` real tokens.

        Inputs: the kept tokens, a sentinel per span and the end token; targets:
        a sentinel before each span and the end token."""
        noise, spans = self.counts(length)
        inputs, targets = length - noise + spans + 1, noise + spans + 1
        return (inputs if self.variant == "encoder_decoder" else inputs + targets), targets

    def row_length(self, sequence_length):
        """The longest row whose corrupted sequence fits in ``sequence_length``."""
        length = self._row_length(sequence_length)
        # prepare() sees rows, not sequence_length, and the prefix LM's lengths
        # jump by 3 at each new span: several sequence lengths share a row
        # length. Remember which one the pipeline asked for, to pad to it.
        self._sequence_lengths[length] = sequence_length
        return length

    def _row_length(self, sequence_length):
        length = 0
        while self.lengths(length + 1)[0] <= sequence_length:
            length += 1
        if length < 2:
            raise ValueError(f"sequence_length {sequence_length} is too short for span "
                             "corruption: no two-token row fits")
        # T5 trims a row whose targets would outgrow the inputs (its
        # random_spans_helper does so at noise_density 0.5, where they tie);
        # the decoder's length then stays within sequence_length too.
        while self.lengths(length)[1] > sequence_length:
            length -= 1
        return length

    def _shapes(self, row_length):
        """(padded sequence length, padded targets length, most spans) for rows
        of ``row_length`` tokens."""
        sizes = [self.lengths(n) for n in range(row_length + 1)]
        sequence = self._sequence_lengths.get(row_length, max(s for s, _ in sizes))
        spans = max(self.counts(n)[1] for n in range(row_length + 1))
        return sequence, max(t for _, t in sizes), spans

    # === Data ===

    def prepare(self, features, seed):
        token_ids = features["token_ids"]
        row_length = token_ids.shape[1]
        if row_length is None:
            raise ValueError("span corruption needs rows of a static length")
        sequence_length, targets_length, max_spans = self._shapes(row_length)
        real = features["padding_mask"] > 0
        noise = noise_mask(tf.reduce_sum(tf.cast(real, tf.int32), axis=1), row_length,
                           max_spans, self.noise_density, self.mean_span_length, seed)
        inputs, targets = corrupt(token_ids, real, noise, self.sentinels)
        start = tf.zeros_like(inputs["count"])
        input_count, target_count = inputs["count"] + 1, targets["count"] + 1  # + end token
        features = dict(features)
        if self.variant == "encoder_decoder":
            encoder = _place([(inputs, start)], self.end, self.pad, sequence_length)
            labels = _place([(targets, start)], self.end, self.pad, targets_length)
            # Teacher forcing: the decoder reads the targets one step late,
            # starting from the pad token (T5's decoder_start_token_id).
            decoder = tf.concat([tf.fill([tf.shape(labels)[0], 1], self.pad), labels[:, :-1]],
                                axis=1)
            weights = _below(target_count, targets_length)
            features.update(
                token_ids=encoder, padding_mask=_below(input_count, sequence_length),
                decoder_token_ids=decoder, decoder_padding_mask=weights)
            features.pop("segment_ids", None)  # encoder–decoders have no segments
        else:
            tokens = _place([(inputs, start), (targets, input_count)], self.end, self.pad,
                            sequence_length)
            total = input_count + target_count
            # Position i predicts token i + 1: the targets, from the last input token on.
            labels = keras.ops.pad(tokens[:, 1:], [[0, 0], [0, 1]])
            position = tf.range(sequence_length)[None]
            weights = tf.cast((position >= input_count[:, None] - 1) &
                              (position < total[:, None] - 1), tf.int32)
            # -1 marks the prefix: it attends both ways (see kerasllm.layers.Attention).
            padding_mask = _below(total, sequence_length) - 2 * _below(input_count,
                                                                         sequence_length)
            features.update(token_ids=tokens, padding_mask=padding_mask,
                            segment_ids=tf.zeros_like(tokens))
        return features, {"ids": labels, "weights": weights}

    # === Model ===

    def call(self, backbone_outputs, inputs, training=False):
        return self.backbone.logits(backbone_outputs["sequence_output"])


def _below(count, length):
    """int32 ``(batch, length)``: 1 before each row's ``count``, 0 after."""
    return tf.cast(tf.range(length)[None] < count[:, None], tf.int32)


def noise_mask(lengths, row_length, max_spans, noise_density, mean_span_length, seed):
    """T5's ``random_spans_noise_mask`` for a batch of rows, statelessly.

    Args:
        lengths: int32 ``(batch,)``, real tokens per row (the rest is padding).
        row_length: the rows' (static) length.
        max_spans: the most noise spans a row can have.
        seed: int32 ``(2,)``.
    Returns:
        bool ``(batch, row_length)``, true at the noise tokens.
    """
    noise_seed, kept_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    # As `SpanCorruption.counts`, in float64 to round exactly as Python does.
    length = tf.maximum(lengths, 2)
    noise = tf.cast(tf.round(tf.cast(length, tf.float64) * noise_density), tf.int32)
    noise = tf.clip_by_value(noise, 1, length - 1)
    spans = tf.cast(tf.round(tf.cast(noise, tf.float64) / mean_span_length), tf.int32)
    spans = tf.clip_by_value(spans, 1, length - noise)
    width = max(row_length, 2)
    noise_spans = _random_segmentation(noise, spans, width, max_spans, noise_seed)
    kept_spans = _random_segmentation(length - noise, spans, width, max_spans, kept_seed)
    # Kept span 0, noise span 0, kept span 1, …: a new span starts at each
    # running total; odd-numbered spans are noise.
    interleaved = tf.reshape(tf.stack([kept_spans, noise_spans], axis=2), [-1, 2 * max_spans])
    starts = tf.minimum(tf.cumsum(interleaved, axis=1)[:, :-1], width)
    batch = tf.shape(lengths)[0]
    starts += (width + 1) * tf.range(batch)[:, None]
    span_starts = tf.math.unsorted_segment_sum(
        tf.ones_like(starts), starts, batch * (width + 1))
    span_number = tf.cumsum(tf.reshape(span_starts, [batch, width + 1])[:, :row_length], axis=1)
    return (span_number % 2 == 1) & (tf.range(row_length)[None] < lengths[:, None])


def _random_segmentation(items, segments, width, max_segments, seed):
    """Lengths ``(batch, max_segments)`` of ``items`` cut into ``segments``
    non-empty pieces at uniformly random places (0 beyond ``segments``).

    T5 shuffles ``segments - 1`` ones among the ``items - 1`` gaps between
    items: the cut gaps are a uniformly random subset of that size. Here they
    are the gaps with the smallest uniform keys.
    """
    batch = tf.shape(items)[0]
    keys = tf.random.stateless_uniform([batch, width - 1], seed)
    keys = tf.where(tf.range(width - 1)[None] < items[:, None] - 1, keys, 2.0)
    ranks = tf.argsort(tf.argsort(keys, axis=1, stable=True), axis=1, stable=True)
    cuts = tf.cast(ranks < segments[:, None] - 1, tf.int32)
    # Item 0 is in segment 0; item j + 1 in the number of cuts up to gap j.
    segment = tf.pad(tf.cumsum(cuts, axis=1), [[0, 0], [1, 0]])
    real = tf.range(width)[None] < items[:, None]
    ids = tf.where(real, segment + max_segments * tf.range(batch)[:, None],
                   batch * max_segments)
    lengths = tf.math.unsorted_segment_sum(tf.cast(real, tf.int32), ids,
                                           batch * max_segments + 1)
    return tf.reshape(lengths[:-1], [batch, max_segments])


def corrupt(token_ids, real, noise, sentinels):
    """Where each token of the inputs and targets goes, before the end token.

    Inputs: the kept tokens, each noise span replaced by its sentinel (T5's
    ``noise_span_to_unique_sentinel``); targets: each noise span after its
    sentinel (``nonnoise_span_to_unique_sentinel``). Returns two dicts of
    ``values`` and ``positions`` (``(batch, row_length)``, used where ``keep``)
    and ``count`` (tokens per row).
    """
    previous = tf.pad(noise[:, :-1], [[0, 0], [1, 0]])
    first = noise & ~previous  # a span's first token
    span = tf.cumsum(tf.cast(first, tf.int32), axis=1) - 1
    sentinel = tf.gather(tf.constant(sentinels, tf.int32), tf.maximum(span, 0))
    token_ids = tf.cast(token_ids, tf.int32)

    keep = real & (~noise | first)
    inputs = {"keep": keep, "values": tf.where(first, sentinel, token_ids),
              "positions": tf.cumsum(tf.cast(keep, tf.int32), axis=1) - 1,
              "count": tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)}
    # Target position of a noise token: the noise tokens and sentinels before it.
    noise_before = tf.cumsum(tf.cast(noise, tf.int32), axis=1, exclusive=True)
    position = noise_before + span + 1
    # Every noise token, and each span's sentinel one step before its first token.
    targets = {"keep": tf.concat([noise, first], axis=1),
               "values": tf.concat([token_ids, sentinel], axis=1),
               "positions": tf.concat([position, position - 1], axis=1),
               "count": tf.reduce_sum(tf.cast(noise, tf.int32) + tf.cast(first, tf.int32),
                                      axis=1)}
    return inputs, targets


def _place(parts, end, pad, length):
    """Rows of ``length``: each part's tokens then ``end``, the parts one after
    another, then padding. ``parts``: ``(part, offset)`` pairs, ``offset``
    ``(batch,)`` the row position where the part starts."""
    indices, updates = [], []
    for part, offset in parts:
        where = tf.where(part["keep"])
        rows = tf.cast(where[:, 0], tf.int32)
        positions = tf.gather_nd(part["positions"], where) + tf.gather(offset, rows)
        batch_rows = tf.range(tf.shape(offset)[0])
        indices += [tf.stack([rows, positions], axis=1),
                    tf.stack([batch_rows, part["count"] + offset], axis=1)]
        updates += [tf.gather_nd(part["values"], where), tf.fill(tf.shape(offset), end)]
    batch = tf.shape(parts[0][1])[0]
    return tf.tensor_scatter_nd_update(tf.fill([batch, length], pad),
                                       tf.concat(indices, 0), tf.concat(updates, 0))


@kerasllm.hookimpl
def kerasllm_objectives():
    return {"span": SpanCorruption}
