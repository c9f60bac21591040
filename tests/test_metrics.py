"""kerasllm.metrics against the references it mirrors: scikit-learn, SciPy, seqeval and
hand-worked SQuAD v1.1 examples."""

import math

import numpy as np
import pytest
import scipy.stats
import seqeval.metrics
import seqeval.metrics.sequence_labeling
import sklearn.metrics

from kerasllm import metrics

TOLERANCE = 1e-12
SEEDS = (0, 1, 2)

# The references warn when a score is 0/0 or an input is constant; that is the
# case under test, not a problem.
pytestmark = [
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning"),
    pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning"),
    pytest.mark.filterwarnings("ignore:A single label was found:UserWarning"),
]


# === Classification ===

def _classification_cases():
    for seed in SEEDS:
        for num_classes in (2, 3, 7):
            rng = np.random.default_rng(seed)
            labels = rng.integers(0, num_classes, size=200)
            yield (f"random-{num_classes}-seed{seed}",
                   labels, rng.integers(0, num_classes, size=200))
            # Correlated predictions: most right, so MCC and F1 are far from 0.
            noisy = np.where(rng.random(200) < 0.7, labels,
                             rng.integers(0, num_classes, size=200))
            yield f"mostly-right-{num_classes}-seed{seed}", labels, noisy
            # Predictions never use the top class; labels never use class 0 here.
            yield (f"class-absent-{num_classes}-seed{seed}",
                   np.maximum(labels, 1), rng.integers(0, max(num_classes - 1, 1), size=200))
    labels = np.random.default_rng(3).integers(0, 5, size=50)
    yield "perfect", labels, labels.copy()
    yield "constant-prediction", labels, np.zeros_like(labels)
    yield "constant-both", np.full(10, 2), np.full(10, 2)
    yield "string-labels", np.array(list("abcabcaab")), np.array(list("abbacccab"))


CLASSIFICATION_CASES = list(_classification_cases())


@pytest.mark.parametrize("case_id,labels,predictions", CLASSIFICATION_CASES,
                         ids=[case[0] for case in CLASSIFICATION_CASES])
def test_classification_matches_sklearn(case_id, labels, predictions):
    assert metrics.accuracy(labels, predictions) == pytest.approx(
        sklearn.metrics.accuracy_score(labels, predictions), abs=TOLERANCE)
    assert metrics.macro_f1(labels, predictions) == pytest.approx(
        sklearn.metrics.f1_score(labels, predictions, average="macro"), abs=TOLERANCE)
    assert metrics.matthews_corrcoef(labels, predictions) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels, predictions), abs=TOLERANCE)


def test_macro_f1_num_classes_checks_ids_but_averages_present_classes():
    labels, predictions = [0, 1, 1, 2], [0, 1, 2, 2]
    assert metrics.macro_f1(labels, predictions, num_classes=10) == pytest.approx(
        sklearn.metrics.f1_score(labels, predictions, average="macro"), abs=TOLERANCE)
    with pytest.raises(ValueError, match=r"macro_f1: predictions holds class id 3, "
                                         r"outside \[0, 3\)"):
        metrics.macro_f1([0, 1, 2], [0, 1, 3], num_classes=3)


def test_matthews_corrcoef_is_zero_when_undefined():
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0
    assert sklearn.metrics.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0


# === Regression ===

def _regression_cases():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        labels = rng.normal(size=100)
        yield f"independent-seed{seed}", labels, rng.normal(size=100)
        yield f"correlated-seed{seed}", labels, labels + 0.5 * rng.normal(size=100)
        # Few distinct values on both sides: many ties to average.
        yield (f"ties-seed{seed}", rng.integers(0, 5, size=100).astype(float),
               rng.integers(0, 4, size=100).astype(float))
    line = np.linspace(-1.0, 3.0, 20)
    yield "perfect", line, 2.0 * line + 1.0
    yield "anti", line, -line**3
    yield "integer-inputs", [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]


REGRESSION_CASES = list(_regression_cases())


@pytest.mark.parametrize("case_id,labels,predictions", REGRESSION_CASES,
                         ids=[case[0] for case in REGRESSION_CASES])
def test_correlations_match_scipy(case_id, labels, predictions):
    assert metrics.pearson(labels, predictions) == pytest.approx(
        scipy.stats.pearsonr(labels, predictions).statistic, abs=TOLERANCE)
    assert metrics.spearman(labels, predictions) == pytest.approx(
        scipy.stats.spearmanr(labels, predictions).statistic, abs=TOLERANCE)


@pytest.mark.parametrize("labels,predictions", [
    ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]),
    ([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]),  # mean-centering 0.1s leaves rounding residue
])
def test_correlations_are_nan_for_constant_input_as_scipy(labels, predictions):
    for ours, reference in ((metrics.pearson, scipy.stats.pearsonr),
                            (metrics.spearman, scipy.stats.spearmanr)):
        assert math.isnan(ours(labels, predictions))
        assert math.isnan(reference(labels, predictions).statistic)
    assert math.isnan(metrics.pearson([1.0], [2.0]))


