"""The data-source plugins: what each reads, and what each does with bad input.

Every file is made here, in tmp_path; nothing is downloaded. Sources are looked up
through the registry, as a config's ``data.source`` is.
"""

import json
import re
import sys
import threading

import keras
import pytest
import tensorflow as tf
from conftest import tiny_config

import kerasllm
from kerasllm.builder import build_data_source
from kerasllm.plugins import get_registry
from kerasllm import reading
from kerasllm.reading import InputReport

SOURCES = {"text": "text", "jsonl": "jsonl", "csv": "delimited", "tsv": "delimited",
           "tfrecord": "tfrecord", "iterable": "iterable", "tfds": "tfds",
           "hf_datasets": "hf_datasets"}
HINT = "fix the row or set data.options.on_error: skip"


def source(name, /, **options):
    return get_registry().get("data source", name, "data.source")(**options)


def python_value(tensor):
    value = tensor.numpy()
    if tensor.dtype == tf.string:
        return value.decode() if tensor.shape.rank == 0 else [item.decode() for item in value]
    return value.tolist()


def read(data_source):
    """The examples as Python values: strings, ints, floats and lists of one of them."""
    return [{name: python_value(value) for name, value in example.items()}
            for example in data_source.examples()]


def specs(data_source):
    """Each key's (dtype, shape) in the dataset."""
    return {name: (spec.dtype, spec.shape.as_list())
            for name, spec in data_source.examples().element_spec.items()}


def texts(data_source):
    return [example["text"] for example in read(data_source)]


def read_error(data_source):
    """The message a user iterating the dataset sees."""
    with pytest.raises(tf.errors.OpError) as error:
        read(data_source)
    return error.value.message


def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def write_tfrecord(path, records, compression=None):
    """Each record a dict of feature name -> list of bytes or of ints."""
    with tf.io.TFRecordWriter(str(path), compression) as writer:
        for record in records:
            features = {
                name: tf.train.Feature(int64_list=tf.train.Int64List(value=values))
                if values and isinstance(values[0], int)
                else tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
                for name, values in record.items()}
            writer.write(tf.train.Example(
                features=tf.train.Features(feature=features)).SerializeToString())
    return path


# --- Registry and options -------------------------------------------------------------


@pytest.mark.parametrize("name", SOURCES)
def test_each_source_is_found_through_the_registry(name):
    cls = get_registry().get("data source", name, "data.source")
    assert issubclass(cls, kerasllm.DataSource)
    assert cls.__module__ == f"kerasllm_plugins.{SOURCES[name]}"
    assert "Args:" in cls.__doc__


def test_a_bad_option_value_is_reported_with_its_config_key(tmp_path):
    config = kerasllm.load_config(tiny_config(data={"source": "jsonl", "options": {
        "paths": str(write(tmp_path / "a.jsonl", '{"text": "x"}\n')), "on_error": "ignore"}}))
    with pytest.raises(kerasllm.ConfigError) as error:
        build_data_source(config)
    assert str(error.value) == ("data.options: invalid value for data source 'jsonl': "
                                "on_error must be 'raise' or 'skip', got 'ignore'")


# --- Paths: every file source resolves them alike -------------------------------------

FILE_SOURCES = {
    "text": {}, "jsonl": {}, "csv": {}, "tsv": {}, "tfrecord": {},
    "hf_datasets": {"builder": "json"},
}


def file_source(name, paths):
    options = FILE_SOURCES[name]
    key = "data_files" if name == "hf_datasets" else "paths"
    return source(name, **options, **{key: paths})


@pytest.mark.parametrize("name", FILE_SOURCES)
def test_a_missing_file_is_named(tmp_path, name):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=f"^{re.escape(f'no such file: {missing!r}')}$"):
        file_source(name, missing)


@pytest.mark.parametrize("name", FILE_SOURCES)
def test_a_glob_matching_nothing_is_named(tmp_path, name):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "sub.txt").mkdir()  # a directory does not count as a match
    pattern = str(tmp_path / "corpus" / "*.txt")
    with pytest.raises(ValueError, match=f"^{re.escape(f'no file matches {pattern!r}')}$"):
        file_source(name, pattern)


@pytest.mark.parametrize("name", FILE_SOURCES)
def test_a_directory_given_as_a_file_is_named_with_the_fix(tmp_path, name):
    with pytest.raises(ValueError) as error:
        file_source(name, str(tmp_path))
    assert str(error.value) == (f"{str(tmp_path)!r} is a directory; name its files, "
                                f"e.g. {str(tmp_path / '*')!r}")


@pytest.mark.parametrize("name", FILE_SOURCES)
def test_paths_whose_files_are_all_empty_are_refused(tmp_path, name):
    write(tmp_path / "a.txt", "")
    write(tmp_path / "b.txt", "")
    patterns = [str(tmp_path / "*.txt"), str(tmp_path / "a.txt")]
    with pytest.raises(ValueError) as error:
        file_source(name, patterns)
    assert str(error.value) == (f"every file in paths ({patterns[0]!r}, {patterns[1]!r}) "
                                "is empty; nothing to read")


