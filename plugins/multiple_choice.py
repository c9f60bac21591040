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
            # Each text is tokenized once and paired with each of its choices.
            texts = tokenizer(batch["text"])
            owners = tf.repeat(tf.range(tf.shape(batch["text"])[0]), num_choices)
            pairs = pack([tf.gather(texts, owners), tokenizer(flat)])
            rows = {key: tf.reshape(value, [-1, num_choices, sequence_length])
                    for key, value in pairs.items()}
            kept = {key: value for key, value in batch.items() if key not in ("text", "choices")}
            if "label" in batch:
                kept["label"] = label
            # The choices' strings stay in the rows for decode to name the chosen one.
            return {**kept, **rows, "choices": tf.reshape(flat, [-1, num_choices])}

        return examples.ragged_batch(TOKENIZE_BATCH).map(
            encode_batch, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

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
        return {**inputs, **flat}

    def call(self, backbone_outputs, inputs, training=False):
        scores = super().call(backbone_outputs, inputs, training=training)
        return tf.reshape(scores, [-1, self.num_choices])

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
