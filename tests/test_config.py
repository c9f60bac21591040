"""Config validation (``load_config``) and the builder's plugin and option checks.

Every user mistake must raise ``ConfigError`` or ``PluginError`` whose message
names the key and says what is allowed.
"""

import re

import pytest
import tensorflow as tf
import yaml
from conftest import SPECIAL_TOKENS, tiny_config

import kerasllm
from kerasllm.builder import build_data_source
from kerasllm.config import BUILTIN_CONFIGS


def config_error(config):
    """The message of the ConfigError that ``load_config(config)`` raises."""
    with pytest.raises(kerasllm.ConfigError) as error:
        kerasllm.load_config(config)
    return str(error.value)


def head_config(**head):
    """A tiny fine-tuning config: a task head instead of objectives."""
    config = tiny_config(head=head)
    del config["objectives"]
    return config


# --- Keys and types -----------------------------------------------------------------


def test_tiny_config_is_valid():
    config = kerasllm.load_config(tiny_config())
    assert isinstance(config, kerasllm.Config)
    assert config.model.hidden_dim == 32
    assert [objective.name for objective in config.objectives] == ["mlm"]
    assert config.training.learning_rate == 0.002


def test_unknown_top_level_key_lists_the_sections():
    message = config_error({**tiny_config(), "trainig": {"steps": 10}})
    assert message == ("unknown config key 'trainig'; allowed: data, head, heads, model, "
                       "objectives, tokenizer, training")


def test_unknown_nested_key_names_the_full_key_and_lists_allowed():
    message = config_error(tiny_config(training={"stepz": 10}))
    assert message.startswith("unknown config key 'training.stepz'; allowed: ")
    allowed = message.split("allowed: ")[1].split(", ")
    assert allowed == sorted(allowed)
    assert {"steps", "steps_per_epoch", "checkpoint_every", "learning_rate"} <= set(allowed)


def test_unknown_key_inside_an_objective():
    message = config_error(tiny_config(objectives=[{"name": "mlm", "option": {}}]))
    assert message == "unknown config key 'objectives[0].option'; allowed: data, name, options, weight"


@pytest.mark.parametrize("section, key, value, expected", [
    ("model", "num_layers", "two", "model.num_layers must be int, got 'two'"),
    ("model", "num_layers", 2.0, "model.num_layers must be int, got 2.0"),
    ("model", "num_layers", True, "model.num_layers must be int, got True"),
    ("model", "dropout", "a lot", "model.dropout must be float, got 'a lot'"),
    ("model", "pooler", "yes", "model.pooler must be bool, got 'yes'"),
    ("model", "norm_first", 1, "model.norm_first must be bool, got 1"),
    ("tokenizer", "vocabulary", 5, "tokenizer.vocabulary must be str, got 5"),
    ("data", "options", ["a.txt"], "data.options must be a mapping, got ['a.txt']"),
])
def test_wrong_type_names_key_type_and_value(section, key, value, expected):
    assert config_error(tiny_config(**{section: {key: value}})) == expected


def test_int_is_accepted_for_a_float():
    config = kerasllm.load_config(tiny_config(training={"clipnorm": 2}))
    assert config.training.clipnorm == 2.0
    assert isinstance(config.training.clipnorm, float)


def test_section_that_is_not_a_mapping():
    assert config_error(tiny_config(model=None)) == "model must be a mapping, got None"
    assert config_error(tiny_config(objectives="mlm")) == "objectives must be a list, got 'mlm'"
    assert config_error(tiny_config(objectives=["mlm"])) == (
        "objectives[0] must be a mapping, got 'mlm'")
    assert config_error([tiny_config()]) == "a config must be a mapping, got list"


@pytest.mark.parametrize("key, value, allowed", [
    ("kind", "rnn", "encoder, decoder, encoder_decoder"),
    ("activation", "swish", "gelu, gelu_approximate, relu, silu"),
    ("position_embedding", "alibi", "learned, rotary, relative"),
])
def test_literal_lists_allowed_values(key, value, allowed):
    assert config_error(tiny_config(model={key: value})) == (
        f"model.{key} must be one of {allowed}; got {value!r}")