# === Multi-label ===

def _multilabel_cases():
    for seed in SEEDS:
        for num_classes in (2, 5):
            rng = np.random.default_rng(seed)
            labels = (rng.random((60, num_classes)) < 0.3).astype(int)
            predictions = (rng.random((60, num_classes)) < 0.3).astype(int)
            yield f"random-{num_classes}-seed{seed}", labels, predictions
            flipped = np.where(rng.random(labels.shape) < 0.1, 1 - labels, labels)
            yield f"mostly-right-{num_classes}-seed{seed}", labels, flipped
    labels = (np.random.default_rng(3).random((30, 4)) < 0.4).astype(int)
    labels[:, 2] = 0
    empty_column = labels.copy()
    empty_column[:5, 0] = 1 - empty_column[:5, 0]
    yield "column-never-positive", labels, empty_column
    yield "perfect", labels, labels.copy()
    yield "no-positive-predictions", labels, np.zeros_like(labels)
    yield "no-positives-anywhere", np.zeros((4, 3), int), np.zeros((4, 3), int)


MULTILABEL_CASES = list(_multilabel_cases())


@pytest.mark.parametrize("case_id,labels,predictions", MULTILABEL_CASES,
                         ids=[case[0] for case in MULTILABEL_CASES])
def test_multilabel_scores_match_sklearn(case_id, labels, predictions):
    scores = metrics.multilabel_scores(labels, predictions)
    assert scores == pytest.approx({
        "micro_f1": sklearn.metrics.f1_score(labels, predictions, average="micro"),
        "macro_f1": sklearn.metrics.f1_score(labels, predictions, average="macro"),
        "exact_match": sklearn.metrics.accuracy_score(labels, predictions),
    }, abs=TOLERANCE)


def test_multilabel_scores_rejects_non_binary_and_mismatched_shapes():
    with pytest.raises(ValueError, match=r"multilabel_scores: predictions must hold only "
                                         r"0 and 1 .* found 2"):
        metrics.multilabel_scores([[0, 1]], [[0, 2]])
    with pytest.raises(ValueError, match=r"multilabel_scores: labels has shape \(1, 2\) "
                                         r"but predictions has shape \(1, 3\)"):
        metrics.multilabel_scores([[0, 1]], [[0, 1, 1]])


# === Sequence labelling ===

def _random_tags(rng, length, types):
    # Uniform over O, B-X and I-X, so ill-formed I- starts (after O or after
    # another type) are common.
    vocabulary = ["O"] + [f"{prefix}-{name}" for name in types for prefix in "BI"]
    return [str(tag) for tag in rng.choice(vocabulary, size=length)]


def _tagging_cases():
    for seed in SEEDS:
        for types in (("PER", "LOC"), ("PER", "LOC", "ORG")):
            rng = np.random.default_rng(seed)
            true_sequences = [_random_tags(rng, int(rng.integers(0, 15)), types)
                              for _ in range(30)]
            # Keep 80% of tags, so many entities match and many do not.
            predicted_sequences = [
                [tag if rng.random() < 0.8 else _random_tags(rng, 1, types)[0]
                 for tag in sequence]
                for sequence in true_sequences]
            yield f"random-{len(types)}types-seed{seed}", true_sequences, predicted_sequences
    sequences = [["B-PER", "I-PER", "O", "B-LOC"], ["I-ORG", "O"]]
    yield "perfect", sequences, [list(sequence) for sequence in sequences]
    yield "only-O-predicted", sequences, [["O"] * len(sequence) for sequence in sequences]
    yield "no-entities-anywhere", [["O", "O"]], [["O", "O"]]


TAGGING_CASES = list(_tagging_cases())


# With no entity at all, seqeval's report averages an empty list for its macro row.
@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case_id,true_sequences,predicted_sequences", TAGGING_CASES,
                         ids=[case[0] for case in TAGGING_CASES])
def test_entity_f1_matches_seqeval(case_id, true_sequences, predicted_sequences):
    scores = metrics.entity_f1(true_sequences, predicted_sequences)
    report = seqeval.metrics.classification_report(
        true_sequences, predicted_sequences, output_dict=True)
    expected_types = {
        name: {"precision": row["precision"], "recall": row["recall"],
               "f1": row["f1-score"], "support": row["support"]}
        for name, row in report.items() if not name.endswith(" avg")}
    micro = {key: scores[key] for key in ("precision", "recall", "f1")}
    assert micro == pytest.approx({
        "precision": seqeval.metrics.precision_score(true_sequences, predicted_sequences),
        "recall": seqeval.metrics.recall_score(true_sequences, predicted_sequences),
        "f1": seqeval.metrics.f1_score(true_sequences, predicted_sequences),
    }, abs=TOLERANCE)
    assert set(scores) == {"precision", "recall", "f1", "per_type"}
    assert list(scores["per_type"]) == list(expected_types)
    for name, expected in expected_types.items():
        assert scores["per_type"][name] == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("case_id,true_sequences,predicted_sequences", TAGGING_CASES,
                         ids=[case[0] for case in TAGGING_CASES])
