"""SavedModel export for TF Serving: every family and tokenizer served from text in a
fresh process, versioning and models.config, the op audit, warm-up requests, the
CLI, and the README's REST bodies."""

import functools
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from helpers import serve_in_fresh_process

import kerasllm
from conftest import tiny_config
from kerasllm.export import (
    NonServableOpError,
    export_savedmodel,
    read_warmup_requests,
    run_in_fresh_process,
    versions,
)
from kerasllm.plugins import get_registry
from kerasllm.task_inputs import pack_texts
from kerasllm_plugins.builtin import pydoc_topics
from kerasllm_plugins.classification import Classification

README = pathlib.Path(__file__).parent.parent / "README.md"
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
# What a client may send: a pair of ordinary texts, an empty string, invalid
# UTF-8, accents and an emoji, and a text many times longer than a row.
TEXTS = [b"Python's for statement iterates over a sequence.", b"", b"caf\xff broken bytes",
         "\u00e9t\u00e9 \U0001F600 d\u00e9j\u00e0 vu".encode(), LONG.encode()]
FAMILIES = {  # family: tokenizer plugin
    "bert": "wordpiece", "roberta": "byte_level_bpe", "gpt2": "byte_level_bpe",
    "llama": "sentencepiece",
}


@functools.cache
def trained_tokenizer(name):
    texts = tf.data.Dataset.from_tensor_slices(pydoc_topics()[:40])
    return get_registry().get("tokenizer", name, "tokenizer.name").train(
        texts, 400, lowercase=False)


def classifier(family, pairs=False, **options):
    config = tiny_config(
        model={"family": family, "num_layers": 1, "max_sequence_length": 64},
        objectives=[], head={"name": "classification", "options": {
            "labels": ["negative", "neutral", "positive"], "pairs": pairs, **options}})
    return kerasllm.build_model(config, trained_tokenizer(FAMILIES[family]))


def cleaned(texts):
    return [t.decode("utf-8", errors="replace") for t in texts]


def token_rows(model, texts):
    pack = tf.function(lambda t: pack_texts({"text": t}, model.tokenizer,
                                            model.config.data.sequence_length))
    rows = {key: value.numpy() for key, value in pack(tf.constant(cleaned(texts))).items()}
    return {key: rows[key] for key in ("token_ids", "padding_mask", "segment_ids")
            if key in model.backbone.input_keys or key != "segment_ids"}


