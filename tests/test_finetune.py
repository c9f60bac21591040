"""`kerasllm finetune` and `kerasllm evaluate`: from a pretrained kerasllm model,
through the CLI, to task metrics on held-out data, printed and written as JSON."""

import json

import numpy as np
import pytest
import yaml

import kerasllm
from conftest import tiny_config
from kerasllm.cli import main
from kerasllm_plugins.builtin import pydoc_topics, stdlib_docstrings


def paragraphs(documents, limit):
    found = [" ".join(p.split()) for d in documents for p in d.split("\n\n")
             if len(p.split()) >= 8]
    return found[:limit]


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    reference, library = paragraphs(pydoc_topics(), 400), paragraphs(stdlib_docstrings(), 400)
    rows = [{"body": text, "source": "reference"} for text in reference] + \
        [{"body": text, "source": "library"} for text in library]
    order = np.random.default_rng(0).permutation(len(rows))
    path = tmp_path_factory.mktemp("data") / "labelled.jsonl"
    path.write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    return path


@pytest.fixture(scope="module")
def pretrained(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained") / "model.keras"
    kerasllm.build_model(tiny_config(), tokenizer).save(path)
    return path


def finetune_config(tmp_path, labelled_file, **training):
    return tiny_config(
        objectives=[],
        head={"name": "classification"},
        data={"source": "jsonl", "heldout_fraction": 0.2, "eval_batches": 4, "batch_size": 16,
              "options": {"paths": str(labelled_file), "text_field": "body",
                          "label_field": "source"}},
        training={"steps": 120, "steps_per_epoch": 40, "checkpoint_every": 40,
                  "output": str(tmp_path / "run"), **training})


def write(tmp_path, config):
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_finetune_from_a_pretrained_model_then_evaluate(tmp_path, labelled_file, pretrained,
                                                         capsys):
    config = finetune_config(tmp_path, labelled_file, initialize_from=str(pretrained))
    assert main(["finetune", str(write(tmp_path, config))]) == 0
    printed = capsys.readouterr().out
    assert f"Initialized the backbone from {pretrained}" in printed
    assert "Parameters: " in printed and "trainable of" in printed
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["classification_accuracy"] > 0.75, written
    for name in ("classification_macro_f1", "classification_matthews_corrcoef"):
        assert f"{name}" in printed
        assert 0 < written[name] <= 1

    model = kerasllm.load_model(tmp_path / "run")
    source = kerasllm.load_model(pretrained)
    # Fine-tuning started from the pretrained weights and moved them, and kept the
    # vocabulary.
    assert model.tokenizer.get_vocabulary() == source.tokenizer.get_vocabulary()
    before = {weight.path: weight.numpy() for weight in source.backbone.weights}
    moved = [not np.array_equal(weight.numpy(), before[weight.path])
             for weight in model.backbone.weights]
    assert sum(moved) > len(moved) / 2
    # The label vocabulary, built from the training data, is saved with the model.
    assert model.config.head.options == {"labels": ["library", "reference"]}
    assert model.predict(paragraphs(pydoc_topics(), 3))[0]["label"] in ("library", "reference")

    capsys.readouterr()
    output = tmp_path / "evaluation.json"
    assert main(["evaluate", str(write(tmp_path, config)), "--json", str(output)]) == 0
    evaluated = json.loads(output.read_text())
    for name, value in written.items():
        assert evaluated[name] == pytest.approx(value, abs=1e-6), name
    assert "classification_accuracy" in capsys.readouterr().out


def test_finetune_with_lora_saves_the_adapters(tmp_path, labelled_file, pretrained, capsys):
    config = finetune_config(tmp_path, labelled_file, initialize_from=str(pretrained),
                             steps=40)
    config["model"] = {"lora": {"rank": 4}}
    assert main(["finetune", str(write(tmp_path, config))]) == 0
    # Rank 4 on query and value of 2 blocks, 32 wide: 4 × 4 × (32 + 32); the
    # classifier: 32 × 2 + 2.
    assert "Parameters: 1,090 trainable of" in capsys.readouterr().out
    model = kerasllm.load_model(tmp_path / "run")
    adapters = np.load(tmp_path / "run" / "lora.weights.npz")
    stored = {name: adapters[name] for name in adapters.files
              if name.endswith(("/lora_a", "/lora_b"))}
    assert len(stored) == 8
    base = {weight.path: weight.numpy()
            for weight in kerasllm.load_model(pretrained).backbone.weights}
    for weight in model.backbone.weights:
        if weight.path in stored:
            np.testing.assert_array_equal(weight.numpy(), stored[weight.path])
            if weight.path.endswith("lora_b"):  # zero when made: it trained
                assert np.abs(weight.numpy()).max() > 0, weight.path
        else:  # the base weights are the pretrained ones, untouched
            np.testing.assert_array_equal(weight.numpy(), base[weight.path])


def test_finetune_resumes_from_its_checkpoints(tmp_path, labelled_file, capsys):
    config = write(tmp_path, finetune_config(tmp_path, labelled_file))
    assert main(["finetune", str(config), "--steps", "40"]) == 0
    assert main(["finetune", str(config), "--steps", "80"]) == 0
    assert "Resuming from step 40" in capsys.readouterr().out
    model = kerasllm.load_model(tmp_path / "run")
    assert int(model.optimizer.iterations.numpy()) == 80


def test_initialize_from_keeps_the_architecture(tmp_path, labelled_file, pretrained, capsys):
    config = finetune_config(tmp_path, labelled_file, initialize_from=str(pretrained))
    config["model"]["num_layers"] = 3
    assert main(["finetune", str(write(tmp_path, config))]) == 2
    assert ("model.num_layers is 3, but training.initialize_from's model has 2; fine-tuning "
            "keeps the architecture it starts from (only dropout, lora may change): remove "
            "model.num_layers") in capsys.readouterr().err


def test_initialize_from_takes_the_architecture_and_checks_the_rest_against_it(
        tmp_path, labelled_file, tokenizer, capsys):
    """No model section: the starting model's architecture (here 48 positions, 3
    blocks, dropout 0) is used, and the config's sequence length and freezing are
    checked against it, not against the defaults."""
    start = tmp_path / "start.keras"
    kerasllm.build_model(tiny_config(model={"max_sequence_length": 48, "num_layers": 3}),
                         tokenizer).save(start)
    config = finetune_config(tmp_path, labelled_file, initialize_from=str(start), steps=40,
                             freeze_layers=3)
    config["data"]["sequence_length"] = 40
    del config["model"]
    assert main(["finetune", str(write(tmp_path, config))]) == 0
    model = kerasllm.load_model(tmp_path / "run")
    assert (model.config.model.num_layers, model.config.model.max_sequence_length,
            model.config.model.dropout) == (3, 48, 0.0)
    config["data"]["sequence_length"] = 64
    assert main(["finetune", str(write(tmp_path, config)), "--output",
                 str(tmp_path / "other")]) == 2
    assert "data.sequence_length (64) exceeds model.max_sequence_length (48)" in \
        capsys.readouterr().err


def test_initialize_from_must_exist(tmp_path, labelled_file, capsys):
    config = finetune_config(tmp_path, labelled_file,
                             initialize_from=str(tmp_path / "missing"))
    assert main(["finetune", str(write(tmp_path, config))]) == 2
    assert "training.initialize_from: not found" in capsys.readouterr().err


def test_finetune_and_pretrain_refuse_each_others_configs(tmp_path, labelled_file, capsys):
    assert main(["finetune", str(write(tmp_path, tiny_config()))]) == 2
    assert "finetune needs a task `head` (or `heads`); this config has only `objectives`: " \
           "use `kerasllm pretrain`" in capsys.readouterr().err
    assert main(["pretrain", str(write(tmp_path, finetune_config(tmp_path, labelled_file)))]) == 2
    assert "pretrain needs `objectives`; this config has a task `head`: use `kerasllm " \
           "finetune`" in capsys.readouterr().err


def test_heads_reading_examples_differently_cannot_share_a_source(tokenizer):
    config = tiny_config(objectives=[], heads=[
        {"name": "classification", "options": {"num_classes": 2}},
        {"name": "token_classification", "options": {"labels": ["B-X", "I-X", "O"]}}])
    with pytest.raises(kerasllm.ConfigError, match=r"heads\[0\] and heads\[1\] read their "
                       "examples differently, so they cannot share a data source"):
        kerasllm.build_model(config, tokenizer)


def test_a_tokenizer_cannot_be_trained_on_examples_without_text(tmp_path, capsys):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"q": "Which?", "c": "This one.", "a": "This",
                                "s": 0}) + "\n")
    config = tiny_config(objectives=[], head={"name": "question_answering"}, data={
        "source": "jsonl", "options": {"paths": str(path), "fields": {
            "question": "q", "context": "c", "answer_text": "a", "answer_start": "s"}}},
        training={"output": str(tmp_path / "run")})
    assert main(["finetune", str(write(tmp_path, config))]) == 2
    assert ("kerasllm: error: training a tokenizer reads the examples' text, and these have "
            "none (they have: answer_start, answer_text, context, question); give tokenizer.vocabulary, or "
            "start from a model with training.initialize_from") in capsys.readouterr().err


