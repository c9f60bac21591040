"""Export a model as a SavedModel that stock TF Serving loads: text in, answers out.

model → ``ServingModule`` (tokenizer, backbone and heads traced into
``tf.function`` signatures; each head says how it serves itself through its
``serving_*`` methods, :class:`kerasllm.Head`) → ``tf.saved_model.save`` into a
staging folder → op audit (only TensorFlow core and tensorflow-text ops) →
warm-up requests → verification in a fresh process that cannot import keras,
keras-hub, kerasllm or tensorflow_text's Python package
(:mod:`kerasllm.serving_check`) → renamed to ``ROOT/NAME/VERSION`` in one step
→ ``ROOT/models.config`` lists the model.

Signatures:

- ``serving_default``: raw UTF-8 strings in (the heads' ``serving_inputs``),
  tokenization and packing in the graph, each serving head's named outputs;
  encoders without a task head give ``embedding``; a generative model without
  a serving head generates (``prompts`` in).
- ``serve_token_ids``: ``token_ids`` and ``padding_mask`` (and ``segment_ids``)
  in, the outputs that need no text; core TensorFlow ops only.
- ``generate`` (decoders, encoder–decoders): ``prompts`` and per-row
  ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``; KV-cached
  decoding in an XLA-compiled while loop.
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

SERVING_DEFAULT = "serving_default"
SERVE_TOKEN_IDS = "serve_token_ids"
GENERATE = "generate"
MODELS_CONFIG = "models.config"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
XLA_MODES = ("generate", "all", "none")
# Ops that exist in TensorFlow but call back into the Python interpreter, which
# a model server does not have.
PYTHON_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class NonServableOpError(KerasLLMError):
    """The exported graph holds an op that TF Serving's model server does not have."""


def export_savedmodel(model, name, root="savedmodels", *, base_path=None, xla="generate",
                      max_new_tokens=32, verify=True):
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
            generate for a generative model without a serving head.
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
        module = ServingModule(model, name, xla=xla, max_new_tokens=max_new_tokens)
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


# === The signatures ===========================================================


