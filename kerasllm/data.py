"""Data sources and the tf.data pipeline from raw examples to model batches.

raw examples (``{"text": ..., ...}``) → tokenize in batches → pretraining:
split each document into sequence-length chunks (never truncated) / fine-tuning:
one sequence per example, truncated by the packer → shuffle → repeat → batch →
pack (the start and end tokens the tokenizer adds, e.g. ``[CLS] … [SEP]``, ``<s> …``
or none; padding) → each head's ``prepare`` → ``(x, y)``.
"""

import keras_hub
import tensorflow as tf

from kerasllm.errors import ConfigError
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
    if model.backbone.kind == "encoder_decoder":
        raise ConfigError(
            "kerasllm's data pipeline does not make the decoder inputs an encoder-decoder "
            "model trains on (decoder_token_ids, decoder_padding_mask) yet; a sequence-to-"
            "sequence objective such as span corruption will. Until then, fit the model "
            "on a tf.data.Dataset of your own that holds them")
    tokenizer = model.tokenizer
    tokens = special_tokens(tokenizer)
    # Room for the start and end tokens the tokenizer adds (two for BERT, none for GPT-2).
    content_length = sequence_length - tokens.add_start - tokens.add_end

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

    packer = start_end_packer(tokenizer, sequence_length)

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


def start_end_packer(tokenizer, sequence_length):
    """keras-hub's ``StartEndPacker`` adding the tokens ``tokenizer`` adds around one sequence.

    It returns ``(token_ids, padding_mask)``. Without a pad token (GPT-2, Llama)
    it pads with the end token: padded positions are masked, so the id does not matter.
    """
    tokens = special_tokens(tokenizer)
    return keras_hub.layers.StartEndPacker(
        sequence_length, start_value=tokens.start if tokens.add_start else None,
        end_value=tokens.end if tokens.add_end else None,
        pad_value=tokens.pad, return_padding_mask=True,
    )


def _chunks(token_ids, size):
    """A dataset of consecutive ``size``-token pieces of one document."""
    starts = tf.range(0, tf.size(token_ids), size)
    lengths = tf.minimum(size, tf.size(token_ids) - starts)
    return tf.data.Dataset.from_tensor_slices(
        {"token_ids": tf.RaggedTensor.from_row_lengths(token_ids, lengths)}
    )
