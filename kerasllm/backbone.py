"""The backbone: token ids in, hidden states out."""

import keras
import tensorflow as tf

from kerasllm.embeddings import RelativePositionBias, TextEmbedding
from kerasllm.errors import ConfigError
from kerasllm.layers import TransformerBlock, make_norm


@keras.saving.register_keras_serializable(package="kerasllm")
class Backbone(keras.Model):
    """A Transformer encoder, decoder-only or encoder–decoder stack.

    A functional model. Inputs are a dict with ``token_ids`` and ``padding_mask``
    (1 for real tokens, 0 for padding; rows packed with several documents number
    them 1, 2, … and attention stays within each document; in a decoder, negative
    values mark a prefix that attends both ways, for prefix LMs), ``segment_ids`` when ``num_segments > 0`` and, for
    encoder–decoders, ``decoder_token_ids`` and ``decoder_padding_mask``. Outputs
    are a dict with ``sequence_output`` ``(batch, length, hidden_dim)`` (the
    decoder's, for encoder–decoders, which also give ``encoder_sequence_output``)
    and, with a pooler, ``pooled_output`` (tanh dense over the first token, BERT).
    ``logits(sequence_output)`` projects to the vocabulary.

    The architecture families are presets of these arguments (``kerasllm.presets``):
    BERT/RoBERTa (post-norm, learned positions, segments, erf GELU, pooler),
    GPT-2 (pre-norm, learned positions, tanh GELU), Llama (RMS norm, rotary,
    SwiGLU, grouped-query attention, no biases), T5 (encoder–decoder, relative
    position bias, RMS norm, unscaled attention, ReLU or gated-GELU).

    Args:
        vocabulary_size: rows of the token embedding (and output projection).
        num_layers, num_heads, hidden_dim, intermediate_dim: stack sizes.
        max_sequence_length: rows of the learned position table (also the
            longest sequence with rotary or relative positions).
        kind: ``encoder`` (bidirectional), ``decoder`` (causal) or
            ``encoder_decoder`` (T5).
        num_decoder_layers: decoder depth of an encoder–decoder; default ``num_layers``.
        num_key_value_heads: grouped-query attention; default ``num_heads``.
        head_dim: per-head size; default ``hidden_dim // num_heads``.
        num_segments: segment-embedding table size; 0 for none.
        norm: ``layer`` or ``rms``.
        norm_first: pre-norm blocks with a final norm instead of post-norm blocks
            with an embedding norm.
        activation: ``gelu`` (erf), ``gelu_approximate`` (tanh), ``relu``, ``silu``.
        gated_feed_forward: gated feed-forward (SwiGLU, gated-GELU).
        use_bias: biases on attention and feed-forward projections.
        position_embedding: ``learned``, ``rotary`` or ``relative`` (T5).
        position_offset: first row of the learned position table (RoBERTa: 2).
        rotary_theta: base of the rotary frequencies.
        relative_buckets, relative_max_distance: T5's bucketing.
        scale_scores: scale attention scores by ``1/sqrt(head_dim)`` (T5: no).
        tie_embeddings: the output projection is the token embedding.
        scale_logits: multiply hidden states by ``hidden_dim ** -0.5`` before the
            output projection (T5, whose tied embeddings are not rescaled).
        dropout: dropout rate throughout.
        layer_norm_epsilon: epsilon of every norm.
        pooler: add ``pooled_output``; default: encoders only.
        lora: LoRA adapters on the attention projections (``kerasllm.lora``),
            ``{"rank", "alpha", "dropout", "targets", "layers"}`` as
            ``kerasllm.config.LoRAConfig``; ``layers`` indexes the blocks of each
            stack (None: all). None for none.

    Examples:
    ```python
    backbone = kerasllm.Backbone(
        vocabulary_size=1000, num_layers=2, num_heads=4, hidden_dim=64,
        intermediate_dim=128, max_sequence_length=32,
    )
    outputs = backbone({
        "token_ids": np.ones((2, 16), "int32"),
        "padding_mask": np.ones((2, 16), "int32"),
        "segment_ids": np.zeros((2, 16), "int32"),
    })
    outputs["sequence_output"].shape  # (2, 16, 64)
    ```
    """

    def __init__(self, vocabulary_size, num_layers, num_heads, hidden_dim, intermediate_dim,
                 max_sequence_length, kind="encoder", num_decoder_layers=None,
                 num_key_value_heads=None, head_dim=None, num_segments=2, norm="layer",
                 norm_first=False, activation="gelu", gated_feed_forward=False, use_bias=True,
                 position_embedding="learned", position_offset=0, rotary_theta=10000.0,
                 relative_buckets=32, relative_max_distance=128, scale_scores=True,
                 tie_embeddings=True, scale_logits=False, dropout=0.1, layer_norm_epsilon=1e-12,
                 pooler=None, lora=None, **kwargs):
        if pooler is None:
            pooler = kind == "encoder"
        # === Layers ===
        embedding = TextEmbedding(
            vocabulary_size, hidden_dim,
            max_sequence_length if position_embedding == "learned" else 0, num_segments,
            normalize=not norm_first, dropout=dropout, layer_norm_epsilon=layer_norm_epsilon,
            position_offset=position_offset, tie_weights=tie_embeddings, norm=norm,
            name="embedding",
        )

        block_lora = None if lora is None else {
            key: value for key, value in lora.items() if key != "layers"}

        def stack(prefix, count, causal, cross_attention):
            adapted = _lora_blocks(lora, count)
            blocks = [
                TransformerBlock(
                    num_heads, intermediate_dim, num_key_value_heads, head_dim, activation,
                    gated_feed_forward, causal, cross_attention, norm, norm_first, use_bias,
                    scale_scores, rotary_theta if position_embedding == "rotary" else None,
                    dropout, layer_norm_epsilon, lora=block_lora if i in adapted else None,
                    name=f"{prefix}block_{i}",
                )
                for i in range(count)
            ]
            bias = RelativePositionBias(
                num_heads, relative_buckets, relative_max_distance, bidirectional=not causal,
                name=f"{prefix}position_bias",
            ) if position_embedding == "relative" else None
            final_norm = make_norm(norm, layer_norm_epsilon, f"{prefix}final_norm") \
                if norm_first else None
            return blocks, bias, final_norm

        encoder_decoder = kind == "encoder_decoder"
        if encoder_decoder:
            encoder_stack = stack("encoder_", num_layers, False, False)
        decoder_stack = stack("", num_decoder_layers or num_layers if encoder_decoder
                              else num_layers, kind != "encoder", encoder_decoder)
        pooler_dense = keras.layers.Dense(
            hidden_dim, activation="tanh", name="pooler") if pooler else None

        # === Functional Model ===
        inputs = {
            "token_ids": keras.Input((None,), dtype="int32", name="token_ids"),
            "padding_mask": keras.Input((None,), dtype="int32", name="padding_mask"),
        }
        if num_segments:
            inputs["segment_ids"] = keras.Input((None,), dtype="int32", name="segment_ids")
        hidden = embedding(inputs["token_ids"], inputs.get("segment_ids"))
        outputs = {}
        if encoder_decoder:
            for name in ("decoder_token_ids", "decoder_padding_mask"):
                inputs[name] = keras.Input((None,), dtype="int32", name=name)
            context = Backbone._run_stack(encoder_stack, hidden, inputs["padding_mask"])
            outputs["encoder_sequence_output"] = context
            hidden = Backbone._run_stack(
                decoder_stack, embedding(inputs["decoder_token_ids"]),
                inputs["decoder_padding_mask"], context, inputs["padding_mask"])
        else:
            hidden = Backbone._run_stack(decoder_stack, hidden, inputs["padding_mask"])
        outputs["sequence_output"] = hidden
        if pooler_dense is not None:
            outputs["pooled_output"] = pooler_dense(hidden[:, 0])
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.max_sequence_length = max_sequence_length
        self.kind = kind
        self.num_decoder_layers = num_decoder_layers
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.num_segments = num_segments
        self.norm = norm
        self.norm_first = norm_first
        self.activation = activation
        self.gated_feed_forward = gated_feed_forward
        self.use_bias = use_bias
        self.position_embedding = position_embedding
        self.position_offset = position_offset
        self.rotary_theta = rotary_theta
        self.relative_buckets = relative_buckets
        self.relative_max_distance = relative_max_distance
        self.scale_scores = scale_scores
        self.tie_embeddings = tie_embeddings
        self.scale_logits = scale_logits
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.pooler = pooler
        self.lora = lora
        self.embedding = embedding
        self.token_embedding = embedding.token_embedding
        self.encoder_stack = encoder_stack if encoder_decoder else None
        self.decoder_stack = decoder_stack

    @staticmethod
    def _run_stack(stack, hidden, padding_mask, context=None, context_mask=None,
                   cache=None, cache_index=0):
        """Blocks, shared position bias and final norm; with a ``cache`` (one per
        block) returns ``(hidden, cache)``. ``context``: the encoder output, or per
        block its cross-attention key/value pair."""
        blocks, bias_layer, final_norm = stack
        bias = None
        if bias_layer is not None:
            bias = bias_layer(hidden, key_length=None if cache is None else
                              tf.shape(cache[0][0])[2], query_offset=cache_index)
        new_cache = []
        for i, block in enumerate(blocks):
            block_context = context[i] if isinstance(context, list) else context
            if cache is None:
                hidden = block(hidden, padding_mask, bias, block_context, context_mask)
            else:
                hidden, block_cache = block(hidden, padding_mask, bias, block_context,
                                            context_mask, cache=cache[i],
                                            cache_index=cache_index)
                new_cache.append(block_cache)
        if final_norm is not None:
            hidden = final_norm(hidden)
        return hidden if cache is None else (hidden, new_cache)

    @property
    def causal(self):
        """Whether the (decoder) stack that produces ``sequence_output`` is causal."""
        return self.kind != "encoder"

    @property
    def input_keys(self):
        keys = ("token_ids", "padding_mask") + (("segment_ids",) if self.num_segments else ())
        if self.kind == "encoder_decoder":
            keys += ("decoder_token_ids", "decoder_padding_mask")
        return keys

    def logits(self, sequence_output, output_matrix=None):
        """Vocabulary logits from ``sequence_output``, through the token embedding
        (tied) or the separate output matrix.

        ``output_matrix``: :meth:`output_matrix`, for a loop that calls this at
        every step with the matrix computed once before it: XLA on CPU multiplies
        a few rows by the tied embedding's transpose twice as slowly as by a
        transposed copy."""
        if self.scale_logits:
            sequence_output = sequence_output * self.hidden_dim ** -0.5
        if output_matrix is None:
            return self.token_embedding(sequence_output, reverse=True)
        return keras.ops.matmul(sequence_output, output_matrix)

    def output_matrix(self):
        """The ``(hidden_dim, vocabulary_size)`` matrix :meth:`logits` projects through,
        in the compute dtype."""
        embedding = self.token_embedding
        matrix = (keras.ops.transpose(embedding.embeddings) if embedding.tie_weights
                  else embedding.reverse_embeddings)
        return keras.ops.cast(matrix, self.compute_dtype)

    # === Incremental decoding (``kerasllm.generation``) ===

    def encode(self, inputs):
        """Encoder–decoders: per decoder block, the cross-attention key/value pair
        of the encoded ``inputs`` (computed once per generation)."""
        hidden = self.embedding(inputs["token_ids"], inputs.get("segment_ids"))
        context = self._run_stack(self.encoder_stack, hidden, inputs["padding_mask"])
        return [block.cross.project_context(context) for block in self.decoder_stack[0]]

    def empty_cache(self, batch_size, max_length):
        """Zeroed self-attention key/value caches, one pair per decoder block."""
        cache = []
        for block in self.decoder_stack[0]:
            attention = block.attention
            shape = (batch_size, attention.num_key_value_heads, max_length,
                     attention._head_dim)
            zeros = tf.zeros(shape, self.compute_dtype)
            cache.append((zeros, zeros))
        return cache

    def decode_step(self, token_ids, cache, cache_index, context=None, context_mask=None):
        """Run ``token_ids`` ``(batch, length)``, at positions ``cache_index``
        onwards, through the decoder stack with a cache; returns
        ``(sequence_output, cache)``. Keys beyond the written positions are
        never attended to: attention with a cache is causal."""
        hidden = self.embedding(token_ids, start_index=cache_index)
        cache_shape = tf.shape(cache[0][0])
        key_mask = tf.ones([cache_shape[0], cache_shape[2]], tf.int32)
        return self._run_stack(self.decoder_stack, hidden, key_mask, context, context_mask,
                               cache=cache, cache_index=cache_index)

    def get_config(self):
        return {
            "name": self.name, "trainable": self.trainable,
            "vocabulary_size": self.vocabulary_size, "num_layers": self.num_layers,
            "num_heads": self.num_heads, "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "max_sequence_length": self.max_sequence_length, "kind": self.kind,
            "num_decoder_layers": self.num_decoder_layers,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "num_segments": self.num_segments, "norm": self.norm,
            "norm_first": self.norm_first, "activation": self.activation,
            "gated_feed_forward": self.gated_feed_forward, "use_bias": self.use_bias,
            "position_embedding": self.position_embedding,
            "position_offset": self.position_offset, "rotary_theta": self.rotary_theta,
            "relative_buckets": self.relative_buckets,
            "relative_max_distance": self.relative_max_distance,
            "scale_scores": self.scale_scores, "tie_embeddings": self.tie_embeddings,
            "scale_logits": self.scale_logits,
            "dropout": self.dropout, "layer_norm_epsilon": self.layer_norm_epsilon,
            "pooler": self.pooler, "lora": self.lora,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _lora_blocks(lora, count):
    """The indices, among a stack's ``count`` blocks, that ``lora["layers"]`` selects."""
    if lora is None:
        return set()
    if lora.get("layers") is None:
        return set(range(count))
    for index in lora["layers"]:
        if not -count <= index < count:
            raise ConfigError(
                f"model.lora.layers: block {index} is out of range for a stack of {count} "
                f"layers; use 0 to {count - 1}, or -1 to -{count} counting from the end")
    return {index % count for index in lora["layers"]}
