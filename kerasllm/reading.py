"""Reading raw documents: paths, UTF-8, bad rows, and a report of what was skipped.

The data-source plugins share these pieces so that every source treats bad input
the same way:

- ``FileSource``: the base of file sources: shared options checked, paths resolved.
- ``resolve_paths``: a path, glob or list of them → files, with an error naming a
  missing file, an empty glob or a directory, before anything is read.
- ``Lines`` and ``Rows``: Python readers (JSONL, CSV, documents) decode UTF-8 with
  the ``encoding_errors`` policy and handle a malformed row with the ``on_error``
  policy, naming the file and line; :mod:`kerasllm.records` turns their records
  into typed examples and those into a ``tf.data.Dataset``.
- ``clean_texts``: the same UTF-8 policy in graph, for readers that never leave
  TensorFlow (text lines, TFRecord, TFDS).
- ``InputReport``: what was skipped or repaired, counted while the dataset is
  iterated, eagerly or inside ``model.fit``.
"""

import glob
import importlib
import os
import re
import threading

import tensorflow as tf

from kerasllm.data import DataSource
from kerasllm.errors import KerasLLMError, PluginError

ENCODING_ERRORS = ("replace", "skip")
ON_ERROR = ("raise", "skip")
# Examples cross from Python to TensorFlow, and through graph cleaning, this many at a
# time: one tensor per batch instead of one per document amortizes the per-call cost.
BATCH = 1024

BLANK_LINES = "blank lines skipped"
EMPTY_FILES = "empty files skipped"
EMPTY_TEXTS = "empty texts skipped"

_GLOB_MAGIC = re.compile(r"[*?[]")
_MAYBE_VALID_UTF8 = r"(?s)[^\x{FFFD}\x{D800}-\x{DFFF}]*"


class DataError(KerasLLMError, ValueError):
    """Bad input found while reading; the message names the file, the line and the fix.

    Raised inside a ``tf.data`` pipeline it reaches the user wrapped in a
    ``tf.errors.OpError`` whose message contains this one.
    """


class MalformedRecord(Exception):
    """Raised by a reader's parse function: the message says what is wrong with a record."""


class InputReport:
    """What reading skipped or repaired, by reason: ``{"blank lines skipped": 3, ...}``.

    Counts grow as the dataset is iterated, over every pass (each epoch reads the
    input again), and include what tf.data has read ahead of its consumer. Python
    readers ``add`` to it; graph readers increment a ``counter`` variable, which
    works inside tf.data functions, eagerly and under ``model.fit``, and ``counts``
    reads it back. Safe to use from several threads.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {}
        self._first = {}  # reason -> where it first happened, when the reader knows
        self._counters = {}

    def add(self, reason, count=1, where=None):
        """Count ``count`` more of ``reason``; ``where`` (``file:line``) is kept for the first."""
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + count
            if where is not None:
                self._first.setdefault(reason, where)

    def counter(self, reason):
        """A scalar int64 ``tf.Variable`` counting ``reason``; ``assign_add`` to it in graph."""
        with self._lock:
            if reason not in self._counters:
                # Outside any function being traced, and on the host, where tf.data runs.
                with tf.init_scope(), tf.device("/CPU:0"):
                    self._counters[reason] = tf.Variable(
                        tf.constant(0, tf.int64), trainable=False)
            return self._counters[reason]

    @property
    def counts(self):
        """``{reason: count}`` for every reason counted at least once."""
        with self._lock:
            counts = dict(self._counts)
            counters = dict(self._counters)
        for reason, variable in counters.items():
            counts[reason] = counts.get(reason, 0) + int(variable.numpy())
        return {reason: count for reason, count in counts.items() if count}

    def __str__(self):
        parts = []
        for reason, count in self.counts.items():
            first = self._first.get(reason)
            parts.append(f"{reason}: {count}" + (f" (first: {first})" if first else ""))
        return ", ".join(parts) or "nothing skipped or replaced"


class FileSource(DataSource):
    """A data source reading files: the options every file source shares,
    checked, the files ``paths`` names, and the ``report`` of what was skipped.

    Subclasses keep ``paths``, ``encoding_errors`` (and ``on_error`` where rows
    can be malformed) in their own signature, whose options are documented
    there, and pass them on.
    """

    def __init__(self, paths, encoding_errors="replace", on_error="raise"):
        check_choice("encoding_errors", encoding_errors, ENCODING_ERRORS)
        check_choice("on_error", on_error, ON_ERROR)
        self.report = InputReport()
        self.files = resolve_paths(paths, self.report)
        self.encoding_errors = encoding_errors
        self.on_error = on_error


def check_choice(option, value, allowed):
    """ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        *others, last = [repr(choice) for choice in allowed]
        choices = f"{', '.join(others)} or {last}"
        raise ValueError(f"{option} must be {choices}, got {value!r}")


def invalid_utf8(unit, encoding_errors):
    """The report's reason for a ``unit`` (line, row, ...) holding invalid UTF-8."""
    return f"{unit}s with invalid UTF-8 {'replaced' if encoding_errors == 'replace' else 'skipped'}"


def on_error_hint(unit):
    return f"fix the {unit} or set data.options.on_error: skip"


