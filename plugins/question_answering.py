"""Extractive question answering (SQuAD v1.1 style): the answer is a span of the context.

Each example becomes rows ``[CLS] question [SEP] context window [SEP]`` with
segment ids 0 and 1. A context longer than a row is cut into overlapping
windows, as Hugging Face's ``doc_stride``; every window is a row of its own and
the answer is read from the best span over all of an example's windows. The
head scores every position as the answer's start and as its end (one dense
layer of 2 outputs on the sequence output, as BERT's SQuAD head); the loss is
the mean of the start and end cross-entropies.

Answers snap to word boundaries: a row keeps, for each context token, the
character span of the *word* it belongs to (words as
:func:`kerasllm.task_inputs.split_words` cuts them), so sub-word tokens of one
word share the word's span, and an answer is always whole words of the context,
``context[start:end]``.
"""

import keras
import numpy as np
import tensorflow as tf

import kerasllm
from kerasllm import metrics
from kerasllm.data import TOKENIZE_BATCH
from kerasllm.errors import ConfigError
from kerasllm.heads import Head
from kerasllm.task_inputs import require_fields, segment_packer, split_words, word_pieces
from kerasllm.tokenizers import special_tokens

# [CLS] question [SEP] context [SEP]
SPECIAL_TOKENS_PER_ROW = 3
# The logit of positions no answer can start or end at; finite, so that
# cross-entropy stays finite whatever the target.
MASKED_LOGIT = -1e9
# The answer for a context without a word.
NO_ANSWER = {"text": "", "start": 0, "end": 0, "score": None}


