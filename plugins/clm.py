"""Causal language modelling: predict every next token (GPT; T5's decoder)."""

import keras
import tensorflow as tf

import kerasllm
from kerasllm.heads import TokenPredictionHead


class CausalLM(TokenPredictionHead):
    """Next-token prediction through the backbone's output projection (tied to
    the token embedding or not); no options. On an encoder–decoder it predicts
    the decoder's tokens (``decoder_token_ids``) given the encoder's input."""

    requires_causal = True

    def __init__(self, backbone, tokenizer, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        self.backbone = backbone
        self.prefix = "decoder_" if backbone.kind == "encoder_decoder" else ""

    def prepare(self, features, seed):
        token_ids = features[f"{self.prefix}token_ids"]
        documents = features[f"{self.prefix}padding_mask"]
        # Position i predicts token i + 1 of the same document; the last position
        # of a row, and of each document packed into it, has nothing to predict.
        labels = keras.ops.pad(token_ids[:, 1:], [[0, 0], [0, 1]])
        same_document = (documents[:, 1:] > 0) & (documents[:, 1:] == documents[:, :-1])
        weights = keras.ops.pad(tf.cast(same_document, tf.int32), [[0, 0], [0, 1]])
        return features, {"ids": labels, "weights": weights}

    def call(self, backbone_outputs, inputs, training=False):
        return self.backbone.logits(backbone_outputs["sequence_output"])


@kerasllm.hookimpl
def kerasllm_objectives():
    return {"clm": CausalLM}