def requests_for(model, family):
    texts = np.array(TEXTS, dtype=object)
    inputs = {"text": texts}
    if family == "bert":
        inputs["text_pair"] = texts[::-1].copy()
    rows = token_rows(model, TEXTS)
    return [("serving_default", inputs),
            ("serving_default", {key: value[:1] for key, value in inputs.items()}),
            ("serve_token_ids", rows)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Each family's classifier exported, and served from one fresh process:
    ``family → (model, version folder, requests, outputs)``."""
    # Seeded before any tokenizer exists: tf.random.set_seed clears TensorFlow's
    # eager kernel cache, and with it the SentencePiece tokenizer's resource.
    tf.keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("savedmodels")
    exported = {}
    for family in sorted(FAMILIES):
        model = classifier(family, pairs=family == "bert")
        path = export_savedmodel(model, family, root=root, verify=False)
        exported[family] = (model, path, read_warmup_requests(path) + requests_for(model, family))
    report = run_in_fresh_process([(path, requests) for _, path, requests in exported.values()])
    assert report["imported"] == []
    return {family: (model, path, requests, outputs) for (family, (model, path, requests)),
            outputs in zip(exported.items(), report["outputs"])}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_classifier_answers_text_in_a_fresh_process_as_in_process(family, served):
    model, _, requests, outputs = served[family]
    (_, inputs), _, (_, rows) = requests[-3:]
    by_text, single, by_ids = outputs[-3:]
    examples = [dict(zip(inputs, values)) for values in zip(*(cleaned(v) for v in inputs.values()))]
    answers = model.predict(examples)
    np.testing.assert_allclose(by_text["probabilities"], [a["probabilities"] for a in answers],
                               rtol=0, atol=1e-5)
    assert [n.decode() for n in by_text["label_names"]] == [a["label"] for a in answers]
    np.testing.assert_array_equal(by_text["label_ids"], [a["label_id"] for a in answers])
    np.testing.assert_allclose(single["probabilities"], by_text["probabilities"][:1], atol=1e-5)
    # Token ids in: the same probabilities as the model on those rows.
    logits = model({**rows, "segment_ids": rows.get("segment_ids",
                                                    np.zeros_like(rows["token_ids"]))})
    np.testing.assert_allclose(by_ids["probabilities"],
                               tf.nn.softmax(logits["classification"]), rtol=0, atol=1e-5)


def test_export_writes_versions_and_a_valid_models_config(served):
    from tensorflow_serving.config import model_server_config_pb2

    from kerasllm.export import update_models_config

    model, first, _, _ = served["bert"]
    root = first.parent.parent
    second = export_savedmodel(model, "bert", root=root, verify=True)
    update_models_config(root, "topics", base_path="/models/")
    assert (first.name, second.name) == ("1", "2")
    assert versions(root / "bert") == [1, 2]
    # Nothing half-written is left beside the versions.
    assert sorted(p.name for p in (root / "bert").iterdir()) == ["1", "2"]
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((root / "models.config").read_text(), config)
    entries = {e.name: (e.base_path, e.model_platform) for e in config.model_config_list.config}
    assert entries == {**{f: (str((root / f).resolve()), "tensorflow") for f in FAMILIES},
                       "topics": ("/models/topics", "tensorflow")}
    # The warm-up file holds PredictionLogs for every signature at two batch sizes.
    requests = read_warmup_requests(second)
    assert sorted({s for s, _ in requests}) == ["serve_token_ids", "serving_default"]
    assert sorted({len(inputs["text"]) for s, inputs in requests if "text" in inputs}) == [1, 3]


def test_bad_model_name_and_config_are_refused(served, tmp_path):
    model = served["bert"][0]
    with pytest.raises(kerasllm.KerasLLMError, match="model name 'my model' is not usable"):
        export_savedmodel(model, "my model", root=tmp_path)
    (tmp_path / "models.config").write_text("model_config_list { config { nme: 'x' } }")
    with pytest.raises(kerasllm.KerasLLMError, match="models.config is not a valid TF Serving"):
        export_savedmodel(model, "ok", root=tmp_path, verify=False)


class PythonCallbackClassifier(Classification):
    """A head whose graph calls back into Python: TF Serving cannot run it."""

    def serving_outputs(self, predictions, rows, inputs):
        outputs = super().serving_outputs(predictions, rows, inputs)
        outputs["score"] = tf.numpy_function(lambda x: x, [outputs["score"]], tf.float32,
                                             name="python_score")
        return outputs


def custom_op_library(folder):
    """A tiny compiled op library: an op TF Serving's model server does not link."""
    source = folder / "identity_op.cc"
    source.write_text(
        '#include "tensorflow/core/framework/op.h"\n'
        '#include "tensorflow/core/framework/op_kernel.h"\n'
        'using namespace tensorflow;\n'
        'REGISTER_OP("KerasllmTestIdentity").Input("x: float").Output("y: float");\n'
        "class IdentityOp : public OpKernel {\n public:\n"
        "  explicit IdentityOp(OpKernelConstruction* c) : OpKernel(c) {}\n"
        "  void Compute(OpKernelContext* c) override { c->set_output(0, c->input(0)); }\n};\n"
        'REGISTER_KERNEL_BUILDER(Name("KerasllmTestIdentity").Device(DEVICE_CPU), IdentityOp);\n')
    library = folder / "identity_op.so"
    subprocess.run(["g++", "-std=c++17", "-shared", "-fPIC", "-O0", str(source), "-o",
                    str(library), *tf.sysconfig.get_compile_flags(),
                    *tf.sysconfig.get_link_flags()], check=True, capture_output=True)
    return tf.load_op_library(str(library))


def with_head(model, head_class, **attributes):
    head = model.heads[0]
    head.__class__ = head_class
    for key, value in attributes.items():
        setattr(head, key, value)
    return model


def test_op_audit_refuses_python_callbacks_and_custom_ops(tmp_path):
    model = with_head(classifier("bert"), PythonCallbackClassifier)
    with pytest.raises(NonServableOpError) as error:
        export_savedmodel(model, "python", root=tmp_path, verify=False)
    message = str(error.value)
    assert "op PyFunc calls back into Python" in message
    assert "python_score" in message and "from layer" in message
    assert "no tf.py_function / tf.numpy_function" in message
    assert versions(tmp_path / "python") == []
    assert list((tmp_path / "python").iterdir()) == []

    library = custom_op_library(tmp_path)

    class CustomOpClassifier(Classification):
        def serving_outputs(self, predictions, rows, inputs):
            with tf.name_scope("calibration"):
                return super().serving_outputs(library.kerasllm_test_identity(predictions),
                                               rows, inputs)

    model = with_head(classifier("bert"), CustomOpClassifier)
    with pytest.raises(NonServableOpError) as error:
        export_savedmodel(model, "custom", root=tmp_path, verify=False)
    message = str(error.value)
    assert re.search(r"op KerasllmTestIdentity is neither a TensorFlow core op nor a "
                     r"tensorflow-text op; node '[^']*calibration/KerasllmTestIdentity'",
                     message), message
    assert versions(tmp_path / "custom") == []


def test_saved_model_cli_lists_the_signatures(served):
    path = served["bert"][1]
    shown = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli",
                            "show", "--dir", str(path), "--all"],
                           capture_output=True, text=True, check=True).stdout
    for signature in ("serving_default", "serve_token_ids"):
        assert f"signature_def['{signature}']" in shown
    assert "inputs['text_pair'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" \
        in shown
    assert "outputs['label_names'] tensor_info:\n        dtype: DT_STRING" in shown


def test_cli_exports_a_saved_model(tmp_path, capsys):
    from kerasllm.cli import main

    model = classifier("bert")
    model.save(tmp_path / "model.keras")
    assert main(["export", str(tmp_path), "--name", "sentiment", "--root",
                 str(tmp_path / "serving"), "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert f"exported {tmp_path / 'serving' / 'sentiment' / '1'}" in printed
    assert "in  text                   string   (-1,)" in printed
    assert main(["export", str(tmp_path / "missing"), "--name", "x"]) == 2
    assert "model file not found" in capsys.readouterr().err
