"""The `nsp` and `sop` objectives: pair statistics, exact pairs, training, errors."""

import math

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from conftest import SPECIAL_TOKENS, tiny_config
from helpers import assert_keras_round_trip, serve_in_fresh_process

import kerasllm
from kerasllm.data import build_dataset, split_heldout

CLS, SEP, PAD = 1, 2, 0  # SPECIAL_TOKENS' ids


def pair_model(tokenizer, objective="nsp", sequence_length=64, **model):
    objectives = [{"name": name} for name in objective.split("+")]
    keras.utils.set_random_seed(0)
    return kerasllm.build_model(tiny_config(
        objectives=objectives, model={"max_sequence_length": sequence_length, **model},
        data={"sequence_length": sequence_length}), tokenizer)


def rows_and_pairs(model, examples, sequence_length, epochs=1, batch_size=64):
    """Shuffled batches of the pipeline as ``(rows, x, y)``: the rows ``prepare``
    receives and what it makes of them."""
    prepare_batch = model.prepare_batch
    model.prepare_batch = lambda rows, seed, heads=None: (rows, prepare_batch(rows, seed, heads))
    batches = build_dataset(model, examples.repeat(epochs), batch_size, sequence_length,
                            shuffle_buffer=2048, seed=0)
    return [tf.nest.map_structure(lambda t: t.numpy(), (rows, x, y))
            for rows, (x, y) in batches]


def content(rows, i):
    """Row ``i``'s real tokens, less the start and end tokens."""
    ids = rows["token_ids"][i]
    return ids[(rows["padding_mask"][i] > 0) & (ids != CLS) & (ids != SEP)].tolist()


def split_pair(x, i):
    """``(A, B)`` of pair row ``i``, checking the row's exact structure."""
    ids, segments, padding = x["token_ids"][i], x["segment_ids"][i], x["padding_mask"][i]
    length = int(padding.sum())
    separators = np.flatnonzero(ids[:length] == SEP)
    assert ids[0] == CLS and len(separators) == 2 and separators[1] == length - 1
    first, second = ids[1:separators[0]].tolist(), ids[separators[0] + 1:length - 1].tolist()
    np.testing.assert_array_equal(padding, np.arange(len(ids)) < length)
    np.testing.assert_array_equal(
        segments, (np.arange(len(ids)) > separators[0]) & (np.arange(len(ids)) < length))
    assert (ids[length:] == PAD).all()
    return first, second


def is_slice(part, whole):
    return any(whole[k:k + len(part)] == part for k in range(len(whole) - len(part) + 1))


def test_nsp_pairs_match_bert_on_the_corpus(tokenizer, examples):
    length = 64
    model = pair_model(tokenizer, "nsp", length)
    word_start = np.array([not token.startswith("##") for token in tokenizer.get_vocabulary()])
    tokens = counted = negatives = unpaired = cut_words = 0
    overlap = {0: [], 1: []}  # Jaccard overlap of A's and B's tokens, by label
    for rows, x, y in rows_and_pairs(model, examples, length):
        labels, weights = y["nsp"]["labels"], y["nsp"]["weights"]
        assert x["token_ids"].shape[1] == length
        pieces = [content(rows, i) for i in range(len(labels))]
        for i, (label, weight) in enumerate(zip(labels, weights)):
            first, second = split_pair(x, i)
            tokens += len(first) + len(second)
            if len(pieces[i]) < 2:
                assert weight == 0
                continue
            # A is the row's beginning, at least a quarter and at most three quarters.
            low = max(1, len(pieces[i]) // 4)
            assert first == pieces[i][:len(first)]
            assert low <= len(first) <= len(pieces[i]) - low
            if weight == 0:
                unpaired += 1
                continue
            counted += 1
            overlap[label].append(len(set(first) & set(second)) / len(set(first) | set(second)))
            if label == 0:
                assert first + second == pieces[i]  # the true continuation, exactly
                cut_words += not word_start[second[0]]
            else:
                negatives += 1
                # From a row of another document, as long as the continuation it replaces.
                assert any(rows["document"][k] != rows["document"][i]
                           and is_slice(second, pieces[k]) for k in range(len(labels)))
                assert 0 < len(second) <= len(pieces[i]) - len(first)
    assert tokens >= 100_000
    assert abs(negatives / counted - 0.5) < 0.03, negatives / counted
    assert unpaired / counted < 0.01  # shuffled batches always mix documents
    assert cut_words / (counted - negatives) < 0.01  # B begins at a word
    # The label is in the text: a true continuation shares more words with A
    # than a piece of another document does (area under the ROC curve).
    positive, negative = np.array(overlap[0]), np.array(overlap[1])
    auc = ((positive[:, None] > negative[None]).mean()
           + (positive[:, None] == negative[None]).mean() / 2)
    assert auc > 0.7, auc


def test_sop_pairs_match_albert_on_the_corpus(tokenizer, examples):
    length = 64
    model = pair_model(tokenizer, "sop", length)
    tokens = counted = swapped = 0
    for rows, x, y in rows_and_pairs(model, examples, length):
        labels, weights = y["sop"]["labels"], y["sop"]["weights"]
        for i, (label, weight) in enumerate(zip(labels, weights)):
            first, second = split_pair(x, i)
            tokens += len(first) + len(second)
            original = content(rows, i)
            assert weight == (len(original) >= 2)
            if not weight:
                continue
            counted += 1
            swapped += label
            assert first and second
            # Un-swapping gives the row's content exactly.
            assert (second + first if label else first + second) == original
    assert tokens >= 100_000
    assert abs(swapped / counted - 0.5) < 0.03, swapped / counted


@pytest.fixture(scope="module")
def word_tokenizer():
    """Whole words w0…w29 and word pieces ##p0…##p9 (ids 5…34 and 35…44)."""
    vocabulary = SPECIAL_TOKENS + [f"w{i}" for i in range(30)] + [f"##p{i}" for i in range(10)]
    return keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)


