"""Answers and task metrics from raw examples: ``model.predict(strings)`` and
``kerasllm evaluate``.

raw examples (strings, dicts or a ``tf.data.Dataset``) → each task head's
``encode`` → backbone and head, compiled → the head's ``decode`` → answers
(labels, spans, answer text) → the head's ``score`` against the references.
"""

import numpy as np
import tensorflow as tf

from kerasllm.data import task_rows
from kerasllm.errors import KerasLLMError

def predict(model, inputs, batch_size=32):
    """Answers for raw inputs: one per input for a model with one task head, else
    a dict of them by head name.

    ``inputs``: a string, a list of strings (``text``), a dict or a list of dicts
    of the fields the head reads (``{"text": ..., "text_pair": ...}``,
    ``{"question": ..., "context": ...}``), or a ``tf.data.Dataset`` of such dicts.
    """
    single = isinstance(inputs, (str, dict))
    examples = as_dataset([inputs] if single else inputs)
    heads = task_heads(model)
    answers = {head.name: head.predict_examples(model, examples, batch_size) for head in heads}
    if single:
        answers = {name: found[0] for name, found in answers.items()}
    return answers[heads[0].name] if len(heads) == 1 else answers


def evaluate(model, examples, batch_size=32, heads=None):
    """Task heads' standard metrics on raw labelled ``examples`` (a dataset), keyed
    ``<head>_<metric>``, e.g. ``classification_macro_f1``. ``heads``: the task
    heads these examples are for (default: all)."""
    references = as_python(examples)
    metrics = {}
    for head in heads or task_heads(model):
        answers = head.predict_examples(model, examples, batch_size)
        for name, value in head.score(answers, references).items():
            metrics[f"{head.name}_{name}"] = float(value)
    return metrics


def task_heads(model):
    heads = [head for head in model.heads if head not in model.objectives]
    if not heads:
        raise KerasLLMError(
            "this model has no task head, so it has no answers to predict; raw text goes "
            "to task heads (classification, question_answering, ...), tensors to "
            "model.predict or model(inputs)")
    return heads


def run_rows(model, head, examples, batch_size=32):
    """``head``'s predictions on the rows its ``encode`` makes of ``examples``:
    ``(predictions, rows)``, two lists with an entry per row (numpy values)."""
    rows = task_rows(model, head, examples, model.config.data.sequence_length)
    keys = model.input_keys_of([head])
    forward = _forward(model, head)
    predictions, values = [], []
    for batch in rows.ragged_batch(batch_size):
        output = forward({key: batch[key] for key in keys})
        predictions += _split_rows(output)
        values += _split_rows(batch)
    return predictions, values


def _forward(model, head):
    """The backbone and ``head``, compiled once per head (kept on it, untracked)."""
    forward = head.__dict__.get("_compiled_forward")
    if forward is None:
        @tf.function(reduce_retracing=True)
        def forward(x):
            inputs = head.transform_inputs(x, training=False)
            outputs = model.backbone({key: inputs[key] for key in model.backbone.input_keys},
                                     training=False)
            return head(outputs, inputs, training=False)
        object.__setattr__(head, "_compiled_forward", forward)
    return forward


def _split_rows(batch):
    """A batch (a tensor or a dict of them, ragged ones too) → a list of rows."""
    structure = batch if isinstance(batch, dict) else {None: batch}
    # A RaggedTensor's numpy() splits it into per-row arrays at once; iterating
    # it in eager mode slices one row at a time, milliseconds each.
    columns = {key: list(value.numpy()) for key, value in structure.items()}
    rows = [dict(zip(columns, row)) for row in zip(*columns.values())]
    return rows if isinstance(batch, dict) else [row[None] for row in rows]


def softmax(logits):
    """Probabilities over the last axis of numpy logits, in float64 for decoding."""
    logits = np.asarray(logits, "float64")
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def as_dataset(inputs):
    """A dataset of example dicts from a dataset, strings or dicts."""
    if isinstance(inputs, tf.data.Dataset):
        return inputs
    items = [{"text": item} if isinstance(item, str) else item for item in inputs]
    if not items or not all(isinstance(item, dict) for item in items):
        raise KerasLLMError("predict takes a string, a dict of fields, or a non-empty list "
                            "of strings or of dicts")
    keys = sorted(items[0])
    if any(sorted(item) != keys for item in items):
        raise KerasLLMError(f"every input needs the same fields; the first has {keys}")
    columns = {}
    for key in keys:
        values = [item[key] for item in items]
        lists = [value for value in values if isinstance(value, (list, tuple))]
        columns[key] = tf.ragged.constant(values) if lists else tf.constant(values)
    return tf.data.Dataset.from_tensor_slices(columns)


def as_python(examples):
    """The examples of a dataset as Python dicts: strings as ``str``, arrays as lists."""
    return [{key: _python(value) for key, value in example.items()}
            for example in examples.as_numpy_iterator()]


def _python(value):
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_python(item) for item in value]
    return value
