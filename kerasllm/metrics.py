"""Evaluation metrics for fine-tuning, computed in numpy on a whole evaluation set.

Classification (``accuracy``, ``macro_f1``, ``matthews_corrcoef``), regression
(``pearson``, ``spearman``), multi-label (``multilabel_scores``), entity-level
sequence labelling (``entity_spans``, ``entity_f1``) and extractive question
answering (``squad_*``). Each returns what the reference implementation
returns — scikit-learn, SciPy, seqeval in its default mode, the official SQuAD
v1.1 evaluation script — and ``tests/test_metrics.py`` checks it against them.
None of those is imported here: the metrics need only numpy and the standard
library. Empty inputs and inputs of different lengths raise ``ValueError`` naming
the function.
"""

import collections
import re
import string

import numpy as np


# === Classification ===

def accuracy(labels, predictions):
    """The fraction of examples whose prediction equals the label."""
    labels, predictions = _paired_1d("accuracy", labels, predictions)
    return float(np.mean(labels == predictions))


def macro_f1(labels, predictions, num_classes=None):
    """The unweighted mean of per-class F1 = 2TP / (2TP + FP + FN).

    The mean runs over the classes that appear in ``labels`` or ``predictions``,
    as ``sklearn.metrics.f1_score(average="macro")``. A class that appears on one
    side only has F1 0 and still counts toward the mean; that F1 is never 0/0, so
    sklearn's ``zero_division`` setting does not change the result. If
    ``num_classes`` is given, every class id must be an integer in
    ``[0, num_classes)``; classes absent from both sides are still not averaged.
    """
    labels, predictions = _paired_1d("macro_f1", labels, predictions)
    if num_classes is not None:
        _check_class_ids("macro_f1", "labels", labels, num_classes)
        _check_class_ids("macro_f1", "predictions", predictions, num_classes)
    true_ids, predicted_ids, num_present = _encode_classes(labels, predictions)
    true_positives = np.bincount(true_ids[true_ids == predicted_ids], minlength=num_present)
    true_counts = np.bincount(true_ids, minlength=num_present)
    predicted_counts = np.bincount(predicted_ids, minlength=num_present)
    return float(np.mean(2 * true_positives / (true_counts + predicted_counts)))


def matthews_corrcoef(labels, predictions):
    """The multi-class Matthews correlation coefficient (Gorodkin's R_K).

    In [-1, 1]; 0.0 when undefined, that is when all labels or all predictions
    are one class, as ``sklearn.metrics.matthews_corrcoef``.
    """
    labels, predictions = _paired_1d("matthews_corrcoef", labels, predictions)
    true_ids, predicted_ids, num_present = _encode_classes(labels, predictions)
    confusion = np.zeros((num_present, num_present), dtype=np.float64)
    np.add.at(confusion, (true_ids, predicted_ids), 1.0)
    true_counts = confusion.sum(axis=1)
    predicted_counts = confusion.sum(axis=0)
    num_examples = float(len(labels))
    covariance = np.trace(confusion) * num_examples - true_counts @ predicted_counts
    true_variance = num_examples**2 - true_counts @ true_counts
    predicted_variance = num_examples**2 - predicted_counts @ predicted_counts
    if true_variance * predicted_variance == 0:
        return 0.0
    return float(covariance / np.sqrt(true_variance * predicted_variance))


# === Regression ===

def pearson(labels, predictions):
    """Pearson's correlation coefficient r.

    NaN when either side is constant (a single pair included): the correlation is
    undefined there, and ``scipy.stats.pearsonr`` also returns nan. A caller that
    selects checkpoints on it must decide how to rank nan.
    """
    labels, predictions = _paired_1d("pearson", labels, predictions)
    return _correlation(labels.astype(np.float64), predictions.astype(np.float64))


def spearman(labels, predictions):
    """Spearman's rank correlation: Pearson's r of the ranks, ties averaged.

    As ``scipy.stats.spearmanr``, and NaN when either side is constant, as there.
    """
    labels, predictions = _paired_1d("spearman", labels, predictions)
    return _correlation(_average_ranks(labels), _average_ranks(predictions))


# === Multi-label ===

def multilabel_scores(labels, predictions):
    """Scores of multi-hot 0/1 matrices of shape ``(examples, classes)``.

    Returns ``micro_f1`` (F1 of all cells pooled), ``macro_f1`` (mean over all
    columns of per-column F1) and ``exact_match`` (fraction of rows predicted
    exactly). As sklearn on indicator arrays, a column with no positive label and
    no positive prediction has F1 0 and counts toward ``macro_f1`` — unlike
    ``macro_f1`` above, which skips absent classes — and ``micro_f1`` is 0 when
    there is no positive anywhere.
    """
    labels = _binary_matrix("multilabel_scores", "labels", labels)
    predictions = _binary_matrix("multilabel_scores", "predictions", predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"multilabel_scores: labels has shape {labels.shape} but "
                         f"predictions has shape {predictions.shape}; they must match")
    true_positives = (labels & predictions).sum(axis=0)
    positives = labels.sum(axis=0) + predictions.sum(axis=0)
    return {
        "micro_f1": _f1_from_counts(true_positives.sum(), positives.sum()),
        "macro_f1": float(np.mean([_f1_from_counts(tp, n)
                                   for tp, n in zip(true_positives, positives)])),
        "exact_match": float(np.mean(np.all(labels == predictions, axis=1))),
    }