class ServingModule(tf.Module):
    """The tf.Module written as the SavedModel: the model's variables, the
    tokenizer's lookup tables and one ``tf.function`` per signature."""

    def __init__(self, model, name, xla="generate", max_new_tokens=32):
        super().__init__(name="kerasllm_serving")
        from kerasllm import generation
        from kerasllm.heads import TokenPredictionHead

        # Not tracked as a Keras object: only its variables and tables are saved.
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_model_name", name)
        self._xla = xla
        self._max_new_tokens = max_new_tokens
        self.model_variables = [variable.value for variable in model.variables]
        self.tables = _resources([model.tokenizer, *model.heads])
        backbone = model.backbone
        self._serving_heads = [head for head in model.heads if head.serving_inputs()]
        # Generation is served where it is what the model learnt: a language-model
        # head, or none (an imported base checkpoint), not a fine-tuned classifier.
        self._generative = backbone.kind != "encoder" and _can_generate(model, generation) and (
            not model.heads or any(isinstance(head, TokenPredictionHead)
                                   for head in model.heads))
        self._embeds = backbone.kind == "encoder" and not (
            set(self._serving_heads) - set(model.objectives))
        if not (self._serving_heads or self._generative or self._embeds):
            raise KerasLLMError(
                "this model has nothing to serve: no head serves text and it can neither "
                "embed (an encoder) nor generate")
        self._signatures = {}
        self._text_specs = {}
        if self._serving_heads or self._embeds:
            specs = {"text": tf.TensorSpec([None], tf.string)} if self._embeds else {}
            for head in self._serving_heads:
                specs.update(head.serving_inputs())
            self._text_specs = specs
            self._add(SERVING_DEFAULT, self._serve_text, specs)
            self._add(SERVE_TOKEN_IDS, self._serve_token_ids, self._token_specs())
        if self._generative:
            generate_specs = {
                "prompts": tf.TensorSpec([None], tf.string),
                "max_new_tokens": tf.TensorSpec([None], tf.int32),
                "temperature": tf.TensorSpec([None], tf.float32),
                "top_k": tf.TensorSpec([None], tf.int32),
                "top_p": tf.TensorSpec([None], tf.float32),
                "seed": tf.TensorSpec([None], tf.int64),
            }
            self._add(GENERATE, self._generate, generate_specs)
            if SERVING_DEFAULT not in self._signatures:
                self._add(SERVING_DEFAULT, self._generate_defaults,
                          {"prompts": tf.TensorSpec([None], tf.string)})
                self._add(SERVE_TOKEN_IDS, self._generate_from_ids, self._token_specs())

    # --- Building ---

    def _token_specs(self):
        keys = ["token_ids", "padding_mask"]
        if "segment_ids" in self._model.backbone.input_keys:
            keys.append("segment_ids")
        return {key: tf.TensorSpec([None, None], tf.int32) for key in keys}

    def _add(self, signature, body, specs):
        specs = {key: tf.TensorSpec(spec.shape, spec.dtype, name=key)
                 for key, spec in specs.items()}
        function = tf.function(lambda **inputs: body(inputs), autograph=False)
        generating = body in (self._generate, self._generate_defaults, self._generate_from_ids)
        with _attention_mode(self._xla == "all" or (generating and self._xla == "generate")):
            concrete = function.get_concrete_function(**specs)
        self._signatures[signature] = concrete
        setattr(self, signature, function)

    @property
    def signatures(self):
        return dict(self._signatures)

    def save(self, path):
        tf.saved_model.save(self, str(path), signatures=self.signatures)

    # --- Signature bodies (traced once, in _add) ---

    def _serve_text(self, inputs):
        model = self._model
        inputs = {key: clean_strings(value) if value.dtype == tf.string else value
                  for key, value in inputs.items()}
        sequence_length = model.config.data.sequence_length
        outputs = {}
        for head in self._serving_heads:
            head_inputs = {key: inputs[key] for key in head.serving_inputs()}
            rows = head.serving_rows(head_inputs, model.tokenizer, sequence_length)
            outputs[head.name] = head.serving_outputs(self._forward(head, rows), rows,
                                                      head_inputs)
        if self._embeds:
            from kerasllm.task_inputs import pack_texts

            rows = pack_texts({"text": inputs["text"]}, model.tokenizer, sequence_length)
            outputs[None] = {"embedding": self._embedding(rows)}
        return _named(outputs)

    def _serve_token_ids(self, inputs):
        rows = dict(inputs)
        if "segment_ids" not in rows:
            rows["segment_ids"] = tf.zeros_like(rows["token_ids"])
        outputs = {}
        for head in self._serving_heads:
            head_rows = head.serving_token_rows(dict(rows))
            outputs[head.name] = head.serving_outputs(self._forward(head, head_rows),
                                                      head_rows, None)
        if self._embeds:
            outputs[None] = {"embedding": self._embedding(rows)}
        return _named(outputs)

    def _forward(self, head, rows):
        model = self._model
        inputs = {key: rows[key] for key in model.input_keys_of([head])}
        inputs = head.transform_inputs(inputs, training=False)
        backbone_outputs = model.backbone(
            {key: inputs[key] for key in model.backbone.input_keys}, training=False)
        return head(backbone_outputs, inputs, training=False)

    def _embedding(self, rows):
        """The pooler's output where there is one, else the mean of the final
        hidden states over the real tokens."""
        backbone = self._model.backbone
        outputs = backbone({key: rows[key] for key in backbone.input_keys}, training=False)
        if "pooled_output" in outputs:
            return tf.cast(outputs["pooled_output"], tf.float32)
        mask = tf.cast(rows["padding_mask"] > 0, tf.float32)[..., None]
        hidden = tf.cast(outputs["sequence_output"], tf.float32)
        return tf.reduce_sum(hidden * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1)

    def _generate(self, inputs):
        from kerasllm import generation

        prompts = clean_strings(inputs["prompts"])
        prompt_ids = generation.graph_prompt_ids(self._model, prompts, inputs["max_new_tokens"])
        return generation.graph_generate(
            self._model, prompt_ids, inputs["max_new_tokens"], inputs["temperature"],
            inputs["top_k"], inputs["top_p"], inputs["seed"],
            jit_compile=self._xla != "none")

    def _defaults(self, batch_size):
        return {"max_new_tokens": tf.fill([batch_size], self._max_new_tokens),
                "temperature": tf.zeros([batch_size]),
                "top_k": tf.zeros([batch_size], tf.int32),
                "top_p": tf.ones([batch_size]),
                "seed": tf.zeros([batch_size], tf.int64)}

    def _generate_defaults(self, inputs):
        return self._generate({**self._defaults(tf.shape(inputs["prompts"])[0]), **inputs})

    def _generate_from_ids(self, inputs):
        from kerasllm import generation

        prompt_ids = tf.RaggedTensor.from_tensor(
            inputs["token_ids"], lengths=tf.reduce_sum(
                tf.cast(inputs["padding_mask"] > 0, tf.int32), axis=1))
        parameters = self._defaults(tf.shape(inputs["token_ids"])[0])
        outputs = generation.graph_generate(
            self._model, prompt_ids, parameters["max_new_tokens"], parameters["temperature"],
            parameters["top_k"], parameters["top_p"], parameters["seed"],
            jit_compile=self._xla != "none")
        return {"token_ids": outputs["token_ids"]}

    # --- Warm-up and verification inputs ---

    def warmup_requests(self):
        """``(signature, inputs)`` pairs, numpy inputs, for every signature at
        batch sizes 1 and 3: what TF Serving replays before it serves."""
        if getattr(self, "_warmups", None) is None:
            from kerasllm.task_inputs import pack_texts

            model = self._model
            # Token ids as the text signature would make them, from the same texts.
            rows = tf.function(lambda text: pack_texts(
                {"text": text}, model.tokenizer, 16))(tf.constant(WARMUP_TEXTS))
            rows = {key: value.numpy().astype("int32") for key, value in rows.items()}
            requests = []
            for signature, concrete in self._signatures.items():
                specs = concrete.structured_input_signature[1]
                for batch_size in (1, 3):
                    requests.append((signature, {key: _sample(key, spec, batch_size, rows)
                                                 for key, spec in specs.items()}))
            self._warmups = requests
        return self._warmups


