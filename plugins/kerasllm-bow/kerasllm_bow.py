"""Bag-of-words pretraining: from the first token, tell which words the sequence holds.

A multi-label objective: one sigmoid per vocabulary id, positive when the id
occurs anywhere in the sequence. It pushes a whole-sequence summary into the
first token, which masked LM alone leaves untrained. Special tokens (padding,
start, end, mask) are never positive.

Heads prepare batches in config order, and this one counts the ids it is given.
List it before ``mlm`` (``objectives: [{name: bow}, {name: mlm}]``) to count the
original tokens; listed after, it counts what masking left visible.
"""

import keras
import numpy as np
import tensorflow as tf

import kerasllm
from kerasllm.tokenizers import special_tokens


class BagOfWords(kerasllm.Head):
    """Args:
        positive_weight: how much a present id counts in the loss relative to an
            absent one; raise it when sequences are short and the vocabulary large.
    """

    # The first token sees the whole sequence only with bidirectional attention.
    requires_causal = False

    def __init__(self, backbone, tokenizer, positive_weight=1.0, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        if not positive_weight > 0:
            raise ValueError(f"positive_weight must be positive, got {positive_weight}")
        self.positive_weight = positive_weight
        self.vocabulary_size = backbone.vocabulary_size
        tokens = special_tokens(tokenizer)
        self.pad_id = tokens.pad
        special = [t for t in (tokens.pad, tokens.start, tokens.end, tokens.mask) if t is not None]
        countable = np.ones(self.vocabulary_size, "float32")
        countable[special] = 0
        self.countable = tf.constant(countable)
        self.classifier = keras.layers.Dense(
            self.vocabulary_size,
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="classifier",
        )
        self.auc = keras.metrics.AUC(from_logits=True, name=f"{self.name}_auc")

    def build(self, sequence_output_shape):
        self.classifier.build((None, sequence_output_shape[-1]))

    def prepare(self, features, seed):
        # Padding positions count as the pad token, which is never positive.
        token_ids = tf.where(features["padding_mask"] > 0, features["token_ids"], self.pad_id)
        # bincount, not one_hot and max: no (batch, length, vocabulary) tensor.
        present = tf.math.bincount(
            token_ids, minlength=self.vocabulary_size, maxlength=self.vocabulary_size,
            binary_output=True, axis=-1, dtype=tf.float32,
        )
        return features, {"present": present * self.countable}

    def call(self, backbone_outputs, inputs, training=False):
        return self.classifier(backbone_outputs["sequence_output"][:, 0])

    def compute_loss(self, targets, predictions):
        return tf.reduce_mean(tf.nn.weighted_cross_entropy_with_logits(
            targets["present"], predictions, pos_weight=self.positive_weight))

    def update_metrics(self, targets, predictions):
        self.auc.update_state(targets["present"], predictions)


@kerasllm.hookimpl
def kerasllm_objectives():
    return {"bow": BagOfWords}
