"""Generative fine-tuning of a decoder: a response to each prompt (instruction tuning).

Examples hold ``prompt`` and ``response`` strings (``text`` stands for
``prompt`` when there is none: what ``model.predict("...")`` makes of a plain
string). A row is one sequence::

    [start] prompt response [end] [pad] …

with the start token only where the tokenizer adds one (BERT's ``[CLS]``,
Llama's ``<s>``; GPT-2 none). A row too long loses the prompt's first tokens:
the response, which carries the loss, is kept whole; only a response that alone
overflows the row is cut, and it is still closed by the end token, as
keras-hub's packers close a truncated sequence. The loss is the next-token
cross-entropy of the response and the end token only; the positions that would
predict prompt tokens weigh 0 ("completion-only" training, as InstructGPT's
supervised fine-tuning and TRL's ``DataCollatorForCompletionOnlyLM``).

Answers are greedy generations (``model.generate``) from the prompt, the
response text alone; they are scored as SQuAD answers are: exact match and
token F1 after ``squad_normalize``, in percent. The perplexity is the
exponential of ``<name>_loss``, which ``fit`` and ``evaluate`` log.
"""

import numbers

import tensorflow as tf

import kerasllm
from kerasllm import metrics
from kerasllm.data import TOKENIZE_BATCH
from kerasllm.generation import detokenize
from kerasllm.heads import TokenPredictionHead
from kerasllm.tokenizers import special_tokens

RESPONSE = "response"


