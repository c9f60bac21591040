"""Python records → typed examples → ``tf.data``: the part of reading that the
Python readers (JSONL, CSV, in-memory items, Hugging Face datasets) share.

- ``field_options``: which record field fills each example key (``fields``,
  ``columns`` and their ``text_field``-style shorthands).
- ``ExampleSchema``: one record → one example, each key keeping the type its first
  example gave it; a record that breaks it is malformed.
- ``python_examples``: a generator of examples → a ``tf.data.Dataset`` whose
  signature the first examples set, lists as 1-D tensors.
"""

import itertools
import numbers
import reprlib
import threading
import typing

import tensorflow as tf

from kerasllm.reading import BATCH, DataError, MalformedRecord


def field_options(option, mapping, shorthands, noun="field"):
    """Which record field fills each example key, and the option that named it:
    ``{key: (option, field)}``, e.g. ``{"text": ("fields.text", "question")}``.

    ``mapping``, the value of ``option`` (``fields`` or ``columns``), lists the
    example's keys when given: a question and a context need no text.
    ``shorthands`` (``{"text": ("text_field", field or None), "label": ...}``) add
    the keys whose field they give; without ``mapping``, ``text`` is the field
    ``text``, as before ``mapping`` existed. ``noun`` is what a field is called in
    messages. Raises ValueError for a mapping that is empty or not of string keys,
    or a key given both ways; the fields themselves are the source's to check.
    """
    example = "{text: question, text_pair: context}"
    if mapping is not None and not (isinstance(mapping, dict) and mapping):
        raise ValueError(f"{option} must be a mapping from example key to {noun}, e.g. "
                         f"{example}, got {mapping!r}")
    names = {}
    for key, field in (mapping or {}).items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{option} keys must be example keys (strings), e.g. {example}; "
                             f"got {key!r}")
        names[key] = (f"{option}.{key}", field)
    for key, (shorthand, field) in shorthands.items():
        if field is not None and key in names:
            raise ValueError(f"{shorthand} and {option}.{key} both name the {noun} of {key}; "
                             "give one of them")
        if field is not None:
            names[key] = (shorthand, field)
    if mapping is None and "text" not in names:
        names = {"text": (shorthands["text"][0], "text"), **names}
    return names


# Example values: Python's type for each, ``list[...]`` for a list of one of them, and
# ``list`` for an empty list, whose items' type is yet to be seen.
_LIST_OF = {item_type: list[item_type] for item_type in (str, int, float, bool)}
_TYPE_NAMES = {
    str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
    _LIST_OF[str]: "a list of strings", _LIST_OF[int]: "a list of integers",
    _LIST_OF[float]: "a list of numbers", _LIST_OF[bool]: "a list of booleans",
}
# An integer may stand for a float: JSON writers may write 1.0 as 1.
_WIDENINGS = {(int, float), (_LIST_OF[int], _LIST_OF[float])}
# In the dataset a boolean is an int32 0 or 1.
_EXAMPLE_VALUE = {str: str, int: int, float: float, bool: int}
_DTYPES = {str: tf.string, int: tf.int32, float: tf.float32}


class ExampleSchema:
    """The keys of a source's examples: the record field each is read from, and the
    type of its values.

    ``text`` is always a string. Every other key takes the type its value has in
    the first example read: a string, an integer, a float, a boolean or a list of
    strings, of integers, of floats or of booleans (a list's items, in the first
    example where it has some); a record holding another type there is
    malformed, so that the dataset's signature, which those examples set, fits
    every example. Only an integer may stand for a float, and an empty list for
    any list. A record with an empty ``text`` is returned as ``{"text": ...}``
    alone, for the reader to skip, whatever its other fields hold: it sets no
    type, since it never reaches the dataset.

    Args:
        names: example key → the field holding it in a record.
        noun: what a field is called in messages: field, column, key.
        types: keys whose type is fixed beforehand, e.g. ``{"label": int}``.
    """

    def __init__(self, names, noun="field", types=None):
        self.names = names
        self.noun = noun
        self.types = {"text": str, **(types or {})}

    def example(self, record):
        """The example of a dict record, its booleans as 1 and 0; or MalformedRecord
        naming a field that is missing or holds the wrong type."""
        for field in self.names.values():
            if field not in record:
                raise MalformedRecord(
                    f"no {self.noun} {field!r} (it has: {', '.join(map(str, record))})")
        text_field = self.names.get("text")
        if text_field is not None:
            text = record[text_field]
            if not isinstance(text, str):
                raise MalformedRecord(
                    f"{self.noun} {text_field!r} is not a string (got {type(text).__name__})")
            if not text.strip():
                return {"text": text}
        example, new_types = {}, {}
        for key, field in self.names.items():
            value = record[field]
            value_type, expected = _value_type(value), self.types.get(key)
            if value_type is None or value_type != expected:
                expected = new_types[key] = self._check(field, value, value_type, expected)
            example[key] = _example_value(value, expected)
        # Only a record well-formed throughout sets types.
        self.types.update(new_types)
        return example

    def _check(self, field, value, value_type, expected):
        """The type of the key ``value`` fills (its own when it sets it), or MalformedRecord."""
        if value_type is None:
            raise MalformedRecord(
                f"{self.noun} {field!r} is not a string, a number, a boolean or a list of one "
                f"of them (got {reprlib.repr(value)})")
        if expected is None or (expected is list and value_type in _LIST_OF.values()):
            return value_type
        if (value_type, expected) in _WIDENINGS or (
                value_type is list and expected in _LIST_OF.values()):
            return expected
        raise MalformedRecord(f"{self.noun} {field!r} is not {_TYPE_NAMES[expected]} "
                              f"(got {reprlib.repr(value)})")