def test_empty_files_are_skipped_and_counted_and_globs_read_in_sorted_order(tmp_path):
    write(tmp_path / "b.txt", "bravo\n")
    write(tmp_path / "a.txt", "alpha\n")
    write(tmp_path / "c.txt", "")
    write(tmp_path / "z.txt", "zulu\n")
    text = source("text", paths=[str(tmp_path / "z.txt"), str(tmp_path / "[abc].txt")])
    assert text.files == [str(tmp_path / name) for name in ("z.txt", "a.txt", "b.txt")]
    assert texts(text) == ["zulu", "alpha", "bravo"]
    assert text.report.counts == {"empty files skipped": 1}
    assert str(text.report) == f"empty files skipped: 1 (first: {tmp_path / 'c.txt'})"


# --- The report -------------------------------------------------------------------------


def test_input_report_counts_from_many_threads_and_reads_like_a_sentence():
    report = InputReport()
    assert report.counts == {} and str(report) == "nothing skipped or replaced"

    def add():
        for _ in range(1000):
            report.add("blank lines skipped")

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.add("malformed rows skipped", 2, where="a.jsonl:17: not valid JSON")
    report.counter("lines with invalid UTF-8 replaced").assign_add(3)
    report.counter("lines with invalid UTF-8 skipped")  # never incremented: not listed
    assert report.counts == {"blank lines skipped": 8000, "malformed rows skipped": 2,
                             "lines with invalid UTF-8 replaced": 3}
    assert str(report) == ("blank lines skipped: 8000, malformed rows skipped: 2 "
                           "(first: a.jsonl:17: not valid JSON), "
                           "lines with invalid UTF-8 replaced: 3")


def fit_twice(data_source, documents):
    """Two epochs of Keras ``fit`` over the source's examples: graph-mode iteration."""
    batches = data_source.examples().map(
        lambda example: (tf.cast(tf.strings.length(example["text"]), tf.float32)[None], 0.0))
    batches = batches.batch(documents).apply(tf.data.experimental.assert_cardinality(1))
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(batches, epochs=2, shuffle=False, verbose=0)


def test_counts_grow_while_keras_fit_iterates_in_graph(tmp_path):
    lines = source("text", paths=str(write(tmp_path / "a.txt", b"one\n\nt\xffo\nthree\n")))
    rows = source("jsonl", on_error="skip", paths=str(write(
        tmp_path / "a.jsonl", '{"text": "one"}\n\nnot json\n{"text": "two"}\n')))
    for data_source in (lines, rows):
        fit_twice(data_source, documents=2)
    # Each epoch reads the input again.
    assert lines.report.counts == {"blank lines skipped": 2,
                                   "lines with invalid UTF-8 replaced": 2}
    assert rows.report.counts == {"blank lines skipped": 2, "malformed rows skipped": 2}


# --- text -------------------------------------------------------------------------------

# Invalid: a stray byte, an encoded surrogate. Valid: U+FFFD itself, a 4-byte character.
LINES = (b"first\r\n\n  \t\nsec\xffond\n\xed\xa0\x80\nkept \xef\xbf\xbd \xf0\x9d\x84\x9e\n"
         b"last, no newline")


def test_text_line_mode_replaces_invalid_utf8_and_counts_blank_lines(tmp_path):
    text = source("text", paths=str(write(tmp_path / "a.txt", LINES)))
    expected = ["first", "sec\ufffdond", "\ufffd" * 3, "kept \ufffd \U0001d11e", "last, no newline"]
    assert texts(text) == expected
    assert text.report.counts == {"blank lines skipped": 2,
                                  "lines with invalid UTF-8 replaced": 2}
    assert texts(text) == expected  # deterministic; each pass counts again
    assert text.report.counts["blank lines skipped"] == 4


def test_text_line_mode_can_skip_lines_with_invalid_utf8(tmp_path):
    text = source("text", paths=str(write(tmp_path / "a.txt", LINES)), encoding_errors="skip")
    assert texts(text) == ["first", "kept \ufffd \U0001d11e", "last, no newline"]
    assert text.report.counts == {"blank lines skipped": 2,
                                  "lines with invalid UTF-8 skipped": 2}


DOCUMENTS = b"One, first line\r\nOne, second line\n\n\n   \nTw\xffo\n\nThree"


@pytest.mark.parametrize("encoding_errors, done, expected", [
    ("replace", "replaced", ["One, first line\nOne, second line", "Tw\ufffdo", "Three"]),
    ("skip", "skipped", ["One, first line\nOne, second line", "Three"]),
])
def test_text_document_mode_applies_the_utf8_policy_per_document(tmp_path, encoding_errors,
                                                                 done, expected):
    path = write(tmp_path / "a.txt", DOCUMENTS)
    text = source("text", paths=str(path), mode="document", encoding_errors=encoding_errors)
    assert texts(text) == expected
    assert text.report.counts == {f"documents with invalid UTF-8 {done}": 1}
    assert f"(first: {path}:6)" in str(text.report)


