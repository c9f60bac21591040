"""Architecture families as presets of the one configurable layer set.

A preset fixes what makes a family itself (norms, positions, feed-forward,
biases); sizes are the user's. ``model: {family: llama, num_layers: 4}`` in a
config is the preset with the given keys on top. The values follow the
reference implementations (Hugging Face transformers' BERT, RoBERTa, GPT-2,
Llama and T5), which the parity tests compare against.
"""

from kerasllm.errors import ConfigError

_BERT = dict(
    kind="encoder", norm="layer", norm_first=False, activation="gelu",
    gated_feed_forward=False, use_bias=True, position_embedding="learned",
    num_segments=2, layer_norm_epsilon=1e-12, tie_embeddings=True, pooler=True,
)

FAMILIES = {
    # Post-LN encoder: learned absolute positions, segments, erf GELU, tanh pooler.
    "bert": _BERT,
    # BERT's layout with one segment and positions starting after the padding row.
    "roberta": {**_BERT, "num_segments": 1, "position_offset": 2, "layer_norm_epsilon": 1e-5},
    # Pre-LN decoder: learned positions, tanh-approximated GELU, tied LM head.
    "gpt2": dict(
        kind="decoder", norm="layer", norm_first=True, activation="gelu_approximate",
        gated_feed_forward=False, use_bias=True, position_embedding="learned",
        num_segments=0, layer_norm_epsilon=1e-5, tie_embeddings=True, pooler=False,
    ),
    # RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases.
    "llama": dict(
        kind="decoder", norm="rms", norm_first=True, activation="silu",
        gated_feed_forward=True, use_bias=False, position_embedding="rotary",
        rotary_theta=10000.0, num_segments=0, layer_norm_epsilon=1e-6,
        tie_embeddings=False, pooler=False, dropout=0.0,
    ),
    # Encoder-decoder: bucketed relative position bias, RMS norm, unscaled
    # attention (T5 folds the scale into its initialisation), ReLU feed-forward.
    "t5": dict(
        kind="encoder_decoder", norm="rms", norm_first=True, activation="relu",
        gated_feed_forward=False, use_bias=False, position_embedding="relative",
        relative_buckets=32, relative_max_distance=128, scale_scores=False,
        num_segments=0, layer_norm_epsilon=1e-6, tie_embeddings=True, scale_logits=True,
        pooler=False,
    ),
}
# T5 v1.1: gated-GELU feed-forward, an untied and unscaled output projection.
FAMILIES["t5_v1_1"] = {**FAMILIES["t5"], "activation": "gelu_approximate",
                       "gated_feed_forward": True, "tie_embeddings": False,
                       "scale_logits": False}


def family_preset(name, where="model.family"):
    """The preset's config keys; ConfigError naming the known families otherwise."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown {where} '{name}'; known: {', '.join(sorted(FAMILIES))}")
    return dict(FAMILIES[name])