def _value_type(value):
    """``value``'s type as in ``_TYPE_NAMES``, or None for any other value (None, a
    dict, a nested or mixed list)."""
    if not isinstance(value, list):
        return _scalar_type(type(value))
    item_types = set(map(_scalar_type, set(map(type, value))))
    if item_types == {int, float}:
        return _LIST_OF[float]
    if len(item_types) == 1 and None not in item_types:
        return _LIST_OF[item_types.pop()]
    return None if value else list


def _scalar_type(cls):
    if cls in _EXAMPLE_VALUE:  # JSON's types, first: the common case
        return cls
    if issubclass(cls, str):
        return str
    if issubclass(cls, bool):  # before int: True is an int to Python, a boolean to JSON
        return bool
    if issubclass(cls, numbers.Integral):
        return int
    if issubclass(cls, numbers.Real):
        return float
    return None


def _example_value(value, value_type):
    """``value`` as the Python type the dataset expects: numpy numbers and booleans
    become ints and floats."""
    if not isinstance(value, list):
        return _EXAMPLE_VALUE[value_type](value)
    if not value:
        return []
    return list(map(_EXAMPLE_VALUE[typing.get_args(value_type)[0]], value))


def record_example(record, text_field, label_field=None, noun="field"):
    """``{"text": ..., "label": ...}`` from a dict record, its label an integer, or
    ``MalformedRecord``: a row of the ``hf_datasets`` source."""
    names = {"text": text_field, **({"label": label_field} if label_field is not None else {})}
    return ExampleSchema(names, noun, {"label": int}).example(record)


def python_examples(make_examples, label=False):
    """A dataset of the examples ``make_examples()`` yields, called afresh each pass.

    Examples are dicts of strings, ints (int32 in the dataset), floats (float32)
    and lists of one of them (1-D tensors of any length), as ``ExampleSchema``
    makes them. Flat examples cross into TensorFlow in batches of ``BATCH``,
    examples with lists in ragged batches. The first example sets the keys and
    dtypes (a list's, the first example where it has items); to see them, the
    first pass starts when the dataset is made, and goes on when it is first
    iterated: nothing is read or counted twice, and a malformed first row fails
    now. A source yielding no example gives an empty dataset of a ``text`` string
    and, with ``label``, an int ``label``.
    """
    examples = make_examples()
    dtypes, lists, read = _first_dtypes(examples)
    if not read:
        dtypes = {"text": tf.string, **({"label": tf.int32} if label else {})}
    unread = [itertools.chain(read, examples)]
    lock = threading.Lock()  # two iterators of one dataset may start at once

    def batches():
        with lock:
            examples = unread.pop() if unread else make_examples()
        while batch := list(itertools.islice(examples, BATCH)):
            values = {key: [example[key] for example in batch] for key in dtypes}
            yield {key: _ragged(values[key], dtypes[key]) if key in lists else values[key]
                   for key in dtypes}

    signature = {key: tf.RaggedTensorSpec([None, None], dtype, 1, tf.int64) if key in lists
                 else tf.TensorSpec([None], dtype) for key, dtype in dtypes.items()}
    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature).unbatch()
    # Unbatched, a ragged batch's row is still a RaggedTensorSpec (ragged_rank 0);
    # passing it through a function makes it the plain 1-D tensor it is.
    return dataset.map(lambda example: example) if lists else dataset


def _first_dtypes(examples):
    """(each key's dtype, the keys holding lists, the examples read to see them):
    the first example's, a list's from the first example where it has items."""
    dtypes, lists, read = {}, set(), []
    for example in examples:
        read.append(example)
        for key, value in example.items():
            if isinstance(value, list):
                lists.add(key)
            if key not in dtypes and value != []:
                dtypes[key] = _DTYPES[type(value[0] if isinstance(value, list) else value)]
        if len(dtypes) == len(example):
            return dtypes, lists, read
    if read:
        empty = ", ".join(repr(key) for key in read[0] if key not in dtypes)
        raise DataError(f"{empty}: an empty list in every example, so no item shows the "
                        "dtype; give one example an item")
    return dtypes, lists, read


def _ragged(lists, dtype):
    flat = tf.constant(list(itertools.chain.from_iterable(lists)), dtype)
    return tf.RaggedTensor.from_row_lengths(flat, [len(values) for values in lists])