def hand_made_batch(rows, documents):
    """Rows as the pipeline gives them: ``[CLS]``, content and ``[SEP]`` as
    listed, padded to the longest."""
    width = max(len(row) for row in rows)
    return {"token_ids": tf.constant([row + [PAD] * (width - len(row)) for row in rows]),
            "padding_mask": tf.constant([[1] * len(row) + [0] * (width - len(row))
                                         for row in rows]),
            "segment_ids": tf.zeros([len(rows), width], tf.int32),
            "document": tf.constant(documents, tf.int64)}


def test_exact_pairs_on_a_hand_made_batch(word_tokenizer):
    model = pair_model(word_tokenizer, "nsp", 16)
    nsp = model.get_head("nsp")
    assert nsp.row_length(16) == 13  # room for [CLS] A [SEP] B [SEP]
    batch = hand_made_batch([[CLS, 5, 6, SEP], [7, 8], [CLS, 9, SEP]], [0, 1, 2])
    seen = set()
    for seed in range(20):
        x, y = nsp.prepare(batch, tf.constant([seed, 0]))
        x = tf.nest.map_structure(lambda t: t.numpy(), x)
        # Two-token rows split 1 + 1; a negative's B is one token of another row.
        for i, (a, b) in enumerate([(5, 6), (7, 8)]):
            label = y["labels"][i].numpy()
            if label == 0:
                expected_b = b
            else:
                expected_b = x["token_ids"][i, 3]
                assert expected_b in {5, 6, 7, 8} - {a, b}
            np.testing.assert_array_equal(x["token_ids"][i], [CLS, a, SEP, expected_b, SEP, 0, 0])
            np.testing.assert_array_equal(x["segment_ids"][i], [0, 0, 0, 1, 1, 0, 0])
            np.testing.assert_array_equal(x["padding_mask"][i], [1, 1, 1, 1, 1, 0, 0])
            seen.add((i, int(label)))
        # One content token cannot be split: it stays whole in A and is not counted.
        np.testing.assert_array_equal(x["token_ids"][2], [CLS, 9, SEP, SEP, 0, 0, 0])
        np.testing.assert_array_equal(x["segment_ids"][2], [0, 0, 0, 1, 0, 0, 0])
        np.testing.assert_array_equal(x["padding_mask"][2], [1, 1, 1, 1, 0, 0, 0])
        assert y["labels"][2] == 0 and y["weights"].numpy().tolist() == [1, 1, 0]
        np.testing.assert_array_equal(x["document"], [0, 1, 2])
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}

    sop = pair_model(word_tokenizer, "sop", 16).get_head("sop")
    orders = set()
    for seed in range(20):
        x, y = sop.prepare(batch, tf.constant([seed, 0]))
        label = y["labels"][0].numpy()
        np.testing.assert_array_equal(x["token_ids"][0], [CLS, 6, SEP, 5, SEP, 0, 0] if label
                                      else [CLS, 5, SEP, 6, SEP, 0, 0])
        orders.add(int(label))
        again, _ = sop.prepare(batch, tf.constant([seed, 0]))  # stateless: same seed, same pair
        np.testing.assert_array_equal(again["token_ids"], x["token_ids"])
    assert orders == {0, 1}


def test_splits_fall_between_words_in_the_middle_half(word_tokenizer):
    sop = pair_model(word_tokenizer, "sop", 24).get_head("sop")
    # w0 ##p0 ##p1 w1 ##p2 w2 w3 ##p3 ##p4 w4 ##p5 ##p6 ##p7 w5 w6 ##p8: 16 tokens,
    # so splits lie in [4, 12]; the words there begin at 5, 6 and 9.
    words = [5, 35, 36, 6, 37, 7, 8, 38, 39, 9, 40, 41, 42, 10, 11, 43]
    batch = hand_made_batch([[CLS] + words + [SEP]] * 8, list(range(8)))
    splits = set()
    for seed in range(10):
        x, y = sop.prepare(batch, tf.constant([seed, 1]))
        for i in range(8):
            first, second = split_pair(tf.nest.map_structure(lambda t: t.numpy(), x), i)
            if y["labels"][i]:
                first, second = second, first
            assert first + second == words
            splits.add(len(first))
    assert splits == {5, 6, 9}


