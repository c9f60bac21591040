"""JSON Lines files: one JSON object per line, the example's keys in named fields."""

import json

import kerasllm
from kerasllm import reading, records


class JsonLinesFiles(reading.FileSource):
    """Args:
        paths: a path or glob, or a list of them; each glob's files are read in
            sorted order. Empty files and blank lines are skipped and counted.
        text_field: the field holding the document, a string; default ``text``,
            unless ``fields`` is given.
        label_field: the field holding the label (an integer, a float or a
            string: a label name), or None.
        fields: example key → field, for examples with more keys than a text and
            a label, or without a text: e.g. ``{text: question, text_pair:
            context, label: answer}``. With ``fields`` an example has only the
            keys it lists, and ``text_field`` / ``label_field``, shorthands for
            ``fields.text`` / ``fields.label``, add theirs (giving both for one
            key is an error). A ``text`` is a string; any other key holds a
            string, an integer, a float, a boolean (1 or 0) or a list of one of
            them, of any length: the type of the first example read (a list's
            items: the first example where it has some), which every row must
            keep (an integer may stand for a float, an empty list for a list).
            An empty ``text`` skips the row; other empty strings are kept.
        encoding_errors: what to do with a row holding invalid UTF-8: ``replace``
            the bad bytes with U+FFFD, or ``skip`` the row; counted either way.
        on_error: what to do with a malformed row (not JSON, not an object, a
            field missing or of another type than in the first example): ``raise``
            an error naming the file and line, or ``skip`` the row and count it.

    Examples:
    ```python
    # data/train.jsonl: {"text": "A fine film.", "label": 1}
    source = JsonLinesFiles("data/train.jsonl", label_field="label")
    # data/nli.jsonl: {"premise": "A man sleeps.", "hypothesis": "He is awake.",
    #                  "gold": "contradiction"}
    source = JsonLinesFiles("data/nli.jsonl", fields={
        "text": "premise", "text_pair": "hypothesis", "label": "gold"})
    ```
    """

    def __init__(self, paths, text_field=None, label_field=None, fields=None,
                 encoding_errors="replace", on_error="raise"):
        names = records.field_options("fields", fields, {
            "text": ("text_field", text_field), "label": ("label_field", label_field)})
        for option, field in names.values():
            if not isinstance(field, str):
                # ValueError, not TypeError: the builder reports it with the config key.
                raise ValueError(f"{option} must be a field name, got {field!r}")  # noqa: TRY004
        super().__init__(paths, encoding_errors, on_error)
        self.schema = records.ExampleSchema(
            {key: field for key, (_, field) in names.items()}, "field")

    def examples(self):
        return records.python_examples(self._rows, label="label" in self.schema.names)

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
        return self.schema.example(record)


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"jsonl": JsonLinesFiles}
