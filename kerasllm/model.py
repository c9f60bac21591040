"""The model ``build_model`` returns: tokenizer, backbone and heads in one ``keras.Model``."""

import contextlib

import keras
import tensorflow as tf

from kerasllm.backbone import Backbone
from kerasllm.config import load_config
from kerasllm.distribute import global_batch_losses
from kerasllm.errors import ConfigError
from kerasllm.keras_workarounds import MultiWorkerWorkarounds
from kerasllm.lora import apply_freezing

# The targets key of a multi-task batch: which heads it is for (1.0) or not (0.0).
HEADS_PRESENT = "heads_present"


@keras.saving.register_keras_serializable(package="kerasllm")
class KerasLLMModel(MultiWorkerWorkarounds, keras.Model):
    """A backbone with pretraining objectives or a task head, trained with ``fit``.

    Built by :func:`kerasllm.build_model` from a config. ``call`` returns a dict
    of predictions keyed by head name. Losses are per head, weighted by the
    config's ``weight`` and summed; ``fit`` logs the total ``loss`` and each
    head's ``<name>_loss`` and metrics (e.g. ``mlm_accuracy``).

    Args:
        config: the kerasllm config as a dict (see :class:`kerasllm.Config`).
        tokenizer: a keras-hub tokenizer (from a tokenizer plugin).
        registry: the plugin registry to look heads up in; default: installed plugins.
    """

    def __init__(self, config, tokenizer, registry=None, **kwargs):
        super().__init__(**kwargs)
        self.config = load_config(config)
        self.tokenizer = tokenizer
        with dtype_policy(self.config.training.precision):
            self._build_layers(tokenizer, registry)
        apply_freezing(self)

    def _build_layers(self, tokenizer, registry):
        from kerasllm.builder import make_head  # the builder imports this module

        model_config = self.config.to_dict()["model"]
        del model_config["family"]
        size = model_config["vocabulary_size"] or tokenizer.vocabulary_size()
        if size < tokenizer.vocabulary_size():
            raise ConfigError(
                f"model.vocabulary_size ({size}) is smaller than the tokenizer's "
                f"vocabulary ({tokenizer.vocabulary_size()} tokens)")
        model_config["vocabulary_size"] = size
        self.backbone = Backbone(name="backbone", **model_config)
        self.heads = [
            make_head(kind, where, head_config, self.backbone, tokenizer, registry)
            for where, head_config, kind in self.config.head_entries
        ]
        self.head_weights = [head_config.weight for _, head_config, _ in self.config.head_entries]
        self.objectives = [head for head, (_, _, kind) in
                           zip(self.heads, self.config.head_entries) if kind == "objective"]
        for source, entries in self.config.tasks:
            builders = [where for where, head_config, _ in entries
                        if self.get_head(head_config.name).builds_sequences]
            if len(builders) > 1:
                raise ConfigError(
                    f"{' and '.join(builders)} both rebuild the rows of "
                    f"{'data.source' if source is None else source.source}; use one of "
                    "them per data source")
            # Task heads on one source share the first one's rows (``Head.encode``).
            encoders = {}
            for where, head_config, kind in entries:
                if kind == "task head":
                    encoders.setdefault(type(self.get_head(head_config.name)).encode, where)
            if len(encoders) > 1:
                raise ConfigError(
                    f"{' and '.join(encoders.values())} read their examples differently, so "
                    "they cannot share a data source; give each its own `data: {source: ...}`")
        for head in self.heads:
            head.build((None, None, self.backbone.hidden_dim))
        self.built = True

    def get_head(self, name):
        """The objective or task head called ``name`` in the config."""
        for head in self.heads:
            if head.name == name:
                return head
        raise KeyError(f"no head named {name!r}; heads: {[h.name for h in self.heads]}")

    @property
    def is_pretraining(self):
        return bool(self.config.objectives)

    @property
    def input_keys(self):
        return self.input_keys_of(self.heads)

    def input_keys_of(self, heads):
        keys = list(self.backbone.input_keys)
        for head in heads:
            keys += [key for key in head.input_keys if key not in keys]
        return tuple(keys)

    def call(self, inputs, training=False):
        """Each head's predictions by head name; a model without heads (an
        imported base checkpoint) returns the backbone's outputs."""
        for head in self.heads:
            inputs = head.transform_inputs(inputs, training=training)
        backbone_outputs = self.backbone(
            {key: inputs[key] for key in self.backbone.input_keys}, training=training
        )
        if not self.heads:
            return backbone_outputs
        predictions = {head.name: head(backbone_outputs, inputs, training=training)
                       for head in self.heads}
        # Losses, metrics and answers in float32 whatever the compute dtype.
        return keras.tree.map_structure(
            lambda value: keras.ops.cast(value, "float32")
            if keras.backend.is_float_dtype(value.dtype) else value, predictions)

    def generate(self, prompts, max_new_tokens=32, *, temperature=0.0, top_k=0, top_p=1.0,
                 seed=None, stop_token_ids=None):
        """Continue prompts: decoder-only models and encoder–decoders (T5).

        Decoding is KV-cached, with static shapes, in one XLA-compiled loop.

        Args:
            prompts: a string, a list of strings, a list of token ids, or a list
                of such lists; prompts may differ in length.
            max_new_tokens: tokens to add to each prompt (at most).
            temperature: 0 picks the most likely token (greedy); above 0 samples
                from the softmax of ``logits / temperature``.
            top_k: sample among the ``k`` most likely tokens only; 0: all.
            top_p: sample among the most likely tokens whose probabilities sum
                to ``top_p`` (nucleus sampling); 1: all.
            seed: an int for reproducible sampling (the same seed gives the same
                samples for the same batch of prompts); None: a fresh seed.
            stop_token_ids: a row ends after generating one of these; default:
                the tokenizer's end token.
        Returns:
            For string prompts, strings (decoder-only: prompt and continuation;
            encoder–decoder: the decoded output); for token ids, lists of ids
            (decoder-only: prompt and continuation, up to and including a stop
            token). A single prompt gives a single result.
        """
        from kerasllm.generation import generate

        return generate(self, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, stop_token_ids=stop_token_ids)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """Answers for raw text; Keras' ``predict`` for tensors and batches.

        Strings, dicts of a task head's fields (``{"text": ..., "text_pair": ...}``,
        ``{"question": ..., "context": ...}``) or lists of them give each example's
        answer as the task head decodes it: a label and its probabilities, entity
        spans with character offsets, an answer and its offsets in the context, …
        (one answer per input; a dict by head name with several task heads). See
        :func:`kerasllm.evaluation.predict`.
        """
        if _is_raw_text(x):
            from kerasllm.evaluation import predict

            return predict(self, x, batch_size or 32)
        return super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps,
                               callbacks=callbacks)

    def prepare_batch(self, features, seed, heads=None):
        """tf.data: a batch of rows → ``(x, y)``, each head transforming in turn.

        ``seed``: int32 ``(2,)``, the batch's; each head draws from its own
        stream of it. ``heads``: those that prepare this batch (default: all).
        """
        heads = self.heads if heads is None else heads
        targets = {}
        # Heads that rebuild the rows (span corruption, sentence pairs) go first.
        for head in sorted(heads, key=lambda head: not head.builds_sequences):
            head_seed = tf.random.experimental.stateless_fold_in(
                tf.cast(seed, tf.int32), self.heads.index(head))
            features, targets[head.name] = head.prepare(features, head_seed)
        return {key: features[key] for key in self.input_keys_of(heads)}, targets

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not self.heads:
            raise ValueError(
                "this model has no objectives and no task head, so nothing to train; "
                "build it with `objectives` or a `head` (e.g. kerasllm.from_hf(path, "
                "head={...}))")
        # Kept for compute_metrics, which runs later in the same step: Keras also
        # calls compute_loss in a symbolic build pass, so no tracker updates here.
        with global_batch_losses():
            self._head_losses = [
                head.compute_loss(y[head.name], y_pred[head.name]) for head in self.heads
            ]
        self._present = self._heads_present(y)
        total = sum(weight * present * loss for weight, present, loss in
                    zip(self.head_weights, self._present, self._head_losses))
        # Each replica's gradients are summed across replicas: scale so the sum is
        # the mean (as Keras' own losses do in `scale_loss_for_distribution`).
        return total / tf.distribute.get_strategy().num_replicas_in_sync

    def train_step(self, data):
        """Keras' step; with ``training.gradient_accumulation_steps`` K > 1, the
        batch in K micro-batches, one after another, and one update with the sum
        of their gradients, in a K-th of the activation memory. For losses
        averaged per example that is the update of one step on the whole batch;
        a token-averaged loss weights each micro-batch's mean equally."""
        steps = self.config.training.gradient_accumulation_steps
        if steps == 1:
            return super().train_step(data)
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        weights = self.trainable_weights
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        total = None
        for micro_x, micro_y in _micro_batches(x, y, steps):
            # Each micro-batch waits for the previous one's gradients, so that
            # only one micro-batch's activations are alive at a time.
            previous = [gradient for gradient in total or [] if gradient is not None]
            with tf.control_dependencies(previous), tf.GradientTape() as tape:
                y_pred = self(micro_x, training=True)
                loss = self.compute_loss(micro_x, micro_y, y_pred, training=True) / steps
                # Keras' loss: per replica, before the division for summing.
                self._loss_tracker.update_state(
                    loss * steps * replicas, sample_weight=tf.shape(micro_x["token_ids"])[0])
                scaled = self.optimizer.scale_loss(loss)
            gradients = tape.gradient(scaled, weights)
            total = gradients if total is None else [
                _add_gradients(a, b) for a, b in zip(total, gradients, strict=True)]
            self.compute_metrics(micro_x, micro_y, y_pred)
        self.optimizer.apply_gradients(zip(total, weights))
        return self.get_metrics_result()

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Weighted by batch size like Keras' own `loss`: evaluation can end on an
        # empty batch (tf.distribute's partial-batch handling) that must not count.
        batch_size = tf.cast(tf.shape(x["token_ids"])[0], tf.float32)
        for head, loss, present in zip(self.heads, self._head_losses, self._present):
            head.loss_tracker.update_state(loss, sample_weight=batch_size * present)
            if isinstance(present, float):
                head.update_metrics(y[head.name], y_pred[head.name])
            else:  # multi-task: a head's metrics count its own batches only
                tf.cond(present > 0,
                        lambda head=head: head.update_metrics(y[head.name], y_pred[head.name]),
                        lambda: None)
        return self.get_metrics_result()

    def _heads_present(self, y):
        """Per head, 1.0 if this batch is for it; multi-task batches say which."""
        if HEADS_PRESENT in y:  # (rows, heads), every row the same; 0 for no rows
            present = tf.reduce_max(tf.cast(y[HEADS_PRESENT], tf.float32), axis=0)
            return tf.unstack(tf.maximum(present, 0.0), num=len(self.heads))
        return [1.0] * len(self.heads)

    def get_config(self):
        config = self.config.to_dict()
        # The vocabulary travels in the config: the backbone and heads need its size
        # and special tokens to be rebuilt. kerasllm's tokenizers carry it in their
        # own config; keras-hub's keep it in asset files, read only after rebuilding.
        tokenizer = keras.saving.serialize_keras_object(self.tokenizer)
        if not tokenizer.get("registered_name", "").startswith("kerasllm>"):
            for name in ("vocabulary", "merges"):
                value = getattr(self.tokenizer, name, None)
                if value is not None:
                    tokenizer["config"][name] = dict(value) if isinstance(value, dict) \
                        else list(value)
        return {"name": self.name, "config": config, "tokenizer": tokenizer}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        tokenizer = keras.saving.deserialize_keras_object(config.pop("tokenizer"))
        return cls(tokenizer=tokenizer, **config)