@pytest.mark.parametrize("value", [1, 0, "true"])
def test_jit_compile_takes_auto_or_a_boolean(value):
    """1 == True in Python, but a config that says 1 is told what it may say."""
    assert config_error(tiny_config(training={"jit_compile": value})) == (
        f"training.jit_compile must be one of auto, True, False; got {value!r}")
    assert kerasllm.load_config(tiny_config(training={"jit_compile": True})
                                ).training.jit_compile is True


def test_objective_without_a_name():
    message = config_error(tiny_config(objectives=[{"weight": 1.0}]))
    assert message == "objectives[0].name is required"


# --- Ranges and consistency -------------------------------------------------------------


@pytest.mark.parametrize("sections, expected", [
    ({"training": {"steps": 0}}, "training.steps must be > 0, got 0"),
    ({"training": {"learning_rate": -0.1}}, "training.learning_rate must be > 0, got -0.1"),
    ({"training": {"warmup_steps": -1}}, "training.warmup_steps must be >= 0, got -1"),
    ({"model": {"dropout": 1.5}}, "model.dropout must be in [0, 1), got 1.5"),
    ({"model": {"num_heads": 0}}, "model.num_heads must be > 0, got 0"),
    ({"model": {"num_segments": -1}}, "model.num_segments must be >= 0, got -1"),
    ({"data": {"batch_size": 0}}, "data.batch_size must be > 0, got 0"),
    ({"data": {"heldout_fraction": 1}},
     "data.heldout_fraction must be between 0 and 1 (exclusive), got 1.0"),
    ({"tokenizer": {"vocabulary_size": 0}}, "tokenizer.vocabulary_size must be > 0, got 0"),
    ({"objectives": [{"name": "mlm", "weight": -1}]},
     "objectives[0].weight must be >= 0.0, got -1.0"),
])
def test_out_of_range_names_key_bound_and_value(sections, expected):
    assert config_error(tiny_config(**sections)) == expected


def test_hidden_dim_must_be_divisible_by_num_heads():
    assert config_error(tiny_config(model={"hidden_dim": 30, "num_heads": 4})) == (
        "model.hidden_dim (30) must be divisible by model.num_heads (4), or give model.head_dim")


def test_objectives_and_a_task_head_need_their_own_data_sources():
    message = config_error(head_config(name="classification", options={"num_classes": 2}) | {
        "objectives": [{"name": "mlm"}]})
    assert message.startswith("objectives and task heads cannot share a data source")
    kerasllm.load_config(head_config(name="classification", options={"num_classes": 2},
                            data={"source": "jsonl", "options": {"paths": "x.jsonl"}})
                | {"objectives": [{"name": "mlm"}]})


def test_head_and_heads_are_exclusive():
    message = config_error(head_config(name="classification") | {
        "heads": [{"name": "other"}]})
    assert message == "give one task head as `head` or several as `heads`, not both"


@pytest.mark.parametrize("config", [
    tiny_config(objectives=[]),
    {key: value for key, value in tiny_config().items() if key != "objectives"},
])
def test_pretraining_needs_objectives(config, tmp_path):
    from kerasllm.jobs import pretrain

    with pytest.raises(kerasllm.ConfigError, match="pretrain needs `objectives`"):
        pretrain(config, output=str(tmp_path))


def test_objective_listed_twice():
    assert config_error(tiny_config(objectives=[{"name": "mlm"}, {"name": "mlm"}])) == (
        "'mlm' appears twice in objectives and heads; each objective or head may be used once")


def test_sequence_length_beyond_max_sequence_length():
    assert config_error(tiny_config(data={"sequence_length": 64})) == (
        "data.sequence_length (64) exceeds model.max_sequence_length (32)")


def test_steps_must_be_a_multiple_of_steps_per_epoch():
    assert config_error(tiny_config(training={"steps": 105})) == (
        "training.steps (105) must be a multiple of training.steps_per_epoch (10)")


def test_checkpoint_every_must_be_a_multiple_of_steps_per_epoch():
    message = config_error(tiny_config(training={"checkpoint_every": 15}))
    assert message.startswith(
        "training.checkpoint_every (15) must be a multiple of training.steps_per_epoch (10)")
    assert "epoch ends" in message  # and says why


