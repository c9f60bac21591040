"""Documents held in Python: a list, or a function returning a fresh iterable each epoch."""

import collections.abc

import kerasllm
from kerasllm import reading


class IterableSource(kerasllm.DataSource):
    """Args:
        items: a list of strings, or of dicts with a ``text`` string and an
            optional integer ``label`` (all items alike); or a function taking no
            arguments that returns a fresh iterable of them, called once when the
            source is made (to see the first item) and once per pass over the data.
            Empty texts are skipped and counted; any other item is an error.

    Examples:
    ```python
    source = IterableSource([{"text": "A fine film.", "label": 1},
                             {"text": "Dull.", "label": 0}])
    source = IterableSource(lambda: (row["body"] for row in database.rows()))
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
        self.label = isinstance(first, dict) and "label" in first
        self.report = reading.InputReport()

    def examples(self):
        return reading.python_examples(self._examples, label=self.label)

    def _examples(self):
        for index, item in enumerate(self._items()):
            try:
                example = self._parse(item)
            except reading.MalformedRecord as error:
                raise reading.DataError(f"items[{index}]: {error}") from None
            if example["text"].strip():
                yield example
            else:
                self.report.add(reading.EMPTY_TEXTS, where=f"items[{index}]")

    def _parse(self, item):
        if isinstance(item, str):
            item = {"text": item}
        elif not isinstance(item, dict):
            raise reading.MalformedRecord(
                f"expected a string or a dict, got {type(item).__name__}")
        return reading.record_example(item, "text", "label" if self.label else None, "key")


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"iterable": IterableSource}
