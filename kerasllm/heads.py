"""The base class of pretraining objectives and fine-tuning task heads."""

import keras
import tensorflow as tf

from kerasllm.distribute import loss_denominator


class Head(keras.layers.Layer):
    """A head: what it adds to the model, its data transform, its loss and metrics.

    Objectives (``kerasllm_objectives`` hook) and task heads
    (``kerasllm_task_heads`` hook) both subclass ``Head``. The builder creates one
    instance per config entry as ``cls(backbone=backbone, tokenizer=tokenizer,
    **options)``, so the constructor's keyword arguments are the head's config
    options; raise ``ValueError`` for a bad value and kerasllm reports it with the
    config key. Override:

    - ``prepare(features, seed)``: runs inside the tf.data pipeline on a batch of
      ``features`` (``token_ids``, ``padding_mask``, ``segment_ids``,
      ``document`` and any other fields the data source yields, such as
      ``label``). Returns ``(features, targets)``: the features with this head's
      changes (e.g. masked ``token_ids``, added ``mask_positions``) and a dict of
      targets for ``compute_loss``. ``seed`` is an int32 ``(2,)`` tensor, new for
      every batch and derived from ``training.seed``: draw random numbers with
      stateless ops (``tf.random.stateless_*``) from it, so that a seeded run
      and a resumed run see the same batches. Heads that rebuild sequences
      (``builds_sequences``) run first, then the others in config order, each
      seeing the previous one's features.
    - ``transform_inputs(inputs, training)``: inside the model, before the
      backbone runs; returns the model inputs the backbone and every head see.
      ELECTRA replaces masked tokens with a generator's samples here. Default:
      unchanged.
    - ``call(backbone_outputs, inputs, training)``: the predictions, from the
      backbone's output dict and the model's input dict.
    - ``compute_loss(targets, predictions)``: a scalar, the mean loss of this
      batch; the model weights it by the config's ``weight``.
    - ``update_metrics(targets, predictions)``: update the head's metrics.
      Metrics assigned as attributes are logged by ``fit`` and ``evaluate``.

    Packed rows: in pretraining, the pipeline concatenates documents (each
    wrapped in the start and end tokens the tokenizer adds) and cuts the stream
    into rows; ``padding_mask`` then numbers the documents of a row 1, 2, … (0
    is padding) and attention never crosses from one document to another.
    ``document`` is the index, in the data source, of the row's first document.

    Fine-tuning task heads also turn raw examples into rows and predictions
    back into answers (:mod:`kerasllm.evaluation` drives them; objectives need
    none of this):

    - ``encode(examples, tokenizer, sequence_length)``: a ``tf.data.Dataset`` of
      raw examples (the data source's dicts, each numbered by an int64
      ``example``) → a dataset of rows, each with ``token_ids``, ``padding_mask``
      (1 for real tokens) and ``segment_ids`` of static shape
      ``(sequence_length,)``, the head's own model inputs and whatever ``prepare``
      and ``decode`` need (labels, character offsets, ``example``). One example
      may give several rows (question answering's windows). Default:
      :func:`kerasllm.task_inputs.encode_segments` of ``text`` (and
      ``text_pair`` when the examples have it), other fields kept.
    - ``decode(predictions, rows)``: ``predictions`` (this head's output for
      each row, numpy) and ``rows`` (each row's fields, numpy) → one answer per
      example, in example order: labels, spans, answer text.
    - ``predict_examples(model, examples, batch_size)``: answers for raw
      examples; default: ``encode``, the model, ``decode``. Generative heads
      override it to call ``model.generate``.
    - ``score(answers, examples)``: the task's standard metrics (a dict of
      floats) from ``predict_examples``' answers and the raw examples (Python
      dicts holding the references).
    - ``infer_options(examples, options)`` (class method): options completed
      from the training examples before the head is built, e.g. the label
      vocabulary; the completed options are saved with the model.

    Serving: what the head computes in an exported SavedModel
    (:func:`kerasllm.export_savedmodel`), in the TensorFlow graph, with no Python
    of kerasllm's at serving time. Every tensor is batch-first; strings arrive
    as valid UTF-8 (invalid bytes already replaced by U+FFFD). A head that
    overrides none of these serves nothing of its own (the exporter still
    serves the backbone's embedding, or generation).

    - ``serving_inputs()``: the string inputs of the ``serving_default``
      signature this head reads, a dict ``name → tf.TensorSpec`` (e.g.
      ``{"text": tf.TensorSpec([None], tf.string)}``); None (the default): the
      head does not serve.
    - ``serving_rows(inputs, tokenizer, sequence_length)``: those inputs → a dict
      of row tensors: the model inputs (``token_ids``, ``padding_mask``,
      ``segment_ids``, the head's ``input_keys``) and whatever
      ``serving_outputs`` needs (character offsets, …). Rows may outnumber the
      inputs (question answering's windows); they then carry ``example``, each
      row's input index. Texts too long for a row are cut as ``encode`` cuts
      them. Default: ``text`` (and ``text_pair`` when ``serving_inputs`` has it)
      packed as ``encode`` packs them.
    - ``serving_token_rows(rows)``: the rows of the ``serve_token_ids``
      signature (``token_ids``, ``padding_mask``, ``segment_ids``, given by the
      client) completed with the head's own model inputs (the masked LM finds
      its ``[MASK]`` positions). Default: unchanged.
    - ``serving_outputs(predictions, rows, inputs)``: this head's predictions
      on the rows → a dict of named output tensors, one entry per input
      (probabilities, label names, character offsets, answer text). ``inputs``
      is None under ``serve_token_ids``: return the outputs that need no text.

    Class attributes:
        input_keys: model inputs this head adds in ``prepare`` (beyond the
            backbone's), e.g. ``("mask_positions",)``.
        requires_causal: ``True`` (decoders only), ``False`` (encoders only) or
            ``None`` (either).
        packs_documents: ``False`` asks for rows that each hold a piece of one
            document (next-sentence prediction), not packed rows.
        builds_sequences: ``prepare`` rebuilds the rows (span corruption,
            sentence pairs); such a head prepares first, and a model has at most one.
    """

    input_keys = ()
    requires_causal = None
    packs_documents = True
    builds_sequences = False

    def __init__(self, backbone, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.loss_tracker = keras.metrics.Mean(name=f"{self.name}_loss")

    def row_length(self, sequence_length):
        """Length of the rows the pipeline gives ``prepare``, for a model input of
        ``sequence_length`` tokens. Override when ``prepare`` makes rows longer or
        shorter (span corruption shortens them, a sentence pair adds a separator)."""
        return sequence_length

    def build(self, sequence_output_shape):
        """Create the head's weights; ``sequence_output_shape`` is the backbone's."""

    def prepare(self, features, seed):
        raise NotImplementedError

    def transform_inputs(self, inputs, training=False):
        return inputs

    def call(self, backbone_outputs, inputs, training=False):
        raise NotImplementedError

    def compute_loss(self, targets, predictions):
        raise NotImplementedError

    def update_metrics(self, targets, predictions):
        """Update metrics beyond the loss, which the model tracks itself."""

    # === Fine-tuning: raw examples in, answers out ===

    def encode(self, examples, tokenizer, sequence_length):
        from kerasllm.task_inputs import encode_segments

        return encode_segments(examples, tokenizer, sequence_length)

    def decode(self, predictions, rows):
        raise NotImplementedError(f"{type(self).__name__} does not decode its predictions")

    def predict_examples(self, model, examples, batch_size=32):
        from kerasllm.evaluation import run_rows

        return self.decode(*run_rows(model, self, examples, batch_size))

    def score(self, answers, examples):
        return {}

    @classmethod
    def infer_options(cls, examples, options):
        return options

    # === Serving: in the exported graph (kerasllm.export) ===

    def serving_inputs(self):
        return None

    def serving_rows(self, inputs, tokenizer, sequence_length):
        from kerasllm.task_inputs import pack_texts

        return pack_texts(inputs, tokenizer, sequence_length)

    def serving_token_rows(self, rows):
        return rows

    def serving_outputs(self, predictions, rows, inputs):
        return {}


class TokenPredictionHead(Head):
    """A head predicting token ids over the vocabulary (masked or causal LM).

    ``prepare`` returns targets ``{"ids": ..., "weights": ...}`` shaped like the
    logits without their last axis; positions of weight 0 do not count. The
    loss is the mean cross-entropy over the counted positions; the metric is
    ``<name>_accuracy`` over the same positions.
    """

    def __init__(self, backbone, tokenizer, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name=f"{self.name}_accuracy")

    def compute_loss(self, targets, predictions):
        return weighted_cross_entropy(targets["ids"], predictions, targets["weights"])

    def update_metrics(self, targets, predictions):
        self.accuracy.update_state(targets["ids"], predictions, sample_weight=targets["weights"])


def weighted_cross_entropy(labels, logits, weights):
    """Mean sparse cross-entropy over the positions of nonzero weight (0 if none)."""
    return weighted_mean(
        keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True), weights)


