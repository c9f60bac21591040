"""kerasllm: pretrain, fine-tune and serve Transformer language models with Keras 3.

The flow, top to bottom: ``config`` (validated dataclasses) → ``plugins``
(the registry filled through the ``kerasllm`` entry-point group) →
``builder`` (backbone + heads → a compiled ``keras.Model``) → ``training``
(``model.fit`` with checkpoints) → ``.keras`` saving → ``export`` (a SavedModel
for TF Serving).
"""

import importlib
import os

# Keras picks its backend at first import; kerasllm is TensorFlow-only.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Fewer TensorFlow C++ start-up notices; set the variable yourself to override.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kerasllm.config import Config, load_config  # noqa: E402
from kerasllm.errors import ConfigError, KerasLLMError, PluginError  # noqa: E402
from kerasllm.hookspecs import hookimpl  # noqa: E402

__version__ = "0.1.0"

# Loaded on first use, so that `import kerasllm` (the CLI, config checks) does not
# wait for TensorFlow.
_LAZY = {
    "Backbone": "kerasllm.backbone",
    "build_model": "kerasllm.builder",
    "load_model": "kerasllm.builder",
    "DataSource": "kerasllm.data",
    "export_savedmodel": "kerasllm.export",
    "from_hf": "kerasllm.hf",
    "from_keras_hub": "kerasllm.keras_hub_interop",
    "load_hf_tokenizer": "kerasllm.hf_tokenizer",
    "Head": "kerasllm.heads",
    "TokenPredictionHead": "kerasllm.heads",
    "KerasLLMModel": "kerasllm.model",
    "TokenizerFactory": "kerasllm.tokenizers",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kerasllm' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "KerasLLMError", "PluginError", "hookimpl",
           "load_config", *_LAZY]
