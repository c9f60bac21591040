"""Causal language modelling: predict every next token (GPT)."""

import keras

import kerasllm
from kerasllm.heads import TokenPredictionHead


class CausalLM(TokenPredictionHead):
    """Next-token prediction through the tied input embedding; no options."""

    requires_causal = True

    def __init__(self, backbone, tokenizer, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        self.token_embedding = backbone.token_embedding

    def prepare(self, features):
        token_ids, padding_mask = features["token_ids"], features["padding_mask"]
        # Position i predicts token i + 1; the last position has nothing to predict.
        labels = keras.ops.pad(token_ids[:, 1:], [[0, 0], [0, 1]])
        weights = keras.ops.pad(padding_mask[:, 1:], [[0, 0], [0, 1]])
        return features, {"ids": labels, "weights": weights}

    def call(self, backbone_outputs, inputs, training=False):
        return self.token_embedding(backbone_outputs["sequence_output"], reverse=True)


@kerasllm.hookimpl
def kerasllm_objectives():
    return {"clm": CausalLM}
