"""The `mlm` objective: BERT masking statistics, training, saving, serving."""

import numpy as np
import pytest
import tensorflow as tf

import kerasllm
from conftest import tiny_config
from helpers import assert_keras_round_trip, run_head_test, serve_in_fresh_process
from kerasllm.data import build_dataset
from kerasllm.tokenizers import special_tokens


def masked_batches(tokenizer, examples, sequence_length=128, **options):
    model = kerasllm.build_model(tiny_config(
        model={"max_sequence_length": sequence_length},
        data={"sequence_length": sequence_length},
        objectives=[{"name": "mlm", "options": options}]), tokenizer)
    return build_dataset(model, examples, 64, sequence_length)


def masking_counts(tokenizer, batches):
    """Selectable, selected, [MASK]ed and unchanged token counts over the batches;
    checks that only real, non-special tokens are selected."""
    tokens = special_tokens(tokenizer)
    specials = [tokens.pad, tokens.start, tokens.end, tokens.mask]
    selectable = selected = masked = unchanged = 0
    for x, y in batches:
        token_ids, restored, rows, positions, originals = unmask(x, y)
        padding = x["padding_mask"].numpy() > 0
        assert padding[rows, positions].all()
        assert not np.isin(originals, specials).any()
        selectable += (padding & ~np.isin(restored, specials)).sum()
        selected += len(originals)
        now = token_ids[rows, positions]
        masked += (now == tokens.mask).sum()
        unchanged += (now == originals).sum()
    return selectable, selected, masked, unchanged


def unmask(x, y):
    """(masked ids, original ids, rows, positions, originals) of a batch."""
    token_ids = x["token_ids"].numpy()
    positions = x["mask_positions"].numpy()
    weights = y["mlm"]["weights"].numpy().astype(bool)
    originals = y["mlm"]["ids"].numpy()
    rows = np.repeat(np.arange(len(token_ids))[:, None], positions.shape[1], 1)
    rows, positions, originals = rows[weights], positions[weights], originals[weights]
    restored = token_ids.copy()
    restored[rows, positions] = originals
    return token_ids, restored, rows, positions, originals


def test_masking_statistics_match_bert(tokenizer, examples):
    selectable, selected, masked, unchanged = masking_counts(
        tokenizer, masked_batches(tokenizer, examples))
    assert selectable >= 100_000
    assert abs(selected / selectable - 0.15) <= 0.005, selected / selectable
    assert abs(masked / selected - 0.8) <= 0.01
    assert abs(unchanged / selected - 0.1) <= 0.01
    random = selected - masked - unchanged
    assert abs(random / selected - 0.1) <= 0.01


def test_rates_are_options(tokenizer, examples):
    selectable, selected, masked, unchanged = masking_counts(tokenizer, masked_batches(
        tokenizer, examples.take(300), selection_rate=0.3, mask_token_rate=0.5,
        random_token_rate=0.0))
    assert abs(selected / selectable - 0.3) <= 0.01
    assert abs(masked / selected - 0.5) <= 0.02
    assert abs(unchanged / selected - 0.5) <= 0.02


def test_whole_word_masking_selects_every_piece_of_a_word(tokenizer, examples):
    vocabulary = tokenizer.get_vocabulary()
    whole = partial = 0
    selectable, selected, _, _ = masking_counts(tokenizer, masked_batches(
        tokenizer, examples.take(200), whole_word_masking=True))
    for x, y in masked_batches(tokenizer, examples.take(200), whole_word_masking=True):
        _, restored, rows, positions, _ = unmask(x, y)
        chosen = np.zeros(restored.shape, bool)
        chosen[rows, positions] = True
        continuation = np.vectorize(lambda i: vocabulary[i].startswith("##"))(restored)
        # A piece is chosen exactly when the piece before it is, within a word.
        inside = continuation[:, 1:]
        assert (chosen[:, 1:][inside] == chosen[:, :-1][inside]).all()
        whole += (chosen[:, 1:] & inside).sum()
        partial += (chosen[:, 1:] != chosen[:, :-1])[inside].sum()
    assert whole > 100 and partial == 0  # multi-piece words were selected, whole
    # Whole words fill the budget less tightly than single tokens, but nearly.
    assert 0.14 <= selected / selectable <= 0.15, selected / selectable


def test_same_seed_same_masks_and_new_masks_each_epoch(tokenizer, examples):
    model = kerasllm.build_model(tiny_config(), tokenizer)
    few = examples.take(8)
    epoch = sum(1 for _ in build_dataset(model, few, 8, 32))

    def draw(seed):
        batches = build_dataset(model, few, 8, 32, seed=seed, repeat=True).take(2 * epoch)
        return [(x["token_ids"].numpy(), x["mask_positions"].numpy()) for x, _ in batches]

    first, again, other = draw(1), draw(1), draw(2)
    for (ids, positions), (ids_again, positions_again) in zip(first, again):
        np.testing.assert_array_equal(ids, ids_again)
        np.testing.assert_array_equal(positions, positions_again)
    assert any((a[1] != b[1]).any() for a, b in zip(first, other))
    # The second epoch shows the same rows with new masks (dynamic masking).
    assert any((a[1] != b[1]).any() for a, b in zip(first[:epoch], first[epoch:]))


