"""CSV and TSV files, read with Python's csv module: quoted fields may hold
delimiters and newlines."""

import csv

import kerasllm
from kerasllm import reading

# csv's default field limit (128 KiB) is below a long document's length; a limit
# still bounds memory when an unclosed quote would swallow the rest of a file.
FIELD_LIMIT = 64 * 2**20


class DelimitedFiles(reading.FileSource):
    """Args:
        paths: a path or glob, or a list of them; each glob's files are read in
            sorted order. Empty files and blank lines are skipped and counted.
        text_column: the column holding the document: its name in the header, or
            its index from 0 (the only choice with ``header=False``).
        label_column: the column holding an integer label (name or index), or None.
        delimiter: one character; default ``,`` for ``csv`` and a tab for ``tsv``.
        header: whether each file's first row names its columns.
        encoding_errors: what to do with a row holding invalid UTF-8: ``replace``
            the bad bytes with U+FFFD, or ``skip`` the row; counted either way.
        on_error: what to do with a malformed row (too few fields, a label that is
            not an integer, broken quoting): ``raise`` an error naming the file and
            line, or ``skip`` the row and count it.

    Examples:
    ```python
    # data/train.csv: text,label / "A fine film, truly.",1
    source = DelimitedFiles("data/train.csv", label_column="label")
    ```
    """

    default_delimiter = ","

    def __init__(self, paths, text_column="text", label_column=None, delimiter=None,
                 header=True, encoding_errors="replace", on_error="raise"):
        delimiter = self.default_delimiter if delimiter is None else delimiter
        if not (isinstance(delimiter, str) and len(delimiter) == 1):
            raise ValueError(f"delimiter must be one character, got {delimiter!r}")
        if not isinstance(header, bool):
            # ValueError, not TypeError: the builder reports it with the config key.
            raise ValueError(f"header must be true or false, got {header!r}")  # noqa: TRY004
        for option, column in (("text_column", text_column), ("label_column", label_column)):
            _check_column(option, column, header)
        super().__init__(paths, encoding_errors, on_error)
        self.text_column = text_column
        self.label_column = label_column
        self.delimiter = delimiter
        self.header = header
        if header:  # a misspelled column fails now, not when training starts
            rows = csv.reader(reading.Lines(self.files[0]), delimiter=delimiter)
            self._indexes(self.files[0], next((row for row in rows if row), []))

    def examples(self):
        return reading.python_examples(self._rows, label=self.label_column is not None)

    def _rows(self):
        csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))
        rows = reading.Rows(self.report, "row", self.encoding_errors, self.on_error)
        for path in self.files:
            lines = reading.Lines(path)
            reader = csv.reader(lines, delimiter=self.delimiter)
            indexes = None if self.header else (self.text_column, self.label_column)
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
        """(text index, label index or None) of this file's columns, from its header."""
        indexes = []
        for option, column in (("text_column", self.text_column),
                               ("label_column", self.label_column)):
            if isinstance(column, str) and column not in header:
                raise reading.DataError(
                    f"{path}: no column {column!r} in the header (columns: "
                    f"{', '.join(header) or 'none'}); set data.options.{option} to one of them")
            indexes.append(header.index(column) if isinstance(column, str) else column)
        return tuple(indexes)

    def _parse(self, row, indexes):
        text_index, label_index = indexes
        needed = max(index for index in indexes if index is not None) + 1
        if len(row) < needed:
            raise reading.MalformedRecord(f"{len(row)} field{'s' if len(row) != 1 else ''}, "
                                          f"expected at least {needed}")
        if label_index is None:
            return {"text": row[text_index]}
        try:
            label = int(row[label_index])
        except ValueError:
            raise reading.MalformedRecord(
                f"label {row[label_index]!r} is not an integer") from None
        return {"text": row[text_index], "label": label}


class CsvFiles(DelimitedFiles):
    __doc__ = DelimitedFiles.__doc__


class TsvFiles(DelimitedFiles):
    __doc__ = DelimitedFiles.__doc__
    default_delimiter = "\t"


def _check_column(option, column, header):
    if column is None and option == "label_column":
        return
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
