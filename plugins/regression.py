"""Sequence (or sentence-pair) regression: one real number per example.

Examples hold ``text``, optionally ``text_pair``, and a float ``label`` (as
STS-B's similarity scores). The loss is the mean squared error of the targets
standardized with ``label_mean`` and ``label_scale``, so that a head starting
near 0 starts near the mean whatever the targets' units; predictions are in
the targets' units. Evaluated with Pearson and Spearman correlation.
"""

import keras
import numpy as np
import tensorflow as tf

import kerasllm
from kerasllm import metrics
from kerasllm.heads import SequenceLevelHead


class Regression(SequenceLevelHead):
    """Args:
        label_mean, label_scale: the targets are learnt as
            ``(label - label_mean) / label_scale``; ``kerasllm finetune`` sets
            them to the training targets' mean and standard deviation.
        representation: ``pooled``, ``first_token`` or ``last_token``, as for
            ``classification``.
        dropout: on the representation before the output layer.
        pairs: the examples are sentence pairs (``text_pair``); set from the
            training examples by ``kerasllm finetune``.

    Serving: ``serving_default`` takes ``text`` (and ``text_pair`` with
    ``pairs``) ``(batch,)`` string, packed and cut as in training; it and
    ``serve_token_ids`` give ``value`` ``(batch,)`` float32, the prediction in
    the targets' units (what ``predict`` answers).
    """

    def __init__(self, backbone, tokenizer, label_mean=0.0, label_scale=1.0,
                 representation=None, dropout=0.1, pairs=False, **kwargs):
        if not label_scale > 0:
            raise ValueError(f"label_scale must be > 0, got {label_scale}")
        super().__init__(backbone, tokenizer, 1, representation, dropout, pairs, **kwargs)
        self.label_mean = float(label_mean)
        self.label_scale = float(label_scale)
        self.mean_absolute_error = keras.metrics.MeanAbsoluteError(
            name=f"{self.name}_mean_absolute_error")

    @classmethod
    def infer_options(cls, examples, options):
        options = super().infer_options(examples, options)
        if {"label_mean", "label_scale"} <= set(options) or "label" not in examples.element_spec:
            return options
        labels = np.array(list(examples.map(lambda example: example["label"])
                               .as_numpy_iterator()), "float64")
        return {"label_mean": float(labels.mean()), "label_scale": float(labels.std()) or 1.0,
                **options}

    def encode(self, examples, tokenizer, sequence_length):
        rows = super().encode(examples, tokenizer, sequence_length)
        if "label" not in rows.element_spec:
            return rows
        return rows.map(lambda row: {**row, "label": tf.cast(row["label"], tf.float32)})

    def prepare(self, features, seed):
        features = dict(features)
        return features, {"values": features.pop("label")}

    def call(self, backbone_outputs, inputs, training=False):
        standardized = super().call(backbone_outputs, inputs, training=training)[:, 0]
        return standardized * self.label_scale + self.label_mean

    def compute_loss(self, targets, predictions):
        error = (predictions - targets["values"]) / self.label_scale
        return tf.reduce_mean(tf.square(error))

    def update_metrics(self, targets, predictions):
        self.mean_absolute_error.update_state(targets["values"], predictions)

    def decode(self, predictions, rows):
        return [float(value) for value in predictions]

    def serving_outputs(self, predictions, rows, inputs):
        return {"value": tf.cast(predictions, tf.float32)}

    def score(self, answers, examples):
        truth = np.array([example["label"] for example in examples], "float64")
        predicted = np.array(answers, "float64")
        return {"pearson": metrics.pearson(truth, predicted),
                "spearman": metrics.spearman(truth, predicted),
                "mean_squared_error": float(np.mean((truth - predicted) ** 2))}


@kerasllm.hookimpl
def kerasllm_task_heads():
    return {"regression": Regression}
