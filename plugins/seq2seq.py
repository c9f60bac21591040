"""Sequence-to-sequence fine-tuning of an encoder–decoder (T5): a response to each prompt.

Examples hold ``prompt`` (the input) and ``response`` (the target) strings
(``text`` stands for ``prompt`` when there is none, as ``model.predict("...")``
gives it). As T5 fine-tunes (Raffel et al. 2020, §2.4)::

    encoder:  prompt </s>                    (and the start token, where the tokenizer adds one)
    decoder:  <pad> response                 (the targets shifted right behind the pad
    targets:  response </s>                   token, T5's decoder_start_token_id)

The encoder's input is packed as the tokenizer packs one sequence, cut at its
end when too long (the end token stays); the targets are cut to the row length
the same way. The loss is the cross-entropy of the target tokens. Answers are
greedy generations (``model.generate``): the decoded output, scored as SQuAD
answers are (exact match and token F1 after ``squad_normalize``, in percent).
"""

import tensorflow as tf

import kerasllm
from kerasllm.task_inputs import segment_packer
from kerasllm_plugins.causal_lm import GenerativeHead


class Seq2Seq(GenerativeHead):
    """An encoder–decoder fine-tuned to answer each ``prompt`` with its ``response``.

    Args:
        max_new_tokens: the longest response generated (in tokens) for
            ``model.predict`` and ``kerasllm evaluate``.
    """

    plugin_name = "seq2seq"
    model_kind = "encoder_decoder"
    other_head = "for a decoder-only model use the causal_lm head"
    # Its rows carry the decoder's inputs, which build_dataset asks one head
    # of an encoder–decoder to build.
    builds_sequences = True

    def pack(self, tokenizer, prompts, responses, sequence_length):
        rows = segment_packer(tokenizer, sequence_length, 1)([prompts])
        if responses is None:
            return rows
        end = tf.fill([responses.nrows(), 1], self.tokens.end)
        targets = tf.concat([responses[:, :sequence_length - 1], end], axis=1)
        target_ids = targets.to_tensor(self.tokens.pad, shape=[None, sequence_length])
        weights = tf.ones_like(targets).to_tensor(0, shape=[None, sequence_length])
        # Teacher forcing: the decoder reads the targets one step late.
        decoder_ids = tf.pad(target_ids[:, :-1], [[0, 0], [1, 0]],
                             constant_values=self.tokens.pad)
        return {**rows, "decoder_token_ids": decoder_ids, "decoder_padding_mask": weights,
                "target_ids": target_ids, "target_weights": weights}

    def response_ids(self, prompt, generated):
        return generated  # the prompt went to the encoder


@kerasllm.hookimpl
def kerasllm_task_heads():
    return {"seq2seq": Seq2Seq}
