"""The `causal_lm` head: completion-only loss, packing, and generation after training.

The task: the prompt is three words that open a standard-library docstring
paragraph, then " =", and the response repeats them ("return the value =" →
"return the value"). Each word is one token of the vocabulary, so every row
has the same layout and a tiny decoder learns to copy by position in 160
steps; held-out prompts are phrases never trained on.
"""

import collections
import re

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
from kerasllm_plugins.builtin import stdlib_docstrings

SEQUENCE_LENGTH = 16
STEPS = 160
DECODER = {"kind": "decoder", "norm_first": True, "num_segments": 0, "pooler": False,
           "activation": "gelu_approximate", "layer_norm_epsilon": 1e-5, "hidden_dim": 64,
           "intermediate_dim": 128, "num_heads": 4}


def causal_lm_config(model=DECODER, **options):
    return tiny_config(model=model, data={"sequence_length": SEQUENCE_LENGTH}, objectives=[],
                       head={"name": "causal_lm", "options": {"max_new_tokens": 8, **options}},
                       training={"steps": STEPS, "warmup_steps": 20, "learning_rate": 0.008})


def as_examples(prompts, responses):
    return tf.data.Dataset.from_tensor_slices({"prompt": prompts, "response": responses})


def dataset(examples):
    """A dataset of the examples (dicts of strings)."""
    return as_examples([e["prompt"] for e in examples], [e["response"] for e in examples])


@pytest.fixture(scope="module")
def task(tokenizer):
    """(training, held-out) examples of the copying task; held-out as dicts."""
    whole_words = set(tokenizer.get_vocabulary())
    openings = [re.findall(r"[a-z]+", paragraph.lower())[:3]
                for document in stdlib_docstrings() for paragraph in document.split("\n\n")]
    phrases = list(dict.fromkeys(" ".join(words) for words in openings
                                 if len(words) == 3 and set(words) <= whole_words))
    phrases = [phrases[i] for i in np.random.default_rng(0).permutation(len(phrases))]
    training, heldout = split_heldout(as_examples([f"{p} =" for p in phrases], phrases), 0.1)
    heldout = [{key: value.decode() for key, value in example.items()}
               for example in heldout.as_numpy_iterator()]
    return training, heldout


@pytest.fixture(scope="module")
def untrained(tokenizer):
    return kerasllm.build_model(causal_lm_config(), tokenizer)


@pytest.fixture(scope="module")
def trained(tokenizer, task):
    """The decoder fine-tuned: its held-out loss before and after, a batch of
    held-out rows, and its answers to the held-out prompts (asked as dicts)."""
    training, heldout = task
    keras.utils.set_random_seed(0)
    model = kerasllm.build_model(causal_lm_config(), tokenizer)
    # One batch: the evaluated loss is the mean over every held-out target token.
    eval_batches = build_dataset(model, dataset(heldout), len(heldout), SEQUENCE_LENGTH).cache()
    before = model.evaluate(eval_batches, verbose=0, return_dict=True)["causal_lm_loss"]
    batches = build_dataset(model, training, 32, SEQUENCE_LENGTH, shuffle_buffer=1024, seed=0,
                            repeat=True)
    model.fit(batches, steps_per_epoch=STEPS, epochs=1, verbose=0)
    after = model.evaluate(eval_batches, verbose=0, return_dict=True)["causal_lm_loss"]
    # One batch of prompts: generation compiles once per batch shape.
    answers = model.predict([{"prompt": e["prompt"]} for e in heldout], batch_size=len(heldout))
    x, _ = next(iter(eval_batches))
    return model, before, after, x, answers


def target_tokens(model, examples):
    """The ids of every counted target (response and end tokens) of ``examples``."""
    found = []
    for _, y in build_dataset(model, examples, 256, SEQUENCE_LENGTH):
        ids, weights = y["causal_lm"]["ids"].numpy(), y["causal_lm"]["weights"].numpy()
        found += ids[weights > 0].tolist()
    return np.array(found)


def test_heldout_response_loss_beats_untrained_and_unigram(trained, task, tokenizer):
    model, before, after, _, _ = trained
    training, heldout = task
    # Unigram baseline: each target token's training frequency (add-one smoothed).
    counts = np.bincount(target_tokens(model, training), minlength=tokenizer.vocabulary_size()) + 1
    heldout_targets = target_tokens(model, dataset(heldout))
    unigram = -np.mean(np.log(counts[heldout_targets] / counts.sum()))
    assert before > 6.5, before  # about log(1000): the untrained model is uniform
    assert after < unigram - 2.5, (after, unigram)
    assert after < before - 5.0, (before, after)


def test_greedy_generation_reproduces_heldout_responses(trained, task):
    model, _, _, _, answers = trained
    training, heldout = task
    scores = model.heads[0].score(answers, heldout)
    assert evaluate(model, dataset(heldout), batch_size=len(heldout)) == {
        f"causal_lm_{name}": value for name, value in scores.items()}
    # Every training response is a different phrase: the baseline answers each
    # prompt with the three most frequent words of the training responses.
    words = collections.Counter(word for e in training.as_numpy_iterator()
                                for word in e["response"].decode().split())
    common = " ".join(word for word, _ in words.most_common(3))
    baseline = metrics.squad_scores([common] * len(heldout), [[e["response"]] for e in heldout])
    assert scores["exact_match"] > baseline["exact_match"] + 45, (scores, baseline)
    assert scores["f1"] > baseline["f1"] + 55, (scores, baseline)


