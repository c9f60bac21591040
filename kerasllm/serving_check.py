"""Load and call SavedModels the way TF Serving does, in a process of their own.

Run as a script (``python -P serving_check.py REQUESTS REPORT``), never imported
by the process it checks. Before importing TensorFlow it hides keras, keras-hub,
kerasllm, kerasllm's plugins and tensorflow_text's Python package, so that
anything the model needs from them fails here as it would in the model
server; tensorflow-text's op kernels are loaded from its shared libraries, which
the stock model server links. Each model is loaded into a session under the
``serve`` tag, and each request runs its signature's tensors by name, as TF
Serving's Predict does.

REQUESTS: JSON ``[{"path": ..., "requests": [{"signature": ..., "inputs":
{name: tensor}}]}]``; REPORT gets ``{"outputs": [[{name: tensor}, ...], ...],
"imported": [hidden modules that got imported], "signatures": [{name:
{"inputs": {...}, "outputs": {...}}}, ...]}``. A tensor is ``{"dtype", "shape",
"values"}``, strings base64-encoded (:func:`encode`, :func:`decode`).

This file imports nothing of kerasllm's: the exporter imports it only for
``encode``/``decode`` and its path.
"""

import base64
import glob
import importlib.abc
import importlib.util
import json
import os
import sys

import numpy as np

HIDDEN = ("keras", "keras_hub", "keras_nlp", "kerasllm", "kerasllm_plugins", "tensorflow_text",
          "tf_keras")


def encode(value):
    value = np.asarray(value)
    if value.dtype.kind in "OSU":
        flat = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in value.ravel()]
        return {"dtype": "string", "shape": list(value.shape),
                "values": [base64.b64encode(v).decode("ascii") for v in flat]}
    return {"dtype": value.dtype.name, "shape": list(value.shape), "values": value.ravel().tolist()}


def decode(tensor):
    if tensor["dtype"] == "string":
        values = np.array([base64.b64decode(v) for v in tensor["values"]], dtype=object)
        return values.reshape(tensor["shape"])
    return np.array(tensor["values"], dtype=tensor["dtype"]).reshape(tensor["shape"])


class _Hidden(importlib.abc.MetaPathFinder):
    """Wraps a finder so that the hidden packages look uninstalled."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


def main(request_file, report_file):
    text = importlib.util.find_spec("tensorflow_text")
    sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
    import tensorflow as tf

    if text is not None:
        folder = os.path.join(text.submodule_search_locations[0], "python", "ops")
        for library in sorted(glob.glob(os.path.join(folder, "*.so"))):
            tf.load_op_library(library)
    with open(request_file) as handle:
        jobs = json.load(handle)
    outputs, signatures = [], []
    for job in jobs:
        with tf.Graph().as_default(), tf.compat.v1.Session() as session:
            meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], job["path"])
            signatures.append({
                name: {"inputs": {k: v.name for k, v in sig.inputs.items()},
                       "outputs": {k: v.name for k, v in sig.outputs.items()}}
                for name, sig in meta_graph.signature_def.items()})
            results = []
            for request in job["requests"]:
                signature = meta_graph.signature_def[request["signature"]]
                feed = {signature.inputs[name].name: decode(tensor)
                        for name, tensor in request["inputs"].items()}
                fetched = session.run({k: v.name for k, v in signature.outputs.items()}, feed)
                results.append({k: encode(v) for k, v in fetched.items()})
            outputs.append(results)
    imported = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
    with open(report_file, "w") as handle:
        json.dump({"outputs": outputs, "imported": imported, "signatures": signatures}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:3])