def test_entity_spans_match_seqeval(case_id, true_sequences, predicted_sequences):
    for tags in true_sequences + predicted_sequences:
        # seqeval's spans end inclusively.
        expected = [(name, start, end + 1) for name, start, end
                    in seqeval.metrics.sequence_labeling.get_entities(tags)]
        assert metrics.entity_spans(tags) == expected


def test_entity_spans_start_entities_at_ill_formed_i_tags():
    tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-PER", "I-PER"]
    assert metrics.entity_spans(tags) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("PER", 5, 7)]
    assert metrics.entity_spans([]) == []


@pytest.mark.parametrize("tag", ["E-PER", "S-PER", "B-", "PER", ""])
def test_entity_spans_rejects_tags_outside_bio(tag):
    with pytest.raises(ValueError, match=rf"entity_spans: tag {tag!r} at position 1"):
        metrics.entity_spans(["O", tag])


def test_entity_f1_rejects_sequences_of_different_lengths():
    with pytest.raises(ValueError, match=r"entity_f1: sequence 1 has 2 true tags but 1 "
                                         r"predicted tags"):
        metrics.entity_f1([["O"], ["O", "B-PER"]], [["O"], ["O"]])


# === Extractive question answering ===

@pytest.mark.parametrize("text,normalized", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("An apple, a day.", "apple day"),
    ("theater anthem", "theater anthem"),  # articles only as whole words
    ("U.S.-based", "usbased"),
    ("  ", ""),
])
def test_squad_normalize(text, normalized):
    assert metrics.squad_normalize(text) == normalized


def test_squad_per_question_scores():
    assert metrics.squad_exact_match("the Eiffel Tower", ["Eiffel Tower"]) == 1.0
    assert metrics.squad_exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert metrics.squad_f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert metrics.squad_f1("", ["Eiffel Tower"]) == 0.0
    assert metrics.squad_exact_match("", ["Eiffel Tower"]) == 0.0
    # Tokens count as a multiset: one shared "cat", two predicted.
    assert metrics.squad_f1("the cat cat", ["a cat"]) == pytest.approx(2 / 3)


def test_squad_scores_take_the_best_gold_answer():
    # Against "Paris": P 1/2, R 1, F1 2/3; against "in Paris, France": P 1, R 2/3, F1 0.8.
    assert metrics.squad_f1("Paris France", ["Paris", "in Paris, France"]) == pytest.approx(0.8)
    assert metrics.squad_exact_match("paris", ["London", "Paris!"]) == 1.0
    scores = metrics.squad_scores(
        ["Eiffel Tower", "Eiffel", "", "Paris France"],
        [["the Eiffel Tower"], ["Eiffel Tower"], ["Louvre"], ["Paris", "in Paris, France"]])
    assert scores == pytest.approx({"exact_match": 25.0,
                                    "f1": 100 * (1 + 2 / 3 + 0 + 0.8) / 4})


def test_squad_rejects_a_bare_string_or_no_gold_answers():
    with pytest.raises(TypeError, match=r"squad_f1: gold_answers must be a list"):
        metrics.squad_f1("Paris", "Paris")
    with pytest.raises(ValueError, match=r"squad_exact_match: gold_answers is empty"):
        metrics.squad_exact_match("Paris", [])


# === Input checks shared by every metric ===

PAIRED_METRICS = {
    "accuracy": metrics.accuracy,
    "macro_f1": metrics.macro_f1,
    "matthews_corrcoef": metrics.matthews_corrcoef,
    "pearson": metrics.pearson,
    "spearman": metrics.spearman,
    "entity_f1": metrics.entity_f1,
    "squad_scores": metrics.squad_scores,
}


@pytest.mark.parametrize("name", PAIRED_METRICS)
def test_empty_inputs_raise(name):
    with pytest.raises(ValueError, match=rf"^{name}: .* are empty"):
        PAIRED_METRICS[name]([], [])


def test_empty_multilabel_inputs_raise():
    with pytest.raises(ValueError, match=r"^multilabel_scores: labels is empty"):
        metrics.multilabel_scores(np.zeros((0, 3)), np.zeros((0, 3)))


@pytest.mark.parametrize("name", PAIRED_METRICS)
def test_mismatched_lengths_raise_with_both_lengths(name):
    if name == "entity_f1":
        first, second = [["O"]] * 3, [["O"]] * 2
    elif name == "squad_scores":
        first, second = ["a"] * 3, [["a"]] * 2
    else:
        first, second = [1, 2, 3], [1, 2]
    with pytest.raises(ValueError, match=rf"^{name}: \w+ has 3 \w+ but \w+ has 2"):
        PAIRED_METRICS[name](first, second)


def test_multidimensional_class_ids_raise():
    with pytest.raises(ValueError, match=r"accuracy: labels must be 1-D.* shape \(3, 1\)"):
        metrics.accuracy([[0], [1], [2]], [0, 1, 2])
