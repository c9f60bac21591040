"""TensorFlow Datasets, read from a prepared copy: this source never downloads."""

import os

import tensorflow as tf

import kerasllm
from kerasllm import reading

KINDS = {"string": lambda dtype: dtype == tf.string, "integer": lambda dtype: dtype.is_integer}


class TfdsSource(kerasllm.DataSource):
    """Args:
        name: a registered TFDS dataset, e.g. ``imdb_reviews`` or
            ``imdb_reviews/plain_text:1.0.0``, already prepared in ``data_dir``
            (``tfds build NAME --data_dir DIR``, once, with network access).
        directory: instead of ``name``, a prepared dataset's folder, the one
            holding ``dataset_info.json`` (e.g. ``DIR/imdb_reviews/plain_text/1.0.0``).
        data_dir: where ``name`` is prepared; default TFDS's own
            (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        split: a split, or a TFDS slice such as ``train[:90%]``.
        text_feature: the string feature holding the document.
        label_feature: an integer feature (e.g. a ``ClassLabel``) to use as the
            label, or None.

    Empty texts are skipped, and invalid UTF-8 replaced with U+FFFD; both counted.
    Needs ``pip install "kerasllm[tfds]"``.

    Examples:
    ```python
    source = TfdsSource(name="imdb_reviews", split="train", label_feature="label")
    ```
    """

    def __init__(self, name=None, directory=None, data_dir=None, split="train",
                 text_feature="text", label_feature=None):
        if (name is None) == (directory is None):
            raise ValueError("give exactly one of name (a registered TFDS dataset) and "
                             "directory (a prepared dataset's folder)")
        tfds = reading.import_optional("tensorflow_datasets", "tensorflow-datasets", "tfds",
                                       "data source 'tfds'")
        if name is not None:
            self.builder = _prepared_builder(tfds, name, data_dir)
        else:
            self.builder = _builder_from_directory(tfds, directory)
        try:
            self.builder.info.splits[split]
        except (KeyError, ValueError) as error:
            raise ValueError(f"split {split!r}: {error}") from None
        for option, feature, kind in (("text_feature", text_feature, "string"),
                                      ("label_feature", label_feature, "integer")):
            if feature is not None:
                _check_feature(self.builder, option, feature, kind)
        self.split = split
        self.text_feature = text_feature
        self.label_feature = label_feature
        self.report = reading.InputReport()

    def examples(self):
        dataset = self.builder.as_dataset(split=self.split, shuffle_files=False)
        examples = dataset.map(self._select).batch(reading.BATCH)
        return reading.clean_texts(examples, self.report, "example", "replace")

    def _select(self, features):
        example = {"text": features[self.text_feature]}
        if self.label_feature is not None:
            example["label"] = tf.cast(features[self.label_feature], tf.int32)
        return example


def _check_feature(builder, option, name, kind):
    features = builder.info.features
    if name in features and features[name].shape == () and KINDS[kind](features[name].tf_dtype):
        return
    found = ", ".join(f"{n} ({features[n].tf_dtype.name})" for n in sorted(features))
    raise ValueError(f"{option} {name!r} is not a scalar {kind} feature of {builder.name}; "
                     f"its features: {found}")


def _prepared_builder(tfds, name, data_dir):
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"no TFDS dataset named {name!r} (see tfds.list_builders(), or "
                         "give directory: a prepared dataset's folder)") from None
    if not builder.is_prepared():
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; kerasllm never "
            f"downloads: prepare it once with `tfds build {name} --data_dir "
            f"{data_dir or '~/tensorflow_datasets'}`, or set data_dir to where it is")
    return builder


def _builder_from_directory(tfds, directory):
    directory = os.path.expanduser(os.fspath(directory))
    if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
        raise ValueError(f"{directory!r} is not a prepared TFDS dataset folder: it has no "
                         "dataset_info.json (give e.g. ~/tensorflow_datasets/NAME/CONFIG/VERSION)")
    return tfds.builder_from_directory(directory)


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"tfds": TfdsSource}