def test_text_rejects_an_unknown_encoding_policy(tmp_path):
    with pytest.raises(ValueError, match="^encoding_errors must be 'replace' or 'skip', "
                       "got 'ignore'$"):
        source("text", paths=str(write(tmp_path / "a.txt", "x")), encoding_errors="ignore")


# --- jsonl ------------------------------------------------------------------------------


def test_jsonl_reads_text_and_label_fields(tmp_path):
    path = write(tmp_path / "a.jsonl", "\ufeff" + "\n".join([
        json.dumps({"body": "A fine film.", "stars": 1, "id": 7}),
        "",
        json.dumps({"body": "Dull.", "stars": 0}),
        json.dumps({"body": "   ", "stars": 0}),
    ]))
    rows = source("jsonl", paths=str(path), text_field="body", label_field="stars")
    assert read(rows) == [{"text": "A fine film.", "label": 1}, {"text": "Dull.", "label": 0}]
    assert rows.report.counts == {"blank lines skipped": 1, "empty texts skipped": 1}


MALFORMED_JSONL = [
    ("not json", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    ("[1, 2]", "not a JSON object (got list)"),
    ('{"body": "x", "label": 1}', "no field 'text' (it has: body, label)"),
    ('{"text": 3, "label": 1}', "field 'text' is not a string (got int)"),
    ('{"text": "x", "label": "1"}', "field 'label' is not an integer (got '1')"),
    ('{"text": "x", "label": true}', "field 'label' is not an integer (got True)"),
    ('{"text": "x"}', "no field 'label' (it has: text)"),
]


@pytest.mark.parametrize("row, problem", MALFORMED_JSONL)
def test_jsonl_malformed_row_error_names_file_line_and_fix(tmp_path, row, problem):
    path = write(tmp_path / "train.jsonl", f'{{"text": "a", "label": 0}}\n\n{row}\n')
    rows = source("jsonl", paths=str(path), label_field="label")
    message = read_error(rows)
    assert f"DataError: {path}:3: {problem}; {HINT}" in message


@pytest.mark.parametrize("row, problem", MALFORMED_JSONL)
def test_jsonl_malformed_rows_can_be_skipped_and_counted(tmp_path, row, problem):
    path = write(tmp_path / "train.jsonl", f'{{"text": "a", "label": 0}}\n{row}\n{row}\n'
                                           '{"text": "b", "label": 1}\n')
    rows = source("jsonl", paths=str(path), label_field="label", on_error="skip")
    assert read(rows) == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    assert rows.report.counts == {"malformed rows skipped": 2}
    assert str(rows.report) == f"malformed rows skipped: 2 (first: {path}:2: {problem})"


@pytest.mark.parametrize("encoding_errors, done, expected", [
    ("replace", "replaced", ["caf\ufffd", "ok"]), ("skip", "skipped", ["ok"])])
def test_jsonl_applies_the_utf8_policy_per_row(tmp_path, encoding_errors, done, expected):
    path = write(tmp_path / "a.jsonl", b'{"text": "caf\xe9"}\n{"text": "ok"}\n')
    rows = source("jsonl", paths=str(path), encoding_errors=encoding_errors)
    assert texts(rows) == expected
    assert rows.report.counts == {f"rows with invalid UTF-8 {done}": 1}


def jsonl(path, *records):
    return str(write(path, "".join(json.dumps(record) + "\n" for record in records)))


def test_jsonl_fields_read_every_value_type_and_lists_of_any_length(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "BATCH", 2)  # ragged batches end mid-file
    path = jsonl(tmp_path / "a.jsonl",
                 {"premise": "A man sleeps.", "hypothesis": "He is awake.", "gold": "no",
                  "score": 0.5, "flag": True, "words": ["A", "man"], "ids": [3, 1, 4],
                  "weights": [0.5, 1], "id": 7},
                 {"premise": "Ada wrote.", "hypothesis": "", "gold": "yes", "score": 2,
                  "flag": False, "words": [], "ids": [9], "weights": [], "id": 8},
                 {"premise": "Cats.", "hypothesis": "Pets.", "gold": "yes", "score": -1.25,
                  "flag": True, "words": ["Cats", ".", "!"], "ids": [], "weights": [2.5]})
    rows = source("jsonl", paths=path, text_field="premise", label_field="gold", fields={
        "text_pair": "hypothesis", "score": "score", "flag": "flag", "words": "words",
        "ids": "ids", "weights": "weights"})
    assert read(rows) == [
        {"text": "A man sleeps.", "text_pair": "He is awake.", "label": "no", "score": 0.5,
         "flag": 1, "words": ["A", "man"], "ids": [3, 1, 4], "weights": [0.5, 1.0]},
        {"text": "Ada wrote.", "text_pair": "", "label": "yes", "score": 2.0, "flag": 0,
         "words": [], "ids": [9], "weights": []},
        {"text": "Cats.", "text_pair": "Pets.", "label": "yes", "score": -1.25, "flag": 1,
         "words": ["Cats", ".", "!"], "ids": [], "weights": [2.5]},
    ]
    assert specs(rows) == {
        "text": (tf.string, []), "text_pair": (tf.string, []), "label": (tf.string, []),
        "score": (tf.float32, []), "flag": (tf.int32, []), "words": (tf.string, [None]),
        "ids": (tf.int32, [None]), "weights": (tf.float32, [None])}
    assert all(isinstance(spec, tf.TensorSpec)
               for spec in rows.examples().element_spec.values())


@pytest.mark.parametrize("labels, dtype", [([1.5, 0], tf.float32), (["pos", "neg"], tf.string)])
def test_jsonl_labels_may_be_floats_or_label_names(tmp_path, labels, dtype):
    path = jsonl(tmp_path / "a.jsonl", *({"text": f"t{i}", "label": label}
                                         for i, label in enumerate(labels)))
    rows = source("jsonl", paths=path, label_field="label")
    assert [example["label"] for example in read(rows)] == labels
    assert specs(rows)["label"] == (dtype, [])


def test_jsonl_examples_have_no_text_when_fields_name_none(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl",
                 {"q": "", "c": "Ada wrote it.", "a": "Ada", "start": 0},
                 {"q": "Who?", "c": "   ", "a": "Bo", "start": 4})
    rows = source("jsonl", paths=path, fields={
        "question": "q", "context": "c", "answer": "a", "answer_start": "start"})
    # Only an empty text skips a row: these rows have none.
    assert read(rows) == [
        {"question": "", "context": "Ada wrote it.", "answer": "Ada", "answer_start": 0},
        {"question": "Who?", "context": "   ", "answer": "Bo", "answer_start": 4}]
    assert rows.report.counts == {}


def test_jsonl_with_no_example_gives_an_empty_dataset_of_text_and_label(tmp_path):
    rows = source("jsonl", paths=jsonl(tmp_path / "a.jsonl", {"text": " ", "label": 0.5}),
                  label_field="label")
    assert read(rows) == []
    assert rows.report.counts == {"empty texts skipped": 1}  # one pass, begun when made
    assert specs(rows) == {"text": (tf.string, []), "label": (tf.int32, [])}


# The first row sets each key's type; (value there, value in row 3, the problem).
TYPE_CHANGES = [
    (1, 1.5, "field 'v' is not an integer (got 1.5)"),
    (0.5, "x", "field 'v' is not a number (got 'x')"),
    ("pos", 1, "field 'v' is not a string (got 1)"),
    (True, 1, "field 'v' is not a boolean (got 1)"),
    ([1, 2], ["a"], "field 'v' is not a list of integers (got ['a'])"),
    (["a"], "a", "field 'v' is not a list of strings (got 'a')"),
    (1, {"a": 1}, "field 'v' is not a string, a number, a boolean or a list of one of them "
                  "(got {'a': 1})"),
    (["a"], [1, "a"], "field 'v' is not a string, a number, a boolean or a list of one of "
                      "them (got [1, 'a'])"),
]


@pytest.mark.parametrize("first, later, problem", TYPE_CHANGES)
def test_jsonl_a_type_change_is_a_malformed_row_named_by_line_or_skipped(tmp_path, first, later,
                                                                          problem):
    path = jsonl(tmp_path / "a.jsonl", {"text": "a", "v": first}, {"text": "", "v": later},
                 {"text": "b", "v": later}, {"text": "c", "v": first})
    fields = {"text": "text", "value": "v"}
    message = read_error(source("jsonl", paths=path, fields=fields))
    assert f"DataError: {path}:3: {problem}; {HINT}" in message
    rows = source("jsonl", paths=path, fields=fields, on_error="skip")
    assert [example["text"] for example in read(rows)] == ["a", "c"]
    assert str(rows.report) == (f"empty texts skipped: 1 (first: {path}:2), "
                                f"malformed rows skipped: 1 (first: {path}:3: {problem})")


def test_jsonl_a_list_takes_its_type_from_the_first_example_where_it_has_items(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"text": "a", "tags": []}, {"text": "b", "tags": [2]},
                 {"text": "c", "tags": []}, {"text": "d", "tags": ["x"]})
    fields = {"text": "text", "tags": "tags"}
    assert f"DataError: {path}:4: field 'tags' is not a list of integers (got ['x']); " \
        f"{HINT}" in read_error(source("jsonl", paths=path, fields=fields))
    rows = source("jsonl", paths=path, fields=fields, on_error="skip")
    assert read(rows) == [{"text": "a", "tags": []}, {"text": "b", "tags": [2]},
                          {"text": "c", "tags": []}]
    assert specs(rows)["tags"] == (tf.int32, [None])
    empty = jsonl(tmp_path / "empty.jsonl", {"text": "a", "tags": []})
    # The dataset's dtypes are found when it is made.
    with pytest.raises(reading.DataError, match="^'tags': an empty list in every example, so "
                       "no item shows the dtype; give one example an item$"):
        source("jsonl", paths=empty, fields=fields).examples()


