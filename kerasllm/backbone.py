"""The backbone: token ids in, hidden states out."""

import keras

from kerasllm.layers import TextEmbedding, TransformerBlock


@keras.saving.register_keras_serializable(package="kerasllm")
class Backbone(keras.Model):
    """A Transformer encoder (bidirectional) or decoder-only (causal) stack.

    A functional model. Inputs are a dict with ``token_ids`` and ``padding_mask``
    (1 for real tokens) and, when ``num_segments > 0``, ``segment_ids``; outputs are
    a dict with ``sequence_output`` ``(batch, length, hidden_dim)`` and, with a
    pooler, ``pooled_output`` ``(batch, hidden_dim)`` (tanh dense over the first
    token, as in BERT).

    Args:
        vocabulary_size: size of the token embedding (and tied output) table.
        num_layers, num_heads, hidden_dim, intermediate_dim: stack sizes.
        max_sequence_length: size of the learned position table.
        causal: decoder-only (causal) attention instead of bidirectional.
        num_segments: segment-embedding table size; 0 for none.
        norm_first: pre-LN blocks with a final layer norm (GPT-2) instead of
            post-LN blocks with an embedding layer norm (BERT).
        dropout: dropout rate throughout.
        activation: feed-forward activation: ``gelu`` (erf), ``gelu_approximate``
            (tanh), ``relu``.
        layer_norm_epsilon: epsilon of every layer norm.
        pooler: add ``pooled_output``.

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
                 max_sequence_length, causal=False, num_segments=2, norm_first=False,
                 dropout=0.1, activation="gelu", layer_norm_epsilon=1e-12, pooler=True,
                 **kwargs):
        # === Layers ===
        embedding = TextEmbedding(
            vocabulary_size, hidden_dim, max_sequence_length, num_segments,
            normalize=not norm_first, dropout=dropout,
            layer_norm_epsilon=layer_norm_epsilon, name="embedding",
        )
        blocks = [
            TransformerBlock(
                num_heads, intermediate_dim, activation, causal, norm_first, dropout,
                layer_norm_epsilon, name=f"block_{i}",
            )
            for i in range(num_layers)
        ]
        final_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="final_norm") if norm_first else None
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
        for block in blocks:
            hidden = block(hidden, inputs["padding_mask"])
        if final_norm is not None:
            hidden = final_norm(hidden)
        outputs = {"sequence_output": hidden}
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
        self.causal = causal
        self.num_segments = num_segments
        self.norm_first = norm_first
        self.dropout = dropout
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.pooler = pooler
        self.token_embedding = embedding.token_embedding

    def get_config(self):
        return {
            "name": self.name, "trainable": self.trainable,
            "vocabulary_size": self.vocabulary_size, "num_layers": self.num_layers,
            "num_heads": self.num_heads, "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "max_sequence_length": self.max_sequence_length, "causal": self.causal,
            "num_segments": self.num_segments, "norm_first": self.norm_first,
            "dropout": self.dropout, "activation": self.activation,
            "layer_norm_epsilon": self.layer_norm_epsilon, "pooler": self.pooler,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @property
    def input_keys(self):
        return ("token_ids", "padding_mask") + (("segment_ids",) if self.num_segments else ())