# === Sequence labelling ===

def entity_spans(tags):
    """The entities in one sequence of BIO tags, as ``(type, start, end_exclusive)``.

    Tags are ``O``, ``B-TYPE`` or ``I-TYPE``. As seqeval's default (non-strict)
    mode, an ``I-TYPE`` that follows ``O`` or a tag of another type starts a new
    entity, as it does in IOB1, instead of being dropped. IOBES tags (``E-``,
    ``S-``) raise ``ValueError``.
    """
    spans = []
    previous_type = None  # the type of the entity open at the previous tag, if any
    for position, tag in enumerate(tags):
        if tag == "O":
            entity_type = None
        elif tag[:2] in ("B-", "I-") and len(tag) > 2:
            entity_type = tag[2:]
        else:
            raise ValueError(f"entity_spans: tag {tag!r} at position {position} is not "
                             f"O, B-TYPE or I-TYPE (IOBES tags are not supported)")
        continues = tag.startswith("I-") and entity_type == previous_type
        if previous_type is not None and not continues:
            spans[-1] = (previous_type, spans[-1][1], position)
        if entity_type is not None and not continues:
            spans.append((entity_type, position, None))
        previous_type = entity_type
    if previous_type is not None:
        spans[-1] = (previous_type, spans[-1][1], len(tags))
    return spans


def entity_f1(true_tag_sequences, predicted_tag_sequences):
    """Entity-level precision, recall and F1, as ``seqeval.metrics`` by default.

    A predicted entity counts only if its type, start and end all match a true
    one. Returns ``precision``, ``recall`` and ``f1`` pooled over all entities
    (micro), and ``per_type``: ``{type: {precision, recall, f1, support}}`` for
    every type seen on either side, ``support`` being its number of true
    entities. A score whose denominator is 0 is 0.0, as seqeval's default.
    """
    if len(true_tag_sequences) != len(predicted_tag_sequences):
        raise ValueError(f"entity_f1: true_tag_sequences has {len(true_tag_sequences)} "
                         f"sequences but predicted_tag_sequences has "
                         f"{len(predicted_tag_sequences)}; pass one prediction per sequence")
    if len(true_tag_sequences) == 0:
        raise ValueError("entity_f1: true_tag_sequences and predicted_tag_sequences are "
                         "empty; pass at least one sequence")
    true_entities, predicted_entities = set(), set()
    for index, (true_tags, predicted_tags) in enumerate(
            zip(true_tag_sequences, predicted_tag_sequences)):
        if len(true_tags) != len(predicted_tags):
            raise ValueError(f"entity_f1: sequence {index} has {len(true_tags)} true tags "
                             f"but {len(predicted_tags)} predicted tags; they must match")
        true_entities.update((index, *span) for span in entity_spans(true_tags))
        predicted_entities.update((index, *span) for span in entity_spans(predicted_tags))
    scores = _precision_recall_f1(true_entities, predicted_entities)
    types = sorted({entity[1] for entity in true_entities | predicted_entities})
    scores["per_type"] = {}
    for entity_type in types:
        true_of_type = {entity for entity in true_entities if entity[1] == entity_type}
        predicted_of_type = {entity for entity in predicted_entities
                             if entity[1] == entity_type}
        scores["per_type"][entity_type] = {
            **_precision_recall_f1(true_of_type, predicted_of_type),
            "support": len(true_of_type),
        }
    return scores


# === Extractive question answering ===

def squad_normalize(text):
    """SQuAD v1.1's answer normalization: lowercase, drop ASCII punctuation and the
    articles a/an/the, collapse whitespace."""
    text = "".join(character for character in text.lower()
                   if character not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction, gold_answers):
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
    gold_answers = _gold_answer_list("squad_exact_match", gold_answers)
    normalized = squad_normalize(prediction)
    return float(any(normalized == squad_normalize(gold) for gold in gold_answers))


def squad_f1(prediction, gold_answers):
    """The best token-level F1, over the gold answers, of the normalized prediction.

    Tokens are the whitespace-separated words after ``squad_normalize``, counted
    as a multiset; an empty prediction or gold answer scores 0 against it.
    """
    gold_answers = _gold_answer_list("squad_f1", gold_answers)
    predicted_tokens = squad_normalize(prediction).split()
    return max(_token_f1(predicted_tokens, squad_normalize(gold).split())
               for gold in gold_answers)


