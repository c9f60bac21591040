"""Replaced-token detection (ELECTRA, Clark et al. 2020).

A small generator, trained as a masked LM, fills the masked positions with
tokens sampled from its softmax; the discriminator (the backbone, with a
binary head) predicts for every real token whether it was replaced. A sample
equal to the original counts as original. The loss is the generator's MLM
loss plus ``discriminator_weight`` (the paper's λ = 50) times the
discriminator's, as the paper trains both jointly; no gradient flows from the
discriminator into the generator through the discrete samples.

Data flow: ``prepare`` (tf.data) masks with BERT's masking at the official
code's rates (15% selected; of those 85% ``[MASK]``, 15% unchanged, none
random) → ``transform_inputs`` (inside the model, before the backbone) runs the
generator on the masked tokens, samples, and writes the samples at every
selected position → the backbone runs on the corrupted tokens → ``call``
returns the generator's and the discriminator's logits.

The generator reuses the backbone's embedding layer (token, position and
segment embeddings and their norm: the paper shares all embeddings), projects
to its own width when narrower, runs its own ``TransformerBlock``s with the
backbone's norm, activation, positions and biases (attention stays within the
documents of a packed row; every head has its own keys and values), and
predicts through a masked-LM head tied to the shared token embedding. Its default size is the official code's: a quarter of
the backbone's width, as deep (``generator_hidden_size = 0.25``,
``generator_layers = 1.0``).

Evaluation: inputs with ``mask_positions`` are corrupted in inference mode too,
so ``evaluate`` reports the same losses as training (the official code's eval
mode corrupts as well). Inference mode samples with a seed computed from the
batch's contents, not from the layer's seed stream: the same inputs give the
same outputs (a reloaded model reproduces them), and evaluating does not move
the training draws. Inputs without ``mask_positions`` (real text), or with
none (zero columns, as an exported model feeds it), are not corrupted: the
discriminator scores them as they are, as the paper uses it.

Served (``kerasllm export``), the discriminator tells which tokens of a text
look replaced, besides the encoder's ``embedding``.
"""

import keras
import keras_hub
import tensorflow as tf

import kerasllm
from kerasllm.heads import Head, weighted_cross_entropy, weighted_mean
from kerasllm.layers import ACTIVATIONS, TransformerBlock, make_norm
from kerasllm.masking import TokenMasking
from kerasllm.tokenizers import token_strings