@pytest.fixture(scope="module")
def trained(tokenizer, documents):
    # 100 steps: with BERT's 0.02-stddev initialisation, accuracy leaves its
    # first plateau (predicting nothing useful) between steps 50 and 80.
    return run_head_test(tiny_config(), tokenizer,
                         tf.data.Dataset.from_tensor_slices({"text": documents}), steps=100)


def test_mlm_trains_logs_and_round_trips(trained, tokenizer, tmp_path):
    model, before, after, x = trained
    assert after["mlm_accuracy"] > before["mlm_accuracy"] + 0.05
    # Logits only at the masked positions.
    assert model(x)["mlm"].shape == (*x["mask_positions"].shape, tokenizer.vocabulary_size())
    assert_keras_round_trip(model, x, tmp_path)


def test_mlm_with_clm_in_one_model_is_rejected(tokenizer):
    import pytest

    with pytest.raises(kerasllm.ConfigError, match="needs model.kind: decoder"):
        kerasllm.build_model(tiny_config(objectives=[{"name": "mlm"}, {"name": "clm"}]), tokenizer)


def fill_mask_rows(tokenizer, texts, length):
    """Packed rows and mask positions of ``texts`` built in Python: each text
    split at "[MASK]", the pieces tokenized and joined by the mask id, cut to
    ``length`` with [CLS] and [SEP]."""
    tokens = special_tokens(tokenizer)
    rows, positions = [], []
    for text in texts:
        ids = []
        for i, piece in enumerate(text.split("[MASK]")):
            ids += ([tokens.mask] if i else []) + np.asarray(tokenizer(piece)).tolist()
        ids = [tokens.start, *ids[:length - 2], tokens.end]
        positions.append([i for i, token in enumerate(ids) if token == tokens.mask])
        rows.append(ids + [tokens.pad] * (length - len(ids)))
    token_ids = np.array(rows, "int32")
    return {"token_ids": token_ids, "padding_mask": (np.arange(length) < np.array(
        [[len(np.trim_zeros(row, "b"))] for row in rows])).astype("int32"),
        "segment_ids": np.zeros_like(token_ids)}, positions


def test_mlm_serves_the_fillers_of_each_mask(trained, tokenizer, tmp_path):
    model = trained[0]
    length = model.config.data.sequence_length
    long = "[MASK] " + "the value of the expression is evaluated first " * 6 + "[MASK]"
    texts = ["the [MASK] statement does nothing.", "a [MASK] is bound to the[MASK].",
             "no mask here", "", long]
    rows, positions = fill_mask_rows(tokenizer, texts, length)
    assert positions[4] == [1]  # the second mask is cut off with the text
    token_request = {key: rows[key] for key in model.backbone.input_keys}
    _, (served, from_ids, none) = serve_in_fresh_process(model, tmp_path, [
        ("serving_default", {"text": np.array(texts, object)}),
        ("serve_token_ids", token_request),
        # A request where no text has a mask: no mask columns.
        ("serving_default", {"text": np.array(["no mask", ""], object)})])

    masks = max(map(len, positions))
    padded = np.array([p + [-1] * (masks - len(p)) for p in positions], "int32")
    logits = model({**rows, "mask_positions": np.maximum(padded, 0)})["mlm"]
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32)).numpy()
    k = model.get_head("mlm").serving_top_k
    top = np.argsort(-probabilities, axis=-1, kind="stable")[..., :k]
    valid = padded >= 0
    vocabulary = np.array(tokenizer.get_vocabulary(), object)
    for outputs in (served, from_ids):
        assert outputs["mask_positions"].dtype == np.int32
        np.testing.assert_array_equal(outputs["mask_positions"], padded)
        assert outputs["filler_ids"].shape == (len(texts), masks, k)
        np.testing.assert_array_equal(outputs["filler_ids"][valid], top[valid])
        assert (outputs["filler_ids"][~valid] == -1).all()
        np.testing.assert_allclose(
            outputs["filler_probabilities"][valid],
            np.take_along_axis(probabilities, top, axis=-1)[valid], rtol=0, atol=1e-5)
        assert (outputs["filler_probabilities"][~valid] == 0).all()
        assert [t.decode() for t in outputs["filler_tokens"][valid].ravel()] == \
            vocabulary[top[valid]].ravel().tolist()
        assert (outputs["filler_tokens"][~valid] == b"").all()
    assert served["embedding"].shape == (len(texts), model.backbone.hidden_dim)
    assert none["mask_positions"].shape == (2, 0)
    assert none["filler_ids"].shape == (2, 0, k)


def test_serving_top_k_is_checked(tokenizer):
    with pytest.raises(kerasllm.ConfigError, match="serving_top_k must be an integer"):
        kerasllm.build_model(tiny_config(
            objectives=[{"name": "mlm", "options": {"serving_top_k": 0}}]), tokenizer)