def squad_scores(predictions, gold_answer_lists):
    """SQuAD v1.1's ``exact_match`` and ``f1``: per-question scores averaged, in percent.

    ``gold_answer_lists`` holds one non-empty list of answer strings per
    prediction. SQuAD v2's unanswerable questions (no gold answer) are not
    supported.
    """
    if len(predictions) != len(gold_answer_lists):
        raise ValueError(f"squad_scores: predictions has {len(predictions)} items but "
                         f"gold_answer_lists has {len(gold_answer_lists)}; pass one list of "
                         f"gold answers per prediction")
    if len(predictions) == 0:
        raise ValueError("squad_scores: predictions and gold_answer_lists are empty; "
                         "pass at least one question")
    pairs = list(zip(predictions, gold_answer_lists))
    return {
        "exact_match": 100.0 * sum(squad_exact_match(p, g) for p, g in pairs) / len(pairs),
        "f1": 100.0 * sum(squad_f1(p, g) for p, g in pairs) / len(pairs),
    }


# === Helpers ===

_PUNCTUATION = frozenset(string.punctuation)


def _paired_1d(function_name, labels, predictions):
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.ndim != 1:
            raise ValueError(f"{function_name}: {name} must be 1-D, one value per example; "
                             f"got shape {values.shape}")
    if len(labels) != len(predictions):
        raise ValueError(f"{function_name}: labels has {len(labels)} items but predictions "
                         f"has {len(predictions)}; pass one prediction per label")
    if len(labels) == 0:
        raise ValueError(f"{function_name}: labels and predictions are empty; "
                         f"pass at least one example")
    return labels, predictions


def _check_class_ids(function_name, name, values, num_classes):
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{function_name}: {name} must be integer class ids when "
                         f"num_classes is given; got dtype {values.dtype}")
    outside = values[(values < 0) | (values >= num_classes)]
    if outside.size:
        raise ValueError(f"{function_name}: {name} holds class id {outside[0].item()}, outside "
                         f"[0, {num_classes}) for num_classes={num_classes}")


def _encode_classes(labels, predictions):
    """Both sides as ids 0..K-1 of the K classes present on either side, and K."""
    classes, ids = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    return ids[:len(labels)], ids[len(labels):], len(classes)


def _correlation(x, y):
    # Tested on the raw values: after centering, float rounding can leave a
    # constant column with tiny nonzero deviations and a spurious r of +-1.
    if np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    r = (x @ y) / np.sqrt((x @ x) * (y @ y))
    # Rounding can push a perfect correlation just past 1; scipy clips it too.
    return float(np.clip(r, -1.0, 1.0))


def _average_ranks(values):
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_run = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    run_starts = np.flatnonzero(starts_run)
    run_ends = np.append(run_starts[1:], len(values))
    # A run of ties occupying 0-based positions [start, end) has ranks start+1..end.
    run_ranks = (run_starts + 1 + run_ends) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = run_ranks[np.cumsum(starts_run) - 1]
    return ranks


def _binary_matrix(function_name, name, values):
    values = np.asarray(values)
    if values.size == 0:
        raise ValueError(f"{function_name}: {name} is empty (shape {values.shape}); "
                         f"pass at least one example and one class")
    if values.ndim != 2:
        raise ValueError(f"{function_name}: {name} must be a 2-D (examples, classes) "
                         f"matrix; got shape {values.shape}")
    is_binary = np.isin(values, (0, 1))
    if not is_binary.all():
        raise ValueError(f"{function_name}: {name} must hold only 0 and 1 (multi-hot); "
                         f"found {values[~is_binary][0].item()!r}")
    return values.astype(bool)


def _f1_from_counts(true_positives, positives):
    """F1 = 2TP / (labelled positives + predicted positives), 0.0 when both are 0."""
    return float(2 * true_positives / positives) if positives else 0.0


def _precision_recall_f1(true_items, predicted_items):
    hits = len(true_items & predicted_items)
    precision = hits / len(predicted_items) if predicted_items else 0.0
    recall = hits / len(true_items) if true_items else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _gold_answer_list(function_name, gold_answers):
    if isinstance(gold_answers, str):
        raise TypeError(f"{function_name}: gold_answers must be a list of answer strings, "
                        f"not one string; pass [{gold_answers!r}]")
    if len(gold_answers) == 0:
        raise ValueError(f"{function_name}: gold_answers is empty; pass at least one "
                         f"answer (unanswerable SQuAD v2 questions are not supported)")
    return gold_answers


def _token_f1(predicted_tokens, gold_tokens):
    shared = sum((collections.Counter(predicted_tokens)
                  & collections.Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(predicted_tokens)
    recall = shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)
