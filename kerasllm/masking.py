"""BERT's token masking, stateless and with whole-word selection.

keras-hub's ``MaskedLMMaskGenerator`` draws from stateful random ops, so the
same seed does not give the same masks twice in one process, and it selects
tokens, never whole words. This module does both: the masks are a function of
``(token_ids, seed)`` alone, which makes a seeded run (and a resumed one)
reproducible. Objectives that mask (``mlm``, ``electra``) share it.
"""

import math

import keras_hub
import numpy as np
import tensorflow as tf

from kerasllm.tokenizers import special_tokens


class TokenMasking:
    """A masked-LM objective's masking options, checked, applied to a batch of features."""

    def __init__(self, backbone, tokenizer, selection_rate, mask_token_rate,
                 random_token_rate, whole_word_masking):
        for name, rate in [("selection_rate", selection_rate),
                           ("mask_token_rate", mask_token_rate),
                           ("random_token_rate", random_token_rate)]:
            if not 0 <= rate <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        if mask_token_rate + random_token_rate > 1:
            raise ValueError("mask_token_rate + random_token_rate must be <= 1")
        self.mask_token = special_tokens(tokenizer).mask
        if self.mask_token is None:
            raise ValueError("the tokenizer has no mask token; masked LM needs one")
        self.rates = (selection_rate, mask_token_rate, random_token_rate)
        self.vocabulary_size = backbone.vocabulary_size
        # Room for every selection of the longest row.
        self.max_selections = math.ceil(selection_rate * backbone.max_sequence_length) + 1
        self.special = special_token_table(tokenizer, backbone.vocabulary_size)
        self.word_start = word_start_table(tokenizer, backbone.vocabulary_size) \
            if whole_word_masking else None

    def __call__(self, features, seed):
        token_ids = features["token_ids"]
        selectable = (features["padding_mask"] > 0) & ~tf.gather(self.special, token_ids)
        selection_rate, mask_token_rate, random_token_rate = self.rates
        return mask_tokens(
            token_ids, seed, selectable, selection_rate=selection_rate,
            mask_token_id=self.mask_token, mask_token_rate=mask_token_rate,
            random_token_rate=random_token_rate, vocabulary_size=self.vocabulary_size,
            max_selections=self.max_selections,
            word_starts=None if self.word_start is None else
            word_starts(token_ids, self.word_start, self.special))


