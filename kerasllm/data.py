"""Data sources and the tf.data pipeline from raw examples to model batches.

raw examples (``{"text": ..., ...}``) → pretraining: tokenize in batches, wrap
each document in the start and end tokens the tokenizer adds (``[CLS] … [SEP]``,
``<s> …`` or none), pack documents into rows (never truncated) / fine-tuning: the
task head's ``encode`` (one or more rows per example) → shuffle → repeat → batch
→ each head's ``prepare`` → ``(x, y)``.
"""

import functools

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
    if "text" not in examples.element_spec:
        raise ConfigError(
            f"training a tokenizer reads the examples' text, and these have none (they "
            f"have: {', '.join(examples.element_spec)}); give tokenizer.vocabulary, or "
            "start from a model with training.initialize_from")
    return examples.map(lambda example: example["text"])


def build_dataset(model, examples, batch_size, sequence_length, *, shuffle_buffer=0,
                  seed=None, repeat=False, packing=True, heads=None, input_context=None):
    """Batches ``(x, y)`` for ``model.fit``/``evaluate`` from a dataset of raw examples.

    Args:
        model: a :class:`kerasllm.KerasLLMModel`; its tokenizer and heads shape the batches.
        examples: a ``tf.data.Dataset`` of raw examples (``DataSource.examples()``).
        batch_size: rows per batch (per worker, with ``input_context``).
        sequence_length: tokens per row.
        shuffle_buffer: rows in the shuffle buffer; 0: no shuffling.
        seed: seeds the shuffling and every head's random draws (masks, spans):
            the same seed gives the same batches. Default 0.
        repeat: cycle through the examples forever (training).
        packing: pretraining only: concatenate documents into full rows; False
            gives each document its own rows, padding the last.
        heads: the heads that prepare these batches (default: all the model's;
            multi-task training gives each data source its own).
        input_context: a ``tf.distribute.InputContext``: each input pipeline
            keeps its own share of the examples.
    """
    heads = model.heads if heads is None else heads
    seed = 0 if seed is None else seed
    if input_context is not None and input_context.num_input_pipelines > 1:
        examples = examples.shard(input_context.num_input_pipelines,
                                  input_context.input_pipeline_id)
    if repeat:
        examples = examples.repeat()
    pretraining = any(head in model.objectives for head in heads)
    if model.backbone.kind == "encoder_decoder" and not any(
            head.builds_sequences for head in heads):
        raise ConfigError(
            "an encoder-decoder model trains on decoder inputs (decoder_token_ids, "
            "decoder_padding_mask) that an objective such as `span` (span corruption) "
            "makes; add it to `objectives`, or fit the model on a tf.data.Dataset of "
            "your own that holds them")
    if pretraining:
        rows = _pretraining_rows(model, examples, heads, sequence_length, packing)
    else:
        # Task heads sharing a data source share the first one's rows.
        rows = task_rows(model, heads[0], examples, sequence_length)
    if shuffle_buffer:
        rows = rows.shuffle(shuffle_buffer, seed=seed)
    # Fields a head keeps for decoding (word offsets, ...) vary in length: ragged.
    batches = rows.batch(batch_size) if pretraining else rows.ragged_batch(batch_size)
    # Each batch's seed is (seed, batch index): a run resumed with
    # ``.skip(step)`` draws exactly what the uninterrupted run drew.
    batches = batches.enumerate().map(
        lambda index, batch: model.prepare_batch(
            batch, tf.stack([tf.cast(seed, tf.int64), index]), heads),
        num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)


def task_rows(model, head, examples, sequence_length):
    """A task head's rows (``Head.encode``) of raw examples, each numbered first
    by an int64 ``example``, so that its rows say which example they came from."""
    numbered = examples.enumerate().map(lambda index, example: {**example, "example": index})
    return head.encode(numbered, model.tokenizer, sequence_length)


