"""Embeddings: token (+ learned position) (+ segment) embeddings, and T5's
relative position bias. Rotary positions are applied inside the attention
(:func:`kerasllm.layers.apply_rotary`)."""

import math

import keras
import keras_hub
import tensorflow as tf

from kerasllm.layers import Dropout, make_norm


@keras.saving.register_keras_serializable(package="kerasllm")
class TextEmbedding(keras.layers.Layer):
    """Token (+ learned position) (+ segment) embeddings.

    The token embedding is keras-hub's ``ReversibleEmbedding``: language-model
    heads project back to the vocabulary with ``token_embedding(x, reverse=True)``,
    through the same matrix (tied) or a separate one (``tie_weights=False``).

    Args:
        vocabulary_size, hidden_dim: table sizes.
        max_sequence_length: rows of the learned position table; 0 for none
            (rotary or relative positions live in the attention).
        position_offset: index of the first position's row (RoBERTa: 2).
        num_segments: size of the segment table; 0 for none.
        normalize: apply a norm to the sum (post-norm encoders such as BERT).
        tie_weights: the output projection is the input embedding.
        dropout: on the output.
    """

    def __init__(self, vocabulary_size, hidden_dim, max_sequence_length, num_segments=0,
                 normalize=True, dropout=0.0, layer_norm_epsilon=1e-12, position_offset=0,
                 tie_weights=True, norm="layer", **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.max_sequence_length = max_sequence_length
        self.num_segments = num_segments
        self.normalize = normalize
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.position_offset = position_offset
        self.tie_weights = tie_weights
        self.norm_kind = norm
        initializer = keras.initializers.TruncatedNormal(stddev=0.02)
        self.token_embedding = keras_hub.layers.ReversibleEmbedding(
            vocabulary_size, hidden_dim, tie_weights=tie_weights,
            embeddings_initializer=initializer, name="token_embedding",
        )
        self.position_embedding = keras_hub.layers.PositionEmbedding(
            max_sequence_length, initializer=initializer, name="position_embedding",
        ) if max_sequence_length else None
        self.segment_embedding = keras.layers.Embedding(
            num_segments, hidden_dim, embeddings_initializer=initializer,
            name="segment_embedding",
        ) if num_segments else None
        self.norm = make_norm(norm, layer_norm_epsilon, "norm") if normalize else None
        self.output_dropout = Dropout(dropout)

    def build(self, token_ids_shape, segment_ids_shape=None):
        self.token_embedding.build(token_ids_shape)
        hidden_shape = (*token_ids_shape, self.hidden_dim)
        if self.position_embedding is not None:
            self.position_embedding.build(hidden_shape)
        if self.segment_embedding is not None:
            self.segment_embedding.build(token_ids_shape)
        if self.norm is not None:
            self.norm.build(hidden_shape)

    def call(self, token_ids, segment_ids=None, start_index=0, training=False):
        embedded = self.token_embedding(token_ids)
        if self.position_embedding is not None:
            embedded = embedded + self.position_embedding(
                embedded, start_index=self.position_offset + start_index)
        if self.segment_embedding is not None:
            if segment_ids is None:
                segment_ids = tf.zeros_like(token_ids)
            embedded = embedded + self.segment_embedding(segment_ids)
        if self.norm is not None:
            embedded = self.norm(embedded)
        return self.output_dropout(embedded, training=training)

    def get_config(self):
        return {
            **super().get_config(), "vocabulary_size": self.vocabulary_size,
            "hidden_dim": self.hidden_dim, "max_sequence_length": self.max_sequence_length,
            "num_segments": self.num_segments, "normalize": self.normalize,
            "dropout": self.dropout, "layer_norm_epsilon": self.layer_norm_epsilon,
            "position_offset": self.position_offset, "tie_weights": self.tie_weights,
            "norm": self.norm_kind,
        }


@keras.saving.register_keras_serializable(package="kerasllm")
class RelativePositionBias(keras.layers.Layer):
    """T5's attention bias: one learned scalar per head and bucket of relative
    distance (exact up to ``num_buckets / 2``, log-spaced up to ``max_distance``,
    then clipped), shared by every layer of a stack.

    Args:
        num_heads: heads of the stack.
        num_buckets, max_distance: the bucketing.
        bidirectional: encoder (keys on both sides) or decoder (keys behind).
    """

    def __init__(self, num_heads, num_buckets=32, max_distance=128, bidirectional=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.num_buckets, self.num_heads),
            initializer=keras.initializers.RandomNormal(stddev=self.num_heads ** -0.5),
        )

    def bucket(self, relative_position):
        """Bucket ids of ``key_position - query_position``, with Hugging Face's
        float32 arithmetic in the same order, so boundary distances (16, 32, 64
        for the defaults) land in the same bucket."""
        buckets = tf.zeros_like(relative_position)
        num_buckets = self.num_buckets
        if self.bidirectional:
            num_buckets //= 2
            buckets += tf.cast(relative_position > 0, relative_position.dtype) * num_buckets
            distance = tf.abs(relative_position)
        else:
            distance = -tf.minimum(relative_position, 0)
        max_exact = num_buckets // 2
        ratio = tf.cast(tf.maximum(distance, 1), tf.float32) / max_exact
        large = max_exact + tf.cast(
            tf.math.log(ratio) / math.log(self.max_distance / max_exact)
            * (num_buckets - max_exact), distance.dtype)
        large = tf.minimum(large, num_buckets - 1)
        return buckets + tf.where(distance < max_exact, distance, large)

    def call(self, hidden, key_length=None, query_offset=0):
        """The bias ``(1, heads, length, key_length)`` for the queries of
        ``hidden``, at positions ``query_offset`` onwards; ``key_length``
        defaults to ``hidden``'s length."""
        query_length = tf.shape(hidden)[1]
        key_length = query_length if key_length is None else key_length
        query_positions = query_offset + tf.range(query_length)
        relative = tf.range(key_length)[None, :] - query_positions[:, None]
        bias = tf.gather(self.embeddings, self.bucket(relative))
        return tf.transpose(bias, [2, 0, 1])[None]

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "num_buckets": self.num_buckets, "max_distance": self.max_distance,
                "bidirectional": self.bidirectional}