@pytest.mark.parametrize("options, message", [
    ({"text_field": "body", "fields": {"text": "title"}},
     "text_field and fields.text both name the field of text; give one of them"),
    ({"label_field": "y", "fields": {"label": "y"}},
     "label_field and fields.label both name the field of label; give one of them"),
    ({"fields": ["text"]}, "fields must be a mapping from example key to field, e.g. "
                           "{text: question, text_pair: context}, got ['text']"),
    ({"fields": {}}, "fields must be a mapping from example key to field, e.g. "
                     "{text: question, text_pair: context}, got {}"),
    ({"fields": {"text": "body", "label": 3}}, "fields.label must be a field name, got 3"),
])
def test_jsonl_rejects_bad_or_conflicting_fields(tmp_path, options, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        source("jsonl", paths=jsonl(tmp_path / "a.jsonl", {"text": "x"}), **options)


# --- csv and tsv ------------------------------------------------------------------------

CSV = ('id,text,label\r\n'
       '1,"A fine film, truly.\nSecond line ""quoted"".",1\r\n'
       '\r\n'
       '2,Dull.,0\r\n')


def test_csv_reads_quoted_fields_with_delimiters_and_newlines(tmp_path):
    rows = source("csv", paths=str(write(tmp_path / "a.csv", CSV)), label_column="label")
    assert read(rows) == [
        {"text": 'A fine film, truly.\nSecond line "quoted".', "label": 1},
        {"text": "Dull.", "label": 0},
    ]
    assert rows.report.counts == {"blank lines skipped": 1}


def test_tsv_splits_at_tabs_and_headerless_files_use_column_indexes(tmp_path):
    tsv = source("tsv", paths=str(write(tmp_path / "a.tsv", "1\tOne, a\t7\n0\tTwo\t8\n")),
                 header=False, text_column=1, label_column=0)
    assert read(tsv) == [{"text": "One, a", "label": 1}, {"text": "Two", "label": 0}]
    semicolons = source("csv", paths=str(write(tmp_path / "b.csv", "text;x\nOne, a;2\n")),
                        delimiter=";")
    assert texts(semicolons) == ["One, a"]


def test_csv_each_file_is_read_by_its_own_header(tmp_path):
    write(tmp_path / "a.csv", "text,label\nalpha,1\n")
    write(tmp_path / "b.csv", "label,extra,text\n2,x,bravo\n")
    rows = source("csv", paths=str(tmp_path / "*.csv"), label_column="label")
    assert read(rows) == [{"text": "alpha", "label": 1}, {"text": "bravo", "label": 2}]


def test_csv_column_missing_from_the_header_fails_at_construction(tmp_path):
    path = write(tmp_path / "a.csv", "body,label\nx,1\n")
    with pytest.raises(ValueError) as error:
        source("csv", paths=str(path))
    assert str(error.value) == (f"{path}: no column 'text' in the header (columns: body, "
                                "label); set data.options.text_column to one of them")


@pytest.mark.parametrize("options, message", [
    ({"header": False},
     "text_column 'text' is a name, but header is false: give the column's index from 0"),
    ({"text_column": -1}, "text_column must be a column index from 0, got -1"),
    ({"label_column": 1.5}, "label_column must be a column name or index, got 1.5"),
    ({"delimiter": "||"}, "delimiter must be one character, got '||'"),
])
def test_csv_rejects_bad_column_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        source("csv", paths=str(write(tmp_path / "a.csv", "text\nx\n")), **options)


# Row 4 spans lines 4 and 5: errors name the line where a row starts.
MALFORMED_CSV = 'text,label\nok,1\nshort\n"two\nlines",x\nbare\rreturn,1\nlast,2\n'


def test_csv_malformed_row_error_names_file_and_starting_line(tmp_path):
    path = write(tmp_path / "train.csv", MALFORMED_CSV)
    assert f"DataError: {path}:3: 1 field, expected at least 2; {HINT}" in read_error(
        source("csv", paths=str(path), label_column="label"))
    headerless = write(tmp_path / "headerless.csv", 'ok,1\n"two\nlines",x\n')
    assert f"{headerless}:2: label 'x' is not an integer; {HINT}" in read_error(
        source("csv", paths=str(headerless), text_column=0, label_column=1, header=False))


def test_csv_malformed_rows_can_be_skipped_and_counted(tmp_path):
    path = write(tmp_path / "train.csv", MALFORMED_CSV)
    rows = source("csv", paths=str(path), label_column="label", on_error="skip")
    assert read(rows) == [{"text": "ok", "label": 1}, {"text": "last", "label": 2}]
    assert rows.report.counts == {"malformed rows skipped": 3}
    assert str(rows.report) == (f"malformed rows skipped: 3 (first: {path}:3: 1 field, "
                                "expected at least 2)")


def test_csv_skips_a_whole_multiline_row_holding_invalid_utf8(tmp_path):
    path = write(tmp_path / "a.csv", b'text\n"caf\xe9\nsecond line"\nok\n')
    assert texts(source("csv", paths=str(path))) == ["caf\ufffd\nsecond line", "ok"]
    rows = source("csv", paths=str(path), encoding_errors="skip")
    assert texts(rows) == ["ok"]
    assert str(rows.report) == f"rows with invalid UTF-8 skipped: 1 (first: {path}:2)"


@pytest.mark.parametrize("label_type, labels", [("float", [1.5, -2.0]), ("str", ["yes", "2"])])
def test_csv_columns_add_string_keys_and_label_type_reads_the_label(tmp_path, label_type,
                                                                    labels):
    path = write(tmp_path / "a.csv", f"premise,gold,hypothesis\nA man sleeps.,{labels[0]},"
                                     f"\nCats.,{labels[1]},Pets.\n")
    rows = source("csv", paths=str(path), label_type=label_type, text_column="premise",
                  columns={"text_pair": "hypothesis", "label": 1})
    assert read(rows) == [{"text": "A man sleeps.", "text_pair": "", "label": labels[0]},
                          {"text": "Cats.", "text_pair": "Pets.", "label": labels[1]}]
    assert specs(rows)["label"] == ({"float": tf.float32, "str": tf.string}[label_type], [])


def test_tsv_columns_need_no_text_and_name_headerless_columns_by_index(tmp_path):
    path = write(tmp_path / "a.tsv", "Who?\tAda wrote it.\n\tBo\n")
    rows = source("tsv", paths=str(path), header=False,
                  columns={"question": 0, "context": 1})
    assert read(rows) == [{"question": "Who?", "context": "Ada wrote it."},
                          {"question": "", "context": "Bo"}]


def test_csv_a_label_not_of_label_type_names_file_and_line(tmp_path):
    path = write(tmp_path / "a.csv", "text,label\nok,0.5\nbad,x\n")
    assert f"DataError: {path}:3: label 'x' is not a number; {HINT}" in read_error(
        source("csv", paths=str(path), label_column="label", label_type="float"))


def test_csv_a_column_missing_from_the_header_names_its_columns_option(tmp_path):
    path = write(tmp_path / "a.csv", "text,label\nx,1\n")
    with pytest.raises(ValueError) as error:
        source("csv", paths=str(path), columns={"text": "text", "text_pair": "context"})
    assert str(error.value) == (f"{path}: no column 'context' in the header (columns: text, "
                                "label); set data.options.columns.text_pair to one of them")


@pytest.mark.parametrize("options, message", [
    ({"text_column": "text", "columns": {"text": "body"}},
     "text_column and columns.text both name the column of text; give one of them"),
    ({"columns": {"label": 1.5}}, "columns.label must be a column name or index, got 1.5"),
    ({"label_type": "bool"}, "label_type must be 'int', 'float' or 'str', got 'bool'"),
])
def test_csv_rejects_bad_or_conflicting_columns(tmp_path, options, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        source("csv", paths=str(write(tmp_path / "a.csv", "text\nx\n")), **options)


# --- tfrecord ---------------------------------------------------------------------------


def test_tfrecord_reads_text_and_label_features_from_compressed_files(tmp_path):
    path = write_tfrecord(tmp_path / "a.tfrecord.gz", [
        {"body": [b"A fine film."], "stars": [1]},
        {"body": [b"caf\xe9"], "stars": [0]},
        {"body": [b" "], "stars": [0]},
    ], compression="GZIP")
    records = source("tfrecord", paths=str(path), text_feature="body", label_feature="stars",
                     compression="GZIP")
    assert read(records) == [{"text": "A fine film.", "label": 1},
                             {"text": "caf\ufffd", "label": 0}]
    assert records.report.counts == {"empty texts skipped": 1,
                                     "records with invalid UTF-8 replaced": 1}
    skipping = source("tfrecord", paths=str(path), text_feature="body", compression="GZIP",
                      encoding_errors="skip")
    assert texts(skipping) == ["A fine film."]


def test_tfrecord_malformed_records_raise_naming_file_and_record_or_are_skipped(tmp_path):
    path = write_tfrecord(tmp_path / "a.tfrecord", [
        {"text": [b"one"], "label": [1]},
        {"text": [b"two"]},
        {"text": [b"three", b"more"], "label": [3]},
        {"text": [b"four"], "label": [4]},
    ])
    message = read_error(source("tfrecord", paths=str(path), label_feature="label"))
    assert (f"{path}: record 2: needs one bytes value in feature text and one int64 value in "
            "feature label; fix the record or set data.options.on_error: skip") in message
    records = source("tfrecord", paths=str(path), label_feature="label", on_error="skip")
    assert read(records) == [{"text": "one", "label": 1}, {"text": "four", "label": 4}]
    assert records.report.counts == {"malformed records skipped": 2}


def test_tfrecord_checks_feature_names_and_compression_at_construction(tmp_path):
    path = write_tfrecord(tmp_path / "a.tfrecord", [{"body": [b"x"], "stars": [1]}])
    with pytest.raises(ValueError) as error:
        source("tfrecord", paths=str(path))
    assert str(error.value) == (f"text_feature 'text': the first record of {path} has no "
                                "bytes_list feature 'text'; its features: body (bytes_list), "
                                "stars (int64_list)")
    with pytest.raises(ValueError, match="label_feature 'body': .* no int64_list feature"):
        source("tfrecord", paths=str(path), text_feature="body", label_feature="body")
    with pytest.raises(ValueError, match=re.escape(
            f"cannot read {path} as a TFRecord file with compression GZIP (DataLossError); "
            "is compression right?")):
        source("tfrecord", paths=str(path), text_feature="body", compression="GZIP")


# --- iterable ---------------------------------------------------------------------------


def test_iterable_reads_strings_and_dicts_with_labels():
    strings = source("iterable", items=["one", "", "two"])
    assert texts(strings) == ["one", "two"]
    assert str(strings.report) == "empty texts skipped: 1 (first: items[1])"
    labelled = source("iterable", items=[{"text": "one", "label": 1}, {"text": "two", "label": 0}])
    assert read(labelled) == [{"text": "one", "label": 1}, {"text": "two", "label": 0}]


def test_iterable_calls_a_function_afresh_for_each_pass():
    calls = []

    def items():
        calls.append(1)
        return (f"document {i}" for i in range(3))

    generated = source("iterable", items=items)
    assert texts(generated) == texts(generated) == ["document 0", "document 1", "document 2"]
    assert len(calls) == 3  # once to see the first item, then once per pass


def test_iterable_refuses_one_shot_iterators_and_bad_items():
    with pytest.raises(ValueError, match="^items must be a list, or a function returning a "
                       "fresh iterable, got generator; an iterator"):
        source("iterable", items=(text for text in ["a"]))
    with pytest.raises(ValueError, match="^items holds no item$"):
        source("iterable", items=[])
    mixed = source("iterable", items=[{"text": "a", "label": 1}, {"text": "b"}, 3])
    assert "DataError: items[1]: no key 'label' (it has: text)" in read_error(mixed)
    assert "DataError: items[1]: expected a string or a dict, got int" in read_error(
        source("iterable", items=["a", 3]))


def test_iterable_dicts_carry_any_keys_with_lists_of_any_length():
    items = [{"words": ["Ada", "wrote"], "tags": [1, 0], "score": 0.5, "gold": True},
             {"words": ["Hi"], "tags": [0], "score": 2, "gold": False, "extra": "left out"},
             {"words": [], "tags": [], "score": -1.25, "gold": True}]
    examples = source("iterable", items=items)
    assert read(examples) == [
        {"words": ["Ada", "wrote"], "tags": [1, 0], "score": 0.5, "gold": 1},
        {"words": ["Hi"], "tags": [0], "score": 2.0, "gold": 0},
        {"words": [], "tags": [], "score": -1.25, "gold": 1}]
    assert specs(examples) == {"words": (tf.string, [None]), "tags": (tf.int32, [None]),
                               "score": (tf.float32, []), "gold": (tf.int32, [])}
    assert "DataError: items[1]: key 'score' is not an integer (got 2.5)" in read_error(
        source("iterable", items=[{"text": "a", "score": 1}, {"text": "b", "score": 2.5}]))
    with pytest.raises(reading.DataError, match=re.escape(
            "items[0]: key 'spans' is not a string, a number, a boolean or a list of one of "
            "them (got [[0, 3]])")):
        source("iterable", items=[{"text": "a", "spans": [[0, 3]]}]).examples()


# --- tfds -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A TFDS dataset prepared here from a tf.data.Dataset (TfDataBuilder): no download."""
    import tensorflow_datasets as tfds

    data_dir = tmp_path_factory.mktemp("tfds")
    split = tf.data.Dataset.from_tensor_slices(
        {"review": ["A fine film.", "", "Dull."], "stars": [1, 0, 0]})
    builder = tfds.dataset_builders.TfDataBuilder(
        name="kerasllm_test_reviews", version="1.0.0", data_dir=str(data_dir),
        split_datasets={"train": split, "test": split.take(1)},
        features=tfds.features.FeaturesDict({
            "review": tfds.features.Text(), "stars": tfds.features.ClassLabel(num_classes=2)}))
    builder.download_and_prepare()
    return data_dir


def test_tfds_reads_a_prepared_dataset_by_name_or_folder(tfds_dir):
    by_name = source("tfds", name="kerasllm_test_reviews", data_dir=str(tfds_dir),
                     text_feature="review", label_feature="stars")
    assert read(by_name) == [{"text": "A fine film.", "label": 1}, {"text": "Dull.", "label": 0}]
    assert by_name.report.counts == {"empty texts skipped": 1}
    by_folder = source("tfds", directory=str(tfds_dir / "kerasllm_test_reviews" / "1.0.0"),
                       split="test", text_feature="review")
    assert read(by_folder) == [{"text": "A fine film."}]


def test_tfds_explains_how_to_prepare_and_never_downloads(tmp_path):
    with pytest.raises(ValueError) as error:
        source("tfds", name="mnist", data_dir=str(tmp_path))
    assert str(error.value) == (
        f"TFDS dataset 'mnist' is not prepared in {tmp_path}/mnist/3.0.1; kerasllm never "
        f"downloads: prepare it once with `tfds build mnist --data_dir {tmp_path}`, or set "
        "data_dir to where it is")
    assert list(tmp_path.iterdir()) == []


def test_tfds_names_a_bad_feature_split_or_folder(tfds_dir, tmp_path):
    with pytest.raises(ValueError) as error:
        source("tfds", name="kerasllm_test_reviews", data_dir=str(tfds_dir))
    assert str(error.value) == ("text_feature 'text' is not a scalar string feature of "
                                "kerasllm_test_reviews; its features: review (string), "
                                "stars (int64)")
    with pytest.raises(ValueError, match="^split 'validation': Unknown split"):
        source("tfds", name="kerasllm_test_reviews", data_dir=str(tfds_dir),
               text_feature="review", split="validation")
    with pytest.raises(ValueError, match="is not a prepared TFDS dataset folder: it has no "
                       "dataset_info.json"):
        source("tfds", directory=str(tmp_path))


@pytest.mark.parametrize("name, module, extra, options", [
    ("tfds", "tensorflow_datasets", "tfds", {"name": "x"}),
    ("hf_datasets", "datasets", "datasets", {"directory": "x"}),
])
def test_adapters_say_how_to_install_a_missing_package(monkeypatch, name, module, extra, options):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(kerasllm.PluginError) as error:
        source(name, **options)
    assert str(error.value).startswith(f"data source '{name}' needs the ")
    assert str(error.value).endswith(f'install it with: pip install "kerasllm[{extra}]"')


# --- hf_datasets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_datasets(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("hf")
    reviews = datasets.Dataset.from_dict(
        {"review": ["A fine film.", None, "", "Dull."], "stars": [1, 1, 0, 0]})
    reviews.save_to_disk(str(root / "reviews"))
    datasets.DatasetDict({"train": reviews, "test": reviews.select([0])}).save_to_disk(
        str(root / "splits"))
    return root


def test_hf_datasets_reads_a_saved_dataset(saved_datasets):
    rows = source("hf_datasets", directory=str(saved_datasets / "reviews"), text_field="review",
                  label_field="stars", on_error="skip")
    assert read(rows) == [{"text": "A fine film.", "label": 1}, {"text": "Dull.", "label": 0}]
    assert rows.report.counts == {"malformed rows skipped": 1, "empty texts skipped": 1}
    split = source("hf_datasets", directory=str(saved_datasets / "splits"), split="test",
                   text_field="review")
    assert texts(split) == ["A fine film."]


def test_hf_datasets_names_a_null_text_row_and_bad_options(saved_datasets):
    reviews = str(saved_datasets / "reviews")
    assert (f"DataError: {reviews} row 1: column 'review' is not a string (got NoneType); "
            f"{HINT}") in read_error(source("hf_datasets", directory=reviews,
                                            text_field="review"))
    with pytest.raises(ValueError) as error:
        source("hf_datasets", directory=reviews)
    assert str(error.value) == (f"text_field 'text': {reviews} has no such column; its "
                                "columns: review, stars")
    with pytest.raises(ValueError, match="^split 'validation': .* has the splits train, test$"):
        source("hf_datasets", directory=str(saved_datasets / "splits"), split="validation")


def test_hf_datasets_streams_local_files_through_a_packaged_builder(tmp_path):
    for name, rows in (("b.jsonl", [("Dull.", 0)]), ("a.jsonl", [("Fine.", 1), ("", 1)])):
        write(tmp_path / name, "".join(
            json.dumps({"text": text, "label": label}) + "\n" for text, label in rows))
    rows = source("hf_datasets", builder="json", data_files=str(tmp_path / "*.jsonl"),
                  label_field="label")
    assert read(rows) == [{"text": "Fine.", "label": 1}, {"text": "Dull.", "label": 0}]
    assert rows.report.counts == {"empty texts skipped": 1}
    with pytest.raises(ValueError, match="^builder must be 'json', 'csv', 'parquet' or "
                       "'text', got 'xml'$"):
        source("hf_datasets", builder="xml", data_files=str(tmp_path / "a.jsonl"))
