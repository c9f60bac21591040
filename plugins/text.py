"""Plain-text files: one document per line, or documents separated by blank lines."""

import glob
import pathlib

import tensorflow as tf

import kerasllm


class TextFiles(kerasllm.DataSource):
    """Args:
        paths: a path or glob, or a list of them; files are read in sorted order.
        mode: ``line`` (each non-empty line is a document) or ``document``
            (documents are separated by one or more blank lines).
    """

    def __init__(self, paths, mode="line"):
        if mode not in ("line", "document"):
            raise ValueError(f"mode must be 'line' or 'document', got {mode!r}")
        patterns = [paths] if isinstance(paths, str) else list(paths)
        files = []
        for pattern in patterns:
            matches = sorted(glob.glob(str(pattern), recursive=True))
            if not matches:
                raise ValueError(f"no file matches {pattern!r}")
            for match in matches:
                if not pathlib.Path(match).is_file():
                    raise ValueError(f"{match!r} is not a file")
            files += matches
        self.files = files
        self.mode = mode

    def examples(self):
        if self.mode == "line":
            lines = tf.data.TextLineDataset(self.files)
            documents = lines.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
        else:
            documents = tf.data.Dataset.from_generator(
                self._documents, output_signature=tf.TensorSpec((), tf.string))
        return documents.map(lambda text: {"text": text})

    def _documents(self):
        for path in self.files:
            with open(path, encoding="utf-8") as handle:
                lines = []
                for line in handle:
                    if line.strip():
                        lines.append(line)
                    elif lines:
                        yield "".join(lines)
                        lines = []
                if lines:
                    yield "".join(lines)


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"text": TextFiles}