def test_predict_returns_the_response_alone(trained, task):
    model, _, _, _, answers = trained
    _, heldout = task
    assert len(answers) == len(heldout) and all(isinstance(a, str) for a in answers)
    # The prompt is stripped: copied words, never the "=" that ends the prompt.
    assert not any("=" in answer for answer in answers), answers
    copied = [a for a, e in zip(answers, heldout) if a == e["response"]]
    assert len(copied) > len(heldout) / 2, answers
    assert model.predict(heldout[0]["prompt"]) == answers[0]  # a plain string is the prompt
    assert model.predict({"prompt": heldout[1]["prompt"], "response": "unread"}) == answers[1]


def test_loss_counts_the_response_and_end_tokens_only(untrained, tokenizer):
    x, y = next(iter(build_dataset(untrained, as_examples(["return the"], ["value"]), 1, 8)))
    cls, ret, the, value, sep = map(tokenizer.token_to_id,
                                    ["[CLS]", "return", "the", "value", "[SEP]"])
    np.testing.assert_array_equal(x["token_ids"][0], [cls, ret, the, value, sep, 0, 0, 0])
    np.testing.assert_array_equal(x["padding_mask"][0], [1, 1, 1, 1, 1, 0, 0, 0])
    # Position i predicts token i + 1: "the" predicts "value", "value" predicts [SEP].
    np.testing.assert_array_equal(y["causal_lm"]["ids"][0], [ret, the, value, sep, 0, 0, 0, 0])
    np.testing.assert_array_equal(y["causal_lm"]["weights"][0], [0, 0, 1, 1, 0, 0, 0, 0])


def test_loss_is_cross_entropy_of_the_response_whatever_the_prompt_targets(untrained, task):
    model = untrained
    training, _ = task
    x, y = next(iter(build_dataset(model, training, 8, SEQUENCE_LENGTH)))
    logits = model(x)["causal_lm"].numpy().astype("float64")
    ids, weights = y["causal_lm"]["ids"].numpy(), y["causal_lm"]["weights"].numpy()
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, ids[..., None], -1)[..., 0][weights > 0].mean()
    loss = model.compute_loss(x, y, model(x))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Other targets where the weight is 0 (the prompt, the padding) change nothing.
    scrambled = np.where(weights > 0, ids, np.random.default_rng(0).integers(0, 1000, ids.shape))
    changed = {"causal_lm": {"ids": tf.constant(scrambled, tf.int32),
                             "weights": y["causal_lm"]["weights"]}}
    np.testing.assert_allclose(model.compute_loss(x, changed, model(x)), loss, rtol=1e-6)


def test_long_rows_keep_the_response_and_the_end_of_the_prompt(untrained, tokenizer):
    head = untrained.heads[0]
    prompt, response = "a b c d e f", "g h i"
    examples = as_examples([prompt, "a"], [response, "b c d e f g h i"])
    rows = list(head.encode(examples, tokenizer, 8).as_numpy_iterator())
    ids = {word: tokenizer.token_to_id(word) for word in "abcdefghi"}
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    # The prompt loses its first tokens; the response and its end stay.
    np.testing.assert_array_equal(rows[0]["token_ids"], [cls, ids["d"], ids["e"], ids["f"],
                                                         ids["g"], ids["h"], ids["i"], sep])
    # A response too long for the row alone is cut, still closed by the end token.
    np.testing.assert_array_equal(rows[1]["token_ids"], [cls, ids["a"], ids["b"], ids["c"],
                                                         ids["d"], ids["e"], ids["f"], sep])
    np.testing.assert_array_equal(rows[1]["target_weights"], [0, 1, 1, 1, 1, 1, 1, 0])
    # Prompts to generate from leave max_new_tokens (8) free in the row.
    assert head.prompt_length(SEQUENCE_LENGTH) == SEQUENCE_LENGTH - 8
    with pytest.raises(ValueError, match=r"max_new_tokens \(8\) leaves no room for a prompt "
                                         r"in rows of 9 tokens \(data.sequence_length\)"):
        head.prompt_length(9)


def test_keras_round_trip(trained, tmp_path):
    model, _, _, x, _ = trained
    restored = assert_keras_round_trip(model, {key: value[:8] for key, value in x.items()},
                                       tmp_path)
    assert restored.heads[0].max_new_tokens == 8


def test_configuration_errors(tokenizer):
    with pytest.raises(kerasllm.ConfigError, match="needs model.kind: decoder, but the model "
                                                   "is an encoder"):
        kerasllm.build_model(causal_lm_config(model={}), tokenizer)
    with pytest.raises(kerasllm.ConfigError, match="causal_lm needs model.kind: decoder, but "
                                                   "the model is encoder_decoder; for an "
                                                   "encoder-decoder use the seq2seq head"):
        kerasllm.build_model(causal_lm_config(model={"family": "t5"}), tokenizer)
    with pytest.raises(kerasllm.ConfigError, match="max_new_tokens must be a positive integer"):
        kerasllm.build_model(causal_lm_config(max_new_tokens=0), tokenizer)
    with pytest.raises(kerasllm.ConfigError, match=r"max_new_tokens \(32\) leaves no room for "
                                                   r"a prompt within the model's 32 positions"):
        kerasllm.build_model(causal_lm_config(max_new_tokens=32), tokenizer)


def test_data_errors_name_the_fields(untrained):
    model = untrained
    questions = tf.data.Dataset.from_tensor_slices({"question": ["why?"]})
    with pytest.raises(ValueError, match="reads each example's 'prompt' .or 'text'. and "
                                         "'response'; the examples have: question"):
        build_dataset(model, questions, 1, SEQUENCE_LENGTH)
    with pytest.raises(ValueError, match="needs each example's reference 'response'; "
                                         "example 0 has none"):
        model.heads[0].score(["an answer"], [{"prompt": "a question"}])
