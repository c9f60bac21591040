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

import kerasllm
from conftest import tiny_config
from kerasllm.export import (
    NonServableOpError,
    export_savedmodel,
    read_saved_model,
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
def trained_tokenizer(name, sentinels=0):
    texts = tf.data.Dataset.from_tensor_slices(pydoc_topics()[:40])
    return get_registry().get("tokenizer", name, "tokenizer.name").train(
        texts, 400, lowercase=False, sentinels=sentinels)


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
        readme = rest_requests(path, "classification") if family == "bert" else []
        exported[family] = (model, path, read_warmup_requests(path) + readme
                            + requests_for(model, family))
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


# Generation exported without XLA for some models: the same tokens (checked
# against model.generate, which compiles), and no XLA compile in the server.
GENERATORS = {  # name: (family, tokenizer, config sections, export xla)
    "gpt2_clm": ("gpt2", "byte_level_bpe", {"objectives": [{"name": "clm"}]}, "generate"),
    "llama_causal_lm": ("llama", "sentencepiece", {
        "objectives": [], "head": {"name": "causal_lm", "options": {"max_new_tokens": 6}}},
        "none"),
    "t5_seq2seq": ("t5", "sentencepiece", {"objectives": [], "head": {"name": "seq2seq"}},
                   "generate"),
    "t5_span": ("t5", "sentencepiece", {"objectives": [{"name": "span"}]}, "none"),
}
# Batches of 3 and 1, as the warm-up requests: XLA compiled the loop for them.
PROMPTS = [b"The for statement caf\xff", b"", LONG.encode()]


def generator(name):
    family, tokenizer, sections, _ = GENERATORS[name]
    config = tiny_config(model={"family": family, "num_layers": 1, "max_sequence_length": 64},
                         **sections)
    return kerasllm.build_model(config, trained_tokenizer(tokenizer, 16 * (name == "t5_span")))


def generate_request(prompts, max_new_tokens, temperature=0.0, seed=0):
    count = len(prompts)
    return ("generate", {
        "prompts": np.array(prompts, dtype=object),
        "max_new_tokens": np.full(count, max_new_tokens, "int32"),
        "temperature": np.full(count, temperature, "float32"),
        "top_k": np.zeros(count, "int32"), "top_p": np.ones(count, "float32"),
        "seed": np.full(count, seed, "int64")})


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    """Decoder and encoder–decoder models exported and
    served from one fresh process: ``name → (model, path, outputs)``."""
    tf.keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("savedmodels")
    requests = [generate_request(PROMPTS, 5),
                generate_request([PROMPTS[0]] * 2 + [PROMPTS[1]], 5, temperature=1.0, seed=7),
                generate_request([PROMPTS[0]], 5, temperature=1.0, seed=7),
                ("serving_default", {"prompts": np.array(PROMPTS[:1], dtype=object)})]
    jobs = {}
    for name, (*_, xla) in GENERATORS.items():
        model = generator(name)
        jobs[name] = (model, export_savedmodel(model, name, root=root, xla=xla, verify=False))
    readme = rest_requests(jobs["gpt2_clm"][1], "generate")
    report = run_in_fresh_process([(path, requests + (readme if name == "gpt2_clm" else []))
                                   for name, (_, path) in jobs.items()])
    assert report["imported"] == []
    return {name: (model, path, outputs) for (name, (model, path)), outputs
            in zip(jobs.items(), report["outputs"])}


@pytest.mark.parametrize("name", GENERATORS)
def test_generate_signature_matches_model_generate(name, generators):
    model, path, outputs = generators[name]
    greedy, sampled, alone, default = outputs[:4]
    encoder_decoder = model.backbone.kind == "encoder_decoder"
    expected = model.generate(cleaned(PROMPTS[:1]), 5)
    assert [t.decode() for t in greedy["text"][:1]] == expected
    # Token ids: what model.generate gives for the same ids, padded with -1.
    row = greedy["token_ids"][0]
    row = row[row >= 0].tolist()
    if not encoder_decoder:
        from kerasllm.generation import graph_prompt_ids

        prompt = graph_prompt_ids(model, tf.constant(cleaned(PROMPTS[:1])), 5)
        assert model.generate(prompt.to_list(), 5) == [row]
    # An empty prompt and one longer than the model's positions still generate.
    for text, completion in zip(greedy["text"][1:], greedy["completion"][1:]):
        assert text.decode().endswith(completion.decode())
    # Sampling: row 0 and 1 share prompt and seed, and row 0 alone samples the same.
    np.testing.assert_array_equal(sampled["token_ids"][0], sampled["token_ids"][1])
    np.testing.assert_array_equal(alone["token_ids"][0],
                                  sampled["token_ids"][0][:alone["token_ids"].shape[1]])
    defaults = model.generate(cleaned(PROMPTS[:1]),
                              getattr(model.heads[0], "max_new_tokens", 32))
    assert [t.decode() for t in default["text"]] == defaults
    saved = read_saved_model(path)
    compiled = [f.attr["_XlaMustCompile"].b for f in saved.meta_graphs[0].graph_def.library.function]
    assert any(compiled) == (GENERATORS[name][3] != "none")


# === The README's REST bodies, as TF Serving's JSON API reads them ===============


def readme_rest_examples(kind):
    """``(request, response)`` JSON pairs the README documents for ``kind``."""
    pattern = r"<!-- rest:(\w+) -->\n```json\n(.*?)```\n\n```json\n(.*?)```"
    return [(json.loads(request), json.loads(response)) for found, request, response
            in re.findall(pattern, README.read_text(), re.S) if found == kind]


def signature_dtypes(path):
    saved = read_saved_model(path)
    return {name: {key: tf.dtypes.as_dtype(info.dtype) for key, info in sig.inputs.items()}
            for name, sig in saved.meta_graphs[0].signature_def.items()}


def rest_tensor(value, dtype):
    """A JSON value as TF Serving converts it: strings to UTF-8 bytes, {"b64": ...}
    to raw bytes, numbers to the input's dtype."""
    import base64

    def leaf(item):
        if isinstance(item, dict):
            return base64.b64decode(item["b64"])
        return item.encode("utf-8") if isinstance(item, str) else item

    def convert(item):
        return [convert(i) for i in item] if isinstance(item, list) else leaf(item)

    values = convert(value)
    if dtype == tf.string:
        return np.array(values, dtype=object)
    return np.array(values, dtype=dtype.as_numpy_dtype)


def rest_request(body, dtypes):
    """``(signature, inputs)`` of a request body in the row or the columnar format."""
    signature = body.get("signature_name", "serving_default")
    if "instances" in body:
        instances = body["instances"]
        columns = {key: [instance[key] for instance in instances] for key in instances[0]}
    else:
        columns = body["inputs"]
    assert set(columns) == set(dtypes[signature]), (columns.keys(), dtypes[signature])
    return signature, {key: rest_tensor(value, dtypes[signature][key])
                       for key, value in columns.items()}


def rest_requests(path, kind):
    dtypes = signature_dtypes(path)
    return [rest_request(request, dtypes) for request, _ in readme_rest_examples(kind)]


def rest_response(body, outputs):
    """The response TF Serving would send for ``outputs``: ``predictions`` (one
    object per instance) for the row format, ``outputs`` for the columnar one."""
    def python(value):
        if isinstance(value, np.ndarray):
            return [python(item) for item in value] if value.ndim else python(value.item())
        if isinstance(value, np.generic):
            return value.item()
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    if "instances" in body:
        count = len(body["instances"])
        return {"predictions": [{key: python(value[i]) for key, value in outputs.items()}
                                for i in range(count)]}
    return {"outputs": {key: python(value) for key, value in outputs.items()}}


def depth(value):
    return 1 + depth(value[0]) if isinstance(value, list) and value else int(
        isinstance(value, list))


def assert_documented(documented, actual):
    """The same outputs, the same number of rows, and each value nested alike."""
    if "predictions" in documented:
        assert len(actual["predictions"]) == len(documented["predictions"])
        pairs = list(zip(documented["predictions"], actual["predictions"]))
    else:
        pairs = [(documented["outputs"], actual["outputs"])]
    for expected, got in pairs:
        assert set(expected) == set(got), (sorted(expected), sorted(got))
        for key in expected:
            assert depth(expected[key]) == depth(got[key]), (key, expected[key], got[key])
            assert type(expected[key] if depth(expected[key]) == 0 else None) in (
                type(got[key] if depth(got[key]) == 0 else None), float, int), key


@pytest.mark.parametrize("kind", ["classification", "generate"])
def test_readme_rest_bodies_call_the_exported_signatures(kind, served, generators):
    examples = readme_rest_examples(kind)
    assert examples, f"the README documents no REST body for {kind}"
    if kind == "classification":
        _, _, requests, outputs = served["bert"]
        outputs = outputs[-3 - len(examples):-3]
    else:
        outputs = generators["gpt2_clm"][2][4:]
    assert len(outputs) == len(examples)
    for (request, response), got in zip(examples, outputs):
        assert_documented(response, rest_response(request, got))