@contextlib.contextmanager
def dtype_policy(name):
    """Layers created inside compute in ``name``'s dtype (``mixed_bfloat16``:
    bfloat16 compute, float32 variables); Keras' norms compute in float32."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _micro_batches(x, y, steps):
    """``steps`` equal slices of a batch along its rows (dense or ragged)."""
    rows = tf.shape(x["token_ids"])[0]
    tf.debugging.assert_equal(
        rows % steps, 0,
        message=f"a batch's rows must split into gradient_accumulation_steps ({steps}) "
                "equal micro-batches")
    size = rows // steps
    for index in range(steps):
        yield keras.tree.map_structure(
            lambda value, index=index: value[index * size:(index + 1) * size], (x, y))


def _add_gradients(a, b):
    """Sum two gradients; sparse ones (embedding lookups) stay sparse, and None
    (a weight this loss does not use) stays None."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
        return tf.IndexedSlices(tf.concat([a.values, b.values], 0),
                                tf.concat([a.indices, b.indices], 0), a.dense_shape)
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


def _is_raw_text(x):
    """Strings, or dicts of fields holding strings or lists of them (token
    classification's ``words``), not a dict of token-id arrays; or a dataset of
    such dicts."""
    if isinstance(x, tf.data.Dataset):
        return isinstance(x.element_spec, dict) and any(
            getattr(spec, "dtype", None) == tf.string for spec in x.element_spec.values())
    if isinstance(x, (list, tuple)) and x:
        x = x[0]
    return isinstance(x, str) or (
        isinstance(x, dict) and any(_is_strings(value) for value in x.values()))


def _is_strings(value):
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], str))
