"""The `question_answering` head: extractive QA on Python's language reference.

The task: a sentence of the pydoc topics is the context and the question names a
word that occurs once in it ("iterator?"); the answer is that word, at its
offset. Finding it means matching the question's tokens against the context's,
which attention learns in a few hundred steps. Held-out contexts are sentences
never trained on, and long ones (four held-out sentences, the answer in the
last) span several windows.
"""

import collections
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasllm
from conftest import tiny_config
from helpers import assert_keras_round_trip, serve_in_fresh_process
from kerasllm import metrics
from kerasllm.data import build_dataset, split_heldout
from kerasllm_plugins.builtin import pydoc_topics

SEQUENCE_LENGTH = 48
OPTIONS = {"stride": 8, "max_question_length": 12, "max_answer_length": 8}
STEPS = 300


def reference_sentences():
    """Prose sentences of the language reference (grammar and code blocks left
    out), each once: topics repeat some, and a held-out one must be unseen."""
    paragraphs = [p.strip() for topic in pydoc_topics() for p in topic.split("\n\n")]
    prose = [p for p in paragraphs if len(p.split()) >= 12 and not p.startswith(" ")
             and ">>>" not in p and "::=" not in p]
    return list(dict.fromkeys(
        " ".join(sentence.split()) for p in prose
        for sentence in re.split(r"(?<=\.)\s+", p) if 8 <= len(sentence.split()) <= 40))


def word_question(context, rng, after=0):
    """A question on a word of ``context`` (at or after character ``after``) that
    occurs once in it, or None if there is none."""
    counts = {}
    for word in re.findall(r"[A-Za-z]+", context.lower()):
        counts[word] = counts.get(word, 0) + 1
    # "the" normalizes to nothing in SQuAD scoring.
    candidates = [m for m in re.finditer(r"(?<!\S)[A-Za-z]{3,}(?!\S)", context)
                  if counts[m.group().lower()] == 1 and m.start() >= after
                  and m.group().lower() != "the"]
    if not candidates:
        return None
    word = candidates[rng.integers(len(candidates))]
    return {"question": f"{word.group()}?", "context": context,
            "answer_text": word.group(), "answer_start": word.start()}


def as_examples(rows):
    return tf.data.Dataset.from_tensor_slices({key: [row[key] for row in rows] for key in rows[0]})


def qa_config(**options):
    return tiny_config(model={"max_sequence_length": SEQUENCE_LENGTH},
                       data={"sequence_length": SEQUENCE_LENGTH}, objectives=[],
                       head={"name": "question_answering", "options": {**OPTIONS, **options}},
                       training={"steps": STEPS, "warmup_steps": 20, "learning_rate": 0.01})


def windows(model, rows, sequence_length=SEQUENCE_LENGTH):
    """The rows the head encodes ``rows`` (dicts) into, as numpy dicts."""
    numbered = as_examples(rows).enumerate().map(lambda i, row: {**row, "example": i})
    return list(model.heads[0].encode(numbered, model.tokenizer, sequence_length)
                .as_numpy_iterator())


@pytest.fixture(scope="module")
def task():
    """Training examples, and held-out single-sentence and long-context ones."""
    rng = np.random.default_rng(0)
    examples = as_examples([row for row in (word_question(s, rng) for s in reference_sentences())
                            if row])
    training, heldout = split_heldout(examples, 0.2)
    heldout = [{key: value.decode() if isinstance(value, bytes) else int(value)
                for key, value in row.items()} for row in heldout.take(200).as_numpy_iterator()]
    long_contexts = []
    for first in range(0, 160, 4):
        sentences = [row["context"] for row in heldout[first:first + 4]]
        row = word_question(" ".join(sentences), rng, after=len(" ".join(sentences[:3])) + 1)
        if row:
            long_contexts.append(row)
    return training, heldout, long_contexts


