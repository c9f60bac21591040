"""CSV and TSV files, read with Python's csv module: quoted fields may hold
delimiters and newlines."""

import csv

import kerasllm
from kerasllm import reading, records

# csv's default field limit (128 KiB) is below a long document's length; a limit
# still bounds memory when an unclosed quote would swallow the rest of a file.
FIELD_LIMIT = 64 * 2**20
# label_type → how a label cell is read, and what the error calls a cell it cannot read.
LABEL_TYPES = {"int": (int, "an integer"), "float": (float, "a number"), "str": (str, "a string")}


class DelimitedFiles(reading.FileSource):
    """Args:
        paths: a path or glob, or a list of them; each glob's files are read in
            sorted order. Empty files and blank lines are skipped and counted.
        text_column: the column holding the document: its name in the header, or
            its index from 0 (the only choice with ``header=False``); default
            ``text``, unless ``columns`` is given.
        label_column: the column holding the label (name or index), or None.
        columns: example key → column (name or index), for examples with more
            keys than a text and a label, or without a text: e.g. ``{text:
            premise, text_pair: hypothesis, label: gold}``. With ``columns`` an
            example has only the keys it lists, and ``text_column`` /
            ``label_column``, shorthands for ``columns.text`` / ``columns.label``,
            add theirs (giving both for one key is an error). Every key but
            ``label`` is a string, as its cells are.
        label_type: how a label cell is read: ``int`` (an integer), ``float`` (a
            number) or ``str`` (a label name, kept as written).
        delimiter: one character; default ``,`` for ``csv`` and a tab for ``tsv``.
        header: whether each file's first row names its columns.
        encoding_errors: what to do with a row holding invalid UTF-8: ``replace``
            the bad bytes with U+FFFD, or ``skip`` the row; counted either way.
        on_error: what to do with a malformed row (too few fields, a label that is
            not of ``label_type``, broken quoting): ``raise`` an error naming the
            file and line, or ``skip`` the row and count it.

    An empty ``text`` skips the row; other empty cells are kept.

    Examples:
    ```python
    # data/train.csv: text,label / "A fine film, truly.",1
    source = DelimitedFiles("data/train.csv", label_column="label")
    # data/nli.csv: premise,hypothesis,gold / A man sleeps.,He is awake.,contradiction
    source = DelimitedFiles("data/nli.csv", label_type="str", columns={
        "text": "premise", "text_pair": "hypothesis", "label": "gold"})
    ```
    """

    default_delimiter = ","

    def __init__(self, paths, text_column=None, label_column=None, columns=None,
                 label_type="int", delimiter=None, header=True, encoding_errors="replace",
                 on_error="raise"):
        delimiter = self.default_delimiter if delimiter is None else delimiter
        if not (isinstance(delimiter, str) and len(delimiter) == 1):
            raise ValueError(f"delimiter must be one character, got {delimiter!r}")
        if not isinstance(header, bool):
            # ValueError, not TypeError: the builder reports it with the config key.
            raise ValueError(f"header must be true or false, got {header!r}")  # noqa: TRY004
        reading.check_choice("label_type", label_type, LABEL_TYPES)
        self.columns = records.field_options("columns", columns, {
            "text": ("text_column", text_column), "label": ("label_column", label_column)},
            noun="column")
        for option, column in self.columns.values():
            _check_column(option, column, header)
        super().__init__(paths, encoding_errors, on_error)
        self.label_type = label_type
        self.delimiter = delimiter
        self.header = header
        if header:  # a misspelled column fails now, not when training starts
            rows = csv.reader(reading.Lines(self.files[0]), delimiter=delimiter)
            self._indexes(self.files[0], next((row for row in rows if row), []))

    def examples(self):
        return records.python_examples(self._rows, label="label" in self.columns)

    def _rows(self):
        csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))
        rows = reading.Rows(self.report, "row", self.encoding_errors, self.on_error)
        for path in self.files:
            lines = reading.Lines(path)
            reader = csv.reader(lines, delimiter=self.delimiter)
            indexes = None if self.header else {
                key: column for key, (_, column) in self.columns.items()}
            while True:
                where = f"{path}:{lines.number + 1}"  # a row starts on the line after the last
                try:
                    row = next(reader, None)
                except csv.Error as error:
                    lines.take_invalid()
                    rows.reject(where, f"not valid CSV ({error})")
                    continue
                if row is None:
                    break
                if not row:
                    self.report.add(reading.BLANK_LINES, where=where)
                elif indexes is None:
                    lines.take_invalid()
                    indexes = self._indexes(path, row)
                else:
                    example = rows.example(where, lines.take_invalid(), self._parse, row, indexes)
                    if example:
                        yield example

    def _indexes(self, path, header):
        """``{key: index}`` of this file's columns, from its header."""
        indexes = {}
        for key, (option, column) in self.columns.items():
            if isinstance(column, str) and column not in header:
                raise reading.DataError(
                    f"{path}: no column {column!r} in the header (columns: "
                    f"{', '.join(header) or 'none'}); set data.options.{option} to one of them")
            indexes[key] = header.index(column) if isinstance(column, str) else column
        return indexes

    def _parse(self, row, indexes):
        needed = max(indexes.values()) + 1
        if len(row) < needed:
            raise reading.MalformedRecord(f"{len(row)} field{'s' if len(row) != 1 else ''}, "
                                          f"expected at least {needed}")
        example = {key: row[index] for key, index in indexes.items()}
        if "label" in example:
            read_label, label_type = LABEL_TYPES[self.label_type]
            try:
                example["label"] = read_label(example["label"])
            except ValueError:
                raise reading.MalformedRecord(
                    f"label {example['label']!r} is not {label_type}") from None
        return example


class CsvFiles(DelimitedFiles):
    __doc__ = DelimitedFiles.__doc__


class TsvFiles(DelimitedFiles):
    __doc__ = DelimitedFiles.__doc__
    default_delimiter = "\t"


def _check_column(option, column, header):
    if isinstance(column, bool) or not isinstance(column, (str, int)):
        # ValueError, not TypeError: the builder reports it with the config key.
        raise ValueError(f"{option} must be a column name or index, got {column!r}")  # noqa: TRY004
    if isinstance(column, int) and column < 0:
        raise ValueError(f"{option} must be a column index from 0, got {column}")
    if isinstance(column, str) and not header:
        raise ValueError(f"{option} {column!r} is a name, but header is false: "
                         "give the column's index from 0")


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"csv": CsvFiles, "tsv": TsvFiles}