def mask_tokens(token_ids, seed, selectable, *, selection_rate, mask_token_id,
                mask_token_rate, random_token_rate, vocabulary_size, max_selections,
                word_starts=None):
    """Select ``selection_rate`` of the selectable tokens of each row and corrupt them.

    Of the selected tokens, ``mask_token_rate`` become ``mask_token_id``,
    ``random_token_rate`` a token drawn uniformly from the vocabulary, and the
    rest stay unchanged. A row with ``n`` selectable tokens gets
    ``round(selection_rate * n)`` selections (at most ``max_selections``). With
    ``word_starts`` (bool, true where a word begins), whole words are selected,
    in random order, as long as they fit in that budget (BERT's whole-word masking).

    Args:
        token_ids: int ``(batch, length)``.
        seed: int32 ``(2,)``.
        selectable: bool ``(batch, length)``: real, non-special tokens.
    Returns:
        A dict: ``token_ids`` (corrupted), ``mask_positions`` ``(batch,
        max_selections)`` in increasing order, ``mask_ids`` (the original tokens
        there) and ``mask_weights`` (1.0 for a selection, 0.0 for padding).
    """
    selection_seed, replacement_seed, random_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    shape = tf.shape(token_ids)
    batch, length = shape[0], shape[1]
    positions = tf.broadcast_to(tf.range(length), shape)
    score = tf.random.stateless_uniform(shape, selection_seed, alg="philox")
    if word_starts is not None:
        # Every piece of a word takes the score of the word's first piece.
        word_index = tf.cumsum(tf.cast(word_starts, tf.int32), axis=1)
        word_index += length * tf.range(batch)[:, None]
        word_score = tf.math.unsorted_segment_max(
            tf.where(word_starts, score, 0.0), word_index, batch * (length + 1))
        score = tf.gather(word_score, word_index)
    score = tf.where(selectable, score, 2.0)  # unselectable tokens sort last
    order = tf.argsort(score, axis=1, stable=True)  # a word's pieces stay together
    budget = tf.minimum(
        tf.cast(tf.floor(selection_rate * tf.reduce_sum(tf.cast(selectable, tf.float32), 1)
                         + 0.5), tf.int32), max_selections)
    taken = tf.cumsum(tf.cast(tf.gather(selectable, order, batch_dims=1), tf.int32), axis=1)
    if word_starts is not None:
        # A word counts with all its pieces: it fits if its last piece does.
        sorted_word = tf.gather(word_index, order, batch_dims=1)
        taken = tf.gather(tf.math.unsorted_segment_max(taken, sorted_word, batch * (length + 1)),
                          sorted_word)
    chosen_sorted = tf.gather(selectable, order, batch_dims=1) & (taken <= budget[:, None])
    selected = tf.gather(chosen_sorted, tf.argsort(order, axis=1), batch_dims=1)

    draw = tf.random.stateless_uniform(shape, replacement_seed, alg="philox")
    random_ids = tf.random.stateless_uniform(shape, random_seed, 0, vocabulary_size,
                                             dtype=tf.int32, alg="philox")
    corrupted = tf.where(draw < mask_token_rate, tf.cast(mask_token_id, token_ids.dtype),
                         tf.where(draw < mask_token_rate + random_token_rate,
                                  tf.cast(random_ids, token_ids.dtype), token_ids))
    mask_positions = tf.sort(tf.where(selected, positions, length + positions), axis=1)
    if max_selections > 0:
        mask_positions = tf.pad(mask_positions, [[0, 0], [0, max_selections]],
                                constant_values=2 * length)[:, :max_selections]
    mask_weights = mask_positions < length
    mask_positions = tf.where(mask_weights, mask_positions, 0)
    return {
        "token_ids": tf.where(selected, corrupted, token_ids),
        "mask_positions": mask_positions,
        "mask_ids": tf.where(mask_weights, tf.gather(token_ids, mask_positions, batch_dims=1), 0),
        "mask_weights": tf.cast(mask_weights, tf.float32),
    }


def special_token_table(tokenizer, vocabulary_size):
    """Bool ``(vocabulary_size,)``: the tokenizer's special tokens (never masked)."""
    tokens = special_tokens(tokenizer)
    table = np.zeros(vocabulary_size, bool)
    special = getattr(tokenizer, "special_token_ids", None) or []
    for token in (tokens.pad, tokens.start, tokens.end, tokens.mask, *special):
        if token is not None:
            table[token] = True
    return tf.constant(table)


def word_start_table(tokenizer, vocabulary_size):
    """Bool ``(vocabulary_size,)``: tokens that begin a word. WordPiece marks the
    other pieces (``##ing``); SentencePiece (``▁``) and byte-level BPE (``Ġ``,
    an encoded space) mark the beginnings."""
    vocabulary = tokenizer.get_vocabulary()
    if isinstance(tokenizer, keras_hub.tokenizers.WordPieceTokenizer):
        starts = [not token.startswith("##") for token in vocabulary]
    elif isinstance(tokenizer, keras_hub.tokenizers.SentencePieceTokenizer):
        starts = [token.startswith("▁") for token in vocabulary]
    elif isinstance(tokenizer, keras_hub.tokenizers.BytePairTokenizer):
        starts = [token.startswith("Ġ") for token in vocabulary]
    else:
        raise ValueError(f"whole-word masking does not know where words begin for "
                         f"{type(tokenizer).__name__}; use a WordPiece, SentencePiece or "
                         "byte-level BPE tokenizer, or whole_word_masking: false")
    table = np.ones(vocabulary_size, bool)  # ids beyond the vocabulary: their own words
    table[:len(starts)] = starts
    return tf.constant(table)


def word_starts(token_ids, start_table, special_table):
    """Where words begin in ``token_ids``: a word-start token, a special token,
    or the token after a special token (a document's first word)."""
    special = tf.gather(special_table, token_ids)
    after_special = tf.pad(special[:, :-1], [[0, 0], [1, 0]], constant_values=True)
    return tf.gather(start_table, token_ids) | special | after_special