def test_same_document_batch_keeps_negatives_out_of_the_loss(word_tokenizer):
    nsp = pair_model(word_tokenizer, "nsp", 16).get_head("nsp")
    batch = hand_made_batch([[CLS, 5, 6, 7, 8], [9, 10, 11, 12, SEP]] * 4, [3] * 8)
    x, y = nsp.prepare(batch, tf.constant([0, 0]))
    # No other document to draw B from: every pair is the true one ...
    assert (y["labels"].numpy() == 0).all()
    for i in range(8):
        first, second = split_pair(tf.nest.map_structure(lambda t: t.numpy(), x), i)
        assert first + second == ([5, 6, 7, 8] if i % 2 == 0 else [9, 10, 11, 12])
    # ... and those drawn negative are not counted (it would tilt the prior).
    weights = y["weights"].numpy()
    assert 0 < weights.sum() < 8


def test_same_seed_same_pairs(tokenizer, examples):
    model = pair_model(tokenizer, "nsp+mlm", 32)
    first, again, other = [next(iter(build_dataset(model, examples.take(8), 16, 32, seed=seed)))
                           for seed in (3, 3, 4)]
    tf.nest.map_structure(np.testing.assert_array_equal, first, again)
    assert (first[0]["token_ids"].numpy() != other[0]["token_ids"].numpy()).any()


def evaluate_after_training(model, examples, steps):
    data = model.config.data
    training, heldout = split_heldout(examples, 0.1)
    batches = build_dataset(model, training, data.batch_size, data.sequence_length,
                            shuffle_buffer=512, seed=0, repeat=True)
    # Shuffled: unshuffled held-out rows of one long document fill whole batches.
    eval_batches = build_dataset(model, heldout, 32, data.sequence_length,
                                 shuffle_buffer=512, seed=1).take(6).cache()
    before = model.evaluate(eval_batches, verbose=0, return_dict=True)
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    after = model.evaluate(eval_batches, verbose=0, return_dict=True)
    return before, after, next(iter(eval_batches))


def test_nsp_with_mlm_trains_and_round_trips(tokenizer, examples, tmp_path):
    # BERT's recipe: pairs first, then masked. A 2-layer, 32-wide encoder does
    # not learn NSP above chance in a short run (its negatives share Python
    # vocabulary with the positives); what it must learn is the label prior:
    # the NSP loss falls to ln 2 from the classifier's initial one.
    model = pair_model(tokenizer, "nsp+mlm", 32)
    before, after, (x, y) = evaluate_after_training(model, examples, 100)
    assert after["mlm_loss"] < before["mlm_loss"] - 0.5, (before, after)
    assert after["nsp_loss"] < before["nsp_loss"], (before, after)
    assert abs(after["nsp_loss"] - math.log(2)) < 0.01, (before, after)
    # mlm masks the pairs' content, never their [CLS] and [SEP].
    masked = y["mlm"]["ids"].numpy()[y["mlm"]["weights"].numpy() > 0]
    assert len(masked) and not np.isin(masked, [CLS, SEP, PAD]).any()
    assert model(x)["nsp"].shape == (len(x["token_ids"]), 2)
    assert_keras_round_trip(model, x, tmp_path)


def test_sop_trains(tokenizer, examples):
    model = pair_model(tokenizer, "sop", 32)
    before, after, _ = evaluate_after_training(model, examples, 50)
    assert after["sop_loss"] < before["sop_loss"], (before, after)
    assert abs(after["sop_loss"] - math.log(2)) < 0.01, (before, after)


def test_bert_recipe_exports_the_embedding_and_mlm_fillers(tokenizer, tmp_path):
    from kerasllm.task_inputs import pack_texts

    model = pair_model(tokenizer, "nsp+mlm")  # untrained: it exports and serves
    texts = ["The pass statement does nothing.", "", "a [MASK] is bound"]
    _, (served,) = serve_in_fresh_process(model, tmp_path, [
        ("serving_default", {"text": np.array(texts, object)})])
    assert set(served) == {"embedding", "mask_positions", "filler_ids", "filler_tokens",
                           "filler_probabilities"}  # nothing of nsp's
    rows = pack_texts({"text": tf.constant(texts)}, tokenizer, 64)
    pooled = model.backbone({key: rows[key] for key in model.backbone.input_keys})
    np.testing.assert_allclose(served["embedding"], pooled["pooled_output"], rtol=0, atol=1e-5)


def test_errors(tokenizer, word_tokenizer):
    with pytest.raises(kerasllm.ConfigError, match="num_segments to 2 or more"):
        pair_model(tokenizer, "nsp", num_segments=1)
    with pytest.raises(kerasllm.ConfigError, match="set model.pooler: true"):
        pair_model(tokenizer, "sop", pooler=False)
    with pytest.raises(kerasllm.ConfigError, match="needs model.kind: encoder"):
        pair_model(tokenizer, "nsp", kind="decoder", pooler=False)
    with pytest.raises(ValueError, match="sequence_length >= 5"):
        pair_model(word_tokenizer, "nsp").get_head("nsp").row_length(4)
    with pytest.raises(kerasllm.ConfigError, match="at most one|both rebuild"):
        pair_model(tokenizer, "nsp+sop")
