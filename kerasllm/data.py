"""Data sources and the tf.data pipeline from raw examples to model batches.

raw examples (``{"text": ..., ...}``) → tokenize in batches → pretraining:
split each document into sequence-length chunks (never truncated) / fine-tuning:
one sequence per example, truncated by the packer → shuffle → repeat → batch →
pack (``[CLS] … [SEP]``, padding) → each head's ``prepare`` → ``(x, y)``.
"""

import keras_hub
import tensorflow as tf

from kerasllm.tokenizers import special_tokens

TOKENIZE_BATCH = 256


class DataSource:
    """Raw examples for training; subclass it in a ``kerasllm_data_sources`` plugin.

    The constructor's keyword arguments are the source's options (``data.options``
    in the config); raise ``ValueError`` for a bad value and kerasllm reports it
    with the config key. ``examples()`` returns a ``tf.data.Dataset`` of dicts
    with a scalar string ``text`` (one document) and any other fields a head
    uses, such as an integer ``label``. It must be deterministic: kerasllm holds
    out documents by position for evaluation.
    """

    def examples(self):
        raise NotImplementedError


def split_heldout(examples, fraction):
    """(training, held-out) datasets; every ``round(1/fraction)``-th example is held out."""
    every = max(2, round(1 / fraction))
    numbered = examples.enumerate()
    heldout = numbered.filter(lambda i, _: i % every == 0).map(lambda _, example: example)
    training = numbered.filter(lambda i, _: i % every != 0).map(lambda _, example: example)
    return training, heldout


def texts(examples):
    """The ``text`` field alone, e.g. to train a tokenizer."""
    return examples.map(lambda example: example["text"])


def build_dataset(model, examples, batch_size, sequence_length, *, shuffle_buffer=0,
                  seed=None, repeat=False):
    """Batches ``(x, y)`` for ``model.fit``/``evaluate`` from a dataset of raw examples."""
    tokenizer = model.tokenizer
    tokens = special_tokens(tokenizer)
    content_length = sequence_length - 2  # room for the start and end tokens

    def tokenize(batch):
        return {**batch, "token_ids": tokenizer(batch["text"])}

    dataset = examples.batch(TOKENIZE_BATCH).map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.unbatch()
    if model.is_pretraining:
        dataset = dataset.flat_map(lambda e: _chunks(e["token_ids"], content_length))
    else:
        dataset = dataset.map(lambda e: {k: v for k, v in e.items() if k != "text"})
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.ragged_batch(batch_size)

    packer = keras_hub.layers.StartEndPacker(
        sequence_length, start_value=tokens.start, end_value=tokens.end,
        pad_value=tokens.pad, return_padding_mask=True,
    )

    def pack(batch):
        token_ids, padding_mask = packer(batch.pop("token_ids"))
        batch["token_ids"] = token_ids
        batch["padding_mask"] = tf.cast(padding_mask, tf.int32)
        batch["segment_ids"] = tf.zeros_like(token_ids)
        return batch

    dataset = dataset.map(pack, num_parallel_calls=tf.data.AUTOTUNE)
    # Sequential on purpose: heads draw random numbers (e.g. MLM masking), and a
    # fixed order of draws makes a seeded run, and a resumed one, reproducible.
    dataset = dataset.map(model.prepare_batch)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _chunks(token_ids, size):
    """A dataset of consecutive ``size``-token pieces of one document."""
    starts = tf.range(0, tf.size(token_ids), size)
    lengths = tf.minimum(size, tf.size(token_ids) - starts)
    return tf.data.Dataset.from_tensor_slices(
        {"token_ids": tf.RaggedTensor.from_row_lengths(token_ids, lengths)}
    )