@pytest.fixture(scope="module")
def trained(tokenizer, task):
    """A tiny encoder fine-tuned from scratch, a batch of its training data, and its
    answers to the held-out questions (single sentences, then long contexts),
    asked as plain dicts."""
    training, heldout, long_contexts = task
    keras.utils.set_random_seed(0)
    model = kerasllm.build_model(qa_config(), tokenizer)
    batches = build_dataset(model, training, 32, SEQUENCE_LENGTH, shuffle_buffer=2048, seed=0,
                            repeat=True)
    model.fit(batches, steps_per_epoch=STEPS, epochs=1, verbose=0)
    questions = [{"question": row["question"], "context": row["context"]}
                 for row in heldout + long_contexts]
    answers = model.predict(questions)
    return model, next(iter(batches)), answers[:len(heldout)], answers[len(heldout):]


@pytest.fixture(scope="module")
def long_context_windows(tokenizer):
    """A long sentence of the reference (and a Unicode tail), asked about its last
    word but one, in rows of 24 tokens with a stride of 5."""
    context = max(reference_sentences(), key=len) + " A naïve café—entry."
    example = {"question": "café?", "context": context, "answer_text": "café",
               "answer_start": context.index("café")}
    model = kerasllm.build_model(
        qa_config(stride=5, max_question_length=6, max_answer_length=3), tokenizer)
    return model, example, windows(model, [example], sequence_length=24)


def test_beats_the_first_word_baseline_on_heldout_sentences(trained, task):
    model, _, answers, _ = trained
    _, heldout, _ = task
    first_words = [row["context"].split()[0] for row in heldout]
    gold = [[row["answer_text"]] for row in heldout]
    baseline = metrics.squad_scores(first_words, gold)
    scores = model.heads[0].score(answers, heldout)
    assert scores == metrics.squad_scores([answer["text"] for answer in answers], gold)
    assert scores["exact_match"] > baseline["exact_match"] + 50, (scores, baseline)
    assert scores["f1"] > baseline["f1"] + 50, (scores, baseline)


def test_answers_are_the_context_at_their_offsets(trained, task):
    _, _, answers, long_answers = trained
    _, heldout, long_contexts = task
    for answer, row in zip(answers + long_answers, heldout + long_contexts, strict=True):
        assert set(answer) == {"text", "start", "end", "score"}
        assert answer["text"] and row["context"][answer["start"]:answer["end"]] == answer["text"]


def test_finds_answers_beyond_the_first_window_of_long_contexts(trained, task, tokenizer):
    model, _, _, long_answers = trained
    _, _, long_contexts = task
    # Counted on the whole text, independently of the head's windowing: the
    # answer starts after all the context tokens a first window holds.
    later = [number for number, row in enumerate(long_contexts)
             if len(tokenizer(row["context"][:row["answer_start"]]))
             >= SEQUENCE_LENGTH - 3 - len(tokenizer(row["question"]))]
    assert len(later) >= 25, (len(later), len(long_contexts))
    answers = [long_answers[number] for number in later]
    examples = [long_contexts[number] for number in later]
    scores = model.heads[0].score(answers, examples)
    baseline = metrics.squad_scores([row["context"].split()[0] for row in examples],
                                    [[row["answer_text"]] for row in examples])
    assert scores["exact_match"] > baseline["exact_match"] + 40, (scores, baseline)


def test_keras_round_trip(trained, tmp_path):
    model, (x, y), _, _ = trained
    assert model(x)["question_answering"].shape == (32, SEQUENCE_LENGTH, 2)
    assert set(y["question_answering"]) == {"start", "end"}
    assert_keras_round_trip(model, x, tmp_path)


