"""The Transformer layer set: one configurable set for every architecture family.

Data flows: ``TextEmbedding`` → ``TransformerBlock`` × N (each a
``SelfAttention`` and a ``FeedForward``, pre-LN or post-LN) → the backbone's
outputs. The attention core (scores, mask, softmax, dropout, weighted sum) is a
``tf.function(jit_compile=True)``: XLA fuses it per layer, and unlike a
whole-step ``jit_compile=True`` it keeps working under ``MirroredStrategy`` on
CPU devices, where compiling the whole step fails with "Trying to access
resource ... located in device CPU:1 from device CPU:0".
"""

import keras
import keras_hub
import tensorflow as tf

ACTIVATIONS = {
    "gelu": lambda x: keras.activations.gelu(x, approximate=False),
    "gelu_approximate": lambda x: keras.activations.gelu(x, approximate=True),
    "relu": keras.activations.relu,
}


@tf.function(jit_compile=True, reduce_retracing=True)
def attention_core(query, key, value, padding_mask, seed, causal, dropout_rate):
    """Scaled dot-product attention, compiled by XLA.

    Args:
        query, key, value: ``(batch, length, heads, head_dim)``; query unscaled.
        padding_mask: ``(batch, length)``, true for real tokens.
        seed: int32 ``(2,)`` seed for stateless attention dropout.
        causal: python bool, mask future positions.
        dropout_rate: python float; 0 disables dropout.
    Returns:
        ``(batch, length, heads, head_dim)``.
    """
    head_dim = tf.shape(query)[-1]
    query = query * tf.math.rsqrt(tf.cast(head_dim, query.dtype))
    scores = tf.einsum("bqhd,bkhd->bhqk", query, key)
    allowed = tf.cast(padding_mask, tf.bool)[:, None, None, :]
    if causal:
        length = tf.shape(query)[1]
        lower = tf.linalg.band_part(tf.ones((length, length), tf.bool), -1, 0)
        allowed = tf.logical_and(allowed, lower[None, None])
    # Softmax in float32 whatever the compute dtype; a large negative (not -inf)
    # keeps fully masked rows (padding queries) finite.
    scores = tf.where(allowed, tf.cast(scores, tf.float32), -1e9)
    weights = tf.nn.softmax(scores, axis=-1)
    if dropout_rate > 0:
        # Philox named explicitly: XLA on CPU runs the default "auto_select"
        # algorithm ~100x slower (0.53 s vs 5 ms for a 32x4x128x128 mask).
        keep = tf.random.stateless_uniform(
            tf.shape(weights), seed=seed, alg="philox") >= dropout_rate
        weights = tf.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return tf.einsum("bhqk,bkhd->bqhd", tf.cast(weights, value.dtype), value)


