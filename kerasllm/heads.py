"""The base class of pretraining objectives and fine-tuning task heads."""

import keras
import tensorflow as tf


class Head(keras.layers.Layer):
    """A head: what it adds to the model, its data transform, its loss and metrics.

    Objectives (``kerasllm_objectives`` hook) and task heads
    (``kerasllm_task_heads`` hook) both subclass ``Head``. The builder creates one
    instance per config entry as ``cls(backbone=backbone, tokenizer=tokenizer,
    **options)``, so the constructor's keyword arguments are the head's config
    options; raise ``ValueError`` for a bad value and kerasllm reports it with the
    config key. Override:

    - ``prepare(features, seed)``: runs inside the tf.data pipeline on a batch of
      ``features`` (``token_ids``, ``padding_mask``, ``segment_ids``,
      ``document`` and any other fields the data source yields, such as
      ``label``). Returns ``(features, targets)``: the features with this head's
      changes (e.g. masked ``token_ids``, added ``mask_positions``) and a dict of
      targets for ``compute_loss``. ``seed`` is an int32 ``(2,)`` tensor, new for
      every batch and derived from ``training.seed``: draw random numbers with
      stateless ops (``tf.random.stateless_*``) from it, so that a seeded run
      and a resumed run see the same batches. Heads that rebuild sequences
      (``builds_sequences``) run first, then the others in config order, each
      seeing the previous one's features.
    - ``transform_inputs(inputs, training)``: inside the model, before the
      backbone runs; returns the model inputs the backbone and every head see.
      ELECTRA replaces masked tokens with a generator's samples here. Default:
      unchanged.
    - ``call(backbone_outputs, inputs, training)``: the predictions, from the
      backbone's output dict and the model's input dict.
    - ``compute_loss(targets, predictions)``: a scalar, the mean loss of this
      batch; the model weights it by the config's ``weight``.
    - ``update_metrics(targets, predictions)``: update the head's metrics.
      Metrics assigned as attributes are logged by ``fit`` and ``evaluate``.

    Packed rows: in pretraining, the pipeline concatenates documents (each
    wrapped in the start and end tokens the tokenizer adds) and cuts the stream
    into rows; ``padding_mask`` then numbers the documents of a row 1, 2, … (0
    is padding) and attention never crosses from one document to another.
    ``document`` is the index, in the data source, of the row's first document.

    Class attributes:
        input_keys: model inputs this head adds in ``prepare`` (beyond the
            backbone's), e.g. ``("mask_positions",)``.
        requires_causal: ``True`` (decoders only), ``False`` (encoders only) or
            ``None`` (either).
        packs_documents: ``False`` asks for rows that each hold a piece of one
            document (next-sentence prediction), not packed rows.
        builds_sequences: ``prepare`` rebuilds the rows (span corruption,
            sentence pairs); such a head prepares first, and a model has at most one.
    """

    input_keys = ()
    requires_causal = None
    packs_documents = True
    builds_sequences = False

    def __init__(self, backbone, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.loss_tracker = keras.metrics.Mean(name=f"{self.name}_loss")

    def row_length(self, sequence_length):
        """Length of the rows the pipeline gives ``prepare``, for a model input of
        ``sequence_length`` tokens. Override when ``prepare`` makes rows longer or
        shorter (span corruption shortens them, a sentence pair adds a separator)."""
        return sequence_length

    def build(self, sequence_output_shape):
        """Create the head's weights; ``sequence_output_shape`` is the backbone's."""

    def prepare(self, features, seed):
        raise NotImplementedError

    def transform_inputs(self, inputs, training=False):
        return inputs

    def call(self, backbone_outputs, inputs, training=False):
        raise NotImplementedError

    def compute_loss(self, targets, predictions):
        raise NotImplementedError

    def update_metrics(self, targets, predictions):
        """Update metrics beyond the loss, which the model tracks itself."""


class TokenPredictionHead(Head):
    """A head predicting token ids over the vocabulary (masked or causal LM).

    ``prepare`` returns targets ``{"ids": ..., "weights": ...}`` shaped like the
    logits without their last axis; positions of weight 0 do not count. The
    loss is the mean cross-entropy over the counted positions; the metric is
    ``<name>_accuracy`` over the same positions.
    """

    def __init__(self, backbone, tokenizer, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name=f"{self.name}_accuracy")

    def compute_loss(self, targets, predictions):
        return weighted_cross_entropy(targets["ids"], predictions, targets["weights"])

    def update_metrics(self, targets, predictions):
        self.accuracy.update_state(targets["ids"], predictions, sample_weight=targets["weights"])


def weighted_cross_entropy(labels, logits, weights):
    """Mean sparse cross-entropy over the positions of nonzero weight (0 if none)."""
    return weighted_mean(
        keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True), weights)


def weighted_mean(values, weights):
    """``sum(values * weights) / sum(weights)``; 0 when every weight is 0 (a batch
    with nothing to count)."""
    weights = tf.cast(weights, values.dtype)
    return tf.reduce_sum(values * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)