def test_windows_cover_the_context_and_target_the_answer(long_context_windows, tokenizer):
    """Consecutive windows share `stride` tokens, together hold every context
    token in order, and only windows holding the whole answer point at it."""
    _, example, rows = long_context_windows
    context, answer_start = example["context"], example["answer_start"]
    answer_end = answer_start + len("café")
    question_ids = tokenizer(example["question"]).tolist()
    room = 24 - 3 - len(question_ids)
    context_ids = tokenizer(context).tolist()
    assert len(rows) == 1 + -(-(len(context_ids) - room) // (room - 5)) >= 3

    covered, covered_ends = [], []
    for index, row in enumerate(rows):
        in_context = row["context_mask"].astype(bool)
        window_ids = row["token_ids"][in_context].tolist()
        assert row["token_ids"][1:1 + len(question_ids)].tolist() == question_ids
        assert row["segment_ids"][:len(question_ids) + 2].tolist() == [0] * (
            len(question_ids) + 2)
        assert (row["segment_ids"][in_context] == 1).all()
        assert np.flatnonzero(in_context)[0] == len(question_ids) + 2
        if index < len(rows) - 1:
            assert len(window_ids) == room
        overlap = 5 if index else 0
        assert window_ids[:overlap] == covered[len(covered) - overlap:]
        covered += window_ids[overlap:]
        covered_ends += row["token_ends"][in_context][overlap:].tolist()
        for start, end, token in zip(row["token_starts"][in_context],
                                     row["token_ends"][in_context], row["token_ids"][in_context]):
            word = context[start:end]
            assert word.strip() == word and token in tokenizer(word)
        holds_answer = (answer_start in row["token_starts"][in_context]
                        and answer_end in row["token_ends"][in_context])
        assert bool(row["start_position"]) == holds_answer
        if holds_answer:
            assert row["token_starts"][row["start_position"]] == answer_start
            assert row["token_ends"][row["end_position"]] == answer_end
        else:
            assert row["end_position"] == 0
    assert covered == context_ids
    assert covered_ends == sorted(covered_ends) and covered_ends[-1] == len(context)
    assert not rows[0]["start_position"] and rows[-1]["start_position"]


def test_decode_takes_the_best_valid_span_over_all_windows(long_context_windows):
    model, example, rows = long_context_windows
    first, second = (np.flatnonzero(row["context_mask"]) for row in rows[:2])
    assert len(first) >= 13
    logits = [np.full((24, 2), -100, "float32") for _ in rows]
    logits[0][0] = 50  # [CLS] and the question are never answers
    logits[0][1, 0] = logits[0][2, 1] = 40
    logits[0][first[6], 0] = logits[0][first[5], 1] = 30  # ends before it starts
    logits[0][first[0], 0] = logits[0][first[9], 1] = 20  # longer than max_answer_length 3
    logits[0][first[12], 0] = logits[0][first[12], 1] = 6  # valid, but lower
    logits[1][second[4], 0], logits[1][second[6], 1] = 7, 6
    [answer] = model.heads[0].decode(logits, rows)
    start = int(rows[1]["token_starts"][second[4]])
    end = int(rows[1]["token_ends"][second[6]])
    assert answer == {"text": example["context"][start:end], "start": start, "end": end,
                      "score": 13.0}


def test_score_takes_the_best_of_the_gold_answers(long_context_windows):
    head = long_context_windows[0].heads[0]
    answers = [{"text": "the Loop."}, {"text": "for loop"}]
    examples = [{"answers": ["a while", "loop"]}, {"answer_text": "for"}]
    assert head.score(answers, examples) == {"exact_match": 50.0, "f1": pytest.approx(100 * (
        1 + 2 / 3) / 2)}
    with pytest.raises(ValueError, match="example 0 has neither answers nor answer_text"):
        head.score(answers[:1], [{"question": "?"}])


@pytest.mark.parametrize("options, message", [
    ({"stride": -1}, "stride must be an integer >= 0, got -1"),
    ({"max_question_length": 0}, "max_question_length must be an integer >= 1, got 0"),
    ({"max_answer_length": 2.5}, "max_answer_length must be an integer >= 1, got 2.5"),
])
def test_bad_options_fail_naming_them(tokenizer, options, message):
    with pytest.raises(kerasllm.ConfigError, match=f"head.options: .*{re.escape(message)}"):
        kerasllm.build_model(qa_config(**options), tokenizer)


def test_a_stride_the_window_cannot_hold_fails_at_encoding(tokenizer):
    model = kerasllm.build_model(qa_config(stride=40), tokenizer)
    with pytest.raises(kerasllm.ConfigError, match=r"leaves 33 for the context .* the stride "
                                                   r"\(40\) must be smaller"):
        model.predict([{"question": "Where?", "context": "In a loop."}])


@pytest.mark.parametrize("example, message", [
    ({"question": "Where?", "text": "In a loop."}, "need the fields question, context; they lack context"),
    ({"question": "Where?", "context": "In a loop.", "answer_text": "loop"},
     "have answer_text but no answer_start"),
])
def test_examples_without_the_fields_fail_naming_them(long_context_windows, example, message):
    model = long_context_windows[0]
    with pytest.raises(ValueError, match=message):
        build_dataset(model, as_examples([example]), 8, SEQUENCE_LENGTH)


def test_answers_not_at_their_offsets_fail_naming_them(long_context_windows):
    model = long_context_windows[0]
    examples = as_examples([  # off by one; whitespace, no word; past the end
        {"question": "Where?", "context": "In a loop.", "answer_text": "loop", "answer_start": 3},
        {"question": "Where?", "context": "In a loop.", "answer_text": " ", "answer_start": 2},
        {"question": "Where?", "context": "In a loop.", "answer_text": "a", "answer_start": 30}])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"answer_text must be the text of the context at answer_start.*"
                             r"\[loop   a\] \[3 2 30\]"):
        list(build_dataset(model, examples, 8, SEQUENCE_LENGTH))


