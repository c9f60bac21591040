"""The `token_classification` head: word/sub-token alignment, windows over long
sequences, character offsets, entities; fine-tunes on code mentions in the pydoc
topics and beats a per-word lexicon."""

import builtins
import collections
import keyword
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasllm
from conftest import tiny_config
from helpers import assert_keras_round_trip, serve_in_fresh_process
from kerasllm import metrics
from kerasllm.data import build_dataset
from kerasllm.evaluation import as_dataset
from kerasllm.jobs import complete_head_options
from kerasllm.plugins import get_registry
from kerasllm.task_inputs import split_words
from kerasllm_plugins.builtin import pydoc_topics
from kerasllm_plugins.token_classification import TokenClassification

TAGS = ["B-X", "I-X", "O"]
# pydoc renders reST ``literals`` in double quotes: "__getattr__()", "None".
QUOTED = re.compile(r'"([^"\n]+)"')
NAME = re.compile(r"[A-Za-z_]\w*(\(\))?")
BUILTIN_NAMES = set(dir(builtins))


def head_config(**options):
    return tiny_config(objectives=[], model={"pooler": False},
                       head={"name": "token_classification", "options": options})


def numbered(examples):
    return examples.enumerate().map(lambda index, example: {**example, "example": index})


def rows_of(head, tokenizer, examples, sequence_length=32):
    rows = head.encode(numbered(as_dataset(examples)), tokenizer, sequence_length)
    return [{key: value.numpy() for key, value in row.items()} for row in rows]


def make_head(tokenizer, **options):
    """A head on its own, for its rows and answers (which need no backbone)."""
    return TokenClassification(backbone=None, tokenizer=tokenizer, **options)


@pytest.fixture(scope="module")
def x_head(tokenizer):
    return make_head(tokenizer, labels=TAGS)


# === Rows ===

def test_the_first_sub_token_of_each_word_carries_its_tag(tokenizer, x_head):
    words = ["The", "__getattribute__", "hook", "raises", "AttributeError", "."]
    tags = ["O", "B-X", "O", "O", "B-X", "O"]
    pieces = [np.asarray(tokenizer(word)).tolist() for word in words]
    assert max(len(word_pieces) for word_pieces in pieces) >= 3  # the case that matters
    [row] = rows_of(x_head, tokenizer, [{"words": words, "tags": tags}])

    content = [piece for word_pieces in pieces for piece in word_pieces]
    length = len(content) + 2
    assert row["token_ids"][:length].tolist() == [
        tokenizer.cls_token_id, *content, tokenizer.sep_token_id]
    assert row["padding_mask"].tolist() == [1] * length + [0] * (32 - length)
    first_tokens = 1 + np.cumsum([0] + [len(p) for p in pieces[:-1]])
    expected_word_ids = np.full(32, -1)
    expected_word_ids[first_tokens] = np.arange(len(words))
    np.testing.assert_array_equal(row["word_ids"], expected_word_ids)
    np.testing.assert_array_equal(row["labels"][first_tokens], [TAGS.index(t) for t in tags])

    # Only the first sub-tokens count: the loss is their mean cross-entropy.
    batch = {key: tf.constant(value[None]) for key, value in row.items()
             if key in ("labels", "word_ids")}
    _, targets = x_head.prepare(batch, seed=tf.zeros(2, tf.int32))
    np.testing.assert_array_equal(targets["weights"][0], expected_word_ids >= 0)
    logits = np.random.default_rng(0).normal(size=(1, 32, len(TAGS))).astype("float32")
    log_probabilities = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
    expected = -np.mean([log_probabilities[p, TAGS.index(t)] for p, t in zip(first_tokens, tags)])
    assert float(x_head.compute_loss(targets, tf.constant(logits))) == pytest.approx(expected,
                                                                                  rel=1e-5)


