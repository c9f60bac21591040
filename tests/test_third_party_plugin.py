"""The example third-party plugin, plugins/kerasllm-bow, installed apart and used.

pip installs it into a folder of its own, and subprocesses see that folder
through PYTHONPATH: kerasllm finds the plugin through the ``kerasllm`` entry
point of its ``.dist-info``, as it finds any installed third-party plugin.
"""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import kerasllm

PLUGIN_SOURCE = pathlib.Path(__file__).parents[1] / "plugins" / "kerasllm-bow"

# Trains bow (listed first: it then sees unmasked tokens) with mlm on real text,
# evaluating on held-out documents before and after; prints one JSON line.
TRAIN_SCRIPT = """
import json

import keras
import keras_hub
import tensorflow as tf
from pydoc_data.topics import topics

import kerasllm
from kerasllm.data import build_dataset, split_heldout

documents = [topics[name] for name in sorted(topics)]
vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
    tf.data.Dataset.from_tensor_slices(documents).batch(64), 1000, lowercase=True,
    reserved_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"],
)
tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
keras.utils.set_random_seed(0)
model = kerasllm.build_model({
    "model": {"num_layers": 2, "num_heads": 2, "hidden_dim": 32, "intermediate_dim": 64,
              "max_sequence_length": 32, "dropout": 0.0},
    "data": {"sequence_length": 32, "batch_size": 8},
    "objectives": [{"name": "bow", "weight": 1.0}, {"name": "mlm"}],
    "training": {"steps": 100, "steps_per_epoch": 20, "checkpoint_every": 100,
                 "learning_rate": 0.002, "warmup_steps": 10},
}, tokenizer)
training, heldout = split_heldout(tf.data.Dataset.from_tensor_slices({"text": documents}), 0.1)
batches = build_dataset(model, training, batch_size=8, sequence_length=32,
                        shuffle_buffer=256, seed=0, repeat=True)
# Cached: both evaluations see the same mlm masks.
heldout_batches = build_dataset(model, heldout, batch_size=8, sequence_length=32).take(4).cache()
before = model.evaluate(heldout_batches, verbose=0, return_dict=True)
history = model.fit(batches, steps_per_epoch=20, epochs=5, verbose=0)
after = model.evaluate(heldout_batches, verbose=0, return_dict=True)
print(json.dumps({"fit_logs": history.history, "before": before, "after": after}))
"""

# Documents are 30 words drawn from one of two disjoint 50-word topics. Every
# word is equally frequent overall, so a head that ignores the sequence can do
# no better than the unigram prior; predicting the topic's words needs the
# first token to read the sequence.
TOPICS_SCRIPT = """
import json

import keras
import keras_hub
import numpy as np
import tensorflow as tf

import kerasllm
from kerasllm.data import build_dataset

words = [f"w{i}" for i in range(100)]
tokenizer = keras_hub.models.BertTokenizer(
    vocabulary=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", *words], lowercase=True)
rng = np.random.default_rng(0)

def examples(count):
    topics = [words[:50], words[50:]]
    texts = [" ".join(rng.choice(topics[i % 2], 30)) for i in range(count)]
    return tf.data.Dataset.from_tensor_slices({"text": texts})

keras.utils.set_random_seed(0)
model = kerasllm.build_model({
    "model": {"num_layers": 2, "num_heads": 2, "hidden_dim": 32, "intermediate_dim": 64,
              "max_sequence_length": 32, "dropout": 0.0},
    "data": {"sequence_length": 32, "batch_size": 8},
    "objectives": [{"name": "bow"}],
    "training": {"steps": 200, "steps_per_epoch": 50, "checkpoint_every": 200,
                 "learning_rate": 0.005, "warmup_steps": 10},
}, tokenizer)
batches = build_dataset(model, examples(512), batch_size=8, sequence_length=32,
                        shuffle_buffer=512, seed=0, repeat=True)
heldout_batches = build_dataset(model, examples(32), batch_size=8, sequence_length=32).cache()
model.fit(batches, steps_per_epoch=50, epochs=4, verbose=0)

# The best loss without reading the sequence: each id's training frequency.
frequency = np.mean([y["bow"]["present"].numpy() for _, y in batches.take(64)], axis=(0, 1))
frequency = np.clip(frequency, 1e-4, 1 - 1e-4)
present = np.concatenate([y["bow"]["present"].numpy() for _, y in heldout_batches])
prior_loss = -np.mean(present * np.log(frequency) + (1 - present) * np.log(1 - frequency))
after = model.evaluate(heldout_batches, verbose=0, return_dict=True)
print(json.dumps({"prior_loss": float(prior_loss), "bow_loss": after["bow_loss"]}))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder holding the plugin, installed by pip as a user would install it."""
    # pip builds a local project in place, writing build/ and *.egg-info next to
    # the sources: build from a copy to leave the checkout untouched.
    source = shutil.copytree(PLUGIN_SOURCE, tmp_path_factory.mktemp("source") / "kerasllm-bow")
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    return target


