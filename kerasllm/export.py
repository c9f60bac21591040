"""Export a model as a SavedModel that stock TF Serving loads: text in, answers out.

model → :class:`kerasllm.serving.ServingModule` (the signatures) →
``tf.saved_model.save`` into a staging folder → op audit (only TensorFlow core
and tensorflow-text ops) → warm-up requests → verification in a fresh process
that cannot import keras, keras-hub, kerasllm or tensorflow_text's Python
package (:mod:`kerasllm.serving_check`) → renamed to ``ROOT/NAME/VERSION`` in
one step → ``ROOT/models.config`` lists the model.
"""

import fcntl
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import uuid

import numpy as np
import tensorflow as tf

from kerasllm.errors import KerasLLMError
from kerasllm.serving import SERVING_DEFAULT, XLA_MODES, ServingModule

MODELS_CONFIG = "models.config"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# Ops that exist in TensorFlow but call back into the Python interpreter, which
# a model server does not have.
PYTHON_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class NonServableOpError(KerasLLMError):
    """The exported graph holds an op that TF Serving's model server does not have."""


def export_savedmodel(model, name, root="savedmodels", *, base_path=None, xla="generate",
                      max_new_tokens=None, verify=True):
    """Write ``model`` as version N+1 of ``ROOT/NAME`` and list it in ``ROOT/models.config``.

    Args:
        model: a :class:`kerasllm.KerasLLMModel`.
        name: the model's name in TF Serving (letters, digits, ``_ . -``).
        root: the folder TF Serving is pointed at; default ``savedmodels``.
        base_path: where the model server sees ``root`` (a Docker mount such as
            ``/models``); default: ``root``'s absolute path here.
        xla: which signatures run XLA-compiled: ``generate`` (the generation
            loop only; the default), ``all`` (also the attention of the forward
            signatures), ``none``. TF Serving runs XLA on CPU only when started
            with ``--xla_cpu_compilation_enabled=true``.
        max_new_tokens: what ``serving_default`` and ``serve_token_ids``
            generate for a generative model without a serving head; default:
            the generative head's ``max_new_tokens`` option, else 32.
        verify: load the written model in a fresh process, as TF Serving does,
            and check its answers against this process's before publishing it.
    Returns:
        the version folder, a ``pathlib.Path``.
    """
    if not _NAME.match(str(name)):
        raise KerasLLMError(f"model name {name!r} is not usable in TF Serving: use letters, "
                            "digits, '_', '.' and '-', starting with a letter or digit")
    if xla not in XLA_MODES:
        raise KerasLLMError(f"xla must be one of {', '.join(XLA_MODES)}, got {xla!r}")
    read_models_config(root)  # a broken models.config fails now, not after the export
    model_dir = pathlib.Path(root) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    # TF Serving only looks at folders named by an integer: a half-written
    # export under another name is never loaded.
    staging = model_dir / f".export-{uuid.uuid4().hex}"
    try:
        module = ServingModule(model, xla=xla, max_new_tokens=max_new_tokens)
        module.save(staging)
        audit_ops(staging)
        write_warmup_requests(staging, module.warmup_requests())
        if verify:
            verify_in_fresh_process(staging, module)
        version = _publish(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    update_models_config(root, name, base_path)
    return model_dir / str(version)


def versions(model_dir):
    """The published versions in ``model_dir``, ascending."""
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _publish(staging, model_dir):
    """Rename ``staging`` to the next free version; another export may take a
    number first, so retry with the next."""
    while True:
        version = (versions(model_dir) or [0])[-1] + 1
        try:
            os.rename(staging, model_dir / str(version))
            return version
        except OSError:
            if not (model_dir / str(version)).exists():
                raise


def read_saved_model(saved_model_dir):
    """The SavedModel proto of ``saved_model_dir``: graphs, functions, signatures."""
    from tensorflow.core.protobuf import saved_model_pb2

    return saved_model_pb2.SavedModel.FromString(
        (pathlib.Path(saved_model_dir) / "saved_model.pb").read_bytes())


def signature_summary(saved_model_dir):
    """The signatures of a SavedModel, one line per input and output:
    ``name dtype shape`` (-1: any size), as ``saved_model_cli show`` lists them."""
    saved = read_saved_model(saved_model_dir)
    lines = []
    for name, signature in sorted(saved.meta_graphs[0].signature_def.items()):
        if name.startswith("__"):
            continue
        lines.append(f"{name}:")
        for kind, tensors in (("in ", signature.inputs), ("out", signature.outputs)):
            for key, info in sorted(tensors.items()):
                dtype = tf.dtypes.as_dtype(info.dtype).name
                shape = [dim.size for dim in info.tensor_shape.dim]
                lines.append(f"  {kind} {key:<22} {dtype:<8} {tuple(shape)}")
    return "\n".join(lines)


# === The op audit ============================================================


def servable_ops():
    """Op names TF Serving's stock model server runs: TensorFlow's own (those
    with a ``tf.raw_ops`` entry, less the Python callbacks) and tensorflow-text's
    (the ops its shared libraries register; the model server links them)."""
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session

    ops = set(dir(tf.raw_ops)) - PYTHON_OPS
    for library in tf_text_op_libraries():
        # What tf.load_op_library reads, without making Python wrappers.
        handle = pywrap_tf_session.TF_LoadLibrary(library)
        try:
            op_list = op_def_pb2.OpList.FromString(pywrap_tf_session.TF_GetOpList(handle))
        finally:
            pywrap_tf_session.TF_DeleteLibraryHandle(handle)
        ops.update(op.name for op in op_list.op)
    return ops


def tf_text_op_libraries():
    """tensorflow-text's op libraries (``.so`` files), found without importing it."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("tensorflow_text")
    if spec is None:
        return []
    folder = os.path.join(spec.submodule_search_locations[0], "python", "ops")
    return sorted(glob.glob(os.path.join(folder, "*.so")))


def audit_ops(saved_model_dir):
    """Raise NonServableOpError naming every op in the SavedModel's graph (and
    its functions) that is neither a TensorFlow core op nor a tensorflow-text
    op, with the node and the layer (name scope) that produced it."""
    saved = read_saved_model(saved_model_dir)
    allowed = servable_ops()
    bad = {}
    for meta_graph in saved.meta_graphs:
        functions = {f.signature.name: f for f in meta_graph.graph_def.library.function}
        compiled = _xla_compiled(functions)
        nodes = [(node, None) for node in meta_graph.graph_def.node]
        for name, function in functions.items():
            nodes += [(node, name) for node in function.node_def]
        for node, function in nodes:
            # XLA's own ops (tf2xla) run only inside a function XLA compiles.
            if node.op not in allowed and not (function in compiled and node.op.startswith("Xla")):
                bad.setdefault(node.op, (node.name, function))
    if bad:
        lines = []
        for op, (node, function) in sorted(bad.items()):
            layer = node.rsplit("/", 1)[0] if "/" in node else "(top level)"
            why = "calls back into Python" if op in PYTHON_OPS else \
                "is neither a TensorFlow core op nor a tensorflow-text op"
            lines.append(f"op {op} {why}; node {node!r}"
                         + (f" in function {function}" if function else "")
                         + f", from layer {layer!r}")
        raise NonServableOpError(
            "the exported graph cannot run in TF Serving's model server:\n  "
            + "\n  ".join(lines)
            + "\nReplace the code that makes it with TensorFlow or tensorflow-text ops "
            "(no tf.py_function / tf.numpy_function, no custom op libraries), or build a "
            "model server that links the op's library.")


def _xla_compiled(functions):
    """Names of the functions XLA compiles: those marked ``_XlaMustCompile`` and
    every function they call."""
    compiled = [name for name, f in functions.items()
                if f.attr["_XlaMustCompile"].b]
    found = set()
    while compiled:
        name = compiled.pop()
        if name in found or name not in functions:
            continue
        found.add(name)
        for node in functions[name].node_def:
            if node.op in functions:
                compiled.append(node.op)
            for value in node.attr.values():
                if value.HasField("func"):
                    compiled.append(value.func.name)
                compiled += [f.name for f in value.list.func]
    return found


# === Warm-up, verification, models.config =====================================


def write_warmup_requests(saved_model_dir, requests):
    """``assets.extra/tf_serving_warmup_requests``: a TFRecord of PredictionLog
    protos, replayed by TF Serving when it loads the model."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = pathlib.Path(saved_model_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, inputs in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(signature_name=signature))
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def read_warmup_requests(saved_model_dir):
    """The warm-up requests as ``(signature, {input: numpy})`` pairs."""
    from tensorflow_serving.apis import prediction_log_pb2

    requests = []
    path = pathlib.Path(saved_model_dir) / WARMUP_FILE
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        request = log.predict_log.request
        requests.append((request.model_spec.signature_name or SERVING_DEFAULT,
                         {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}))
    return requests


