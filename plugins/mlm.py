"""Masked language modelling (BERT).

15% of the non-special tokens of each sequence are selected; of those, 80%
become ``[MASK]``, 10% a random token and 10% stay unchanged. With
``whole_word_masking``, whole words are selected (all pieces of ``play ##ing``
or neither). Masks are drawn inside the tf.data pipeline from the batch's seed,
so an example gets new masks every time it is seen (dynamic masking, as in
RoBERTa) while a seeded run stays reproducible. Logits are computed only at the
selected positions, through a head tied to the input embedding.

Served (``kerasllm export``), the objective fills masks: texts holding the
tokenizer's mask token (``[MASK]``) in, the most likely tokens for each mask out.
"""

import keras
import keras_hub
import tensorflow as tf

import kerasllm
from kerasllm.heads import TokenPredictionHead
from kerasllm.layers import ACTIVATIONS
from kerasllm.masking import TokenMasking
from kerasllm.task_inputs import segment_packer
from kerasllm.tokenizers import token_strings


class MaskedLM(TokenPredictionHead):
    """Args:
        selection_rate: fraction of non-special tokens selected for prediction.
        mask_token_rate: of the selected, the fraction replaced by the mask token.
        random_token_rate: of the selected, the fraction replaced by a random token.
        whole_word_masking: select whole words rather than single tokens.
        serving_top_k: the fillers an exported model gives for each mask.

    Serving: ``serving_default`` takes ``text`` ``(batch,)`` string, texts
    holding the tokenizer's mask token as written in its vocabulary
    (``[MASK]``, case-sensitive; the text is split there and each piece
    tokenized, so the token needs no spaces around it); ``serve_token_ids``
    finds the mask token's id in ``token_ids``. Outputs, with ``masks`` the
    most masks of any text of the request and ``k`` = ``serving_top_k``:

    - ``mask_positions`` ``(batch, masks)`` int32: each mask's position in the
      packed row (``[CLS]`` is 0), in order; -1 pads rows with fewer masks.
    - ``filler_ids`` ``(batch, masks, k)`` int32: the ``k`` most likely token
      ids at each mask, most likely first; -1 at padding.
    - ``filler_tokens`` ``(batch, masks, k)`` string: those tokens as the
      vocabulary writes them (``##ing``, ``▁word``); empty at padding.
    - ``filler_probabilities`` ``(batch, masks, k)`` float32: their softmax
      probabilities over the whole vocabulary; 0 at padding.

    A text is cut to ``data.sequence_length`` tokens as in training (the end
    token kept); masks cut off with it are not reported. A text without a mask
    gives only padding (``masks`` is 0 when no text of the request has one);
    the ``embedding`` output is served alongside.
    """

    input_keys = ("mask_positions",)
    requires_causal = False

    def __init__(self, backbone, tokenizer, selection_rate=0.15, mask_token_rate=0.8,
                 random_token_rate=0.1, whole_word_masking=False, serving_top_k=5,
                 **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        self.masking = TokenMasking(backbone, tokenizer, selection_rate, mask_token_rate,
                                    random_token_rate, whole_word_masking)
        if isinstance(serving_top_k, bool) or not isinstance(serving_top_k, int) \
                or not 1 <= serving_top_k <= backbone.vocabulary_size:
            raise ValueError(f"serving_top_k must be an integer in [1, vocabulary size "
                             f"{backbone.vocabulary_size}], got {serving_top_k!r}")
        self.serving_top_k = serving_top_k
        self.mask_string = tokenizer.id_to_token(self.masking.mask_token)
        # A numpy array, which Keras does not track.
        self.vocabulary = token_strings(tokenizer, backbone.vocabulary_size)
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

    # === Serving ===

    def serving_inputs(self):
        return {"text": tf.TensorSpec([None], tf.string)}

    def serving_rows(self, inputs, tokenizer, sequence_length):
        # The tokenizers split "[MASK]" into "[", "mask", "]" (keras-hub's
        # special_tokens_in_strings is off by default): split the text at the
        # mask token, tokenize the pieces, and put the mask id between them.
        pieces = tf.strings.split(inputs["text"], self.mask_string)
        tokens = tokenizer(pieces.flat_values)
        if not isinstance(tokens, tf.RaggedTensor):
            tokens = tf.RaggedTensor.from_tensor(tokens)
        tokens = tf.cast(tokens, tf.int32)
        # Every piece but a text's last is followed by a mask.
        last = pieces.row_limits() - 1
        followed = tf.tensor_scatter_nd_update(
            tf.ones_like(pieces.flat_values, tf.int32), last[:, None],
            tf.zeros_like(last, tf.int32))
        masks = tf.RaggedTensor.from_row_lengths(
            tf.fill([tf.reduce_sum(followed)], self.masking.mask_token),
            tf.cast(followed, tokens.row_splits.dtype))
        ids = tf.RaggedTensor.from_row_splits(tf.concat([tokens, masks], axis=1),
                                              pieces.row_splits).merge_dims(1, 2)
        rows = segment_packer(tokenizer, sequence_length, 1)([ids])
        return self.serving_token_rows(rows)

    def serving_token_rows(self, rows):
        """``mask_positions`` (0 where padding, for the gather) and
        ``mask_weights`` (1.0 for a mask) of the mask tokens in the rows."""
        token_ids = rows["token_ids"]
        masked = (token_ids == self.masking.mask_token) & (rows["padding_mask"] > 0)
        length = tf.shape(token_ids)[1]
        positions = tf.broadcast_to(tf.range(length), tf.shape(token_ids))
        count = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(masked, tf.int32), axis=1)), 0)
        # The masks' positions first, in order; the others sort after them.
        ordered = tf.sort(tf.where(masked, positions, length + positions), axis=1)[:, :count]
        valid = ordered < length
        return {**rows, "mask_positions": tf.where(valid, ordered, 0),
                "mask_weights": tf.cast(valid, tf.float32)}

    def serving_outputs(self, predictions, rows, inputs):
        probabilities = tf.nn.softmax(tf.cast(predictions, tf.float32))
        best, ids = tf.math.top_k(probabilities, k=self.serving_top_k)
        valid = rows["mask_weights"] > 0
        fills = valid[..., None]
        return {
            "mask_positions": tf.where(valid, rows["mask_positions"], -1),
            "filler_ids": tf.where(fills, ids, -1),
            "filler_tokens": tf.where(fills, tf.gather(tf.constant(self.vocabulary), ids), ""),
            "filler_probabilities": tf.where(fills, best, 0.0),
        }


@kerasllm.hookimpl
def kerasllm_objectives():
    return {"mlm": MaskedLM}
