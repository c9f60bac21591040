"""The `seq2seq` head: T5's encoder and decoder inputs, and a text-to-text task.

The task, cast as T5 casts classification (Raffel et al. 2020, §2.4: the label
is text to generate): a paragraph of Python's documentation is the prompt, and
the response names where it comes from, "language reference" (the pydoc
topics) or "standard library" (module docstrings). The model is a tiny T5 v1.1
(untied, unscaled output projection) trained from scratch; held-out paragraphs
are never trained on.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasllm
from conftest import tiny_config
from helpers import assert_keras_round_trip
from kerasllm import metrics
from kerasllm.data import build_dataset, split_heldout
from kerasllm.evaluation import evaluate
from kerasllm.tokenizer_layers import WordPieceTokenizer
from kerasllm_plugins.builtin import pydoc_topics, stdlib_docstrings

SEQUENCE_LENGTH = 24
STEPS = 150
SOURCES = ("language reference", "standard library")
T5 = {"family": "t5_v1_1"}


def seq2seq_config(model=T5, **options):
    return tiny_config(model=model, data={"sequence_length": SEQUENCE_LENGTH}, objectives=[],
                       head={"name": "seq2seq", "options": {"max_new_tokens": 6, **options}},
                       training={"steps": STEPS, "warmup_steps": 20, "learning_rate": 0.005})


def as_examples(prompts, responses):
    return tf.data.Dataset.from_tensor_slices({"prompt": prompts, "response": responses})


@pytest.fixture(scope="module")
def t5_tokenizer(tokenizer):
    """conftest's vocabulary packed as T5 packs: no start token, each sequence
    closed by the end token."""
    return WordPieceTokenizer(tokenizer.get_vocabulary(), lowercase=True, special_tokens={
        "pad": "[PAD]", "end": "[SEP]", "unknown": "[UNK]", "mask": "[MASK]"}, add_end=True)


@pytest.fixture(scope="module")
def task():
    """(training, held-out) examples, 600 paragraphs of each source; held-out as dicts."""
    prompts, responses = [], []
    for documents, source in zip((pydoc_topics(), stdlib_docstrings()), SOURCES):
        found = [" ".join(p.split()) for d in documents for p in d.split("\n\n")
                 if len(p.split()) >= 8][:600]
        prompts += found
        responses += [source] * len(found)
    order = np.random.default_rng(0).permutation(len(prompts))
    training, heldout = split_heldout(
        as_examples([prompts[i] for i in order], [responses[i] for i in order]), 0.2)
    heldout = [{key: value.decode() for key, value in example.items()}
               for example in heldout.as_numpy_iterator()]
    return training, heldout


@pytest.fixture(scope="module")
def untrained(t5_tokenizer):
    return kerasllm.build_model(seq2seq_config(), t5_tokenizer)


@pytest.fixture(scope="module")
def trained(t5_tokenizer, task):
    """The T5 fine-tuned, a batch of its rows, and its answers to the held-out
    prompts (asked as dicts, in one batch: generation compiles once per shape)."""
    training, heldout = task
    keras.utils.set_random_seed(0)
    model = kerasllm.build_model(seq2seq_config(), t5_tokenizer)
    batches = build_dataset(model, training, 16, SEQUENCE_LENGTH, shuffle_buffer=1024, seed=0,
                            repeat=True)
    model.fit(batches, steps_per_epoch=STEPS, epochs=1, verbose=0)
    answers = model.predict([{"prompt": e["prompt"]} for e in heldout], batch_size=len(heldout))
    x, _ = next(iter(batches))
    return model, x, answers


def test_generated_responses_beat_the_majority_source(trained, task):
    model, _, answers = trained
    training, heldout = task
    responses = [e["response"].decode() for e in training.as_numpy_iterator()]
    majority = max(SOURCES, key=responses.count)
    references = [[e["response"]] for e in heldout]
    baseline = metrics.squad_scores([majority] * len(heldout), references)
    scores = model.heads[0].score(answers, heldout)
    assert scores == metrics.squad_scores(answers, references)
    assert scores["exact_match"] > baseline["exact_match"] + 35, (scores, baseline)
    assert scores["f1"] > baseline["f1"] + 35, (scores, baseline)
    examples = as_examples([e["prompt"] for e in heldout], [e["response"] for e in heldout])
    assert evaluate(model, examples, batch_size=len(heldout)) == {
        f"seq2seq_{name}": value for name, value in scores.items()}


def test_predict_returns_response_strings(trained, task):
    model, _, answers = trained
    _, heldout = task
    assert len(answers) == len(heldout) and set(answers) <= set(SOURCES), set(answers)
    assert model.predict(heldout[0]["prompt"]) == answers[0]  # a plain string is the prompt
    assert model.predict({"prompt": heldout[1]["prompt"], "response": "unread"}) == answers[1]


def test_decoder_reads_the_targets_shifted_right_behind_the_pad_token(untrained, t5_tokenizer):
    examples = as_examples(["return the value", "a b c d e f g h"], ["the value", "i j k l m"])
    x, y = next(iter(build_dataset(untrained, examples, 2, 6)))
    pad, end = t5_tokenizer.pad_token_id, t5_tokenizer.end_token_id
    ids = {word: t5_tokenizer.token_to_id(word) for word in
           ["return", "the", "value", *"abcdefghijklm"]}
    # The encoder reads the prompt and the end token (cut at its end when too long).
    np.testing.assert_array_equal(x["token_ids"], [
        [ids["return"], ids["the"], ids["value"], end, pad, pad],
        [ids["a"], ids["b"], ids["c"], ids["d"], ids["e"], end]])
    np.testing.assert_array_equal(x["padding_mask"], [[1, 1, 1, 1, 0, 0], [1] * 6])
    # Targets: the response and the end token (cut the same way).
    targets = [[ids["the"], ids["value"], end, pad, pad, pad],
               [ids["i"], ids["j"], ids["k"], ids["l"], ids["m"], end]]
    np.testing.assert_array_equal(y["seq2seq"]["ids"], targets)
    np.testing.assert_array_equal(y["seq2seq"]["weights"], [[1, 1, 1, 0, 0, 0], [1] * 6])
    np.testing.assert_array_equal(x["decoder_token_ids"],
                                  [[pad] + row[:-1] for row in targets])
    np.testing.assert_array_equal(x["decoder_padding_mask"], y["seq2seq"]["weights"])


def test_loss_is_cross_entropy_of_the_targets(untrained, task):
    training, _ = task
    x, y = next(iter(build_dataset(untrained, training, 4, SEQUENCE_LENGTH)))
    logits = untrained(x)["seq2seq"].numpy().astype("float64")
    ids, weights = y["seq2seq"]["ids"].numpy(), y["seq2seq"]["weights"].numpy()
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, ids[..., None], -1)[..., 0][weights > 0].mean()
    np.testing.assert_allclose(untrained.compute_loss(x, y, untrained(x)), expected, rtol=1e-5)


def test_keras_round_trip(trained, tmp_path):
    model, x, _ = trained
    restored = assert_keras_round_trip(model, {key: value[:4] for key, value in x.items()},
                                       tmp_path)
    assert restored.heads[0].max_new_tokens == 6


def test_configuration_errors(tokenizer):
    decoder = {"kind": "decoder", "num_segments": 0, "pooler": False}
    with pytest.raises(kerasllm.ConfigError, match="seq2seq needs model.kind: encoder_decoder, "
                                                   "but the model is decoder; for a "
                                                   "decoder-only model use the causal_lm head"):
        kerasllm.build_model(seq2seq_config(model=decoder), tokenizer)
    with pytest.raises(kerasllm.ConfigError, match="seq2seq needs model.kind: encoder_decoder, "
                                                   "but the model is encoder"):
        kerasllm.build_model(seq2seq_config(model={}), tokenizer)
    with pytest.raises(kerasllm.ConfigError, match="max_new_tokens must be a positive integer"):
        kerasllm.build_model(seq2seq_config(max_new_tokens=1.5), tokenizer)
