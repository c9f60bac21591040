"""Checks every head plugin gets: it trains, its loss falls, it logs, it saves."""

import keras
import numpy as np

import kerasllm
from kerasllm.data import build_dataset, split_heldout


def run_head_test(config, tokenizer, examples, steps=60, min_improvement=0.5):
    """Build, train and round-trip a model; return (model, held-out before, after).

    Asserts that fit logs the total loss and each head's ``<name>_loss``, that the
    held-out loss of every head falls by ``min_improvement`` (nats), and that the
    model reloads from ``.keras`` in safe mode with identical outputs.
    """
    keras.utils.set_random_seed(0)
    model = kerasllm.build_model(config, tokenizer)
    data = model.config.data
    training, heldout = split_heldout(examples, 0.1)
    batches = build_dataset(model, training, data.batch_size, data.sequence_length,
                            shuffle_buffer=512, seed=0, repeat=True)
    eval_batches = build_dataset(model, heldout, data.batch_size,
                                 data.sequence_length).take(4).cache()
    before = model.evaluate(eval_batches, verbose=0, return_dict=True)
    history = model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    after = model.evaluate(eval_batches, verbose=0, return_dict=True)
    names = [head.name for head in model.heads]
    assert set(history.history) >= {"loss", *(f"{name}_loss" for name in names)}
    for name in names:
        assert after[f"{name}_loss"] < before[f"{name}_loss"] - min_improvement, (before, after)

    x, _ = next(iter(eval_batches))
    return model, before, after, x


def assert_keras_round_trip(model, x, tmp_path):
    model.save(tmp_path / "model.keras")
    restored = kerasllm.load_model(tmp_path / "model.keras")
    assert restored.config == model.config
    expected, got = model(x), restored(x)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert restored.tokenizer.get_vocabulary() == model.tokenizer.get_vocabulary()
    return restored


def serve_in_fresh_process(model, tmp_path, requests, name="model", **export_options):
    """Export ``model`` and call it as TF Serving would, in a fresh process.

    Replays the export's warm-up requests, then runs ``requests``, ``[(signature,
    {input: array})]``, in one process that cannot import keras, keras-hub,
    kerasllm or tensorflow_text's Python package. Returns ``(version_dir,
    outputs)``, one dict of numpy outputs per request.
    """
    from kerasllm.export import export_savedmodel, read_warmup_requests, run_in_fresh_process

    path = export_savedmodel(model, name, root=tmp_path / "savedmodels", verify=False,
                             **export_options)
    warmups = read_warmup_requests(path)
    report = run_in_fresh_process([(path, warmups + list(requests))])
    assert report["imported"] == []
    return path, report["outputs"][0][len(warmups):]