# --- Files and built-in configs --------------------------------------------------------


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    from_file = kerasllm.load_config(path)
    assert from_file == kerasllm.load_config(tiny_config())
    assert kerasllm.load_config(str(path)) == from_file
    assert kerasllm.load_config(from_file) == from_file  # a Config is accepted too
    assert kerasllm.load_config(from_file.to_dict()) == from_file


def test_builtin_quickstart_config_loads():
    assert "quickstart" in BUILTIN_CONFIGS
    config = kerasllm.load_config("quickstart")
    assert [objective.name for objective in config.objectives] == ["mlm"]
    assert config.head is None
    assert config.model.kind == "encoder"
    assert config.data.source == "builtin"


def test_missing_file_lists_builtin_configs(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = config_error(missing)
    assert message == (f"config file not found: {missing}; give a YAML file or a built-in "
                       f"config ({', '.join(BUILTIN_CONFIGS)})")
    assert "quickstart" in message


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  kind: [encoder\n")
    message = config_error(path)
    assert message.startswith(f"{path} is not valid YAML: ")
    assert "line 2, column 9" in message  # where the unclosed list starts


def test_yaml_errors_in_a_file_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_config(training={"stepz": 10})))
    assert config_error(path).startswith("unknown config key 'training.stepz'; allowed: ")


# --- Builder: plugins and their options --------------------------------------------------


def build_error(config, tokenizer, error_type=kerasllm.ConfigError):
    with pytest.raises(error_type) as error:
        kerasllm.build_model(config, tokenizer)
    return str(error.value)


def test_tiny_config_builds(tokenizer):
    model = kerasllm.build_model(tiny_config(), tokenizer)
    assert [head.name for head in model.heads] == ["mlm"]


def test_unknown_objective_lists_known_objectives(tokenizer):
    message = build_error(tiny_config(objectives=[{"name": "mlmm"}]), tokenizer,
                          kerasllm.PluginError)
    assert re.match(r"unknown objective 'mlmm' in objectives\[0\]\.name; known: .*\bclm, .*\bmlm\b",
                    message), message


def test_objective_name_used_as_a_task_head(tokenizer):
    message = build_error(head_config(name="mlm"), tokenizer, kerasllm.PluginError)
    assert message.startswith("unknown task head 'mlm' in head.name; known: ")
    assert "classification" in message


def test_unknown_objective_option_lists_allowed_options(tokenizer):
    message = build_error(tiny_config(objectives=[{"name": "mlm", "options": {"foo": 1}}]),
                          tokenizer)
    assert message == ("unknown option 'foo' for objective 'mlm' in objectives[0].options; "
                       "allowed: mask_token_rate, random_token_rate, selection_rate, "
                       "serving_top_k, whole_word_masking")


def test_fixed_constructor_arguments_are_not_options(tokenizer):
    message = build_error(
        tiny_config(objectives=[{"name": "mlm", "options": {"name": "other"}}]), tokenizer)
    assert message.startswith("unknown option 'name' for objective 'mlm'")


def test_invalid_objective_option_value_names_the_options_key(tokenizer):
    message = build_error(
        tiny_config(objectives=[{"name": "mlm", "options": {"selection_rate": 2}}]), tokenizer)
    assert message == ("objectives[0].options: invalid value for objective 'mlm': "
                       "selection_rate must be in [0, 1], got 2")


def test_clm_needs_a_decoder(tokenizer):
    message = build_error(tiny_config(objectives=[{"name": "clm"}]), tokenizer)
    assert message == ("objective 'clm' in objectives[0] needs model.kind: decoder, "
                       "but the model is an encoder")


def test_mlm_needs_an_encoder(tokenizer):
    message = build_error(tiny_config(model={"kind": "decoder"}), tokenizer)
    assert message == ("objective 'mlm' in objectives[0] needs model.kind: encoder, "
                       "but the model is a decoder")


def test_mlm_names_an_encoder_decoder_as_such(tokenizer):
    message = build_error(tiny_config(model={"family": "t5"}), tokenizer)
    assert message == ("objective 'mlm' in objectives[0] needs model.kind: encoder, "
                       "but the model is an encoder-decoder")