def weighted_mean(values, weights):
    """``sum(values * weights) / sum(weights)``; 0 when every weight is 0 (a batch
    with nothing to count). Under a distribution strategy, a loss's sums are
    over the global batch (:func:`kerasllm.distribute.loss_denominator`)."""
    weights = tf.cast(weights, values.dtype)
    return tf.reduce_sum(values * weights) / loss_denominator(tf.reduce_sum(weights))


class SequenceLevelHead(Head):
    """A task head predicting from one vector per sequence: the backbone's pooled
    output or the first token's final hidden state, through dropout and a dense
    layer of ``units`` outputs (classification, regression, multiple choice).

    Args:
        units: outputs of the dense layer.
        representation: ``pooled`` (the backbone's pooler; encoders),
            ``first_token`` (the first token's final hidden state) or
            ``last_token`` (the last real token's: in a decoder the only one that
            has seen the whole text, as Hugging Face's GPT-2 and Llama
            classifiers use). Default: ``pooled`` with a pooler, else
            ``last_token`` for decoders and ``first_token`` for encoders.
        dropout: on the representation, while training.
        pairs: the head reads sentence pairs, ``text`` and ``text_pair``: an
            exported model's ``serving_default`` takes both. ``infer_options``
            sets it when the training examples have ``text_pair``.
    """

    REPRESENTATIONS = ("pooled", "first_token", "last_token")

    def __init__(self, backbone, tokenizer, units, representation=None, dropout=0.1,
                 pairs=False, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        self.pairs = bool(pairs)
        if representation is None:
            representation = "pooled" if backbone.pooler else (
                "last_token" if backbone.causal else "first_token")
        if representation not in self.REPRESENTATIONS:
            raise ValueError(f"representation must be one of {', '.join(self.REPRESENTATIONS)}, "
                             f"got {representation!r}")
        if representation == "pooled" and not backbone.pooler:
            raise ValueError("representation 'pooled' needs model.pooler: true; or use "
                             "representation: first_token (last_token for decoders)")
        self.representation = representation
        self.dropout = keras.layers.Dropout(dropout)
        self.output_dense = keras.layers.Dense(
            units, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="classifier")

    @classmethod
    def infer_options(cls, examples, options):
        if "text_pair" in examples.element_spec:
            options = {"pairs": True, **options}
        return options

    def build(self, sequence_output_shape):
        self.output_dense.build((None, sequence_output_shape[-1]))

    def serving_inputs(self):
        text = tf.TensorSpec([None], tf.string)
        return {"text": text, "text_pair": text} if self.pairs else {"text": text}

    def call(self, backbone_outputs, inputs, training=False):
        sequence_output = backbone_outputs["sequence_output"]
        if self.representation == "pooled":
            representation = backbone_outputs["pooled_output"]
        elif self.representation == "first_token":
            representation = sequence_output[:, 0]
        else:
            last = tf.reduce_sum(tf.cast(inputs["padding_mask"] > 0, tf.int32), axis=1) - 1
            representation = tf.gather(sequence_output, tf.maximum(last, 0), batch_dims=1)
        return self.output_dense(self.dropout(representation, training=training))
