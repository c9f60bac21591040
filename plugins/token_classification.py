"""Token classification: a tag for every word (named entities, part of speech).

Examples hold ``words`` (a list of strings) or ``text`` (a string, split into
words by :func:`kerasllm.task_inputs.split_words`: runs of letters and digits,
each punctuation mark a word of its own), and for training ``tags``: one tag per
word, a name (``B-PER``, ``I-PER``, ``O``) or an id. Each word is tokenized on
its own; the first of its sub-word tokens carries its tag and the others, like
the special and padding tokens, do not count in the loss (Hugging Face's
``label_all_tokens=False``, its -100 labels).

A sequence too long for one row is cut, between words, into overlapping windows
(as question answering cuts long contexts); each word is predicted from the
window where it has the most context on both sides, so no word is dropped. A
single word longer than a row keeps its first tokens.

With BIO tags (``O``, ``B-TYPE``, ``I-TYPE``) the answers also hold the entities,
read as seqeval reads them, and ``score`` reports seqeval's entity-level
precision, recall and F1.
"""

import keras
import numpy as np
import tensorflow as tf

import kerasllm
from kerasllm import metrics
from kerasllm.data import TOKENIZE_BATCH, start_end_packer
from kerasllm.evaluation import softmax
from kerasllm.heads import TokenPredictionHead
from kerasllm.task_inputs import (
    label_encoder,
    label_options,
    label_vocabulary,
    split_words,
    word_pieces,
)
from kerasllm.tokenizers import special_tokens


