"""Masked language modelling (BERT).

15% of the non-special tokens of each sequence are selected; of those, 80%
become ``[MASK]``, 10% a random token and 10% stay unchanged. Masks are drawn
inside the tf.data pipeline, so an example gets new masks every time it is seen
(dynamic masking, as in RoBERTa). Logits are computed only at the selected
positions, through a head tied to the input embedding.
"""

import math

import keras
import keras_hub

import kerasllm
from kerasllm.heads import TokenPredictionHead
from kerasllm.layers import ACTIVATIONS
from kerasllm.tokenizers import special_tokens


class MaskedLM(TokenPredictionHead):
    """Args:
        selection_rate: fraction of non-special tokens selected for prediction.
        mask_token_rate: of the selected, the fraction replaced by the mask token.
        random_token_rate: of the selected, the fraction replaced by a random token.
    """

    input_keys = ("mask_positions",)
    requires_causal = False

    def __init__(self, backbone, tokenizer, selection_rate=0.15, mask_token_rate=0.8,
                 random_token_rate=0.1, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        for name, rate in [("selection_rate", selection_rate),
                           ("mask_token_rate", mask_token_rate),
                           ("random_token_rate", random_token_rate)]:
            if not 0 <= rate <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        if mask_token_rate + random_token_rate > 1:
            raise ValueError("mask_token_rate + random_token_rate must be <= 1")
        tokens = special_tokens(tokenizer)
        if tokens.mask is None:
            raise ValueError("the tokenizer has no mask token; mlm needs one")
        sequence_length = backbone.max_sequence_length
        self.mask_generator = keras_hub.layers.MaskedLMMaskGenerator(
            vocabulary_size=backbone.vocabulary_size,
            mask_selection_rate=selection_rate,
            mask_token_id=tokens.mask,
            # Room for every selection: the selector picks ceil(rate * n) per row.
            mask_selection_length=math.ceil(selection_rate * sequence_length) + 1,
            unselectable_token_ids=sorted(
                {t for t in (tokens.pad, tokens.start, tokens.end) if t is not None}),
            mask_token_rate=mask_token_rate,
            random_token_rate=random_token_rate,
        )
        self.lm_head = keras_hub.layers.MaskedLMHead(
            vocabulary_size=backbone.vocabulary_size,
            token_embedding=backbone.token_embedding,
            # BERT's and RoBERTa's LM heads: the backbone's activation and epsilon.
            intermediate_activation=ACTIVATIONS[backbone.activation],
            layer_norm_epsilon=backbone.layer_norm_epsilon,
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="lm_head",
        )

    def build(self, sequence_output_shape):
        self.lm_head.build(sequence_output_shape, (None, None))

    def prepare(self, features):
        masked = self.mask_generator(features["token_ids"])
        features = {**features, "token_ids": masked["token_ids"],
                    "mask_positions": masked["mask_positions"]}
        return features, {"ids": masked["mask_ids"], "weights": masked["mask_weights"]}

    def call(self, backbone_outputs, inputs, training=False):
        return self.lm_head(backbone_outputs["sequence_output"],
                            mask_positions=inputs["mask_positions"])


@kerasllm.hookimpl
def kerasllm_objectives():
    return {"mlm": MaskedLM}