# === Serving ===

def test_an_exported_model_answers_as_predict_does(trained, task, tmp_path):
    """In a fresh process, as TF Serving runs it: the same answers as
    ``predict`` for held-out questions, long contexts answered beyond their
    first window, empty questions and contexts, and invalid UTF-8 (served as if
    it were U+FFFD)."""
    model, _, _, _ = trained
    _, heldout, long_contexts = task
    candidates = [{"question": row["question"], "context": row["context"]}
                  for row in heldout[:20] + long_contexts[:8]]
    rows = collections.defaultdict(list)
    for row in windows(model, candidates):
        rows[row["example"]].append(row)
    # Sentences of one window (for serve_token_ids too), then long contexts.
    sentences = [i for i in range(20) if len(rows[i]) == 1][:8]
    assert len(sentences) == 8
    single = [rows[i][0] for i in sentences]
    asked = [candidates[i] for i in sentences] + candidates[20:]
    asked += [{"question": "", "context": heldout[0]["context"]},
              {"question": "loop?", "context": ""}, {"question": "", "context": ""},
              {"question": "café?", "context": "A naïve café in Zürich."}]
    raw = [{key: value.encode() for key, value in row.items()} for row in asked]
    raw.append({"question": b"caf\xff?", "context": b"Say caf\xff or \xc3 and wait."})
    by_ids = {key: np.stack([row[key] for row in single])
              for key in ("token_ids", "padding_mask", "segment_ids")}
    _, (served, served_ids) = serve_in_fresh_process(model, tmp_path, [
        ("serving_default", {key: np.array([row[key] for row in raw], dtype=object)
                             for key in ("question", "context")}),
        ("serve_token_ids", by_ids)])

    expected = model.predict([{key: value.decode("utf-8", "replace")
                               for key, value in row.items()} for row in raw])
    assert set(served) == {"answer", "start", "end", "score"}
    for i, answer in enumerate(expected):
        assert served["answer"][i].decode() == answer["text"]
        assert (served["start"][i], served["end"][i]) == (answer["start"], answer["end"])
        if answer["score"] is None:  # no context word
            assert served["score"][i] == -np.inf
        else:
            assert served["score"][i] == pytest.approx(answer["score"], abs=1e-4)
    assert [answer["score"] is None for answer in expected[16:]] == [
        False, True, True, False, False]
    # Long contexts: some answers come from beyond the first window.
    first_window_ends = [rows[i][0]["token_ends"].max() for i in range(20, 28)]
    assert sum(served["start"][8:16] >= first_window_ends) >= 3

    # Token ids in: the best span's token positions in each row.
    assert set(served_ids) == {"start_token", "end_token", "score"}
    for row, first, last, score, answer in zip(single, served_ids["start_token"],
                                               served_ids["end_token"], served_ids["score"],
                                               expected):
        assert (row["token_starts"][first], row["token_ends"][last]) == (
            answer["start"], answer["end"])
        assert score == pytest.approx(answer["score"], abs=1e-4)