def test_long_sequences_are_cut_into_overlapping_windows(tokenizer):
    words = [word for word in pydoc_topics()[0].split() if word.isalpha()][:120]
    stride, capacity = 6, 22  # rows of 24 tokens: [CLS], 22 word tokens, [SEP]
    head = make_head(tokenizer, labels=TAGS, stride=stride)
    rows = rows_of(head, tokenizer, [{"words": words}], sequence_length=24)
    counts = [len(np.asarray(tokenizer(word))) for word in words]
    assert min(counts) >= 1 and max(counts) <= capacity
    windows = []
    for row in rows:
        firsts = row["word_ids"][row["word_ids"] >= 0]
        windows.append((firsts[0], firsts[-1] + 1))
        assert row["padding_mask"].sum() - 2 == sum(counts[firsts[0]:firsts[-1] + 1])
    assert len(rows) > 5 and windows[0][0] == 0 and windows[-1][1] == len(words)
    for (start, stop), (next_start, next_stop) in zip(windows, windows[1:]):
        assert sum(counts[start:stop]) <= capacity < sum(counts[start:stop + 1])  # full
        assert start < next_start <= stop < next_stop  # overlapping, moving on
        # As much overlap as the stride allows, unless the next word needs the room.
        overlap = sum(counts[next_start:stop])
        assert overlap <= stride
        assert (overlap + counts[next_start - 1] > stride
                or sum(counts[next_start - 1:stop + 1]) > capacity)

    # Each word takes the tag of the window where it has the most context on
    # both sides: here window k says TAGS[k % 3] everywhere.
    predictions = [np.tile(np.eye(3, dtype="float32")[k % 3], (24, 1)) for k in range(len(rows))]
    [answer] = head.decode(predictions, rows)

    def chosen_window(word):
        contexts = [(min(position, row["padding_mask"].sum() - 1 - position), -k)
                    for k, row in enumerate(rows)
                    for position in np.flatnonzero(row["word_ids"] == word)]
        return -max(contexts)[1]  # the most context; on a tie, the first window

    expected = [TAGS[chosen_window(word) % 3] for word in range(len(words))]
    assert answer["tags"] == expected
    # Not the first window to see a word: overlaps are split between windows.
    assert any(len(set(expected[next_start:stop])) == 2
               for (_, stop), (next_start, _) in zip(windows, windows[1:]))


def test_empty_examples_and_words_without_tokens(tokenizer, x_head):
    rows = rows_of(x_head, tokenizer, [{"words": []}, {"words": ["b", "", "c"]}])
    empty, with_blank = rows
    assert (empty["word_ids"] == -1).all() and empty["padding_mask"].sum() == 2
    assert sorted(with_blank["word_ids"][with_blank["word_ids"] >= 0]) == [0, 2]
    answers = x_head.decode([np.zeros((32, 3), "float32")] * 2, rows)
    assert answers[0] == {"words": [], "tags": [], "scores": [], "offsets": [],
                          "entities": []}
    assert answers[1]["tags"] == ["B-X", None, "B-X"]
    assert answers[1]["offsets"] == [[0, 1], [2, 2], [3, 4]]


# === Answers: tags, offsets, entities ===

def decode_with_tags(head, tokenizer, examples, tags):
    """Answers for ``examples`` from logits that pick ``tags`` (one list per example)."""
    rows = rows_of(head, tokenizer, examples)
    predictions = []
    for row in rows:
        logits = np.zeros((32, len(TAGS)), "float32")
        for position in np.flatnonzero(row["word_ids"] >= 0):
            tag = tags[int(row["example"])][row["word_ids"][position]]
            logits[position, TAGS.index(tag)] = 5.0
        predictions.append(logits)
    return head.decode(predictions, rows)


def test_character_offsets_index_the_original_text(tokenizer, x_head):
    text = 'Zoë\'s "KeyError" — raised in Zürich, then über-café (naïve)!'
    words = ["Zoë", "'", "s", '"', "KeyError", '"', "—", "raised", "in", "Zürich", ",",
             "then", "über", "-", "café", "(", "naïve", ")", "!"]
    entities = {"Zoë": "B-X", "KeyError": "B-X", "über": "B-X", "-": "I-X", "café": "I-X",
                "naïve": "B-X"}
    [answer] = decode_with_tags(x_head, tokenizer, [{"text": text}],
                                [[entities.get(word, "O") for word in words]])
    assert answer["words"] == words
    for word, (start, end) in zip(answer["words"], answer["offsets"]):
        assert text[start:end] == word
    assert answer["entities"] == [
        {"type": "X", "start": text.index(entity), "end": text.index(entity) + len(entity),
         "text": entity} for entity in ("Zoë", "KeyError", "über-café", "naïve")]