def run_in_fresh_process(jobs, timeout=600):
    """Run ``jobs`` (``[(saved_model_dir, [(signature, inputs), ...])]``) in a new
    Python process as :mod:`kerasllm.serving_check` does; returns its report:
    ``{"outputs": [[{name: numpy}, ...] per job], "imported": [...], "signatures": ...}``."""
    import tempfile

    from kerasllm import serving_check

    with tempfile.TemporaryDirectory() as folder:
        request_file = os.path.join(folder, "requests.json")
        report_file = os.path.join(folder, "report.json")
        with open(request_file, "w") as handle:
            json.dump([{"path": str(path), "requests": [
                {"signature": signature,
                 "inputs": {k: serving_check.encode(v) for k, v in inputs.items()}}
                for signature, inputs in requests]} for path, requests in jobs], handle)
        # -P: the script's folder (kerasllm/) must not shadow other packages.
        done = subprocess.run(
            [sys.executable, "-P", serving_check.__file__, request_file, report_file],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode != 0:
            raise KerasLLMError(
                "the exported model failed to load or run in a fresh TensorFlow process "
                f"(exit {done.returncode}):\n{done.stderr[-4000:]}")
        with open(report_file) as handle:
            report = json.load(handle)
    report["outputs"] = [[{k: serving_check.decode(v) for k, v in outputs.items()}
                          for outputs in job] for job in report["outputs"]]
    return report


def verify_in_fresh_process(saved_model_dir, module, tolerance=1e-5):
    """Replay the warm-up requests in a fresh process (TF Serving's loader, no
    keras, keras-hub, kerasllm or tensorflow_text Python) and compare every
    output with the same signature run here."""
    requests = module.warmup_requests()
    report = run_in_fresh_process([(saved_model_dir, requests)])
    if report["imported"]:
        raise KerasLLMError(f"serving the model imported {report['imported']}")
    for (signature, inputs), got in zip(requests, report["outputs"][0]):
        expected = module.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
        for key, value in expected.items():
            value = value.numpy()
            if value.dtype.kind in "fc":
                close = np.allclose(got[key], value, rtol=0, atol=tolerance, equal_nan=True)
            else:
                close = np.array_equal(got[key], value)
            if not close:
                raise KerasLLMError(
                    f"the reloaded SavedModel's {signature} output {key!r} differs from the "
                    f"model's: {got[key]!r} != {value!r}")


def update_models_config(root, name, base_path=None):
    """Add ``name`` to ``ROOT/models.config`` (a ModelServerConfig text proto,
    TF Serving's ``--model_config_file``), keeping every other entry as it is;
    written atomically, under a lock against concurrent exports."""
    from google.protobuf import text_format

    root = pathlib.Path(root)
    path = root / MODELS_CONFIG
    model_base = f"{base_path.rstrip('/')}/{name}" if base_path else str((root / name).resolve())
    with open(root / ".models.config.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        config = read_models_config(root)
        entries = config.model_config_list.config
        entry = next((e for e in entries if e.name == name), None) or entries.add(name=name)
        entry.base_path = model_base
        entry.model_platform = "tensorflow"
        staging = path.with_name(f".{MODELS_CONFIG}.{uuid.uuid4().hex}")
        staging.write_text(text_format.MessageToString(config))
        os.replace(staging, path)
    return path


def read_models_config(root):
    """``ROOT/models.config`` as a ModelServerConfig (empty if there is none)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    path = pathlib.Path(root) / MODELS_CONFIG
    config = model_server_config_pb2.ModelServerConfig()
    if path.exists():
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as error:
            raise KerasLLMError(f"{path} is not a valid TF Serving model config ({error}); "
                                "fix or delete it, then export again") from None
    return config
