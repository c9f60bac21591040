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

    - ``prepare(features)``: runs inside the tf.data pipeline on a batch of
      ``features`` (``token_ids``, ``padding_mask``, ``segment_ids`` and any other
      fields the data source yields, such as ``label``). Returns
      ``(features, targets)``: the features with this head's changes (e.g. masked
      ``token_ids``, added ``mask_positions``) and a dict of targets for
      ``compute_loss``. Heads run in config order, each seeing the previous
      one's features.
    - ``call(backbone_outputs, inputs, training)``: the predictions, from the
      backbone's output dict and the model's input dict.
    - ``compute_loss(targets, predictions)``: a scalar, the mean loss of this
      batch; the model weights it by the config's ``weight``.
    - ``update_metrics(targets, predictions)``: update the head's metrics.
      Metrics assigned as attributes are logged by ``fit`` and ``evaluate``.

    Class attributes:
        input_keys: model inputs this head adds in ``prepare`` (beyond the
            backbone's), e.g. ``("mask_positions",)``.
        requires_causal: ``True`` (decoders only), ``False`` (encoders only) or
            ``None`` (either).
    """

    input_keys = ()
    requires_causal = None

    def __init__(self, backbone, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.loss_tracker = keras.metrics.Mean(name=f"{self.name}_loss")

    def build(self, sequence_output_shape):
        """Create the head's weights; ``sequence_output_shape`` is the backbone's."""

    def prepare(self, features):
        raise NotImplementedError

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
        losses = keras.losses.sparse_categorical_crossentropy(
            targets["ids"], predictions, from_logits=True)
        weights = tf.cast(targets["weights"], losses.dtype)
        return tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)

    def update_metrics(self, targets, predictions):
        self.accuracy.update_state(targets["ids"], predictions, sample_weight=targets["weights"])
