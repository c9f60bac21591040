"""Randomly initialised Hugging Face reference models, saved as checkpoints.

The references for the parity tests (transformers on PyTorch CPU, a test-only
extra). Every parameter gets normal noise on top of its initialisation, layer
norms and biases included, so a wrong mapping cannot hide behind ones and zeros.
"""

import keras_hub
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]

# Several small configs per family: layer, head and kv-head counts, hidden sizes
# that are not powers of two, tied and untied output projections.
CONFIGS = {
    "bert-mlm": ("BertForMaskedLM", "BertConfig", dict(
        vocab_size=99, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=50, max_position_embeddings=40)),
    "bert-base": ("BertModel", "BertConfig", dict(
        vocab_size=83, hidden_size=60, num_hidden_layers=3, num_attention_heads=5,
        intermediate_size=70, max_position_embeddings=24, type_vocab_size=3,
        hidden_act="gelu_new")),
    "roberta-mlm": ("RobertaForMaskedLM", "RobertaConfig", dict(
        vocab_size=99, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=50, max_position_embeddings=40)),
    "roberta-base": ("RobertaModel", "RobertaConfig", dict(
        vocab_size=70, hidden_size=52, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=30, max_position_embeddings=30)),
    "gpt2-lm": ("GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=101, n_embd=36, n_layer=2, n_head=3, n_positions=64,
        bos_token_id=5, eos_token_id=7)),
    "gpt2-base": ("GPT2Model", "GPT2Config", dict(
        vocab_size=77, n_embd=60, n_layer=3, n_head=5, n_inner=70, n_positions=32,
        activation_function="relu", layer_norm_epsilon=1e-4)),
    "llama-gqa": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500.0, eos_token_id=7, bos_token_id=1)),
    "llama-mqa-tied": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=89, hidden_size=48, intermediate_size=60, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, rms_norm_eps=1e-5, eos_token_id=7)),
    "llama-mha-head-dim": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=64, hidden_size=44, intermediate_size=36, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=12,
        max_position_embeddings=64, eos_token_id=7)),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=90, d_model=36, d_kv=10, d_ff=50, num_layers=2, num_decoder_layers=3,
        num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        eos_token_id=7, decoder_start_token_id=0, pad_token_id=0)),
    "t5-v1_1": ("T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=90, d_model=44, d_kv=8, d_ff=50, num_layers=1, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        eos_token_id=7, decoder_start_token_id=0, pad_token_id=0)),
}


def reference_model(name, seed=0):
    """The reference model of ``CONFIGS[name]``, every parameter perturbed."""
    model_class, config_class, arguments = CONFIGS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**arguments)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def save(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    return directory


def tokenizer():
    """Token-level tests feed ids; any tokenizer serves for the model's text side."""
    return keras_hub.models.BertTokenizer(vocabulary=SPECIAL_TOKENS + list("abcdefghij"))


def padded_batch(vocabulary_size, length, lengths, seed=0):
    """``(token_ids, padding_mask)``: rows of the given real lengths, right-padded."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(8, vocabulary_size, (len(lengths), length)).astype("int32")
    padding_mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype("int32")
    return token_ids, padding_mask


def torch_ids(array):
    return torch.tensor(np.asarray(array), dtype=torch.long)
