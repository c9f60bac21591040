"""Sequence and sentence-pair classification: one label, or several (multi-label).

Examples hold ``text``, optionally ``text_pair`` (packed as ``[CLS] A [SEP] B
[SEP]`` with segment ids 0 and 1), and ``label``: a class id, a class name, or
with ``multi_label`` a list of them. ``kerasllm finetune`` builds the label
vocabulary from the training data when labels are names; it is saved with the
model, and predictions name the classes.
"""

import keras
import numpy as np
import tensorflow as tf

import kerasllm
from kerasllm import metrics
from kerasllm.errors import KerasLLMError
from kerasllm.evaluation import softmax
from kerasllm.heads import SequenceLevelHead, weighted_mean
from kerasllm.task_inputs import label_encoder, label_options, label_vocabulary


class Classification(SequenceLevelHead):
    """Args:
        num_classes: number of classes; default: the number of ``labels``.
        labels: the class names in id order; examples may then give names.
        multi_label: each class is a separate yes/no (sigmoid and binary
            cross-entropy); ``label`` is a list of the classes that apply.
        class_weights: a loss weight per class: single-label, the weighted mean
            of the cross-entropy by each example's class (as PyTorch's
            ``CrossEntropyLoss(weight=...)``); multi-label, each class's binary
            cross-entropy scaled by its weight.
        threshold: multi-label: the probability above which a class applies.
        representation: ``pooled``, ``first_token`` or ``last_token``; default:
            the pooler where there is one, else the first token (encoders) or
            the last (decoders); see :class:`kerasllm.heads.SequenceLevelHead`.
        dropout: on the representation before the classifier.
        pairs: the examples are sentence pairs (``text_pair``); set from the
            training examples by ``kerasllm finetune``.
    """

    def __init__(self, backbone, tokenizer, num_classes=None, labels=None, multi_label=False,
                 class_weights=None, threshold=0.5, representation=None, dropout=0.1,
                 pairs=False, **kwargs):
        labels, num_classes = label_vocabulary(labels, num_classes, "num_classes", "class")
        if class_weights is not None and (
                len(class_weights) != num_classes or min(class_weights) < 0):
            raise ValueError(f"class_weights must be {num_classes} weights >= 0, one per "
                             f"class, got {class_weights!r}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        super().__init__(backbone, tokenizer, num_classes, representation, dropout, pairs,
                         **kwargs)
        self.num_classes = num_classes
        self.labels = labels
        self.multi_label = multi_label
        self.class_weights = class_weights
        self.threshold = threshold
        if multi_label:
            self.accuracy = keras.metrics.BinaryAccuracy(name=f"{self.name}_accuracy",
                                                         threshold=threshold)
        else:
            self.accuracy = keras.metrics.SparseCategoricalAccuracy(name=f"{self.name}_accuracy")

    @classmethod
    def infer_options(cls, examples, options):
        options = super().infer_options(examples, options)
        return label_options(examples, options, "label", "num_classes")

    def encode(self, examples, tokenizer, sequence_length):
        rows = super().encode(examples, tokenizer, sequence_length)
        if "label" not in rows.element_spec:
            return rows
        to_ids = label_encoder(self.labels)
        num_classes = self.num_classes

        def label(row):
            ids = to_ids(row["label"])
            if self.multi_label:
                ids = tf.reduce_max(tf.one_hot(tf.reshape(ids, [-1]), num_classes), axis=0)
            return {**row, "label": ids}

        return rows.map(label, num_parallel_calls=tf.data.AUTOTUNE)

    def prepare(self, features, seed):
        features = dict(features)
        return features, {"labels": features.pop("label")}

    def compute_loss(self, targets, predictions):
        labels = targets["labels"]
        if self.multi_label:
            losses = keras.losses.binary_crossentropy(
                labels[..., None], predictions[..., None], from_logits=True)
            if self.class_weights is not None:
                losses *= tf.constant(self.class_weights, losses.dtype)
            return tf.reduce_mean(losses)
        losses = keras.losses.sparse_categorical_crossentropy(labels, predictions,
                                                              from_logits=True)
        if self.class_weights is None:
            return tf.reduce_mean(losses)
        return weighted_mean(losses, tf.gather(tf.constant(self.class_weights), labels))

    def update_metrics(self, targets, predictions):
        if self.multi_label:
            self.accuracy.update_state(targets["labels"], tf.sigmoid(predictions))
        else:
            self.accuracy.update_state(targets["labels"], predictions)

    def decode(self, predictions, rows):
        names = self.labels or list(range(self.num_classes))
        answers = []
        for logits in predictions:
            logits = logits.astype("float64")
            if self.multi_label:
                probabilities = 1 / (1 + np.exp(-logits))
                chosen = [int(i) for i in np.flatnonzero(probabilities > self.threshold)]
                answers.append({"labels": [names[i] for i in chosen], "label_ids": chosen,
                                "probabilities": probabilities.tolist()})
            else:
                probabilities = softmax(logits)
                best = int(probabilities.argmax())
                answers.append({"label": names[best], "label_id": best,
                                "score": float(probabilities[best]),
                                "probabilities": probabilities.tolist()})
        return answers

    def serving_outputs(self, predictions, rows, inputs):
        """``probabilities`` ``(batch, classes)`` float32 and, single-label,
        ``label_ids`` ``(batch,)`` int32, ``label_names`` ``(batch,)`` string
        (the id as text without label names) and ``score`` (the chosen class's
        probability); multi-label, ``applies`` ``(batch, classes)`` bool and
        ``label_names`` ``(batch, classes)``, the name where the class applies, else
        empty."""
        logits = tf.cast(predictions, tf.float32)
        names = tf.constant(self.labels or [str(i) for i in range(self.num_classes)])
        if self.multi_label:
            probabilities = tf.sigmoid(logits)
            applies = probabilities > self.threshold
            return {"probabilities": probabilities, "applies": applies,
                    "label_names": tf.where(applies, names[None, :], "")}
        probabilities = tf.nn.softmax(logits)
        label_ids = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return {"probabilities": probabilities, "label_ids": label_ids,
                "label_names": tf.gather(names, label_ids),
                "score": tf.reduce_max(probabilities, axis=-1)}

    def score(self, answers, examples):
        if self.multi_label:
            truth = np.zeros((len(examples), self.num_classes), int)
            for row, example in zip(truth, examples):
                labels = example["label"] if isinstance(example["label"], list) \
                    else [example["label"]]
                row[[self._label_id(label) for label in labels]] = 1
            predicted = np.zeros_like(truth)
            for row, answer in zip(predicted, answers):
                row[answer["label_ids"]] = 1
            return metrics.multilabel_scores(truth, predicted)
        truth = [self._label_id(example["label"]) for example in examples]
        predicted = [answer["label_id"] for answer in answers]
        return {"accuracy": metrics.accuracy(truth, predicted),
                "macro_f1": metrics.macro_f1(truth, predicted, self.num_classes),
                "matthews_corrcoef": metrics.matthews_corrcoef(truth, predicted)}

    def _label_id(self, label):
        if not isinstance(label, str):
            return int(label)
        if not self.labels or label not in self.labels:
            raise KerasLLMError(f"label {label!r} is not one of this head's labels "
                                f"({', '.join(self.labels or [])}); give the head its full "
                                "`labels` list")
        return self.labels.index(label)


@kerasllm.hookimpl
def kerasllm_task_heads():
    return {"classification": Classification}