class Electra(Head):
    """Args:
        discriminator_weight: λ, the discriminator loss's weight in the total
            (the paper: 50; the generator's is 1).
        selection_rate: fraction of non-special tokens selected for the generator.
        mask_token_rate: of the selected, the fraction the generator sees as the
            mask token (the official code: 0.85; BERT: 0.8).
        random_token_rate: of the selected, the fraction it sees as a random token
            (the official code: 0); the rest it sees unchanged.
        whole_word_masking: select whole words rather than single tokens.
        generator_hidden_dim: the generator's width; default a quarter of the
            backbone's (the paper's best range is a quarter to a half).
        generator_num_layers: the generator's depth; default the backbone's.
        generator_num_heads: default: the backbone's head size kept (the official
            code's ``hidden // 64`` for BERT-sized heads), at least 1 and a
            divisor of ``generator_hidden_dim``.
        generator_intermediate_dim: default: the backbone's ratio of
            intermediate to hidden width (BERT's 4).

    Serving: ``serving_default`` takes ``text`` ``(batch,)`` string, packed
    and cut to ``data.sequence_length`` as in training; ``serve_token_ids``
    the client's rows. Neither corrupts the text: the discriminator scores it
    as it is. Outputs, ``length`` the rows' length:

    - ``replaced_probabilities`` ``(batch, length)`` float32: the
      discriminator's probability that each token was replaced; 0 at padding.
    - ``tokens`` ``(batch, length)`` string: each token as the vocabulary
      writes it (``[CLS]``, ``##ing``); empty at padding.
    """

    input_keys = ("mask_positions", "mask_weights")
    requires_causal = False

    def __init__(self, backbone, tokenizer, discriminator_weight=50.0, selection_rate=0.15,
                 mask_token_rate=0.85, random_token_rate=0.0, whole_word_masking=False,
                 generator_hidden_dim=None, generator_num_layers=None,
                 generator_num_heads=None, generator_intermediate_dim=None, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        if backbone.kind != "encoder":
            raise ValueError(f"ELECTRA needs an encoder backbone, got kind {backbone.kind!r}")
        if backbone.position_embedding == "relative":
            raise ValueError(
                "ELECTRA's generator does not support relative (T5) position bias; "
                "use model.position_embedding: learned or rotary")
        if isinstance(discriminator_weight, bool) or not isinstance(
                discriminator_weight, (int, float)) or not discriminator_weight > 0:
            raise ValueError(f"discriminator_weight must be positive, got {discriminator_weight}")
        self.discriminator_weight = float(discriminator_weight)
        self.masking = TokenMasking(backbone, tokenizer, selection_rate, mask_token_rate,
                                    random_token_rate, whole_word_masking)
        for name, value in [("generator_hidden_dim", generator_hidden_dim),
                            ("generator_num_heads", generator_num_heads),
                            ("generator_num_layers", generator_num_layers),
                            ("generator_intermediate_dim", generator_intermediate_dim)]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        hidden = generator_hidden_dim or max(1, backbone.hidden_dim // 4)
        heads = generator_num_heads or default_num_heads(
            hidden, backbone.head_dim or backbone.hidden_dim // backbone.num_heads)
        layers = generator_num_layers or backbone.num_layers
        intermediate = generator_intermediate_dim or max(
            1, round(backbone.intermediate_dim * hidden / backbone.hidden_dim))
        if hidden % heads:
            raise ValueError(f"generator_hidden_dim ({hidden}) must be divisible by "
                             f"generator_num_heads ({heads})")
        rotary = backbone.position_embedding == "rotary"
        if rotary and (hidden // heads) % 2:
            raise ValueError(f"rotary positions need an even generator head size, got "
                             f"{hidden // heads} (generator_hidden_dim {hidden} / "
                             f"generator_num_heads {heads})")
        self.generator_hidden_dim = hidden
        self.generator_num_heads = heads
        self.generator_num_layers = layers
        self.generator_intermediate_dim = intermediate
        initializer = keras.initializers.TruncatedNormal(stddev=0.02)

        # === Generator ===
        # Shared with the discriminator (the same layer, so the same variables).
        self.embedding = backbone.embedding
        # Hugging Face's `embeddings_project`: the shared embeddings are as wide
        # as the discriminator.
        self.generator_projection = keras.layers.Dense(
            hidden, kernel_initializer=initializer, name="generator_projection",
        ) if hidden != backbone.hidden_dim else None
        self.generator_blocks = [
            TransformerBlock(
                heads, intermediate, activation=backbone.activation,
                gated=backbone.gated_feed_forward, norm=backbone.norm,
                norm_first=backbone.norm_first, use_bias=backbone.use_bias,
                scale_scores=backbone.scale_scores,
                rotary_theta=backbone.rotary_theta if rotary else None,
                dropout=backbone.dropout, layer_norm_epsilon=backbone.layer_norm_epsilon,
                name=f"generator_block_{i}",
            )
            for i in range(layers)
        ]
        self.generator_norm = make_norm(backbone.norm, backbone.layer_norm_epsilon,
                                        "generator_final_norm") if backbone.norm_first else None
        # Its dense maps back to the embedding width; the output projection is
        # the shared token embedding (the official code's `generator_predictions`).
        self.generator_head = keras_hub.layers.MaskedLMHead(
            vocabulary_size=backbone.vocabulary_size,
            token_embedding=backbone.token_embedding,
            intermediate_activation=ACTIVATIONS[backbone.activation],
            layer_norm_epsilon=backbone.layer_norm_epsilon,
            kernel_initializer=initializer, name="generator_head",
        )
        self.seed_generator = keras.random.SeedGenerator(name="sampling_seed")

        # === Discriminator head (Hugging Face's ElectraDiscriminatorPredictions) ===
        self.discriminator_dense = keras.layers.Dense(
            backbone.hidden_dim, activation=ACTIVATIONS[backbone.activation],
            kernel_initializer=initializer, name="discriminator_dense")
        self.discriminator_output = keras.layers.Dense(
            1, kernel_initializer=initializer, name="discriminator_output")

        # === Metrics ===
        self.generator_loss = keras.metrics.Mean(name=f"{self.name}_generator_loss")
        self.discriminator_loss = keras.metrics.Mean(name=f"{self.name}_discriminator_loss")
        self.generator_accuracy = keras.metrics.SparseCategoricalAccuracy(
            name=f"{self.name}_generator_accuracy")
        # Logits: a positive logit predicts "replaced".
        self.discriminator_accuracy = keras.metrics.BinaryAccuracy(
            name=f"{self.name}_discriminator_accuracy", threshold=0.0)
        self.replaced_fraction = keras.metrics.Mean(name=f"{self.name}_replaced_fraction")
        # A numpy array, which Keras does not track.
        self.vocabulary = token_strings(tokenizer, backbone.vocabulary_size)

    def build(self, sequence_output_shape):
        width = self.generator_hidden_dim
        if self.generator_projection is not None:
            self.generator_projection.build(sequence_output_shape)
        for block in self.generator_blocks:
            block.build((None, None, width))
        if self.generator_norm is not None:
            self.generator_norm.build((None, None, width))
        self.generator_head.build((None, None, width), (None, None))
        self.discriminator_dense.build(sequence_output_shape)
        self.discriminator_output.build(sequence_output_shape)

    # === Data ===

    def prepare(self, features, seed):
        masked = self.masking(features, seed)
        targets = {
            "ids": masked["mask_ids"], "weights": masked["mask_weights"],
            # The discriminator's labels compare the corrupted tokens with these.
            "token_ids": features["token_ids"],
            "token_weights": tf.cast(features["padding_mask"] > 0, tf.float32),
        }
        features = {**features, "token_ids": masked["token_ids"],
                     "mask_positions": masked["mask_positions"],
                     "mask_weights": masked["mask_weights"]}
        return features, targets

    # === Model ===

    def transform_inputs(self, inputs, training=False):
        if "mask_positions" not in inputs or inputs["mask_positions"].shape[1] == 0:
            return inputs  # real text (no selections, as served): nothing to corrupt
        if "mask_weights" not in inputs:
            raise ValueError("ELECTRA inputs with `mask_positions` need `mask_weights` too "
                             "(1.0 for a selection, 0.0 for padding), as `prepare` makes them")
        token_ids, positions = inputs["token_ids"], inputs["mask_positions"]
        logits = self.generate(inputs, training)
        if training:
            seed = tf.cast(keras.random.randint((2,), 0, 2**31 - 1, seed=self.seed_generator),
                           tf.int32)
        else:
            seed = content_seed(token_ids, positions)
        # The samples are discrete: no gradient reaches the generator through them
        # (the paper trains the generator by maximum likelihood, not adversarially).
        samples = sample_tokens(tf.stop_gradient(logits), seed)
        corrupted = scatter_tokens(token_ids, positions, inputs["mask_weights"], samples)
        return {**inputs, "token_ids": corrupted,
                f"{self.name}_generator_logits": logits,
                f"{self.name}_corrupted_token_ids": corrupted}

    def generate(self, inputs, training=False):
        """The generator's logits ``(batch, max_selections, vocabulary)`` at the
        ``mask_positions`` of the (masked) ``inputs``."""
        hidden = self.embedding(inputs["token_ids"], inputs.get("segment_ids"),
                                training=training)
        if self.generator_projection is not None:
            hidden = self.generator_projection(hidden)
        for block in self.generator_blocks:
            hidden = block(hidden, inputs["padding_mask"], training=training)
        if self.generator_norm is not None:
            hidden = self.generator_norm(hidden)
        return self.generator_head(hidden, mask_positions=inputs["mask_positions"])

    def call(self, backbone_outputs, inputs, training=False):
        hidden = self.discriminator_dense(backbone_outputs["sequence_output"])
        predictions = {"discriminator_logits": self.discriminator_output(hidden)[..., 0]}
        if f"{self.name}_generator_logits" in inputs:
            predictions["generator_logits"] = inputs[f"{self.name}_generator_logits"]
            predictions["corrupted_token_ids"] = inputs[f"{self.name}_corrupted_token_ids"]
        return predictions

    # === Serving ===

    def serving_inputs(self):
        return {"text": tf.TensorSpec([None], tf.string)}

    def serving_rows(self, inputs, tokenizer, sequence_length):
        return self.serving_token_rows(super().serving_rows(inputs, tokenizer, sequence_length))

    def serving_token_rows(self, rows):
        # The exporter feeds the head all its input keys: no selections, so
        # transform_inputs leaves the text as it is.
        no_selections = tf.zeros([tf.shape(rows["token_ids"])[0], 0])
        return {**rows, "mask_positions": tf.cast(no_selections, tf.int32),
                "mask_weights": no_selections}

    def serving_outputs(self, predictions, rows, inputs):
        real = rows["padding_mask"] > 0
        logits = tf.cast(predictions["discriminator_logits"], tf.float32)
        return {"replaced_probabilities": tf.where(real, tf.sigmoid(logits), 0.0),
                "tokens": tf.where(real, tf.gather(tf.constant(self.vocabulary),
                                                   rows["token_ids"]), "")}

    # === Loss and metrics ===

    def replaced(self, targets, predictions):
        """1.0 where the discriminator's input differs from the original token
        (a sample equal to the original counts as original, as in the paper)."""
        original = tf.cast(targets["token_ids"], predictions["corrupted_token_ids"].dtype)
        return tf.cast(predictions["corrupted_token_ids"] != original, tf.float32)

    def losses(self, targets, predictions):
        """``(generator, discriminator)`` losses: the mean cross-entropy over the
        selected positions, the mean sigmoid cross-entropy over real tokens."""
        generator = weighted_cross_entropy(
            targets["ids"], tf.cast(predictions["generator_logits"], tf.float32),
            targets["weights"])
        discriminator = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=self.replaced(targets, predictions),
            logits=tf.cast(predictions["discriminator_logits"], tf.float32))
        return generator, weighted_mean(discriminator, targets["token_weights"])

    def compute_loss(self, targets, predictions):
        generator, discriminator = self.losses(targets, predictions)
        return generator + self.discriminator_weight * discriminator

    def update_metrics(self, targets, predictions):
        generator, discriminator = self.losses(targets, predictions)
        # Weighted by batch size, as the model weights the head's total loss.
        batch_size = tf.cast(tf.shape(targets["token_ids"])[0], tf.float32)
        self.generator_loss.update_state(generator, sample_weight=batch_size)
        self.discriminator_loss.update_state(discriminator, sample_weight=batch_size)
        self.generator_accuracy.update_state(
            targets["ids"], predictions["generator_logits"], sample_weight=targets["weights"])
        replaced = self.replaced(targets, predictions)
        real = targets["token_weights"]
        self.discriminator_accuracy.update_state(
            replaced, predictions["discriminator_logits"], sample_weight=real)
        self.replaced_fraction.update_state(replaced, sample_weight=real)


def default_num_heads(hidden_dim, head_size):
    """Heads of the backbone's size (at least one) that divide ``hidden_dim``."""
    heads = max(1, hidden_dim // head_size)
    while hidden_dim % heads:
        heads -= 1
    return heads


def sample_tokens(logits, seed):
    """One token per position, drawn from ``softmax(logits)`` (float32) with the
    stateless int32 ``(2,)`` ``seed``; ``logits``: ``(batch, n, vocabulary)``."""
    shape = tf.shape(logits)
    flat = tf.reshape(tf.cast(logits, tf.float32), [-1, shape[-1]])
    samples = tf.random.stateless_categorical(flat, 1, seed, dtype=tf.int32)
    return tf.reshape(samples, shape[:-1])


def scatter_tokens(token_ids, positions, weights, tokens):
    """``token_ids`` with ``tokens`` written at the ``positions`` of weight > 0
    (selected positions are distinct; padding entries write nothing). One-hot
    rather than a scatter: static shapes, so it compiles under XLA."""
    hits = tf.one_hot(positions, tf.shape(token_ids)[1], dtype=tf.int32) \
        * tf.cast(weights > 0, tf.int32)[..., None]
    written = tf.reduce_max(hits, axis=1) > 0
    values = tf.reduce_sum(hits * tf.cast(tokens, tf.int32)[..., None], axis=1)
    return tf.where(written, tf.cast(values, token_ids.dtype), token_ids)


def content_seed(token_ids, positions):
    """An int32 ``(2,)`` seed computed from a batch's contents: inference-mode
    sampling is reproducible for the same inputs yet differs between batches."""
    ids = tf.cast(token_ids, tf.int64)
    length = tf.shape(ids, out_type=tf.int64)[1]
    rows = tf.range(tf.shape(ids, out_type=tf.int64)[0])[:, None]
    place = rows * length + tf.range(length)[None, :] + 1
    first = tf.reduce_sum(ids * place)
    second = tf.reduce_sum(ids * (place % 7919)) + tf.reduce_sum(tf.cast(positions, tf.int64))
    return tf.cast(tf.math.floormod(tf.stack([first, second]), 2**31 - 1), tf.int32)


@kerasllm.hookimpl
def kerasllm_objectives():
    return {"electra": Electra}