def test_task_metrics_score_each_head_on_its_own_source(tokenizer):
    """Two task heads on two sources: each is scored on its own held-out examples
    (a head given the other's examples would lack its fields)."""
    import tensorflow as tf

    from kerasllm.jobs import _task_metrics

    config = tiny_config(objectives=[], heads=[
        {"name": "classification", "options": {"num_classes": 2},
         "data": {"source": "iterable", "options": {"items": [{"text": "a", "label": 0}]}}},
        {"name": "multiple_choice", "options": {"num_choices": 2},
         "data": {"source": "iterable", "options": {"items": [
             {"text": "a", "choices": ["b", "c"], "label": 1}]}}}])
    model = kerasllm.build_model(config, tokenizer)
    classified = tf.data.Dataset.from_tensor_slices(
        {"text": ["one text", "another"], "label": [0, 1]})
    chosen = tf.data.Dataset.from_tensor_slices(
        {"text": ["a question"] * 3, "choices": [["yes", "no"]] * 3, "label": [0, 1, 1]})
    task_heads = [[model.heads[0]], [model.heads[1]]]
    metrics = _task_metrics(model, task_heads, [(None, classified), (None, chosen)])
    assert set(metrics) == {"classification_accuracy", "classification_macro_f1",
                            "classification_matthews_corrcoef", "multiple_choice_accuracy"}
    assert metrics["multiple_choice_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_finetune_from_a_hugging_face_checkpoint(tmp_path, labelled_file, capsys):
    """A BERT checkpoint as transformers saves it: its architecture, vocabulary and
    weights are the fine-tuned model's starting point (frozen here, so still equal)."""
    import hf_models

    checkpoint = hf_models.save(hf_models.reference_model("bert-base"), tmp_path / "bert")
    words = "the of and to is in for be it on that with as by this are or not from".split()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocabulary = hf_models.SPECIAL_TOKENS + words + letters + [f"##{c}" for c in letters]
    (checkpoint / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    config = finetune_config(tmp_path, labelled_file, initialize_from=str(checkpoint),
                             steps=40, freeze_embeddings=True, freeze_layers=3)
    config["data"]["sequence_length"] = 24
    del config["model"]
    assert main(["finetune", str(write(tmp_path, config))]) == 0
    assert f"Initialized the backbone from {checkpoint}" in capsys.readouterr().out
    model = kerasllm.load_model(tmp_path / "run")
    imported = kerasllm.from_hf(checkpoint)
    assert (model.config.model.num_layers, model.config.model.hidden_dim) == (3, 60)
    assert model.tokenizer.get_vocabulary() == imported.tokenizer.get_vocabulary()
    imported_weights = {weight.path: weight.numpy() for weight in imported.backbone.weights}
    frozen = [weight for weight in model.backbone.weights if "pooler" not in weight.path]
    for weight in frozen:
        np.testing.assert_array_equal(weight.numpy(), imported_weights[weight.path])