def _tokenized(model, examples):
    tokenizer = model.tokenizer

    def tokenize(batch):
        return {**batch, "token_ids": tokenizer(batch["text"])}

    return examples.batch(TOKENIZE_BATCH).map(
        tokenize, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _pretraining_rows(model, examples, heads, sequence_length, packing):
    """Rows of ``row_length`` tokens: ``token_ids``, ``padding_mask`` (document
    numbers, 0 for padding), ``segment_ids`` and ``document``.

    Every document is wrapped in the start and end tokens the tokenizer adds; a
    tokenizer that adds neither (GPT-2) gets its end token appended as the
    boundary. Documents longer than a row continue on the next row: no token
    is dropped.
    """
    tokens = special_tokens(model.tokenizer)
    builders = [head for head in heads if head.builds_sequences]
    row_length = builders[0].row_length(sequence_length) if builders else sequence_length
    packing = packing and all(head.packs_documents for head in heads)
    before = [tokens.start] if tokens.add_start else []
    after = [tokens.end] if tokens.add_end or not tokens.add_start else []
    after = [token for token in after if token is not None]

    def wrap(index, example):
        ids = tf.cast(example["token_ids"], tf.int32)
        ids = tf.concat([tf.constant(before, tf.int32), ids, tf.constant(after, tf.int32)], 0)
        return {"token_ids": ids, "document": tf.fill(tf.shape(ids), index)}

    documents = _tokenized(model, examples).filter(
        lambda example: tf.size(example["token_ids"]) > 0).enumerate().map(wrap)
    if packing:
        rows = _pack(documents, row_length)
    else:
        rows = documents.map(lambda document: _pad_rows(document, row_length)).unbatch()

    def features(row):
        document = row["document"]
        real = document >= 0
        # Number the row's documents 1, 2, ... (0: padding) for attention.
        numbers = tf.where(real, document - document[0] + 1, 0)
        return {"token_ids": tf.where(real, row["token_ids"], tokens.pad),
                "padding_mask": tf.cast(numbers, tf.int32),
                "segment_ids": tf.zeros_like(row["token_ids"]),
                "document": document[0]}

    return rows.map(features, num_parallel_calls=tf.data.AUTOTUNE)


def _pad_rows(stream, row_length):
    """``(rows, row_length)`` of a token stream; the padding's document is -1."""
    size = tf.size(stream["token_ids"])
    padding = (-size) % row_length
    return {key: tf.reshape(tf.pad(value, [[0, padding]], constant_values=-1 if
                                   key == "document" else 0), [-1, row_length])
            for key, value in stream.items()}


def _pack(documents, row_length):
    """Concatenate documents and cut the stream into rows; a finite stream's
    last, partial row is padded."""
    flush = {"token_ids": tf.zeros([0], tf.int32), "document": tf.zeros([0], tf.int64),
             "flush": True}
    stream = documents.map(lambda document: {**document, "flush": False}).concatenate(
        tf.data.Dataset.from_tensors(flush))
    empty = {"token_ids": tf.zeros([0], tf.int32), "document": tf.zeros([0], tf.int64)}

    def step(carry, document):
        joined = {key: tf.concat([carry[key], document[key]], 0) for key in carry}
        whole = tf.size(joined["token_ids"]) // row_length * row_length
        if_flush = _pad_rows(joined, row_length)
        rows = {key: tf.reshape(value[:whole], [-1, row_length]) for key, value in joined.items()}
        rows = {key: tf.cond(document["flush"], lambda k=key: if_flush[k], lambda k=key: rows[k])
                for key in rows}
        rest = {key: tf.cond(document["flush"], lambda k=key: empty[k],
                             lambda k=key: joined[k][whole:]) for key in joined}
        return rest, rows

    return stream.scan(empty, step).unbatch()


def padding_fraction(batches):
    """Fraction of padding positions in ``(x, y)`` batches (iterates them once)."""
    padding = total = 0
    for x, _ in batches:
        mask = x["padding_mask"].numpy()
        padding += (mask == 0).sum()
        total += mask.size
    return padding / max(total, 1)


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


def mixing_rates(sizes, temperature):
    """Sampling probability of each task: ``size ** (1 / temperature)``, normalized.

    Temperature 1 draws in proportion to size (T5's examples-proportional
    mixing); larger temperatures give small tasks more (mT5 uses 1/0.3 ≈ 3.3)."""
    scaled = [size ** (1.0 / temperature) for size in sizes]
    return [value / sum(scaled) for value in scaled]


def mix(model, task_batches, rates, seed=0):
    """One dataset drawing each batch from one task's ``(x, y)`` batches.

    Args:
        task_batches: ``[(heads, dataset)]`` from ``build_dataset(..., heads=heads)``.
        rates: the probability of drawing from each (``mixing_rates``); None:
            all batches of the first, then of the second, ... (evaluation).
    A batch is for its task's heads only: the other heads' inputs and targets are
    zeros, and ``y[HEADS_PRESENT]`` tells the model whose losses and metrics count.
    """
    from kerasllm.model import HEADS_PRESENT

    x_spec, y_spec = {}, {}
    for _, batches in task_batches:
        x, y = batches.element_spec
        x_spec.update(x)
        y_spec.update(y)

    def complete(heads):
        present = tf.constant([float(head in heads) for head in model.heads])

        def fill(x, y):
            size = tf.shape(x["token_ids"])[0]
            x = {**{key: _zeros(spec, size) for key, spec in x_spec.items()}, **x}
            y = {**tf.nest.map_structure(lambda spec: _zeros(spec, size), y_spec), **y}
            # One row per example, like every other field, so that splitting a
            # batch across replicas or into micro-batches keeps it whole.
            return x, {**y, HEADS_PRESENT: tf.tile(present[None], [size, 1])}
        return fill

    completed = [batches.map(complete(heads)) for heads, batches in task_batches]
    if len(completed) == 1:
        return completed[0]
    if rates is None:  # evaluation: every task's batches, one task after another
        return functools.reduce(tf.data.Dataset.concatenate, completed)
    return tf.data.Dataset.sample_from_datasets(completed, rates, seed=seed)


def _zeros(spec, batch_size):
    """Zeros for a batch of ``spec``: the batch dimension, and 1 for other unknown ones."""
    shape = [batch_size] + [1 if dim is None else dim for dim in spec.shape[1:]]
    return tf.zeros(shape, spec.dtype)


def count_examples(examples):
    """The number of examples (one pass unless tf.data knows it)."""
    cardinality = int(examples.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(examples.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
