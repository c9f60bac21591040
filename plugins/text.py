"""Plain-text files: one document per line, or documents separated by blank lines."""

import itertools

import tensorflow as tf

import kerasllm
from kerasllm import reading, records


class TextFiles(reading.FileSource):
    """Args:
        paths: a path or glob, or a list of them; each glob's files are read in
            sorted order. Empty files are skipped and counted.
        mode: ``line`` (each non-empty line is a document; blank lines are
            skipped and counted) or ``document`` (documents are separated by one or
            more blank lines; a document's lines are joined with ``\\n``).
        encoding_errors: what to do with a line (``line`` mode) or document holding
            invalid UTF-8: ``replace`` the bad bytes with U+FFFD, or ``skip`` it;
            counted either way.

    Examples:
    ```python
    source = TextFiles("corpus/*.txt", mode="document")
    for example in source.examples().take(2):
        print(example["text"].numpy().decode())
    print(source.report)  # e.g. "lines with invalid UTF-8 replaced: 1"
    ```
    """

    def __init__(self, paths, mode="line", encoding_errors="replace"):
        reading.check_choice("mode", mode, ("line", "document"))
        super().__init__(paths, encoding_errors)
        self.mode = mode

    def examples(self):
        if self.mode == "document":
            return records.python_examples(self._documents, label=False)
        # Lines never leave the graph: TensorFlow reads them (dropping "\n" and "\r\n")
        # and checks them a batch at a time.
        lines = tf.data.TextLineDataset(self.files).batch(reading.BATCH)
        return reading.clean_texts(lines.map(lambda text: {"text": text}), self.report, "line",
                                   self.encoding_errors, empty_reason=reading.BLANK_LINES)

    def _documents(self):
        rows = reading.Rows(self.report, "document", self.encoding_errors)
        for path in self.files:
            lines = reading.Lines(path)
            document, start = [], 0
            # A blank line after the last closes the last document.
            for line in itertools.chain(lines, [""]):
                if line.strip():
                    document.append(line.rstrip("\r\n"))
                    start = start or lines.number
                elif document:
                    example = rows.example(f"{path}:{start}", lines.take_invalid(),
                                           lambda text: {"text": text}, "\n".join(document))
                    if example:
                        yield example
                    document, start = [], 0


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"text": TextFiles}