def test_vocabulary_size_below_the_tokenizers_is_refused(tokenizer):
    message = build_error(tiny_config(model={"vocabulary_size": 10}), tokenizer)
    assert message == (f"model.vocabulary_size (10) is smaller than the tokenizer's "
                       f"vocabulary ({tokenizer.vocabulary_size()} tokens)")


def test_clm_builds_on_a_decoder(tokenizer):
    model = kerasllm.build_model(
        tiny_config(model={"kind": "decoder"}, objectives=[{"name": "clm"}]), tokenizer)
    assert [head.name for head in model.heads] == ["clm"]
    assert model.backbone.causal


def test_classification_needs_num_classes_or_labels(tokenizer):
    message = build_error(head_config(name="classification"), tokenizer)
    assert message == ("head.options: invalid value for task head 'classification': "
                       "give num_classes, or labels (the class names)")


def test_classification_rejects_a_bad_num_classes(tokenizer):
    message = build_error(head_config(name="classification", options={"num_classes": 1}),
                          tokenizer)
    assert message == ("head.options: invalid value for task head 'classification': "
                       "num_classes must be an integer >= 2, got 1")


def test_classification_builds_with_num_classes(tokenizer):
    model = kerasllm.build_model(
        head_config(name="classification", options={"num_classes": 3}), tokenizer)
    assert model.heads[0].num_classes == 3
    assert not model.is_pretraining


# --- Builder: tokenizer vocabulary files ---------------------------------------------------


def test_missing_vocabulary_file(tmp_path):
    missing = tmp_path / "vocab.txt"
    with pytest.raises(kerasllm.ConfigError) as error:
        kerasllm.build_model(tiny_config(tokenizer={"vocabulary": str(missing)}))
    assert str(error.value) == f"tokenizer.vocabulary: not found: {missing}"


def test_vocabulary_without_special_tokens(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join([*SPECIAL_TOKENS[:-1], "the", "a", "##s"]) + "\n")
    with pytest.raises(kerasllm.ConfigError) as error:
        kerasllm.build_model(tiny_config(tokenizer={"vocabulary": str(path)}))
    message = str(error.value)
    assert message.startswith("tokenizer.vocabulary: ")
    assert str(path) in message
    assert "['[MASK]']" in message


def test_vocabulary_file_is_loaded(tmp_path):
    path = tmp_path / "vocab.txt"
    words = ["the", "cat", "sat", "##s"]
    path.write_text("\n".join([*SPECIAL_TOKENS, *words]) + "\n")
    model = kerasllm.build_model(tiny_config(tokenizer={"vocabulary": str(path)}))
    assert model.tokenizer.get_vocabulary() == [*SPECIAL_TOKENS, *words]
    assert model.backbone.vocabulary_size == len(SPECIAL_TOKENS) + len(words)


# --- The text data source ---------------------------------------------------------------


def text_source(**options):
    return build_data_source(kerasllm.load_config(tiny_config(
        data={"source": "text", "options": options})))


def documents(source):
    return [example["text"].numpy().decode("utf-8") for example in source.examples()]


def test_text_glob_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "corpus" / "*.txt")
    with pytest.raises(kerasllm.ConfigError) as error:
        text_source(paths=pattern)
    message = str(error.value)
    assert message.startswith("data.options: ")
    assert f"no file matches {pattern!r}" in message


def test_text_source_needs_paths():
    with pytest.raises(kerasllm.ConfigError) as error:
        text_source()
    assert str(error.value) == "data.options.paths is required by data source 'text'"