@keras.saving.register_keras_serializable(package="kerasllm")
class SelfAttention(keras.layers.Layer):
    """Multi-head self-attention with a fused QKV projection and the XLA core.

    Args:
        num_heads: number of attention heads; ``hidden_dim`` must divide by it.
        causal: mask future positions (decoders).
        dropout: dropout rate on the attention probabilities.
    """

    def __init__(self, num_heads, causal=False, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.causal = causal
        self.dropout = dropout
        self.seed_generator = keras.random.SeedGenerator()

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        head_dim = hidden_dim // self.num_heads
        self.qkv = keras.layers.EinsumDense(
            "btd,dnhk->btnhk", output_shape=(None, 3, self.num_heads, head_dim),
            bias_axes="nhk", name="qkv",
        )
        self.qkv.build(input_shape)
        self.output_projection = keras.layers.EinsumDense(
            "bthk,hkd->btd", output_shape=(None, hidden_dim), bias_axes="d", name="output",
        )
        self.output_projection.build((*input_shape[:-1], self.num_heads, head_dim))

    def call(self, hidden, padding_mask, training=False):
        qkv = self.qkv(hidden)
        rate = self.dropout if training else 0.0
        # Draw from the seed stream only when dropout applies: evaluation must not
        # advance it, or a resumed run (which evaluates first) drifts from the
        # uninterrupted one.
        if rate:
            seed = tf.cast(keras.random.randint((2,), 0, 2**31 - 1, seed=self.seed_generator),
                           tf.int32)
        else:
            seed = tf.zeros((2,), tf.int32)
        context = attention_core(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], padding_mask, seed, self.causal, rate,
        )
        return self.output_projection(context)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "causal": self.causal, "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="kerasllm")
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward: dense → activation → dense."""

    def __init__(self, intermediate_dim, activation="gelu", **kwargs):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim
        self.activation = activation

    def build(self, input_shape):
        self.intermediate = keras.layers.Dense(self.intermediate_dim, name="intermediate")
        self.intermediate.build(input_shape)
        self.output_projection = keras.layers.Dense(input_shape[-1], name="output")
        self.output_projection.build((*input_shape[:-1], self.intermediate_dim))

    def call(self, hidden):
        return self.output_projection(ACTIVATIONS[self.activation](self.intermediate(hidden)))

    def get_config(self):
        return {**super().get_config(), "intermediate_dim": self.intermediate_dim,
                "activation": self.activation}


@keras.saving.register_keras_serializable(package="kerasllm")
class TransformerBlock(keras.layers.Layer):
    """Attention and feed-forward sub-layers, each with a residual and a layer norm.

    Args:
        num_heads, intermediate_dim, activation: sub-layer sizes.
        causal: causal self-attention.
        norm_first: pre-LN (normalise the sub-layer input, GPT-2) instead of
            post-LN (normalise the residual sum, BERT).
        dropout: on attention probabilities and sub-layer outputs.
        layer_norm_epsilon: epsilon of both layer norms.
    """

    def __init__(self, num_heads, intermediate_dim, activation="gelu", causal=False,
                 norm_first=False, dropout=0.0, layer_norm_epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.causal = causal
        self.norm_first = norm_first
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon

    def build(self, input_shape):
        self.attention = SelfAttention(self.num_heads, self.causal, self.dropout, name="attention")
        self.attention.build(input_shape)
        self.feed_forward = FeedForward(self.intermediate_dim, self.activation, name="feed_forward")
        self.feed_forward.build(input_shape)
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="attention_norm")
        self.attention_norm.build(input_shape)
        self.feed_forward_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="feed_forward_norm")
        self.feed_forward_norm.build(input_shape)
        self.output_dropout = keras.layers.Dropout(self.dropout)

    def call(self, hidden, padding_mask, training=False):
        hidden = self._residual(
            hidden, self.attention_norm, training,
            lambda x: self.attention(x, padding_mask, training=training),
        )
        return self._residual(hidden, self.feed_forward_norm, training, self.feed_forward)

    def _residual(self, hidden, norm, training, sublayer):
        if self.norm_first:
            return hidden + self.output_dropout(sublayer(norm(hidden)), training=training)
        return norm(hidden + self.output_dropout(sublayer(hidden), training=training))

    def get_config(self):
        return {
            **super().get_config(), "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim, "activation": self.activation,
            "causal": self.causal, "norm_first": self.norm_first, "dropout": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }


@keras.saving.register_keras_serializable(package="kerasllm")
class TextEmbedding(keras.layers.Layer):
    """Token + learned position (+ segment) embeddings.

    The token embedding is keras-hub's ``ReversibleEmbedding``, so language-model
    heads tie their output projection to it (``token_embedding(x, reverse=True)``).

    Args:
        vocabulary_size, hidden_dim, max_sequence_length: table sizes.
        num_segments: size of the segment table; 0 for none.
        normalize: apply a layer norm to the sum (post-LN encoders such as BERT).
        dropout: on the output.
    """

    def __init__(self, vocabulary_size, hidden_dim, max_sequence_length, num_segments=0,
                 normalize=True, dropout=0.0, layer_norm_epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.max_sequence_length = max_sequence_length
        self.num_segments = num_segments
        self.normalize = normalize
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        initializer = keras.initializers.TruncatedNormal(stddev=0.02)
        self.token_embedding = keras_hub.layers.ReversibleEmbedding(
            vocabulary_size, hidden_dim, embeddings_initializer=initializer,
            name="token_embedding",
        )
        self.position_embedding = keras_hub.layers.PositionEmbedding(
            max_sequence_length, initializer=initializer, name="position_embedding",
        )
        self.segment_embedding = keras.layers.Embedding(
            num_segments, hidden_dim, embeddings_initializer=initializer,
            name="segment_embedding",
        ) if num_segments else None
        self.norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="norm") if normalize else None
        self.output_dropout = keras.layers.Dropout(dropout)

    def build(self, token_ids_shape, segment_ids_shape=None):
        self.token_embedding.build(token_ids_shape)
        hidden_shape = (*token_ids_shape, self.hidden_dim)
        self.position_embedding.build(hidden_shape)
        if self.segment_embedding is not None:
            self.segment_embedding.build(token_ids_shape)
        if self.norm is not None:
            self.norm.build(hidden_shape)

    def call(self, token_ids, segment_ids=None, training=False):
        embedded = self.token_embedding(token_ids)
        embedded = embedded + self.position_embedding(embedded)
        if self.segment_embedding is not None:
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
        }
