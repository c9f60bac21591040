"""Multiple choice: pick the right one of ``num_choices`` answers (SWAG, RACE, COPA).

Examples hold ``text`` (the context or question), ``choices`` (a list of
exactly ``num_choices`` strings) and, for training, ``label`` (the index of the
right choice). As Hugging Face's ``AutoModelForMultipleChoice``, each (text,
choice) pair is packed as ``[CLS] text [SEP] choice [SEP]`` with segment ids 0
and 1, the backbone encodes the pairs as separate rows, one shared dense layer
scores each, and a softmax over an example's scores gives the choice. A row of
this head holds ``(num_choices, sequence_length)`` token ids, padding mask and
segment ids, which ``transform_inputs`` flattens to ``batch * num_choices``
backbone rows.
Answers are ``{"label": the chosen index, "choice": its text, "score": its
probability, "probabilities": one per choice}``; the task metric is accuracy.
"""

import keras
import tensorflow as tf

import kerasllm
from kerasllm import metrics
from kerasllm.data import TOKENIZE_BATCH
from kerasllm.evaluation import softmax
from kerasllm.heads import SequenceLevelHead
from kerasllm.task_inputs import require_fields, segment_packer

PAIR_KEYS = ("token_ids", "padding_mask", "segment_ids")


class MultipleChoice(SequenceLevelHead):
    """Args:
        num_choices: the number of choices every example has; ``kerasllm
            finetune`` takes it from the first training example.
        representation: ``pooled``, ``first_token`` or ``last_token`` of each
            (text, choice) pair, as for ``classification``.
        dropout: on the representation before the scoring layer.

    Serving: ``serving_default`` takes ``text`` ``(batch,)`` and ``choices``
    ``(batch, num_choices)`` string, packed as in training, and gives
    ``probabilities`` ``(batch, num_choices)`` float32, ``choice_ids``
    ``(batch,)`` int32 (the chosen index, ``predict``'s ``label``),
    ``choice_text`` ``(batch,)`` string (its text) and ``score`` ``(batch,)``
    float32 (its probability). ``serve_token_ids`` takes one packed ``[CLS]
    text [SEP] choice [SEP]`` pair per row and gives ``logits`` ``(batch,)``
    float32, the pair's score: the softmax over an example's rows is its
    ``probabilities``. (Rows must stay one per input for TF Serving's request
    batching, so the signature cannot group an example's pairs.)
    """

    def __init__(self, backbone, tokenizer, num_choices=None, representation=None,
                 dropout=0.1, **kwargs):
        if num_choices is None:
            raise ValueError("give num_choices, the number of choices each example has")
        if isinstance(num_choices, bool) or not isinstance(num_choices, int) or num_choices < 2:
            raise ValueError(f"num_choices must be an integer >= 2, got {num_choices!r}")
        super().__init__(backbone, tokenizer, 1, representation, dropout, **kwargs)
        self.num_choices = num_choices
        self.pair_keys = tuple(key for key in PAIR_KEYS if key in backbone.input_keys)
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name=f"{self.name}_accuracy")

    @classmethod
    def infer_options(cls, examples, options):
        if "num_choices" in options or "choices" not in examples.element_spec:
            return options
        first = next(iter(examples.take(1)), None)
        if first is None:
            raise ValueError("the training examples are empty, so they give no num_choices")
        return {**options, "num_choices": int(tf.size(first["choices"]))}

    def encode(self, examples, tokenizer, sequence_length):
        require_fields(examples, ("text", "choices"), "multiple_choice")
        spec = examples.element_spec
        shape = spec["choices"].shape
        if shape.rank != 1 or spec["choices"].dtype != tf.string:
            raise ValueError(f"'choices' must be a list of strings per example, got "
                             f"{spec['choices'].dtype.name} of shape {shape}")
        if shape[0] is not None and shape[0] != self.num_choices:
            raise ValueError(f"'choices' holds {shape[0]} strings per example, but the head "
                             f"has num_choices={self.num_choices}")
        if "label" in spec and not spec["label"].dtype.is_integer:
            raise ValueError(f"'label' must be the index of the right choice (an integer), "
                             f"got {spec['label'].dtype.name}")
        pack = segment_packer(tokenizer, sequence_length, 2)
        num_choices = self.num_choices

        def encode_batch(batch):
            choices = batch["choices"]
            if isinstance(choices, tf.RaggedTensor):
                counts, flat = choices.row_lengths(), choices.flat_values
            else:
                counts, flat = tf.fill(tf.shape(choices)[:1], tf.shape(choices)[1]), choices
            checks = [_assert_all(
                counts == num_choices, batch["example"], counts,
                f"choices must hold num_choices={num_choices} strings in every example; "
                "the examples (numbers, then choice counts) that do not:")]
            if "label" in batch:
                label = tf.cast(batch["label"], tf.int32)
                checks.append(_assert_all(
                    (label >= 0) & (label < num_choices), batch["example"], label,
                    f"label must be a choice index in [0, {num_choices}); "
                    "the examples (numbers, then labels) that are not:"))
            with tf.control_dependencies(checks):
                flat = tf.reshape(flat, [-1])
            kept = {key: value for key, value in batch.items() if key not in ("text", "choices")}
            if "label" in batch:
                kept["label"] = label
            return {**kept, **self.pack_choices(pack, tokenizer, batch["text"], flat)}

        return examples.ragged_batch(TOKENIZE_BATCH).map(
            encode_batch, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

    def pack_choices(self, pack, tokenizer, texts, choices):
        """``texts`` ``(batch,)`` and their ``choices`` flat, ``(batch *
        num_choices,)`` strings → rows of ``(batch, num_choices, length)`` pairs,
        and ``choices`` ``(batch, num_choices)``; ``pack``: a two-segment packer."""
        # Each text is tokenized once and paired with each of its choices.
        owners = tf.repeat(tf.range(tf.shape(texts)[0]), self.num_choices)
        pairs = pack([tf.gather(tokenizer(texts), owners), tokenizer(choices)])
        rows = {key: tf.reshape(value, [-1, self.num_choices, value.shape[-1]])
                for key, value in pairs.items()}
        # The choices' strings stay in the rows for decode to name the chosen one.
        return {**rows, "choices": tf.reshape(choices, [-1, self.num_choices])}

    def prepare(self, features, seed):
        features = dict(features)
        return features, {"labels": features.pop("label")}

    def transform_inputs(self, inputs, training=False):
        flat = {}
        for key in self.pair_keys:
            value = inputs[key]
            if value.shape.rank != 3:
                raise ValueError(f"{self.name}: {key!r} must be (batch, num_choices, length), "
                                 f"got shape {value.shape}")
            flat[key] = tf.reshape(value, [-1, tf.shape(value)[-1]])
        # Pairs per example: num_choices, or 1 for serve_token_ids' single pairs.
        choices = inputs["token_ids"].shape[1]
        flat[self.choices_key] = tf.shape(inputs["token_ids"])[1] if choices is None \
            else tf.constant(choices)
        return {**inputs, **flat}

    @property
    def choices_key(self):
        return f"{self.name}_choices"

    def call(self, backbone_outputs, inputs, training=False):
        scores = super().call(backbone_outputs, inputs, training=training)
        return tf.reshape(scores, [-1, inputs.get(self.choices_key, self.num_choices)])

    def compute_loss(self, targets, predictions):
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            targets["labels"], predictions, from_logits=True))

    def update_metrics(self, targets, predictions):
        self.accuracy.update_state(targets["labels"], predictions)

    def decode(self, predictions, rows):
        answers = []
        for scores, row in zip(predictions, rows):
            probabilities = softmax(scores)
            best = int(probabilities.argmax())
            answers.append({"label": best, "choice": row["choices"][best].decode("utf-8"),
                            "score": float(probabilities[best]),
                            "probabilities": probabilities.tolist()})
        return answers

    # === Serving ===

    def serving_inputs(self):
        return {"text": tf.TensorSpec([None], tf.string),
                "choices": tf.TensorSpec([None, self.num_choices], tf.string)}

    def serving_rows(self, inputs, tokenizer, sequence_length):
        pack = segment_packer(tokenizer, sequence_length, 2)
        return self.pack_choices(pack, tokenizer, inputs["text"],
                                 tf.reshape(inputs["choices"], [-1]))

    def serving_token_rows(self, rows):
        # The signature's rows are (batch, length): each one (text, choice) pair.
        return {key: value[:, None] for key, value in rows.items()}

    def serving_outputs(self, predictions, rows, inputs):
        logits = tf.cast(predictions, tf.float32)
        if inputs is None:
            return {"logits": logits[:, 0]}
        probabilities = tf.nn.softmax(logits)
        chosen = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return {"probabilities": probabilities, "choice_ids": chosen,
                "choice_text": tf.gather(rows["choices"], chosen, batch_dims=1),
                "score": tf.reduce_max(probabilities, axis=-1)}

    def score(self, answers, examples):
        return {"accuracy": metrics.accuracy([int(example["label"]) for example in examples],
                                             [answer["label"] for answer in answers])}


def _assert_all(valid, example_numbers, values, message):
    """An op failing the pipeline unless every ``valid``; it names the examples
    that are not, and their ``values``."""
    return tf.debugging.Assert(tf.reduce_all(valid), [
        message, tf.boolean_mask(example_numbers, ~valid), tf.boolean_mask(values, ~valid)],
        summarize=5)


@kerasllm.hookimpl
def kerasllm_task_heads():
    return {"multiple_choice": MultipleChoice}