def test_text_source_rejects_an_unknown_mode(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(kerasllm.ConfigError, match=r"mode must be 'line' or 'document', "
                       r"got 'paragraph'"):
        text_source(paths=str(tmp_path / "a.txt"), mode="paragraph")


def test_unknown_data_source_lists_known_sources():
    with pytest.raises(kerasllm.PluginError) as error:
        build_data_source(kerasllm.load_config(tiny_config(data={"source": "txt"})))
    assert re.match(r"unknown data source 'txt' in data\.source; known: .*\bbuiltin, .*\btext\b",
                    str(error.value)), str(error.value)


CORPUS_B = """\
The first document
spans two lines.

   \t
Second document, one line.


Third document: after two blank lines
"""

CORPUS_A = "Alpha one.\n\nAlpha two, no final newline."


@pytest.fixture
def corpus(tmp_path):
    # Written b then a: files are read in sorted order, not creation order.
    (tmp_path / "b.txt").write_text(CORPUS_B)
    (tmp_path / "a.txt").write_text(CORPUS_A)
    (tmp_path / "notes.md").write_text("not matched\n")
    return tmp_path


def test_text_line_mode_yields_each_non_empty_line(corpus):
    assert documents(text_source(paths=str(corpus / "*.txt"))) == [
        "Alpha one.",
        "Alpha two, no final newline.",
        "The first document",
        "spans two lines.",
        "Second document, one line.",
        "Third document: after two blank lines",
    ]


def test_text_document_mode_splits_at_blank_lines(corpus):
    source = text_source(paths=[str(corpus / "b.txt"), str(corpus / "a.txt")], mode="document")
    texts = documents(source)
    # Lines keep their newlines inside a document; the last one's is incidental.
    assert [text.rstrip("\n") for text in texts] == [
        "The first document\nspans two lines.",
        "Second document, one line.",
        "Third document: after two blank lines",
        "Alpha one.",
        "Alpha two, no final newline.",
    ]
    assert documents(source) == texts  # deterministic, as held-out splitting needs


def test_family_preset_fills_in_and_keys_override_it():
    config = kerasllm.load_config(tiny_config(
        model={"family": "llama", "num_key_value_heads": 1, "rotary_theta": 500.0},
        objectives=[{"name": "clm"}]))
    model = config.model
    assert (model.kind, model.norm, model.activation, model.gated_feed_forward,
            model.use_bias, model.position_embedding, model.tie_embeddings) == (
        "decoder", "rms", "silu", True, False, "rotary", False)
    assert model.rotary_theta == 500.0 and model.num_key_value_heads == 1
    assert model.hidden_dim == 32  # the sizes stay the user's


@pytest.mark.parametrize("model,message", [
    ({"family": "gpt3"}, "unknown model.family 'gpt3'; known: bert, gpt2, llama, roberta, t5, "
                         "t5_v1_1"),
    ({"num_heads": 4, "hidden_dim": 32, "num_key_value_heads": 3},
     "model.num_key_value_heads (3) must divide model.num_heads (4)"),
    ({"kind": "decoder", "pooler": True},
     "model.pooler needs model.kind: encoder; set it to false"),
    ({"family": "t5", "num_segments": 2}, "model.num_segments must be 0 for an encoder_decoder "
                                          "model"),
    ({"num_decoder_layers": 3}, "model.num_decoder_layers needs model.kind: encoder_decoder"),
    ({"family": "llama", "hidden_dim": 30, "num_heads": 2},
     "model: rotary positions need an even head size, got 15"),
    ({"family": "t5", "relative_buckets": 2},
     "model.relative_buckets (2) leaves 0 exact distances, which must be at least 1 and below "
     "model.relative_max_distance (128)"),
    ({"family": "t5", "relative_buckets": 32, "relative_max_distance": 8},
     "model.relative_buckets (32) leaves 8 exact distances, which must be at least 1 and below "
     "model.relative_max_distance (8)"),
    ({"position_offset": 2, "max_sequence_length": 33},
     "data.sequence_length (32) exceeds model.max_sequence_length (33) - "
     "model.position_offset (2)"),
])
def test_model_family_and_architecture_mistakes(model, message):
    assert config_error(tiny_config(model=model)) == message


def test_jit_compile_auto_compiles_the_whole_step_on_one_device_only(tokenizer):
    """auto: compiled on one device, CPU included; under a strategy, Keras' own
    auto, which leaves CPU devices uncompiled (a compiled step under
    MirroredStrategy on CPU devices fails)."""
    assert kerasllm.build_model(tiny_config(), tokenizer).jit_compile is True
    with tf.distribute.MirroredStrategy(["CPU:0"]).scope():
        assert kerasllm.build_model(tiny_config(), tokenizer).jit_compile is False
    assert kerasllm.build_model(tiny_config(training={"jit_compile": False}),
                                tokenizer).jit_compile is False
