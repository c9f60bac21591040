"""The Transformer layer set: one configurable set for every architecture family.

Data flows: ``TextEmbedding`` (:mod:`kerasllm.embeddings`) → ``TransformerBlock``
× N (an ``Attention``, in encoder–decoder models a second, cross ``Attention``,
and a ``FeedForward``, each pre-norm or post-norm) → the backbone's outputs.
The families differ only in arguments: the norm (layer or RMS), the
feed-forward (plain or gated, its activation), the positions (learned, rotary
or T5's relative bias), biases, grouped-query attention and the attention scale.

The attention core (scores, mask, bias, softmax, dropout, weighted sum) is a
``tf.function(jit_compile=True)``: XLA fuses it per layer, and unlike a
whole-step ``jit_compile=True`` it keeps working under ``MirroredStrategy`` on
CPU devices, where compiling the whole step fails with "Trying to access
resource ... located in device CPU:1 from device CPU:0".

Attention and blocks take an optional key/value ``cache`` for incremental
decoding: the same code serves training, evaluation and generation.
"""

import contextlib
import math
import threading

import keras
import tensorflow as tf

from kerasllm.lora import LoRAEinsumDense

ACTIVATIONS = {
    "gelu": lambda x: keras.activations.gelu(x, approximate=False),
    "gelu_approximate": lambda x: keras.activations.gelu(x, approximate=True),
    "relu": keras.activations.relu,
    "silu": keras.activations.silu,
}


def make_norm(norm, epsilon, name):
    """``layer``: mean and variance, scale and bias (BERT, GPT-2); ``rms``: root
    mean square and scale only (T5, Llama)."""
    if norm == "rms":
        return keras.layers.RMSNormalization(epsilon=epsilon, name=name)
    return keras.layers.LayerNormalization(epsilon=epsilon, name=name)


def drop(values, seed, rate):
    """Inverted dropout of ``values`` with a stateless mask from int32 ``(2,)`` ``seed``.

    Threefry named explicitly: compiled by XLA on CPU, a mask of 2M values takes
    2.5 ms with it, 10 ms with Philox and 400 ms with the default
    ``auto_select`` (which Keras' dropout uses)."""
    keep = tf.random.stateless_uniform(tf.shape(values), seed=seed, alg="threefry") >= rate
    return tf.where(keep, values / tf.cast(1.0 - rate, values.dtype), tf.zeros_like(values))


_compiled_drop = tf.function(drop, jit_compile=True, reduce_retracing=True)