def run_python(args, site=None, timeout=300):
    """stdout of ``python args``; with ``site``, which sees the plugin installed there."""
    paths = [str(site)] if site else []
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def plugin_rows(site=None):
    output = run_python(["-m", "kerasllm.cli", "plugins", "list"], site)
    return [line.split() for line in output.splitlines()]


def test_plugins_list_shows_the_installed_plugin(site):
    rows = plugin_rows(site)
    assert ["bow", "objective", "kerasllm-bow", "0.1.0", "ok"] in rows
    mlm = next(row for row in rows if row[0] == "mlm")
    assert mlm[1:3] == ["objective", "kerasllm"] and mlm[-1] == "ok"

    assert "bow" not in [row[0] for row in plugin_rows()]


def test_trains_with_mlm_and_improves_on_heldout_text(site, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    result = json.loads(run_python([str(script)], site).splitlines()[-1])
    before, after = result["before"], result["after"]

    assert {"bow_loss", "bow_auc", "mlm_loss"} <= set(result["fit_logs"])
    # Measured: bow_loss 0.694 -> 0.109, bow_auc 0.54 -> 0.81 after these 100 steps.
    assert after["bow_loss"] < before["bow_loss"] - 0.3
    assert after["bow_auc"] > before["bow_auc"] + 0.1


def test_first_token_learns_which_words_the_sequence_holds(site, tmp_path):
    script = tmp_path / "topics.py"
    script.write_text(TOPICS_SCRIPT)
    result = json.loads(run_python([str(script)], site).splitlines()[-1])
    # Measured: 0.332 against the prior's 0.510; knowing the topic exactly gives 0.327.
    assert result["bow_loss"] < result["prior_loss"] - 0.1


def load_installed_module(site):
    # Loaded by path, not through sys.path, so the plugin stays invisible to
    # this process's plugin registry and to the other tests.
    spec = importlib.util.spec_from_file_location("kerasllm_bow", site / "kerasllm_bow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bow_head(site, tokenizer, **options):
    backbone = kerasllm.Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, num_heads=2,
        hidden_dim=8, intermediate_dim=16, max_sequence_length=16,
    )
    return load_installed_module(site).BagOfWords(backbone, tokenizer, name="bow", **options)


def test_targets_mark_the_ids_at_real_positions_except_special_tokens(site, tokenizer):
    head = bow_head(site, tokenizer)
    vocabulary_size = tokenizer.vocabulary_size()
    special = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
               tokenizer.mask_token_id]
    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, vocabulary_size, (4, 16)).astype("int32")
    token_ids[:, :4] = special  # real positions that must not count
    padding_mask = (np.arange(16) < np.array([[16], [12], [7], [4]])).astype("int32")

    features = {"token_ids": token_ids, "padding_mask": padding_mask}
    prepared, targets = head.prepare(features, tf.constant([0, 0]))

    expected = np.zeros((4, vocabulary_size), "float32")
    for row, (ids, mask) in enumerate(zip(token_ids, padding_mask)):
        expected[row, [i for i, real in zip(ids, mask) if real and i not in special]] = 1
    np.testing.assert_array_equal(targets["present"].numpy(), expected)
    assert expected[3].sum() == 0  # a row of special tokens only: nothing to predict
    np.testing.assert_array_equal(prepared["token_ids"], token_ids)  # left for later heads


def test_rejects_a_non_positive_positive_weight(site, tokenizer):
    with pytest.raises(ValueError, match="positive_weight"):
        bow_head(site, tokenizer, positive_weight=0.0)