def test_entities_of_word_lists_index_the_joined_words(tokenizer, x_head):
    words = ["Use", "__init__", "()", "or", "dict", "."]
    [answer] = decode_with_tags(x_head, tokenizer, [{"words": words}],
                                [["O", "B-X", "I-X", "O", "B-X", "O"]])
    joined = " ".join(words)
    assert answer["tags"] == ["O", "B-X", "I-X", "O", "B-X", "O"]
    assert answer["entities"] == [
        {"type": "X", "start": 4, "end": 15, "text": "__init__ ()"},
        {"type": "X", "start": 19, "end": 23, "text": "dict"}]
    for entity in answer["entities"]:
        assert joined[entity["start"]:entity["end"]] == entity["text"]
    assert answer["scores"] == pytest.approx([np.exp(5) / (np.exp(5) + 2)] * 6)


def test_tags_that_are_not_bio_give_no_entities(tokenizer):
    head = make_head(tokenizer, labels=["NOUN", "VERB"])
    rows = rows_of(head, tokenizer, [{"words": ["names", "bind"]}])
    [answer] = head.decode([np.tile([0.0, 1.0], (32, 1))], rows)
    assert answer["tags"] == ["VERB", "VERB"] and "entities" not in answer
    scores = head.score([answer], [{"tags": ["NOUN", "VERB"]}])
    assert scores == {"accuracy": 0.5}


# === Bad input ===

def test_unknown_and_miscounted_tags_fail_naming_the_field(tokenizer, x_head):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"not one of the labels of this head \(B-X, I-X, O\).*B-PER"):
        rows_of(x_head, tokenizer, [{"words": ["a", "b"], "tags": ["O", "B-PER"]}])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"tags: these examples .* give one tag per word:\] \[1\]"):
        rows_of(x_head, tokenizer, [{"words": ["a", "b"], "tags": ["O", "O"]},
                                    {"words": ["c", "d"], "tags": ["O"]}])
    with pytest.raises(ValueError, match="need `words`.*or `text`; they have: tokens"):
        rows_of(x_head, tokenizer, [{"tokens": ["a"]}])
    with pytest.raises(ValueError, match=r"stride \(40\) must be smaller than the 30"):
        rows_of(make_head(tokenizer, labels=TAGS, stride=40), tokenizer, [{"text": "a"}])
    with pytest.raises(ValueError, match="'tags' holds names, but the head has no label"):
        rows_of(make_head(tokenizer, num_labels=3), tokenizer,
                [{"words": ["a"], "tags": ["O"]}])