class QuestionAnswering(Head):
    """Examples hold ``question`` and ``context`` (strings); to train,
    ``answer_text`` and ``answer_start`` (its character offset in the context, as
    SQuAD's); to evaluate, either those or ``answers``, a list of acceptable
    answer strings (scored against the best of them). A window that does not
    hold the whole answer is trained to point at ``[CLS]`` (position 0), as
    Hugging Face's ``run_qa``. Predictions are dicts ``{"text", "start", "end",
    "score"}`` with ``text == context[start:end]`` (character offsets) and
    ``score`` the start plus end logit of the chosen span (an empty text and
    score None for a context without words). Answers snap to whole words (see
    the module's docstring): an ``answer_text`` that cuts a word trains on, and
    predicts, all of it. Rows carry the model input ``context_mask`` (1 on context tokens).

    Served (:func:`kerasllm.export_savedmodel`), ``serving_default`` takes
    ``question`` and ``context``, ``(batch,)`` strings, windows them as
    ``encode`` does, and answers each input from the best span over all its
    windows, as ``predict``:

    - ``answer`` ``(batch,)`` string: ``context[start:end]``.
    - ``start``, ``end`` ``(batch,)`` int32: its character offsets in the
      context (Python ``str`` indices, ``end`` exclusive).
    - ``score`` ``(batch,)`` float32: the span's start plus end logit.

    A context without words gives ``""``, 0, 0 and score ``-inf`` (``predict``'s
    None). ``serve_token_ids`` takes rows packed as ``encode`` packs them
    (``[CLS] question [SEP] context [SEP]``; the context is taken to be the
    tokens between the first separator and the last token) and gives, per
    row, ``start_token`` and ``end_token`` ``(batch,)`` int32, the best span's
    first and last token positions (0 without context), and ``score``.

    Args:
        stride: tokens of context two consecutive windows share (Hugging Face's
            ``doc_stride``); it must be smaller than a window's context tokens,
            ``data.sequence_length - max_question_length - 3``.
        max_question_length: question tokens kept; longer questions lose
            their end.
        max_answer_length: the longest answer predicted, in tokens (sub-word
            pieces).
    """

    input_keys = ("context_mask",)

    def __init__(self, backbone, tokenizer, stride=128, max_question_length=64,
                 max_answer_length=30, **kwargs):
        for name, value, least in (("stride", stride, 0),
                                   ("max_question_length", max_question_length, 1),
                                   ("max_answer_length", max_answer_length, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        super().__init__(backbone, tokenizer, **kwargs)
        self.stride = stride
        self.max_question_length = max_question_length
        self.max_answer_length = max_answer_length
        self.end_token_id = special_tokens(tokenizer).end
        self.span_dense = keras.layers.Dense(
            2, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="span_logits")
        self.span_accuracy = keras.metrics.Mean(name=f"{self.name}_span_accuracy")

    def build(self, sequence_output_shape):
        self.span_dense.build(sequence_output_shape)

    # === Examples → rows ===

    def encode(self, examples, tokenizer, sequence_length):
        require_fields(examples, ("question", "context"), "question_answering")
        fields = examples.element_spec
        labelled = [key for key in ("answer_text", "answer_start") if key in fields]
        if len(labelled) == 1:
            other = {"answer_text": "answer_start", "answer_start": "answer_text"}[labelled[0]]
            raise ValueError(f"question_answering examples have {labelled[0]} but no {other}; "
                             "training needs both")
        window_rows = self._window_rows(tokenizer, sequence_length, bool(labelled))
        return examples.ragged_batch(TOKENIZE_BATCH).map(
            window_rows, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

    def _window_rows(self, tokenizer, sequence_length, labelled):
        """A function: a batch of examples → the rows of all their windows; for
        ``encode``'s pipeline and the exported graph alike."""
        room = sequence_length - SPECIAL_TOKENS_PER_ROW - self.max_question_length
        if room <= self.stride:
            raise ConfigError(
                f"question_answering: a row of data.sequence_length {sequence_length} tokens "
                f"leaves {max(room, 0)} for the context after max_question_length "
                f"({self.max_question_length}) and {SPECIAL_TOKENS_PER_ROW} special tokens; "
                f"the stride ({self.stride}) must be smaller: lower stride or "
                f"max_question_length, or raise data.sequence_length")
        pack = segment_packer(tokenizer, sequence_length, 2)
        stride, max_question_length = self.stride, self.max_question_length

        def window_rows(batch):
            question = tf.cast(tokenizer(batch["question"]), tf.int32)[:, :max_question_length]
            tokens, token_starts, token_ends = context_tokens(tokenizer, batch["context"])
            # Each example's windows: as many context tokens as its question leaves
            # room for, the next one starting `stride` tokens before this one ends.
            room = sequence_length - SPECIAL_TOKENS_PER_ROW - question.row_lengths()
            step = room - stride
            num_tokens = tokens.row_lengths()
            beyond_first = tf.maximum(num_tokens - room, tf.zeros_like(num_tokens))
            num_windows = 1 + (beyond_first + step - 1) // step
            window_index = tf.ragged.range(num_windows)
            example = window_index.value_rowids()  # the batch position of each window
            first = window_index.flat_values * tf.gather(step, example)
            length = tf.minimum(tf.gather(room, example), tf.gather(num_tokens, example) - first)
            start = tf.gather(tokens.row_starts(), example) + first
            positions = tf.ragged.range(start, start + length)  # into the flat context tokens

            window_question = tf.gather(question, example)
            rows = pack([window_question, tf.gather(tokens.flat_values, positions)])
            # Context token k of a window sits at row position len(question) + 2 + k.
            context_offset = window_question.row_lengths() + 2
            token_window = positions.value_rowids()
            within_window = (tf.range(tf.size(positions.flat_values, out_type=tf.int64))
                             - tf.gather(positions.row_starts(), token_window))
            places = tf.stack(
                [token_window, within_window + tf.gather(context_offset, token_window)], axis=1)

            def at_places(token_values):
                """The context tokens' values at their row positions; -1 elsewhere."""
                return tf.tensor_scatter_nd_update(
                    tf.fill(tf.shape(rows["token_ids"]), -1), places,
                    tf.gather(token_values.flat_values, positions.flat_values))

            rows["token_starts"] = at_places(token_starts)
            rows["token_ends"] = at_places(token_ends)
            rows["context_mask"] = tf.cast(rows["token_starts"] >= 0, tf.int32)
            if labelled:
                first_token, last_token = answer_tokens(batch, token_starts, token_ends)
                first_token, last_token = tf.gather(first_token, example), tf.gather(
                    last_token, example)
                inside = (first_token >= first) & (last_token < first + length)
                shift = context_offset - first
                rows["start_position"] = tf.cast(
                    tf.where(inside, first_token + shift, 0), tf.int32)
                rows["end_position"] = tf.cast(tf.where(inside, last_token + shift, 0), tf.int32)
            kept = {key: tf.gather(value, example) for key, value in batch.items()
                    if key not in ("question", "answer_text", "answer_start")}
            return {**kept, **rows}

        return window_rows

    # === Model ===

    def prepare(self, features, seed):
        features = dict(features)
        if "start_position" not in features:
            raise ValueError("question_answering trains on examples with answer_text and "
                             "answer_start (its character offset in the context)")
        return features, {"start": features.pop("start_position"),
                          "end": features.pop("end_position")}

    def call(self, backbone_outputs, inputs, training=False):
        logits = tf.cast(self.span_dense(backbone_outputs["sequence_output"]), tf.float32)
        # [CLS] stays open: it is the target of windows that miss the answer.
        is_first = tf.range(tf.shape(logits)[1]) == 0
        open_positions = (inputs["context_mask"] > 0) | is_first[None, :]
        return tf.where(open_positions[..., None], logits, MASKED_LOGIT)

    def compute_loss(self, targets, predictions):
        start_loss = keras.losses.sparse_categorical_crossentropy(
            targets["start"], predictions[..., 0], from_logits=True)
        end_loss = keras.losses.sparse_categorical_crossentropy(
            targets["end"], predictions[..., 1], from_logits=True)
        return (tf.reduce_mean(start_loss) + tf.reduce_mean(end_loss)) / 2

    def update_metrics(self, targets, predictions):
        predicted = tf.argmax(predictions, axis=1, output_type=tf.int32)
        both = (predicted[:, 0] == targets["start"]) & (predicted[:, 1] == targets["end"])
        self.span_accuracy.update_state(tf.cast(both, tf.float32))

    # === Rows → answers ===

    def decode(self, predictions, rows):
        best = {}  # example number → its best span so far (None: no context word yet)
        for logits, row in zip(predictions, rows):
            example = int(row["example"])
            span = self._best_span(logits, row)
            if span is not None and (best.get(example) is None
                                     or span["score"] > best[example]["score"]):
                best[example] = span
            best.setdefault(example, None)
        return [best[example] or dict(NO_ANSWER) for example in sorted(best)]

    def _best_span(self, logits, row):
        """The row's best span ``start <= end < start + max_answer_length``, both in
        the context, by start plus end logit; None for a row without context."""
        in_context = row["context_mask"].astype(bool)
        if not in_context.any():
            return None
        positions = np.arange(len(in_context))
        span_length = positions[None, :] - positions[:, None] + 1
        valid = (in_context[:, None] & in_context[None, :]
                 & (span_length >= 1) & (span_length <= self.max_answer_length))
        scores = logits[:, 0, None].astype("float64") + logits[None, :, 1]
        start, end = np.unravel_index(np.argmax(np.where(valid, scores, -np.inf)), scores.shape)
        first_character, last_character = int(row["token_starts"][start]), int(
            row["token_ends"][end])
        context = row["context"].decode("utf-8")
        return {"text": context[first_character:last_character], "start": first_character,
                "end": last_character, "score": float(scores[start, end])}

    def score(self, answers, examples):
        gold = []
        for index, example in enumerate(examples):
            if "answers" in example:
                gold.append(example["answers"])
            elif "answer_text" in example:
                gold.append([example["answer_text"]])
            else:
                raise ValueError(f"question_answering: example {index} has neither answers "
                                 "nor answer_text to score against")
        return metrics.squad_scores([answer["text"] for answer in answers], gold)

    # === Serving (kerasllm.export) ===

    def serving_inputs(self):
        text = tf.TensorSpec([None], tf.string)
        return {"question": text, "context": text}

    def serving_rows(self, inputs, tokenizer, sequence_length):
        """The windows ``encode`` makes; each row's ``example`` is its input's index."""
        batch = {**inputs, "example": tf.range(tf.size(inputs["context"], out_type=tf.int64))}
        return self._window_rows(tokenizer, sequence_length, labelled=False)(batch)

    def serving_token_rows(self, rows):
        """``context_mask`` of rows packed as ``encode`` packs them, ``[CLS] question
        [SEP] context [SEP]``: the tokens after the first separator (the end token
        after the first position) and before the last real token."""
        positions = tf.range(tf.shape(rows["token_ids"])[1])[None, :]
        separator = tf.argmax((rows["token_ids"] == self.end_token_id) & (positions > 0),
                              axis=1, output_type=tf.int32)
        last = tf.reduce_sum(tf.cast(rows["padding_mask"] > 0, tf.int32), axis=1) - 1
        context = (positions > separator[:, None]) & (positions < last[:, None])
        return {**rows, "context_mask": tf.cast(context, tf.int32)}

    def serving_outputs(self, predictions, rows, inputs):
        first, last, scores = self._serving_spans(predictions, rows["context_mask"])
        if inputs is None:
            return {"start_token": first, "end_token": last, "score": scores}
        # Each input's best window; the first of equals, as decode.
        contexts = inputs["context"]
        windows = tf.RaggedTensor.from_value_rowids(scores, rows["example"],
                                                    nrows=tf.size(contexts, out_type=tf.int64))
        row = windows.row_starts() + tf.argmax(windows.to_tensor(-np.inf), axis=1)
        score = tf.gather(scores, row)
        found = score > -np.inf
        start = tf.where(found, tf.gather(
            tf.gather(rows["token_starts"], first, batch_dims=1), row), 0)
        end = tf.where(found, tf.gather(tf.gather(rows["token_ends"], last, batch_dims=1), row), 0)
        return {"answer": tf.strings.substr(contexts, start, end - start, unit="UTF8_CHAR"),
                "start": start, "end": end, "score": score}

    def _serving_spans(self, logits, context_mask):
        """Each row's best span, as ``_best_span`` chooses it: its first and last
        token positions (int32, 0 for a row without context) and its score
        (float32, -inf without context)."""
        logits = tf.cast(logits, tf.float32)
        length = tf.shape(logits)[1]
        # (start, span length - 1) → the end position; past the row is no span.
        ends = tf.range(length)[:, None] + tf.range(self.max_answer_length)[None, :]
        inside = ends < length
        ends = tf.minimum(ends, length - 1)
        in_context = context_mask > 0
        valid = in_context[:, :, None] & tf.gather(in_context, ends, axis=1) & inside[None]
        scores = logits[:, :, 0, None] + tf.gather(logits[:, :, 1], ends, axis=1)
        scores = tf.reshape(tf.where(valid, scores, -np.inf), [tf.shape(logits)[0], -1])
        best = tf.argmax(scores, axis=1, output_type=tf.int32)
        score = tf.reduce_max(scores, axis=1)
        found = score > -np.inf
        first = best // self.max_answer_length
        last = first + best % self.max_answer_length
        return tf.where(found, first, 0), tf.where(found, last, 0), score


def context_tokens(tokenizer, contexts):
    """The context's sub-word tokens, each with its word's character span:
    ``(token_ids, starts, ends)``, ragged ``(batch, tokens)``."""
    words, word_starts, word_ends = split_words(contexts)
    pieces = word_pieces(tokenizer, words)
    token_ids = pieces.merge_dims(1, 2)
    pieces_per_word = pieces.values.row_lengths()

    def per_token(word_values):
        return token_ids.with_flat_values(tf.repeat(word_values.flat_values, pieces_per_word))

    return token_ids, per_token(word_starts), per_token(word_ends)


def answer_tokens(batch, token_starts, token_ends):
    """The first and last context tokens of each example's answer (int64): those
    of the words it overlaps. Fails unless ``answer_text`` is the context's text at
    ``answer_start`` and overlaps a word."""
    answer_start = tf.cast(batch["answer_start"], tf.int32)
    answer_length = tf.strings.length(batch["answer_text"], unit="UTF8_CHAR")
    # Clipped, so that an offset outside the context fails the check below
    # rather than substr, whose message names neither field.
    context_length = tf.strings.length(batch["context"], unit="UTF8_CHAR")
    at_start = tf.strings.substr(batch["context"],
                                 tf.clip_by_value(answer_start, 0, context_length),
                                 answer_length, unit="UTF8_CHAR")
    token_example = token_starts.value_rowids()

    def tokens_where(flags):
        return tf.math.unsorted_segment_sum(tf.cast(flags, tf.int64), token_example,
                                            tf.size(answer_start))

    first = tokens_where(token_ends.flat_values <= tf.gather(answer_start, token_example))
    last = tokens_where(token_starts.flat_values
                        < tf.gather(answer_start + answer_length, token_example)) - 1
    wrong = (at_start != batch["answer_text"]) | (answer_start < 0) | (first > last)
    check = tf.debugging.Assert(~tf.reduce_any(wrong), [
        "question_answering: answer_text must be the text of the context at answer_start "
        "(a character offset) and hold a word; failing (answer_text, answer_start):",
        tf.boolean_mask(batch["answer_text"], wrong),
        tf.boolean_mask(answer_start, wrong)], summarize=5)
    with tf.control_dependencies([check]):
        return tf.identity(first), tf.identity(last)


@kerasllm.hookimpl
def kerasllm_task_heads():
    return {"question_answering": QuestionAnswering}