@keras.saving.register_keras_serializable(package="kerasllm")
class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` with its mask drawn by :func:`drop`, compiled by XLA
    (Threefry has no kernel outside XLA). The seed stream and saved state are
    Keras' own."""

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        seed = tf.cast(keras.random.randint((2,), 0, 2**31 - 1, seed=self.seed_generator),
                       tf.int32)
        return _compiled_drop(inputs, seed, self.rate)


@tf.function(jit_compile=True, reduce_retracing=True)
def attention_core(query, key, value, allowed, bias, seed, scale, dropout_rate,
                   head_major=False):
    """Dot-product attention with grouped key/value heads, compiled by XLA.

    Args:
        query: ``(batch, query_length, heads, head_dim)``.
        key, value: ``(batch, key_length, kv_heads, head_dim)``, or with
            ``head_major`` ``(batch, kv_heads, key_length, head_dim)`` (the
            key/value cache's layout); ``heads`` is a multiple of ``kv_heads``
            and key/value head ``n`` serves the query heads ``n * heads / kv_heads``
            onwards (as Hugging Face's ``repeat_kv``).
        allowed: bool ``(batch, query_length, key_length)``.
        bias: ``(1 or batch, heads, query_length, key_length)`` added to the
            scores (T5's relative position bias), or None.
        seed: int32 ``(2,)`` seed for stateless attention dropout.
        scale: python float multiplying the query.
        dropout_rate: python float; 0 disables dropout.
    Returns:
        ``(batch, query_length, heads, head_dim)``.
    """
    batch, query_length, heads, head_dim = tf.unstack(tf.shape(query))
    kv_heads = tf.shape(key)[1 if head_major else 2]
    key_length = tf.shape(key)[2 if head_major else 1]
    keys = "bnkd" if head_major else "bknd"
    groups = heads // kv_heads
    # The query heads of one key/value head and the query positions merge into
    # one axis, so every matmul, and its gradients, contracts a single axis: a
    # (groups, query) pair as the contracted axes made XLA copy the scores'
    # gradient into a transposed layout, a fifth of a training step at T=1024.
    # Transposes are einsums: tf.transpose's gradient reads its permutation
    # from this function's outputs, and in a whole-step XLA compilation that
    # made every step input a compile-time constant, recompiling every step.
    grouped = tf.reshape(query * scale, [batch, query_length, kv_heads, groups, head_dim])
    grouped = tf.reshape(tf.einsum("bqngd->bngqd", grouped), [batch, kv_heads, -1, head_dim])
    scores = tf.einsum(f"bnmd,{keys}->bnmk", grouped, key)
    scores = tf.reshape(tf.cast(scores, tf.float32), [batch, heads, query_length, key_length])
    if bias is not None:
        scores += tf.cast(bias, tf.float32)
    # Softmax in float32 whatever the compute dtype; a large negative (not -inf)
    # keeps fully masked rows (padding queries) finite.
    scores = tf.where(allowed[:, None], scores, -1e9)
    weights = tf.nn.softmax(scores, axis=-1)
    if dropout_rate > 0:
        weights = drop(weights, seed, dropout_rate)
    weights = tf.reshape(tf.cast(weights, value.dtype),
                         [batch, kv_heads, -1, key_length])
    context = tf.einsum(f"bnmk,{keys}->bnmd", weights, value)
    context = tf.reshape(context, [batch, kv_heads, groups, query_length, head_dim])
    context = tf.einsum("bngqd->bqngd", context)
    return tf.reshape(context, [batch, query_length, heads, head_dim])


_without_xla = threading.local()


@contextlib.contextmanager
def without_xla():
    """Trace for a graph that no XLA compiles: the attention core as plain
    TensorFlow ops, and cache writes with a core op.

    For exported graphs: TF Serving's stock model server runs no XLA-compiled
    function on CPU unless started with ``--xla_cpu_compilation_enabled``."""
    previous = _outside_xla()
    _without_xla.active = True
    try:
        yield
    finally:
        _without_xla.active = previous


def _outside_xla():
    return getattr(_without_xla, "active", False)


def _write_at(cache, values, index):
    """``cache`` ``(batch, kv_heads, length, head_dim)`` with ``values``
    ``(batch, new, kv_heads, head_dim)`` written from position ``index``.

    Head-major because attention reads the cache by head: stored position-major,
    XLA on CPU copied every layer's whole cache into that order at every step.
    Compiled, XLA's in-place dynamic-update-slice; traced ``without_xla``, a core
    op (``XlaDynamicUpdateSlice`` has no kernel outside XLA, and XLA cannot
    compile a strided update at a position only known at run time)."""
    values = tf.transpose(values, [0, 2, 1, 3])
    if not _outside_xla():
        return keras.ops.slice_update(cache, [0, 0, index, 0], values)
    begin = tf.stack([0, 0, tf.cast(index, tf.int32), 0])
    return tf.raw_ops.TensorStridedSliceUpdate(
        input=cache, begin=begin, end=begin + tf.shape(values), strides=tf.ones([4], tf.int32),
        value=values)


def apply_rotary(x, positions, theta):
    """Rotary position embedding (RoPE) in the half-split layout of Hugging Face's
    Llama: feature ``i`` pairs with ``i + head_dim / 2``.

    ``x``: ``(batch, length, heads, head_dim)``; ``positions``: ``(length,)``.
    """
    head_dim = x.shape[-1]
    inverse_frequency = 1.0 / tf.pow(
        tf.constant(theta, tf.float32), tf.range(0, head_dim, 2, dtype=tf.float32) / head_dim)
    angles = tf.cast(positions, tf.float32)[:, None] * inverse_frequency[None, :]
    angles = tf.concat([angles, angles], axis=-1)[None, :, None, :]
    cos, sin = tf.cast(tf.cos(angles), x.dtype), tf.cast(tf.sin(angles), x.dtype)
    first, second = tf.split(x, 2, axis=-1)
    return x * cos + tf.concat([-second, first], axis=-1) * sin


@keras.saving.register_keras_serializable(package="kerasllm")
class Attention(keras.layers.Layer):
    """Multi-head attention: self-attention, or cross-attention to a ``context``.

    Args:
        num_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention); must
            divide ``num_heads``; default ``num_heads``, 1 is multi-query.
        head_dim: per-head size; default ``hidden_dim // num_heads``.
        causal: mask future positions (decoder self-attention).
        use_bias: biases on the projections.
        scale_scores: divide scores by ``sqrt(head_dim)``; T5 does not.
        rotary_theta: apply rotary embeddings with this base to queries and
            keys; None for none.
        dropout: dropout rate on the attention probabilities.
        lora: LoRA adapters, ``{"rank", "alpha", "dropout", "targets"}`` (targets
            among ``query``, ``key``, ``value``, ``output``), or None.
    """

    def __init__(self, num_heads, num_key_value_heads=None, head_dim=None, causal=False,
                 use_bias=True, scale_scores=True, rotary_theta=None, dropout=0.0,
                 kernel_initializer=None, lora=None, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads or num_heads
        self.head_dim = head_dim
        self.causal = causal
        self.use_bias = use_bias
        self.scale_scores = scale_scores
        self.rotary_theta = rotary_theta
        self.dropout = dropout
        self.kernel_initializer = kernel_initializer or keras.initializers.TruncatedNormal(
            stddev=0.02)
        self.lora = lora
        self.seed_generator = keras.random.SeedGenerator()

    def build(self, hidden_shape, padding_mask_shape=None, context_shape=None):
        hidden_dim = hidden_shape[-1]
        head_dim = self.head_dim or hidden_dim // self.num_heads
        self._head_dim = head_dim
        context_shape = context_shape or hidden_shape

        def projection(name, equation, output_shape, bias_axes, shape):
            arguments = dict(
                equation=equation, output_shape=output_shape,
                bias_axes=bias_axes if self.use_bias else None,
                kernel_initializer=self.kernel_initializer, name=name,
            )
            if self.lora and name in self.lora["targets"]:
                layer = LoRAEinsumDense(**arguments, rank=self.lora["rank"],
                                        alpha=self.lora["alpha"], dropout=self.lora["dropout"])
            else:
                layer = keras.layers.EinsumDense(**arguments)
            layer.build(shape)
            return layer

        def input_projection(name, heads, shape):
            return projection(name, "btd,dnh->btnh", (None, heads, head_dim), "nh", shape)

        self.query = input_projection("query", self.num_heads, hidden_shape)
        self.key = input_projection("key", self.num_key_value_heads, context_shape)
        self.value = input_projection("value", self.num_key_value_heads, context_shape)
        self.output_projection = projection(
            "output", "btnh,nhd->btd", (None, hidden_dim), "d",
            (*hidden_shape[:-1], self.num_heads, head_dim))

    def project_context(self, context):
        """Keys and values of a cross-attention context: computed once per
        generation and then passed as ``context``."""
        return self.key(context), self.value(context)

    def call(self, hidden, padding_mask, context=None, bias=None, cache=None, cache_index=0,
             training=False):
        """Attention from ``hidden`` to itself, or to ``context``.

        Args:
            hidden: ``(batch, length, hidden_dim)``.
            padding_mask: ``(batch, key_length)``, nonzero for the keys that may
                be attended to. In self-attention without a cache, values above 1
                number the documents packed into a row, and a query attends
                only to keys of its own document; negative values mark a prefix
                (of document ``-value``) that attends both ways even in a causal
                stack (prefix LM).
            context: cross-attention: the sequence to attend to, or its
                ``project_context`` pair computed earlier.
            bias: added to the scores, ``(1 or batch, heads, length, key_length)``.
            cache: self-attention during incremental decoding: a ``(keys, values)``
                pair of ``(batch, kv_heads, max_length, head_dim)``; this call's
                keys and values are written at ``cache_index`` and the call
                returns ``(output, cache)``.
            cache_index: position of ``hidden``'s first token.
        """
        query_positions = cache_index + tf.range(tf.shape(hidden)[1])
        query = self.query(hidden)
        if context is not None:
            key, value = context if isinstance(context, tuple) else self.project_context(context)
        else:
            key, value = self.key(hidden), self.value(hidden)
            if self.rotary_theta:
                query = apply_rotary(query, query_positions, self.rotary_theta)
                key = apply_rotary(key, query_positions, self.rotary_theta)
            if cache is not None:
                key = _write_at(cache[0], key, cache_index)
                value = _write_at(cache[1], value, cache_index)
                cache = (key, value)
        key_mask = tf.cast(padding_mask, tf.int32)[:, None, :]
        key_documents = tf.abs(key_mask)
        allowed = key_documents > 0
        if context is None and cache is None:
            # Packed rows number their documents in the padding mask: a token
            # attends within its own document (padding queries attend anywhere).
            query_documents = tf.transpose(key_documents, [0, 2, 1])
            allowed &= (query_documents == key_documents) | (query_documents == 0)
        if self.causal:
            key_positions = tf.range(tf.shape(key)[1 if cache is None else 2])
            visible = key_positions[None, None, :] <= query_positions[None, :, None]
            if context is None and cache is None:
                # A prefix (negative mask values) attends both ways: prefix LM.
                visible |= (key_mask < 0) & (tf.transpose(key_mask, [0, 2, 1]) < 0)
            allowed &= visible
        rate = self.dropout if training else 0.0
        # Draw from the seed stream only when dropout applies: evaluation must not
        # advance it, or a resumed run (which evaluates first) drifts from the
        # uninterrupted one.
        if rate:
            seed = tf.cast(keras.random.randint((2,), 0, 2**31 - 1, seed=self.seed_generator),
                           tf.int32)
        else:
            seed = tf.zeros((2,), tf.int32)
        scale = 1 / math.sqrt(self._head_dim) if self.scale_scores else 1.0
        core = attention_core.python_function if _outside_xla() else attention_core
        context = core(query, key, value, allowed, bias, seed, scale, rate,
                       head_major=cache is not None)
        output = self.output_projection(context)
        return output if cache is None else (output, cache)

    def get_config(self):
        return {
            **super().get_config(), "num_heads": self.num_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "causal": self.causal, "use_bias": self.use_bias,
            "scale_scores": self.scale_scores, "rotary_theta": self.rotary_theta,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "lora": self.lora,
        }


@keras.saving.register_keras_serializable(package="kerasllm")
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward: ``output(act(intermediate(x)))``, or gated
    (``output(act(gate(x)) * intermediate(x))``: SwiGLU with ``silu``, T5 v1.1's
    gated-GELU with ``gelu_approximate``)."""

    def __init__(self, intermediate_dim, activation="gelu", gated=False, use_bias=True,
                 kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.gated = gated
        self.use_bias = use_bias
        self.kernel_initializer = kernel_initializer or keras.initializers.TruncatedNormal(
            stddev=0.02)

    def build(self, input_shape):
        def dense(units, name, shape):
            layer = keras.layers.Dense(units, use_bias=self.use_bias, name=name,
                                       kernel_initializer=self.kernel_initializer)
            layer.build(shape)
            return layer

        self.intermediate = dense(self.intermediate_dim, "intermediate", input_shape)
        self.gate = dense(self.intermediate_dim, "gate", input_shape) if self.gated else None
        self.output_projection = dense(
            input_shape[-1], "output", (*input_shape[:-1], self.intermediate_dim))

    def call(self, hidden):
        activation = ACTIVATIONS[self.activation]
        if self.gated:
            inner = activation(self.gate(hidden)) * self.intermediate(hidden)
        else:
            inner = activation(self.intermediate(hidden))
        return self.output_projection(inner)

    def get_config(self):
        return {**super().get_config(), "intermediate_dim": self.intermediate_dim,
                "activation": self.activation, "gated": self.gated, "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@keras.saving.register_keras_serializable(package="kerasllm")
class TransformerBlock(keras.layers.Layer):
    """Self-attention, optional cross-attention and feed-forward sub-layers, each
    with a residual and a norm.

    Args:
        num_heads, num_key_value_heads, head_dim, intermediate_dim: sizes.
        activation, gated: the feed-forward (see ``FeedForward``).
        causal: causal self-attention.
        cross_attention: add a cross-attention sub-layer (encoder–decoder decoders).
        norm: ``layer`` or ``rms``.
        norm_first: pre-norm (normalise the sub-layer input: GPT-2, Llama, T5)
            instead of post-norm (normalise the residual sum: BERT).
        use_bias: biases on attention and feed-forward projections.
        scale_scores, rotary_theta: see ``Attention``.
        dropout: on attention probabilities and sub-layer outputs.
        layer_norm_epsilon: epsilon of the norms.
        lora: LoRA adapters (see ``Attention``) for the self-attention and the
            cross-attention alike, as PEFT's T5 targets (``q``, ``v``) name both.
    """

    def __init__(self, num_heads, intermediate_dim, num_key_value_heads=None, head_dim=None,
                 activation="gelu", gated=False, causal=False, cross_attention=False,
                 norm="layer", norm_first=False, use_bias=True, scale_scores=True,
                 rotary_theta=None, dropout=0.0, layer_norm_epsilon=1e-12, lora=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.activation = activation
        self.gated = gated
        self.causal = causal
        self.cross_attention = cross_attention
        self.norm = norm
        self.norm_first = norm_first
        self.use_bias = use_bias
        self.scale_scores = scale_scores
        self.rotary_theta = rotary_theta
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.lora = lora

    def build(self, hidden_shape, padding_mask_shape=None, context_shape=None):
        def attention(name, causal, rotary_theta):
            return Attention(
                self.num_heads, self.num_key_value_heads, self.head_dim, causal=causal,
                use_bias=self.use_bias, scale_scores=self.scale_scores,
                rotary_theta=rotary_theta, dropout=self.dropout, lora=self.lora, name=name,
            )

        def norm(name):
            layer = make_norm(self.norm, self.layer_norm_epsilon, name)
            layer.build(hidden_shape)
            return layer

        self.attention = attention("attention", self.causal, self.rotary_theta)
        self.attention.build(hidden_shape)
        self.attention_norm = norm("attention_norm")
        self.cross = self.cross_norm = None
        if self.cross_attention:
            self.cross = attention("cross_attention", False, None)
            self.cross.build(hidden_shape, context_shape=context_shape or hidden_shape)
            self.cross_norm = norm("cross_attention_norm")
        self.feed_forward = FeedForward(self.intermediate_dim, self.activation, self.gated,
                                        self.use_bias, name="feed_forward")
        self.feed_forward.build(hidden_shape)
        self.feed_forward_norm = norm("feed_forward_norm")
        self.output_dropout = Dropout(self.dropout)

    def call(self, hidden, padding_mask, position_bias=None, context=None, context_mask=None,
             cache=None, cache_index=0, training=False):
        """``context``: the encoder output (or its ``project_context`` pair, when
        decoding incrementally) for the cross-attention. With a ``cache`` (the
        self-attention's, see ``Attention``) returns ``(hidden, cache)``."""
        def self_attention(x):
            nonlocal cache
            if cache is None:
                return self.attention(x, padding_mask, bias=position_bias, training=training)
            x, cache = self.attention(x, padding_mask, bias=position_bias, cache=cache,
                                      cache_index=cache_index, training=training)
            return x

        hidden = self._residual(hidden, self.attention_norm, training, self_attention)
        if self.cross is not None:
            hidden = self._residual(
                hidden, self.cross_norm, training,
                lambda x: self.cross(x, context_mask, context=context, training=training),
            )
        hidden = self._residual(hidden, self.feed_forward_norm, training, self.feed_forward)
        return hidden if cache is None else (hidden, cache)

    def _residual(self, hidden, norm, training, sublayer):
        if self.norm_first:
            return hidden + self.output_dropout(sublayer(norm(hidden)), training=training)
        return norm(hidden + self.output_dropout(sublayer(hidden), training=training))

    def get_config(self):
        return {
            **super().get_config(), "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "activation": self.activation, "gated": self.gated, "causal": self.causal,
            "cross_attention": self.cross_attention, "norm": self.norm,
            "norm_first": self.norm_first, "use_bias": self.use_bias,
            "scale_scores": self.scale_scores, "rotary_theta": self.rotary_theta,
            "dropout": self.dropout, "layer_norm_epsilon": self.layer_norm_epsilon,
            "lora": self.lora,
        }