def resolve_paths(paths, report):
    """The files ``paths`` names: a path or glob, or a list of them.

    Each glob's matches are sorted (directories it matches are passed over); the
    patterns keep their order. Empty files are left out and counted in ``report``.
    Raises ValueError naming a missing file, a glob matching no file, a directory,
    or patterns whose files are all empty.
    """
    patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not patterns:
        raise ValueError("paths is empty; give a file, a glob or a list of them")
    files = []
    for pattern in patterns:
        pattern = os.path.expanduser(os.fspath(pattern))
        if _GLOB_MAGIC.search(pattern):
            matches = sorted(match for match in glob.glob(pattern, recursive=True)
                             if os.path.isfile(match))
            if not matches:
                raise ValueError(f"no file matches {pattern!r}")
        elif os.path.isdir(pattern):
            raise ValueError(f"{pattern!r} is a directory; name its files, e.g. "
                             f"{os.path.join(pattern, '*')!r}")
        elif not os.path.isfile(pattern):
            raise ValueError(f"no such file: {pattern!r}")
        else:
            matches = [pattern]
        files += matches
    empty = [path for path in files if os.path.getsize(path) == 0]
    if len(empty) == len(files):
        named = ", ".join(repr(os.fspath(pattern)) for pattern in patterns)
        raise ValueError(f"every file in paths ({named}) is empty; nothing to read")
    if empty:
        report.add(EMPTY_FILES, len(empty), where=empty[0])
    return [path for path in files if path not in empty]


class Lines:
    """The lines of a file, read one at a time and decoded as UTF-8.

    Invalid bytes become U+FFFD, and ``take_invalid()`` tells whether any line
    since its last call had some, so that a reader can apply the policy to a whole
    record (a CSV row or a document spans lines). ``number`` is the last line's,
    from 1. Lines keep their ending (csv needs it); a byte-order mark is dropped.
    """

    def __init__(self, path):
        self.path = path
        self.number = 0
        self._invalid = False

    def __iter__(self):
        with open(self.path, "rb") as handle:
            for self.number, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="replace")
                    self._invalid = True
                yield line.removeprefix("\ufeff") if self.number == 1 else line

    def take_invalid(self):
        invalid, self._invalid = self._invalid, False
        return invalid


class Rows:
    """The bad-input policies of a Python reader whose records are ``unit``\\ s.

    Args:
        report: the source's ``InputReport``.
        unit: what one record is called in messages and the report (row, document).
        encoding_errors: ``replace`` or ``skip`` a record holding invalid UTF-8.
        on_error: ``raise`` a ``DataError`` for a malformed record, or ``skip`` it.
    """

    def __init__(self, report, unit, encoding_errors="replace", on_error="raise"):
        self.report = report
        self.unit = unit
        self.encoding_errors = encoding_errors
        self.on_error = on_error

    def example(self, where, invalid, parse, *args):
        """``parse(*args)`` (an example dict, or ``MalformedRecord``), or None when the
        record is skipped: invalid UTF-8 under ``skip``, malformed under ``skip``, or
        an empty ``text`` (an example without one is never empty). ``where`` is the
        record's ``file:line``."""
        if invalid:
            self.report.add(invalid_utf8(self.unit, self.encoding_errors), where=where)
            if self.encoding_errors == "skip":
                return None
        try:
            example = parse(*args)
        except MalformedRecord as error:
            self.reject(where, str(error))
            return None
        if has_empty_text(example):
            self.report.add(EMPTY_TEXTS, where=where)
            return None
        return example

    def reject(self, where, problem):
        if self.on_error == "raise":
            raise DataError(f"{where}: {problem}; {on_error_hint(self.unit)}")
        self.report.add(f"malformed {self.unit}s skipped", where=f"{where}: {problem}")


def has_empty_text(example):
    return "text" in example and not example["text"].strip()


def clean_texts(batches, report, unit, encoding_errors, empty_reason=EMPTY_TEXTS):
    """Examples from a dataset of batched examples (a 1-D ``text`` and other fields),
    in graph: empty texts dropped, invalid UTF-8 replaced by U+FFFD or the example
    dropped, per ``encoding_errors``; both counted in ``report``."""
    empty_count = report.counter(empty_reason)
    invalid_count = report.counter(invalid_utf8(unit, encoding_errors))

    def clean(batch):
        text = batch["text"]
        # Only texts that RE2 cannot read as UTF-8 free of U+FFFD and surrogates are
        # transcoded (ICU, about 4x slower than the regex): RE2 reads every invalid
        # sequence as one of those, so no invalid text passes unchecked.
        suspect = tf.cast(~tf.strings.regex_full_match(text, _MAYBE_VALID_UTF8), tf.int32)
        parts = tf.dynamic_partition(text, suspect, 2)
        repaired = tf.dynamic_stitch(tf.dynamic_partition(tf.range(tf.size(text)), suspect, 2), [
            parts[0], tf.strings.unicode_transcode(
                parts[1], "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)])
        empty = tf.strings.length(tf.strings.strip(text)) == 0
        invalid = (repaired != text) & ~empty
        keep = ~empty & ~invalid if encoding_errors == "skip" else ~empty
        updates = [empty_count.assign_add(_count(empty)),
                   invalid_count.assign_add(_count(invalid))]
        with tf.control_dependencies(updates):
            return {name: tf.boolean_mask(values, keep)
                    for name, values in {**batch, "text": repaired}.items()}

    return batches.map(clean, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _count(mask):
    return tf.reduce_sum(tf.cast(mask, tf.int64))


def import_optional(module, package, extra, what):
    """``module``, or PluginError telling how to install ``package`` for ``what``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise PluginError(
            f"{what} needs the {package} package, which could not be imported ({error}); "
            f'install it with: pip install "kerasllm[{extra}]"'
        ) from None