class TokenClassification(TokenPredictionHead):
    """A tag per word, from the final hidden state of the word's first token.

    Example fields: ``words`` or ``text``; ``tags`` to train and score.

    Answers (``model.predict``), one per example: ``words``; ``tags``, the
    predicted tag of each word (``None`` for a word that gives no tokens, such
    as an empty string); ``scores``, each tag's probability; ``offsets``, each
    word's ``[start, end)`` character offsets; and with BIO tags ``entities``,
    dicts of ``type``, ``start``, ``end`` (character offsets, end exclusive) and
    ``text``. Offsets index ``text`` when the example gives it, else
    ``" ".join(words)``, so ``source[start:end]`` is always the entity's text.

    Served (:func:`kerasllm.export_savedmodel`), ``serving_default`` takes
    ``text``, ``(batch,)`` string, split and windowed as ``encode`` does (so a
    text of any length is tagged whole), and gives ``predict``'s answers as
    dense tensors, padded to the most words (entities) of any text of the request:

    - ``words`` ``(batch, words)`` string; ``""`` at padding.
    - ``tags`` ``(batch, words)`` string and ``tag_ids`` int32: each word's tag;
      ``""`` and -1 at padding and for a word without tokens (``predict``'s None).
    - ``scores`` ``(batch, words)`` float32: the tag's probability; 0 there.
    - ``word_starts``, ``word_ends`` ``(batch, words)`` int32: character offsets
      into ``text`` (Python ``str`` indices, end exclusive); -1 at padding.
    - ``num_words`` ``(batch,)`` int32.
    - With BIO tags, the entities: ``entity_types`` and ``entity_texts``
      ``(batch, entities)`` string, ``entity_starts`` and ``entity_ends`` int32
      (character offsets, -1 at padding), ``num_entities`` ``(batch,)`` int32.

    ``serve_token_ids`` (token ids in, no text, so no words) gives a tag for
    every token: ``token_tags`` ``(batch, sequence)`` string, ``token_tag_ids``
    int32 and ``token_scores`` float32 (``""``, -1 and 0 at padding); a word's
    tag is its first token's.

    Args:
        labels: the tag names in id order; examples may then give names.
            ``kerasllm finetune`` builds it from the training ``tags``.
        num_labels: number of tags; default: the number of ``labels``.
        dropout: on the hidden states before the classifier.
        stride: at most this many tokens are shared by consecutive windows of
            a long sequence (as Hugging Face tokenizers' ``stride``); default: a
            quarter of a row.
    """

    def __init__(self, backbone, tokenizer, labels=None, num_labels=None, dropout=0.1,
                 stride=None, **kwargs):
        labels, num_labels = label_vocabulary(labels, num_labels, "num_labels", "tag")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if stride is not None and (not isinstance(stride, int) or stride < 0):
            raise ValueError(f"stride must be an integer >= 0 (tokens), got {stride!r}")
        super().__init__(backbone, tokenizer, **kwargs)
        self.labels = labels
        self.num_labels = num_labels
        self.stride = stride
        # Entities need BIO tags; other tag sets (part of speech, IOBES) get tags only.
        self.has_entities = labels is not None and all(
            label == "O" or (label[:2] in ("B-", "I-") and len(label) > 2) for label in labels)
        self.dropout = keras.layers.Dropout(dropout)
        self.output_dense = keras.layers.Dense(
            num_labels, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="classifier")

    @classmethod
    def infer_options(cls, examples, options):
        return label_options(examples, options, "tags", "num_labels")

    def build(self, sequence_output_shape):
        self.output_dense.build(sequence_output_shape)

    def call(self, backbone_outputs, inputs, training=False):
        hidden = self.dropout(backbone_outputs["sequence_output"], training=training)
        return self.output_dense(hidden)

    # === Rows: words → windows of sub-word tokens ===

    def encode(self, examples, tokenizer, sequence_length):
        """Rows hold the model inputs, ``word_ids`` (at the first token of each
        word, the word's index in its example; -1 elsewhere), ``labels`` (the
        tag ids at those tokens) when the examples have ``tags``, and the
        example's other fields; text examples gain ``word_starts`` and ``word_ends``."""
        fields = examples.element_spec
        if "words" not in fields and "text" not in fields:
            raise ValueError("token classification examples need `words` (a list of "
                             f"strings) or `text`; they have: {', '.join(fields)}")
        to_ids = label_encoder(self.labels, "tags") if "tags" in fields else None
        window_rows = self._window_rows(tokenizer, sequence_length, to_ids)
        return examples.ragged_batch(TOKENIZE_BATCH).map(
            window_rows, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

    def _window_rows(self, tokenizer, sequence_length, to_ids=None):
        """A function: a batch of examples (``words`` or ``text``, ``example``, and
        ``tags`` for ``to_ids`` to encode) → the rows of all their windows; for
        ``encode``'s pipeline and the exported graph alike."""
        tokens = special_tokens(tokenizer)
        first_token = int(tokens.add_start)
        capacity = sequence_length - first_token - int(tokens.add_end)
        stride = capacity // 4 if self.stride is None else self.stride
        if stride >= capacity:
            raise ValueError(f"stride ({stride}) must be smaller than the {capacity} word "
                             f"tokens a row of {sequence_length} holds")
        packer = start_end_packer(tokenizer, sequence_length)

        def window_rows(batch):
            batch = dict(batch)
            if "words" in batch:
                words = _ragged(batch["words"])
            else:
                words, batch["word_starts"], batch["word_ends"] = split_words(batch["text"])
            pieces = word_pieces(tokenizer, words)[:, :, :capacity]
            counts = pieces.with_values(pieces.values.row_lengths())
            cumulative, (example, starts, stops) = _windows(counts, capacity, stride)
            # Word ranges in each example, and in the batch's flat list of words.
            word_ranges = tf.ragged.range(starts, stops)
            flat_ranges = word_ranges + tf.gather(pieces.row_splits, example)[:, None]
            token_ids, padding_mask = packer(
                tf.gather(pieces.values, flat_ranges).merge_dims(1, 2))
            window = word_ranges.value_rowids()
            word = word_ranges.flat_values
            row_example = tf.gather(example, window)
            position = first_token + (
                tf.gather_nd(cumulative, tf.stack([row_example, word], axis=1))
                - tf.gather_nd(cumulative, tf.stack([row_example, tf.gather(starts, window)], 1)))
            has_tokens = tf.gather(counts.values, flat_ranges.values) > 0
            word_ids = tf.tensor_scatter_nd_update(
                tf.fill([tf.size(starts, tf.int64), sequence_length], tf.constant(-1, tf.int64)),
                tf.boolean_mask(tf.stack([window, position], axis=1), has_tokens),
                tf.boolean_mask(word, has_tokens))
            rows = {key: tf.gather(value, example) for key, value in batch.items()
                    if key != "tags"}
            rows.update(token_ids=token_ids, padding_mask=tf.cast(padding_mask, tf.int32),
                        segment_ids=tf.zeros_like(token_ids),
                        word_ids=tf.cast(word_ids, tf.int32))
            if to_ids is not None:
                tags = _ragged(batch["tags"])
                miscounted = tags.row_lengths() != words.row_lengths()
                check = tf.debugging.Assert(~tf.reduce_any(miscounted), [
                    "tags: these examples have a different number of tags and words; give "
                    "one tag per word:", tf.boolean_mask(batch["example"], miscounted)],
                    summarize=5)
                with tf.control_dependencies([check]):
                    tag_ids = tf.identity(to_ids(tags).flat_values)
                flat_word_ids = tf.where(
                    word_ids >= 0, word_ids + tf.gather(pieces.row_splits, example)[:, None], -1)
                # Shifted by one so that -1 (no word) gathers the 0 in front.
                rows["labels"] = tf.gather(tf.concat([[0], tag_ids], axis=0), flat_word_ids + 1)
            return rows

        return window_rows

    def prepare(self, features, seed):
        features = dict(features)
        weights = tf.cast(features["word_ids"] >= 0, tf.float32)
        return features, {"ids": features.pop("labels"), "weights": weights}

    # === Answers ===

    def decode(self, predictions, rows):
        # Per example and word: (context, tag id, probability) of the best window.
        found = {}
        for logits, row in zip(predictions, rows):
            probabilities = softmax(logits)
            length = int(row["padding_mask"].sum())
            best = found.setdefault(int(row["example"]), (row, {}))[1]
            for position in np.flatnonzero(row["word_ids"] >= 0):
                word = int(row["word_ids"][position])
                context = min(position, length - 1 - position)
                tag = int(probabilities[position].argmax())
                if word not in best or context > best[word][0]:
                    best[word] = (context, tag, float(probabilities[position, tag]))
        return [self._answer(row, best) for _, (row, best) in sorted(found.items())]

    def _answer(self, row, best):
        if "word_starts" in row:  # words split from the text, with their offsets
            source = row["text"].decode("utf-8")
            offsets = list(zip(row["word_starts"].tolist(), row["word_ends"].tolist()))
            words = [source[start:end] for start, end in offsets]
        else:
            words = [word.decode("utf-8") for word in row["words"]]
            source = " ".join(words)
            starts = np.cumsum([0] + [len(word) + 1 for word in words[:-1]]).tolist()
            offsets = [(start, start + len(word)) for start, word in zip(starts, words)]
        names = self.labels or list(range(self.num_labels))
        tags = [names[best[i][1]] if i in best else None for i in range(len(words))]
        answer = {"words": words, "tags": tags,
                  "scores": [best[i][2] if i in best else 0.0 for i in range(len(words))],
                  "offsets": [list(offset) for offset in offsets]}
        if self.has_entities:
            answer["entities"] = [
                {"type": kind, "start": offsets[first][0], "end": offsets[stop - 1][1],
                 "text": source[offsets[first][0]:offsets[stop - 1][1]]}
                for kind, first, stop in metrics.entity_spans([tag or "O" for tag in tags])]
        return answer

    def score(self, answers, examples):
        truth = [[self._tag_name(tag) for tag in example["tags"]] for example in examples]
        predicted = [answer["tags"] for answer in answers]
        for index, (true_tags, predicted_tags) in enumerate(zip(truth, predicted)):
            if len(true_tags) != len(predicted_tags):
                raise ValueError(f"tags: example {index} has {len(true_tags)} tags for "
                                 f"{len(predicted_tags)} words; give one tag per word")
        scores = {"accuracy": metrics.accuracy([tag for tags in truth for tag in tags],
                                               [tag for tags in predicted for tag in tags])}
        if self.has_entities:
            entity_scores = metrics.entity_f1(
                truth, [[tag or "O" for tag in tags] for tags in predicted])
            scores.update({key: entity_scores[key] for key in ("precision", "recall", "f1")})
        return scores

    def _tag_name(self, tag):
        return self.labels[tag] if self.labels and isinstance(tag, int) else tag

    # === Serving (kerasllm.export) ===

    def serving_inputs(self):
        return {"text": tf.TensorSpec([None], tf.string)}

    def serving_rows(self, inputs, tokenizer, sequence_length):
        """The windows ``encode`` makes of ``text``; each row's ``example`` is its text's index."""
        texts = inputs["text"]
        return self._window_rows(tokenizer, sequence_length)(
            {"text": texts, "example": tf.range(tf.size(texts, out_type=tf.int64))})

    def serving_outputs(self, predictions, rows, inputs):
        logits = tf.cast(predictions, tf.float32)
        tag_ids = tf.argmax(logits, axis=-1, output_type=tf.int32)
        scores = tf.reduce_max(tf.nn.softmax(logits), axis=-1)
        names = tf.constant(self.labels or [str(i) for i in range(self.num_labels)])
        if inputs is None:
            real = rows["padding_mask"] > 0
            tag_ids = tf.where(real, tag_ids, -1)
            return {"token_tag_ids": tag_ids, "token_tags": _tag_names(names, tag_ids),
                    "token_scores": tf.where(real, scores, 0.0)}
        texts = inputs["text"]
        tag_ids, scores, starts, ends = _word_predictions(
            rows, tag_ids, scores, tf.size(texts, out_type=tf.int64))
        tag_ids, starts, ends = tag_ids.to_tensor(-1), starts.to_tensor(-1), ends.to_tensor(-1)
        outputs = {"words": _substrings(texts, starts, ends, starts >= 0),
                   "tags": _tag_names(names, tag_ids), "tag_ids": tag_ids,
                   "scores": scores.to_tensor(0.0), "word_starts": starts, "word_ends": ends,
                   "num_words": tf.reduce_sum(tf.cast(starts >= 0, tf.int32), axis=1)}
        if self.has_entities:
            outputs.update(self._serving_entities(tag_ids, starts, ends, texts))
        return outputs

    def _serving_entities(self, tag_ids, starts, ends, texts):
        """The entities of ``(batch, words)`` tag ids (-1: none, read as ``O``), as
        :func:`kerasllm.metrics.entity_spans` reads BIO tags: an entity begins
        at each tagged word that does not continue the previous word's entity
        (``I-TYPE`` after a tag of the same type) and ends before the next word
        that does not continue it."""
        types = sorted({label[2:] for label in self.labels if label != "O"})
        # Index 0 stands for tag id -1.
        type_of = tf.constant([-1] + [types.index(label[2:]) if label != "O" else -1
                                      for label in self.labels])
        inside = tf.constant([False] + [label.startswith("I-") for label in self.labels])
        kind = tf.gather(type_of, tag_ids + 1)
        previous = tf.pad(kind[:, :-1], [[0, 0], [1, 0]], constant_values=-1)
        continues = tf.gather(inside, tag_ids + 1) & (kind == previous)
        begins = (kind >= 0) & ~continues
        last = (kind >= 0) & ~tf.pad(continues[:, 1:], [[0, 0], [0, 1]])
        entity_starts = tf.ragged.boolean_mask(starts, begins).to_tensor(-1)
        entity_ends = tf.ragged.boolean_mask(ends, last).to_tensor(-1)
        found = entity_starts >= 0
        kinds = tf.ragged.boolean_mask(tf.gather(tf.constant(types), tf.maximum(kind, 0)), begins)
        return {"entity_types": kinds.to_tensor(""), "entity_starts": entity_starts,
                "entity_ends": entity_ends,
                "entity_texts": _substrings(texts, entity_starts, entity_ends, found),
                "num_entities": tf.reduce_sum(tf.cast(found, tf.int32), axis=1)}


def _ragged(values):
    """Ragged ``(batch, words)`` values; examples of equal length batch densely."""
    return values if isinstance(values, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(values)


def _tag_names(names, tag_ids):
    """The names of tag ids (any shape); "" for -1."""
    return tf.where(tag_ids >= 0, tf.gather(names, tf.maximum(tag_ids, 0)), "")


def _substrings(texts, starts, ends, found):
    """``texts[i][starts[i, j]:ends[i, j]]`` (character offsets) where ``found``, else ""."""
    starts, ends = tf.maximum(starts, 0), tf.maximum(ends, 0)
    texts = tf.broadcast_to(texts[:, None], tf.shape(starts))
    return tf.where(found, tf.strings.substr(texts, starts, ends - starts, unit="UTF8_CHAR"), "")


def _word_predictions(rows, tag_ids, scores, num_inputs):
    """Each word's tag id and score from the rows' token predictions ``(rows,
    sequence)``, taken from the window where the word has the most context on
    both sides (the first such window on a tie), as ``decode`` chooses.
    Returns ragged ``(inputs, words)`` tag ids (-1 for a word without tokens),
    scores, and the words' character starts and ends."""
    example = rows["example"]
    # Every input has a window (a text without words an empty one): the first
    # holds its words' offsets.
    first_rows = tf.searchsorted(example, tf.range(num_inputs))
    starts = tf.gather(rows["word_starts"], first_rows)
    ends = tf.gather(rows["word_ends"], first_rows)
    found = tf.where(rows["word_ids"] >= 0)  # (row, position) of each word's first token
    row, position = found[:, 0], found[:, 1]
    length = tf.reduce_sum(tf.cast(rows["padding_mask"] > 0, tf.int64), axis=1)
    context = tf.minimum(position, tf.gather(length, row) - 1 - position)
    word = (tf.gather(starts.row_splits, tf.gather(example, row))
            + tf.cast(tf.gather_nd(rows["word_ids"], found), tf.int64))
    num_rows = tf.size(example, out_type=tf.int64)
    rank = context * (num_rows + 1) + num_rows - row  # more context first, then earlier rows
    best = tf.math.unsorted_segment_max(rank, word, tf.size(starts.flat_values))
    chosen = rank == tf.gather(best, word)

    def per_word(values, missing):
        flat = tf.tensor_scatter_nd_update(
            tf.fill(tf.shape(starts.flat_values), missing), tf.boolean_mask(word, chosen)[:, None],
            tf.boolean_mask(tf.gather_nd(values, found), chosen))
        return starts.with_flat_values(flat)

    return per_word(tag_ids, -1), per_word(scores, 0.0), starts, ends


def _windows(counts, capacity, stride):
    """The windows over a batch of sequences, from their words' token counts
    (ragged ``(batch, words)``, each at most ``capacity``).

    Each window takes as many words as fit in ``capacity`` tokens; the next
    begins at the first word that leaves at most ``stride`` tokens of overlap
    and room for the word that did not fit. A sequence without words has one
    empty window. Returns ``cumulative`` (``(batch, words + 1)``: the tokens before
    each word) and the windows' ``(example, start, stop)`` word ranges, sorted
    by example and start.
    """
    word_counts = counts.row_lengths()
    cumulative = tf.concat([tf.zeros_like(word_counts)[:, None],
                            tf.cumsum(counts.to_tensor(), axis=1)], axis=1)

    def first_word_from(tokens, side):
        return tf.searchsorted(cumulative, tokens[:, None], side=side, out_type=tf.int64)[:, 0]

    def step(start, stop, windows):
        open_ = stop < word_counts
        # Padding words count 0 tokens: a window may not run past the last word.
        new_stop = tf.minimum(first_word_from(
            tf.gather(cumulative, start, batch_dims=1) + capacity, "right") - 1, word_counts)
        # The next window shares at most `stride` tokens, and fewer if the word
        # at `new_stop` (which did not fit) needs the room.
        after_next_word = tf.minimum(new_stop + 1, word_counts)
        next_start = tf.maximum(
            first_word_from(tf.gather(cumulative, new_stop, batch_dims=1) - stride, "left"),
            first_word_from(tf.gather(cumulative, after_next_word, batch_dims=1) - capacity,
                            "left"))
        windows = [found.write(found.size(), tf.boolean_mask(value, open_))
                   for found, value in zip(windows, (tf.range(tf.size(start, tf.int64)),
                                                     start, new_stop))]
        return tf.where(open_, next_start, start), tf.where(open_, new_stop, stop), windows

    found = [tf.TensorArray(tf.int64, size=0, dynamic_size=True, infer_shape=False,
                            element_shape=[None]) for _ in range(3)]
    _, _, found = tf.while_loop(
        lambda start, stop, windows: tf.reduce_any(stop < word_counts), step,
        (tf.zeros_like(word_counts), tf.fill(tf.shape(word_counts), tf.constant(-1, tf.int64)),
         found))
    example, start, stop = (windows.concat() for windows in found)
    order = tf.argsort(example * (tf.reduce_max(word_counts) + 1) + start)
    return cumulative, [tf.gather(value, order) for value in (example, start, stop)]


@kerasllm.hookimpl
def kerasllm_task_heads():
    return {"token_classification": TokenClassification}