# Texts of every kind a client may send: plain, empty, accents and emoji with an
# invalid byte.
WARMUP_TEXTS = [b"Warm-up request: the quick brown fox jumps over the lazy dog.", b"",
                "Unicode \u00e9t\u00e9 \U0001F600 and a bad byte: ".encode() + b"\xff"]
WARMUP_PARAMETERS = {"max_new_tokens": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                     "seed": 0}


def _sample(key, spec, batch_size, rows):
    """A warm-up value for input ``key``: texts, token rows, or generation settings."""
    if spec.dtype == tf.string:
        shape = [batch_size] + [dim or 2 for dim in spec.shape[1:]]
        count = int(np.prod(shape))
        texts = [WARMUP_TEXTS[i % len(WARMUP_TEXTS)] for i in range(count)]
        return np.array(texts, dtype=object).reshape(shape)
    if key in rows:
        return rows[key][:batch_size]
    return np.full([batch_size], WARMUP_PARAMETERS.get(key, 0), spec.dtype.as_numpy_dtype)


def _can_generate(model, generation):
    try:
        generation.can_generate(model)
    except ValueError:
        return False
    return True


def _attention_mode(compiled):
    import contextlib

    from kerasllm.layers import without_xla

    return contextlib.nullcontext() if compiled else without_xla()


def _named(outputs):
    """One output dict: a single head's names as they are, several heads'
    prefixed by the head's name; ``embedding`` (key None) unprefixed."""
    heads = [name for name in outputs if name is not None]
    named = {}
    for head, values in outputs.items():
        for key, value in values.items():
            named[f"{head}_{key}" if head is not None and len(heads) > 1 else key] = value
    return named


def clean_strings(texts):
    """Invalid UTF-8 bytes → U+FFFD, so that no tokenizer fails on them."""
    return tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace",
                                        replacement_char=0xFFFD)


def _resources(roots, depth=6):
    """The lookup tables and other TensorFlow resources the tokenizer and heads
    hold, also those out of TensorFlow's tracking (keras-hub's BPE cache lives
    in a plain Python object): a SavedModel must own every resource its
    functions capture."""
    found, seen = [], set()

    def walk(value, level):
        if id(value) in seen or level > depth or isinstance(
                value, (str, bytes, int, float, bool, type(None), np.ndarray, tf.Tensor)):
            return
        seen.add(id(value))
        if isinstance(value, tf.saved_model.experimental.TrackableResource):
            found.append(value)
            return
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, (list, tuple, set)):
            children = list(value)
        else:
            children = list(getattr(value, "__dict__", {}).values())
        for child in children:
            walk(child, level + 1)

    for root in roots:
        walk(root, 0)
    return found


def signature_summary(saved_model_dir):
    """The signatures of a SavedModel, one line per input and output:
    ``name dtype shape`` (-1: any size), as ``saved_model_cli show`` lists them."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((pathlib.Path(saved_model_dir) / "saved_model.pb").read_bytes())
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
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((pathlib.Path(saved_model_dir) / "saved_model.pb").read_bytes())
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
                close = np.allclose(got[key], value, rtol=0, atol=tolerance)
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
