"""Documents held in Python: a list, or a function returning a fresh iterable each epoch."""

import collections.abc

import kerasllm
from kerasllm import reading, records


class IterableSource(kerasllm.DataSource):
    """Args:
        items: a list of strings, or of dicts; or a function taking no arguments
            that returns a fresh iterable of them, called once when the source is
            made (to see the first item) and once per pass over the data. A string
            is the example ``{"text": ...}``; a dict's keys are the example's, and
            the first item's are every item's (others are left out): a ``text``
            string, and any other key holding a string, an integer, a float, a
            boolean (1 or 0) or a list of one of them, of any length, with the
            type it has in the first example (a list's items: the first example
            where it has some; an integer may stand for a float, an empty list for
            a list). An empty ``text`` is skipped and counted; any other item is
            an error.

    Examples:
    ```python
    source = IterableSource([{"text": "A fine film.", "label": 1},
                             {"text": "Dull.", "label": 0}])
    source = IterableSource(lambda: (row["body"] for row in database.rows()))
    source = IterableSource([{"words": ["Ada", "wrote"], "tags": ["B-PER", "O"]}])
    ```
    """

    def __init__(self, items):
        if callable(items):
            self._items = items
        elif (isinstance(items, collections.abc.Iterable) and iter(items) is not items
              and not isinstance(items, (str, bytes, dict))):
            self._items = lambda: items
        else:
            raise ValueError(
                f"items must be a list, or a function returning a fresh iterable, got "
                f"{type(items).__name__}; an iterator or generator can be read only once, "
                "and training reads the data once per epoch")
        first = next(iter(self._items()), None)
        if first is None:
            raise ValueError("items holds no item")
        if isinstance(first, dict) and not (first and all(isinstance(key, str) for key in first)):
            raise ValueError(f"items[0] has the keys {list(first)}; an item's keys are the "
                             "example's, strings such as text and label")
        keys = list(first) if isinstance(first, dict) else ["text"]
        self.schema = records.ExampleSchema({key: key for key in keys}, "key")
        self.report = reading.InputReport()

    def examples(self):
        return records.python_examples(self._examples, label="label" in self.schema.names)

    def _examples(self):
        for index, item in enumerate(self._items()):
            try:
                example = self._parse(item)
            except reading.MalformedRecord as error:
                raise reading.DataError(f"items[{index}]: {error}") from None
            if reading.has_empty_text(example):
                self.report.add(reading.EMPTY_TEXTS, where=f"items[{index}]")
            else:
                yield example

    def _parse(self, item):
        if isinstance(item, str):
            item = {"text": item}
        elif not isinstance(item, dict):
            raise reading.MalformedRecord(
                f"expected a string or a dict, got {type(item).__name__}")
        return self.schema.example(item)


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"iterable": IterableSource}
