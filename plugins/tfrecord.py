"""TFRecord files of serialized ``tf.train.Example``, parsed in graph."""

import tensorflow as tf
from google.protobuf.message import DecodeError

import kerasllm
from kerasllm import reading

KINDS = {"text_feature": "bytes_list", "label_feature": "int64_list"}


class TFRecordFiles(reading.FileSource):
    """Args:
        paths: a path or glob, or a list of them; each glob's files are read in
            sorted order. Empty files are skipped and counted.
        text_feature: the bytes feature holding the document.
        label_feature: the int64 feature holding an integer label, or None.
        compression: None, ``GZIP`` or ``ZLIB``, as the files were written.
        encoding_errors: what to do with a record whose text is invalid UTF-8:
            ``replace`` the bad bytes with U+FFFD, or ``skip`` the record; counted
            either way.
        on_error: what to do with a malformed record (the text or label feature
            missing, or not holding exactly one value): ``raise`` an error naming
            the file and record number, or ``skip`` the record and count it.

    The first record is checked when the source is made: a feature name that is
    wrong, or of the wrong type, fails at once with the features it has.

    Examples:
    ```python
    source = TFRecordFiles("data/train-*.tfrecord.gz", compression="GZIP",
                           label_feature="label")
    ```
    """

    def __init__(self, paths, text_feature="text", label_feature=None, compression=None,
                 encoding_errors="replace", on_error="raise"):
        reading.check_choice("compression", compression, (None, "GZIP", "ZLIB"))
        super().__init__(paths, encoding_errors, on_error)
        self.features = {"text_feature": text_feature, "label_feature": label_feature}
        self.compression = compression or ""
        self._check_first_record()

    def examples(self):
        batches = tf.data.Dataset.from_tensor_slices(self.files).flat_map(self._read)
        return reading.clean_texts(batches, self.report, "record", self.encoding_errors)

    def _read(self, path):
        records = tf.data.TFRecordDataset(path, self.compression).enumerate(1)
        return records.batch(reading.BATCH).map(
            lambda numbers, batch: self._parse(path, numbers, batch),
            num_parallel_calls=tf.data.AUTOTUNE)

    def _parse(self, path, numbers, records):
        dtypes = {"text_feature": tf.string, "label_feature": tf.int64}
        parsed = tf.io.parse_example(records, {
            name: tf.io.RaggedFeature(dtypes[option])
            for option, name in self.features.items() if name is not None})
        well_formed = tf.reduce_all(
            tf.stack([values.row_lengths() == 1 for values in parsed.values()]), axis=0)
        if self.on_error == "raise":
            first = numbers[tf.argmin(tf.cast(well_formed, tf.int32))]
            message = tf.strings.join([
                path, ": record ", tf.strings.as_string(first),
                f": {self._expected()}; {reading.on_error_hint('record')}"])
            check = tf.debugging.Assert(tf.reduce_all(well_formed), [message])
        else:
            check = self.report.counter("malformed records skipped").assign_add(
                tf.reduce_sum(tf.cast(~well_formed, tf.int64)))
        with tf.control_dependencies([check]):
            kept = {name: tf.ragged.boolean_mask(values, well_formed).flat_values
                    for name, values in parsed.items()}
        example = {"text": kept[self.features["text_feature"]]}
        if self.features["label_feature"] is not None:
            example["label"] = tf.cast(kept[self.features["label_feature"]], tf.int32)
        return example

    def _expected(self):
        # Unquoted: the assertion's message shows quotes escaped.
        return "needs " + " and ".join(
            f"one {KINDS[option].removesuffix('_list')} value in feature {name}"
            for option, name in self.features.items() if name is not None)

    def _check_first_record(self):
        for path in self.files:
            try:
                record = next(iter(tf.data.TFRecordDataset(path, self.compression)), None)
            except tf.errors.OpError as error:
                raise ValueError(
                    f"cannot read {path} as a TFRecord file with compression "
                    f"{self.compression or None} ({type(error).__name__}); is compression "
                    "right?") from None
            if record is not None:
                break
        else:
            raise ValueError(f"the files in paths hold no records: {', '.join(self.files)}")
        try:
            features = tf.train.Example.FromString(record.numpy()).features.feature
        except DecodeError:
            raise ValueError(f"the first record of {path} is not a tf.train.Example") from None
        kinds = {name: feature.WhichOneof("kind") for name, feature in features.items()}
        for option, name in self.features.items():
            if name is not None and kinds.get(name) != KINDS[option]:
                found = ", ".join(f"{n} ({kind})" for n, kind in sorted(kinds.items()))
                raise ValueError(f"{option} {name!r}: the first record of {path} has no "
                                 f"{KINDS[option]} feature {name!r}; its features: {found}")


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"tfrecord": TFRecordFiles}