class GenerativeHead(TokenPredictionHead):
    """What the prompt → response heads share: targets made in ``encode``,
    logits through the backbone's output projection, answers from
    ``model.generate``, SQuAD's scores. A subclass packs the rows (``pack``)
    for the backbone ``kind`` it serves.

    Args:
        max_new_tokens: the longest response generated (in tokens) for
            ``model.predict`` and ``kerasllm evaluate``.
    """

    plugin_name = None
    model_kind = None
    other_head = None  # what to use on the other kinds of model

    def __init__(self, backbone, tokenizer, max_new_tokens=32, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        if backbone.kind != self.model_kind:
            raise ValueError(
                f"{self.plugin_name} needs model.kind: {self.model_kind}, but the model is "
                f"{backbone.kind}; {self.other_head}")
        if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.tokens = special_tokens(tokenizer)
        if self.tokens.end is None:
            raise ValueError(f"{self.plugin_name} closes each response with the tokenizer's "
                             "end token, and this tokenizer has none")
        self.backbone = backbone
        self.max_new_tokens = int(max_new_tokens)

    def pack(self, tokenizer, prompts, responses, sequence_length):
        """Rows of ``sequence_length`` from ragged int32 ``(batch, tokens)``
        prompts and responses (None: prompts alone, to generate from): the model
        inputs and, with responses, ``target_ids`` and ``target_weights``."""
        raise NotImplementedError

    def prompt_length(self, sequence_length):
        """The longest prompt ``predict_examples`` generates from."""
        return sequence_length

    def response_ids(self, prompt, generated):
        """The response in ``model.generate``'s output for token-id ``prompt``."""
        return generated[len(prompt):]

    # === Data ===

    def encode(self, examples, tokenizer, sequence_length):
        with_response = RESPONSE in examples.element_spec
        return self._encode(examples, tokenizer, sequence_length, with_response)

    def _encode(self, examples, tokenizer, sequence_length, with_response):
        prompt_key = _prompt_key(examples, self.plugin_name)
        texts = {prompt_key, RESPONSE}

        def encode(batch):
            responses = _token_ids(tokenizer, batch[RESPONSE]) if with_response else None
            rows = self.pack(tokenizer, _token_ids(tokenizer, batch[prompt_key]), responses,
                             sequence_length)
            return {**{key: value for key, value in batch.items() if key not in texts}, **rows}

        return examples.ragged_batch(TOKENIZE_BATCH).map(
            encode, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

    def prepare(self, features, seed):
        features = dict(features)
        return features, {"ids": features.pop("target_ids"),
                          "weights": features.pop("target_weights")}

    # === Model ===

    def call(self, backbone_outputs, inputs, training=False):
        return self.backbone.logits(backbone_outputs["sequence_output"])

    # === Answers ===

    def predict_examples(self, model, examples, batch_size=32):
        length = self.prompt_length(model.config.data.sequence_length)
        rows = self._encode(examples, model.tokenizer, length, with_response=False)
        prompts = [row["token_ids"][row["padding_mask"] > 0].tolist()
                   for row in rows.as_numpy_iterator()]
        answers = []
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            generated = model.generate(batch, max_new_tokens=self.max_new_tokens)
            answers += [detokenize(model.tokenizer, self.response_ids(prompt, ids), self.tokens)
                        for prompt, ids in zip(batch, generated)]
        return answers

    def score(self, answers, examples):
        missing = [i for i, example in enumerate(examples) if RESPONSE not in example]
        if missing:
            raise ValueError(f"scoring {self.plugin_name} needs each example's reference "
                             f"'{RESPONSE}'; example {missing[0]} has none")
        return metrics.squad_scores(answers, [[example[RESPONSE]] for example in examples])


class CausalLM(GenerativeHead):
    """A decoder fine-tuned to continue each ``prompt`` with its ``response``;
    the loss counts the response and its end token only.

    Args:
        max_new_tokens: the longest response generated (in tokens) for
            ``model.predict`` and ``kerasllm evaluate``. Prompts to generate
            from keep their last ``sequence_length - max_new_tokens`` tokens
            (the model's learned positions, when fewer, bound the sum too).
    """

    plugin_name = "causal_lm"
    requires_causal = True
    model_kind = "decoder"
    other_head = "for an encoder-decoder use the seq2seq head"

    def __init__(self, backbone, tokenizer, max_new_tokens=32, **kwargs):
        super().__init__(backbone, tokenizer, max_new_tokens, **kwargs)
        self.start = (self.tokens.start,) if self.tokens.add_start and \
            self.tokens.start is not None else ()
        self.positions = backbone.max_sequence_length - backbone.position_offset
        if self.positions - self.max_new_tokens <= len(self.start):
            raise ValueError(
                f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt within the "
                f"model's {self.positions} positions (model.max_sequence_length); lower it")

    def prompt_length(self, sequence_length):
        length = min(sequence_length, self.positions) - self.max_new_tokens
        if length <= len(self.start):
            raise ValueError(
                f"{self.plugin_name}'s max_new_tokens ({self.max_new_tokens}) leaves no room "
                f"for a prompt in rows of {sequence_length} tokens (data.sequence_length); "
                "lower max_new_tokens")
        return length

    def pack(self, tokenizer, prompts, responses, sequence_length):
        batch = prompts.nrows()
        start = _repeat(self.start, batch)
        if responses is None:
            answer = _repeat((), batch)
        else:
            # Room for the start token, a prompt token (the response's first token
            # is predicted from something) and the end token.
            room = sequence_length - len(self.start) - 2
            if room < 1:
                raise ValueError(f"rows of {sequence_length} tokens are too short for "
                                 f"{self.plugin_name}'s prompt and response")
            answer = tf.concat([responses[:, :room], _repeat((self.tokens.end,), batch)], axis=1)
        prompts = _last(prompts, sequence_length - len(self.start) - answer.row_lengths())
        row = tf.concat([start, prompts, answer], axis=1)
        shape = [None, sequence_length]
        token_ids = row.to_tensor(self.tokens.pad, shape=shape)
        rows = {"token_ids": token_ids,
                "padding_mask": tf.ones_like(row).to_tensor(0, shape=shape),
                "segment_ids": tf.zeros_like(token_ids)}
        if responses is not None:
            is_answer = tf.concat([tf.zeros_like(start), tf.zeros_like(prompts),
                                   tf.ones_like(answer)], axis=1).to_tensor(0, shape=shape)
            # Position i predicts token i + 1: it counts where that token is the answer's.
            rows["target_ids"] = tf.pad(token_ids[:, 1:], [[0, 0], [0, 1]],
                                        constant_values=self.tokens.pad)
            rows["target_weights"] = tf.pad(is_answer[:, 1:], [[0, 0], [0, 1]])
        return rows


def _prompt_key(examples, head):
    fields = examples.element_spec
    for key in ("prompt", "text"):
        if key in fields:
            return key
    raise ValueError(f"{head} reads each example's 'prompt' (or 'text') and '{RESPONSE}'; "
                     f"the examples have: {', '.join(fields)}")


def _token_ids(tokenizer, texts):
    ids = tokenizer(texts)
    if not isinstance(ids, tf.RaggedTensor):
        ids = tf.RaggedTensor.from_tensor(ids)
    return tf.cast(ids, tf.int32)


def _repeat(ids, batch):
    """``ids`` as a ragged ``(batch, len(ids))`` int32, the same in every row."""
    row = tf.constant(ids, tf.int32, shape=[len(ids)])
    return tf.RaggedTensor.from_tensor(tf.tile(row[None], [batch, 1]))


def _last(ids, counts):
    """The last ``counts`` (``(batch,)``) tokens of each row of ragged ``ids``."""
    lengths = ids.row_lengths()
    keep = tf.ragged.range(lengths) >= (lengths - tf.cast(counts, tf.int64))[:, None]
    return tf.ragged.boolean_mask(ids, keep)


@kerasllm.hookimpl
def kerasllm_task_heads():
    return {"causal_lm": CausalLM}
