"""JSON Lines files: one JSON object per line, its text (and label) in named fields."""

import json

import kerasllm
from kerasllm import reading


class JsonLinesFiles(reading.FileSource):
    """Args:
        paths: a path or glob, or a list of them; each glob's files are read in
            sorted order. Empty files and blank lines are skipped and counted.
        text_field: the field holding the document, a string.
        label_field: the field holding an integer label, or None.
        encoding_errors: what to do with a row holding invalid UTF-8: ``replace``
            the bad bytes with U+FFFD, or ``skip`` the row; counted either way.
        on_error: what to do with a malformed row (not JSON, not an object, a
            field missing or of the wrong type): ``raise`` an error naming the file
            and line, or ``skip`` the row and count it.

    Examples:
    ```python
    # data/train.jsonl: {"text": "A fine film.", "label": 1}
    source = JsonLinesFiles("data/train.jsonl", label_field="label")
    ```
    """

    def __init__(self, paths, text_field="text", label_field=None, encoding_errors="replace",
                 on_error="raise"):
        super().__init__(paths, encoding_errors, on_error)
        self.text_field = text_field
        self.label_field = label_field

    def examples(self):
        return reading.python_examples(self._rows, label=self.label_field is not None)

    def _rows(self):
        rows = reading.Rows(self.report, "row", self.encoding_errors, self.on_error)
        for path in self.files:
            lines = reading.Lines(path)
            for line in lines:
                where = f"{path}:{lines.number}"
                if not line.strip():
                    self.report.add(reading.BLANK_LINES, where=where)
                    continue
                example = rows.example(where, lines.take_invalid(), self._parse, line)
                if example:
                    yield example

    def _parse(self, line):
        try:
            record = json.loads(line)
        except ValueError as error:
            raise reading.MalformedRecord(f"not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise reading.MalformedRecord(f"not a JSON object (got {type(record).__name__})")
        return reading.record_example(record, self.text_field, self.label_field)


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"jsonl": JsonLinesFiles}
