"""Masked language modelling (BERT).

15% of the non-special tokens of each sequence are selected; of those, 80%
become ``[MASK]``, 10% a random token and 10% stay unchanged. With
``whole_word_masking``, whole words are selected (all pieces of ``play ##ing``
or neither). Masks are drawn inside the tf.data pipeline from the batch's seed,
so an example gets new masks every time it is seen (dynamic masking, as in
RoBERTa) while a seeded run stays reproducible. Logits are computed only at the
selected positions, through a head tied to the input embedding.
"""

import keras
import keras_hub

import kerasllm
from kerasllm.heads import TokenPredictionHead
from kerasllm.layers import ACTIVATIONS
from kerasllm.masking import TokenMasking


class MaskedLM(TokenPredictionHead):
    """Args:
        selection_rate: fraction of non-special tokens selected for prediction.
        mask_token_rate: of the selected, the fraction replaced by the mask token.
        random_token_rate: of the selected, the fraction replaced by a random token.
        whole_word_masking: select whole words rather than single tokens.
    """

    input_keys = ("mask_positions",)
    requires_causal = False

    def __init__(self, backbone, tokenizer, selection_rate=0.15, mask_token_rate=0.8,
                 random_token_rate=0.1, whole_word_masking=False, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        self.masking = TokenMasking(backbone, tokenizer, selection_rate, mask_token_rate,
                                    random_token_rate, whole_word_masking)
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

    def prepare(self, features, seed):
        masked = self.masking(features, seed)
        features = {**features, "token_ids": masked["token_ids"],
                    "mask_positions": masked["mask_positions"]}
        return features, {"ids": masked["mask_ids"], "weights": masked["mask_weights"]}

    def call(self, backbone_outputs, inputs, training=False):
        return self.lm_head(backbone_outputs["sequence_output"],
                            mask_positions=inputs["mask_positions"])


@kerasllm.hookimpl
def kerasllm_objectives():
    return {"mlm": MaskedLM}