@pytest.mark.parametrize("options, message", [
    ({}, "give num_labels, or labels"),
    ({"labels": TAGS, "num_labels": 4}, r"num_labels \(4\) differs from the number of labels"),
    ({"labels": ["O", "O"]}, "labels must be a list of distinct tag names"),
    ({"num_labels": 1}, "num_labels must be an integer >= 2"),
    ({"labels": TAGS, "stride": -1}, "stride must be an integer >= 0"),
    ({"labels": TAGS, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
])
def test_bad_options_are_config_errors(tokenizer, options, message):
    with pytest.raises(kerasllm.ConfigError,
                       match=f"head.options: invalid value for task head.*{message}"):
        kerasllm.build_model(head_config(**options), tokenizer)


def test_the_tag_vocabulary_is_learnt_from_the_training_tags():
    registry = get_registry()
    names = as_dataset([{"words": ["a", "b"], "tags": ["B-X", "O"]},
                        {"words": ["c"], "tags": ["I-X"]}])
    config = kerasllm.load_config(head_config())
    completed = complete_head_options(config, registry, [(names, None)])
    assert completed.head.options == {"labels": ["B-X", "I-X", "O"]}
    ids = as_dataset([{"words": ["a", "b"], "tags": [0, 4]}])
    assert complete_head_options(config, registry, [(ids, None)]).head.options == {
        "num_labels": 5}


# === Fine-tuning on real text ===

def mention_type(code):
    """The entity type of a quoted code span, or None for spans that are not a
    name (expressions, operators, dotted paths)."""
    if not NAME.fullmatch(code):
        return None
    if code in keyword.kwlist:
        return "KEYWORD"
    return "BUILTIN" if code.removesuffix("()") in BUILTIN_NAMES else "NAME"


def code_mentions():
    """Prose sentences of the pydoc topics that quote code, as (text, words, tags).

    Quoted names are entities: keywords (``"finally"``), built-in names
    (``"TypeError"``, ``"len()"``) and other names (``"__getitem__()"``, ``"x"``).
    The same words unquoted are not: ``if`` in a sentence, ``x`` in an
    expression. Split into words, ``"__getitem__()"`` is 7 of them.
    """
    sentences = {}
    for topic in pydoc_topics():
        for paragraph in topic.split("\n\n"):
            text = " ".join(paragraph.split())
            if "::=" in text or ">>>" in text:  # grammar rules and sessions, not prose
                continue
            for sentence in re.split(r"(?<=[.;:])\s+(?=[A-Z])", text):
                quotes = sentence.count('"')
                if quotes and quotes % 2 == 0 and 5 <= len(sentence.split()) <= 40:
                    sentences[sentence] = None
    texts = list(sentences)
    words, starts, ends = (values.to_list() for values in split_words(tf.constant(texts)))
    found = []
    for text, text_words, text_starts, text_ends in zip(texts, words, starts, ends):
        tags = ["O"] * len(text_words)
        for quoted in QUOTED.finditer(text):
            entity_type = mention_type(quoted.group(1))
            inside = [i for i, (start, end) in enumerate(zip(text_starts, text_ends))
                      if quoted.start(1) <= start and end <= quoted.end(1)]
            for i in inside if entity_type else ():
                tags[i] = ("B-" if i == inside[0] else "I-") + entity_type
        found.append((text, [word.decode() for word in text_words], tags))
    return found


@pytest.fixture(scope="module")
def mentions():
    """(training, held-out): every fifth distinct sentence is held out."""
    examples = code_mentions()
    return ([e for i, e in enumerate(examples) if i % 5],
            [e for i, e in enumerate(examples) if i % 5 == 0])


@pytest.fixture(scope="module")
def fine_tuned(tokenizer, mentions):
    training, _ = mentions
    examples = as_dataset([{"words": words, "tags": tags} for _, words, tags in training])
    config = head_config()
    # The learning rate decays to 0 at training.steps.
    config["training"].update(steps=500, learning_rate=0.005)
    config = complete_head_options(kerasllm.load_config(config), get_registry(),
                                   [(examples, None)])
    keras.utils.set_random_seed(0)
    model = kerasllm.build_model(config, tokenizer)
    batches = build_dataset(model, examples, 16, 32, shuffle_buffer=2048, seed=0, repeat=True)
    model.fit(batches, steps_per_epoch=500, epochs=1, verbose=0)
    return model


def lexicon_baseline(training, heldout):
    """Each word's most frequent tag in the training sentences; O for new words."""
    counts = collections.defaultdict(collections.Counter)
    for _, words, tags in training:
        for word, tag in zip(words, tags):
            counts[word][tag] += 1
    return [[counts[word].most_common(1)[0][0] if word in counts else "O" for word in words]
            for _, words, _ in heldout]


def test_finds_code_mentions_better_than_a_lexicon(fine_tuned, mentions, tmp_path):
    training, heldout = mentions
    truth = [tags for _, _, tags in heldout]
    assert sum(len(metrics.entity_spans(tags)) for tags in truth) > 250
    from_words = fine_tuned.predict([{"words": words} for _, words, _ in heldout])
    scores = fine_tuned.heads[0].score(from_words, [{"tags": tags} for tags in truth])
    lexicon = metrics.entity_f1(truth, lexicon_baseline(training, heldout))["f1"]
    # All-O finds no entity: F1 0. Measured, seeds 0-2: 0.42-0.49; the lexicon: 0.28.
    assert scores["f1"] > 0.35, scores
    assert scores["f1"] > lexicon + 0.1, (scores, lexicon)
    assert scores["accuracy"] > 0.9, scores

    # The raw sentences split into the same words: the same tags, and offsets
    # into the sentences.
    texts = [text for text, _, _ in heldout]
    from_text = fine_tuned.predict(texts)
    assert [answer["words"] for answer in from_text] == [words for _, words, _ in heldout]
    assert [answer["tags"] for answer in from_text] == [a["tags"] for a in from_words]
    assert sum(len(answer["entities"]) for answer in from_text) > 150
    for text, answer in zip(texts, from_text):
        for entity in answer["entities"]:
            assert text[entity["start"]:entity["end"]] == entity["text"]
            assert entity["type"] in ("KEYWORD", "BUILTIN", "NAME")

    examples = as_dataset([{"words": words, "tags": tags} for _, words, tags in heldout[:8]])
    x, _ = next(iter(build_dataset(fine_tuned, examples, 8, 32)))
    assert_keras_round_trip(fine_tuned, x, tmp_path)


# === Serving ===

def test_an_exported_model_tags_words_as_predict_does(fine_tuned, mentions, tokenizer, tmp_path):
    """In a fresh process, as TF Serving runs it: the same words, tags, scores,
    offsets and entities as ``predict``, for Unicode, an empty text, a text of
    several windows and invalid UTF-8 (served as if it were U+FFFD)."""
    _, heldout = mentions
    head = fine_tuned.heads[0]
    candidates = [text for text, _, _ in heldout[4:40]]
    rows = collections.defaultdict(list)
    for row in rows_of(head, tokenizer, [{"text": text} for text in candidates]):
        rows[row["example"]].append(row)
    # Texts of one window, for serve_token_ids too.
    one_window = [i for i in range(len(candidates)) if len(rows[i]) == 1][:6]
    assert len(one_window) == 6
    texts = [candidates[i] for i in one_window]
    short = [rows[i][0] for i in one_window]
    long_text = " ".join(text for text, _, _ in heldout[:4])
    assert len(tokenizer(long_text)) > 2 * 32
    raw = [text.encode() for text in texts + [
        'Zoë\'s "KeyError" — raised in Zürich, then über-café (naïve)!', "", long_text]]
    raw.append(b'caf\xff "len()" or "None".')
    by_ids = {key: np.stack([row[key] for row in short])
              for key in ("token_ids", "padding_mask", "segment_ids")}
    _, (served, served_ids) = serve_in_fresh_process(fine_tuned, tmp_path, [
        ("serving_default", {"text": np.array(raw, dtype=object)}),
        ("serve_token_ids", by_ids)])

    expected = fine_tuned.predict([text.decode("utf-8", "replace") for text in raw])
    assert set(served) == {"words", "tags", "tag_ids", "scores", "word_starts", "word_ends",
                           "num_words", "entity_types", "entity_starts", "entity_ends",
                           "entity_texts", "num_entities"}
    labels = head.labels
    for i, answer in enumerate(expected):
        count = served["num_words"][i]
        assert count == len(answer["words"])
        assert [word.decode() for word in served["words"][i, :count]] == answer["words"]
        assert [tag.decode() for tag in served["tags"][i, :count]] == answer["tags"]
        assert [labels[tag] for tag in served["tag_ids"][i, :count]] == answer["tags"]
        np.testing.assert_allclose(served["scores"][i, :count], answer["scores"], atol=1e-5)
        assert [[start, end] for start, end in zip(
            served["word_starts"][i, :count], served["word_ends"][i, :count])] == answer["offsets"]
        # Padding: no word.
        assert (served["tags"][i, count:] == b"").all()
        assert (served["word_starts"][i, count:] == -1).all()
        found = served["num_entities"][i]
        assert [{"type": kind.decode(), "start": start, "end": end, "text": text.decode()}
                for kind, start, end, text in zip(
                    served["entity_types"][i, :found], served["entity_starts"][i, :found],
                    served["entity_ends"][i, :found], served["entity_texts"][i, :found])
                ] == answer["entities"]
    assert served["num_words"][len(texts) + 1] == 0  # the empty text
    assert served["num_entities"].sum() >= 5

    # Token ids in: a tag for every real token, the words' at their first tokens.
    assert set(served_ids) == {"token_tag_ids", "token_tags", "token_scores"}
    for row, tag_ids, answer in zip(short, served_ids["token_tag_ids"], expected):
        real = row["padding_mask"] > 0
        assert (tag_ids[~real] == -1).all() and (tag_ids[real] >= 0).all()
        first_tokens = row["word_ids"] >= 0
        assert [labels[tag] for tag in tag_ids[first_tokens]] == [
            answer["tags"][word] for word in row["word_ids"][first_tokens]]
