"""The signatures of an exported model: what TF Serving runs, traced from the model.

``ServingModule`` is the ``tf.Module`` that ``kerasllm.export`` writes: the
model's variables, the tokenizer's lookup tables, and one ``tf.function`` per
signature. Each head serves itself through its ``serving_*`` methods
(:class:`kerasllm.Head`); the module joins them into:

- ``serving_default``: raw UTF-8 strings in (the heads' ``serving_inputs``),
  tokenization and packing in the graph, each serving head's named outputs;
  encoders without a task head give ``embedding``; a generative model without
  a serving head generates (``prompts`` in).
- ``serve_token_ids``: ``token_ids`` and ``padding_mask`` (and ``segment_ids``)
  in, the outputs that need no text; core TensorFlow ops only.
- ``generate`` (decoders, encoder–decoders): ``prompts`` and per-row
  ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``; KV-cached
  decoding in an XLA-compiled while loop (:func:`kerasllm.generation.graph_generate`).
"""

import contextlib

import numpy as np
import tensorflow as tf

from kerasllm.errors import KerasLLMError

SERVING_DEFAULT = "serving_default"
SERVE_TOKEN_IDS = "serve_token_ids"
GENERATE = "generate"
XLA_MODES = ("generate", "all", "none")


class ServingModule(tf.Module):
    """The tf.Module written as the SavedModel: the model's variables, the
    tokenizer's lookup tables and one ``tf.function`` per signature."""

    def __init__(self, model, xla="generate", max_new_tokens=None):
        super().__init__(name="kerasllm_serving")
        from kerasllm import generation
        from kerasllm.heads import TokenPredictionHead

        # Not tracked as a Keras object: only its variables and tables are saved.
        object.__setattr__(self, "_model", model)
        self._xla = xla
        self._max_new_tokens = max_new_tokens or next(
            (head.max_new_tokens for head in model.heads if hasattr(head, "max_new_tokens")), 32)
        self.model_variables = [variable.value for variable in model.variables]
        self.tables = _resources([model.tokenizer, *model.heads])
        backbone = model.backbone
        # Plain attributes (tf.Module would track them): the SavedModel holds the
        # signatures, variables and tables, not the Keras layers or the warm-ups.
        object.__setattr__(self, "_serving_heads",
                           [head for head in model.heads if head.serving_inputs()])
        # Generation is served where it is what the model learnt: a language-model
        # head, or none (an imported base checkpoint), not a fine-tuned classifier.
        self._generative = backbone.kind != "encoder" and _can_generate(model, generation) and (
            not model.heads or any(
                # A distilled student's objective is the head's `objective`.
                isinstance(getattr(head, "objective", head), TokenPredictionHead)
                for head in model.heads))
        self._embeds = backbone.kind == "encoder" and not (
            set(self._serving_heads) - set(model.objectives))
        if not (self._serving_heads or self._generative or self._embeds):
            raise KerasLLMError(
                "this model has nothing to serve: no head serves text and it can neither "
                "embed (an encoder) nor generate")
        object.__setattr__(self, "_signatures", {})
        if self._serving_heads or self._embeds:
            specs = {"text": tf.TensorSpec([None], tf.string)} if self._embeds else {}
            for head in self._serving_heads:
                specs.update(head.serving_inputs())
            self._add(SERVING_DEFAULT, self._serve_text, specs)
            self._add(SERVE_TOKEN_IDS, self._serve_token_ids, self._token_specs())
        if self._generative:
            generate_specs = {
                "prompts": tf.TensorSpec([None], tf.string),
                "max_new_tokens": tf.TensorSpec([None], tf.int32),
                "temperature": tf.TensorSpec([None], tf.float32),
                "top_k": tf.TensorSpec([None], tf.int32),
                "top_p": tf.TensorSpec([None], tf.float32),
                "seed": tf.TensorSpec([None], tf.int64),
            }
            self._add(GENERATE, self._generate, generate_specs)
            if SERVING_DEFAULT not in self._signatures:
                self._add(SERVING_DEFAULT, self._generate_defaults,
                          {"prompts": tf.TensorSpec([None], tf.string)})
                self._add(SERVE_TOKEN_IDS, self._generate_from_ids, self._token_specs())

    # --- Building ---

    def _token_specs(self):
        keys = ["token_ids", "padding_mask"]
        if "segment_ids" in self._model.backbone.input_keys:
            keys.append("segment_ids")
        return {key: tf.TensorSpec([None, None], tf.int32) for key in keys}

    def _add(self, signature, body, specs):
        specs = {key: tf.TensorSpec(spec.shape, spec.dtype, name=key)
                 for key, spec in specs.items()}
        function = tf.function(lambda **inputs: body(inputs), autograph=False)
        generating = body in (self._generate, self._generate_defaults, self._generate_from_ids)
        with _attention_mode(self._xla == "all" or (generating and self._xla == "generate")):
            concrete = function.get_concrete_function(**specs)
        self._signatures[signature] = concrete
        setattr(self, signature, function)

    @property
    def signatures(self):
        return dict(self._signatures)

    def save(self, path):
        tf.saved_model.save(self, str(path), signatures=self.signatures)

    # --- Signature bodies (traced once, in _add) ---

    def _serve_text(self, inputs):
        model = self._model
        inputs = {key: clean_strings(value) if value.dtype == tf.string else value
                  for key, value in inputs.items()}
        sequence_length = model.config.data.sequence_length
        outputs = {}
        for head in self._serving_heads:
            head_inputs = {key: inputs[key] for key in head.serving_inputs()}
            rows = head.serving_rows(head_inputs, model.tokenizer, sequence_length)
            outputs[head.name] = head.serving_outputs(self._forward(head, rows), rows,
                                                      head_inputs)
        if self._embeds:
            from kerasllm.task_inputs import pack_texts

            rows = pack_texts({"text": inputs["text"]}, model.tokenizer, sequence_length)
            outputs[None] = {"embedding": self._embedding(rows)}
        return _named(outputs)

    def _serve_token_ids(self, inputs):
        rows = dict(inputs)
        if "segment_ids" not in rows:
            rows["segment_ids"] = tf.zeros_like(rows["token_ids"])
        outputs = {}
        for head in self._serving_heads:
            head_rows = head.serving_token_rows(dict(rows))
            outputs[head.name] = head.serving_outputs(self._forward(head, head_rows),
                                                      head_rows, None)
        if self._embeds:
            outputs[None] = {"embedding": self._embedding(rows)}
        return _named(outputs)

    def _forward(self, head, rows):
        model = self._model
        inputs = {key: rows[key] for key in model.input_keys_of([head]) if key in rows}
        inputs = head.transform_inputs(inputs, training=False)
        backbone_outputs = model.backbone(
            {key: inputs[key] for key in model.backbone.input_keys}, training=False)
        return head(backbone_outputs, inputs, training=False)

    def _embedding(self, rows):
        """The pooler's output where there is one, else the mean of the final
        hidden states over the real tokens."""
        backbone = self._model.backbone
        outputs = backbone({key: rows[key] for key in backbone.input_keys}, training=False)
        if "pooled_output" in outputs:
            return tf.cast(outputs["pooled_output"], tf.float32)
        mask = tf.cast(rows["padding_mask"] > 0, tf.float32)[..., None]
        hidden = tf.cast(outputs["sequence_output"], tf.float32)
        return tf.reduce_sum(hidden * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1)

    def _generate(self, inputs):
        from kerasllm import generation

        prompts = clean_strings(inputs["prompts"])
        prompt_ids = generation.graph_prompt_ids(self._model, prompts, inputs["max_new_tokens"])
        return generation.graph_generate(
            self._model, prompt_ids, inputs["max_new_tokens"], inputs["temperature"],
            inputs["top_k"], inputs["top_p"], inputs["seed"],
            jit_compile=self._xla != "none")

    def _defaults(self, batch_size):
        return {"max_new_tokens": tf.fill([batch_size], self._max_new_tokens),
                "temperature": tf.zeros([batch_size]),
                "top_k": tf.zeros([batch_size], tf.int32),
                "top_p": tf.ones([batch_size]),
                "seed": tf.zeros([batch_size], tf.int64)}

    def _generate_defaults(self, inputs):
        return self._generate({**self._defaults(tf.shape(inputs["prompts"])[0]), **inputs})

    def _generate_from_ids(self, inputs):
        from kerasllm import generation

        prompt_ids = tf.RaggedTensor.from_tensor(
            inputs["token_ids"], lengths=tf.reduce_sum(
                tf.cast(inputs["padding_mask"] > 0, tf.int32), axis=1))
        parameters = self._defaults(tf.shape(inputs["token_ids"])[0])
        outputs = generation.graph_generate(
            self._model, prompt_ids, parameters["max_new_tokens"], parameters["temperature"],
            parameters["top_k"], parameters["top_p"], parameters["seed"],
            jit_compile=self._xla != "none")
        return {"token_ids": outputs["token_ids"]}

    # --- Warm-up and verification inputs ---

    def warmup_requests(self):
        """``(signature, inputs)`` pairs, numpy inputs, for every signature at
        batch sizes 1 and 3: what TF Serving replays before it serves."""
        if getattr(self, "_warmups", None) is None:
            from kerasllm.task_inputs import pack_texts

            model = self._model
            # Token ids as the text signature would make them, from the same texts.
            rows = tf.function(lambda text: pack_texts(
                {"text": text}, model.tokenizer, 16))(tf.constant(WARMUP_TEXTS))
            rows = {key: value.numpy().astype("int32") for key, value in rows.items()}
            requests = []
            for signature, concrete in self._signatures.items():
                specs = concrete.structured_input_signature[1]
                for batch_size in (1, 3):
                    requests.append((signature, {key: _sample(key, spec, batch_size, rows)
                                                 for key, spec in specs.items()}))
            object.__setattr__(self, "_warmups", requests)
        return self._warmups


# Texts of every kind a client may send: plain, empty, accents and emoji with an
# invalid byte.
WARMUP_TEXTS = [b"Warm-up request: the quick brown fox jumps over the lazy dog.", b"",
                "Unicode \u00e9t\u00e9 \U0001F600 and a bad byte: ".encode() + b"\xff"]
WARMUP_PARAMETERS = {"max_new_tokens": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                     "seed": 0}


def _sample(key, spec, batch_size, rows):
    """A warm-up value for input ``key``: texts, token rows, or generation settings."""
    if spec.dtype == tf.string:
        shape = [batch_size] + [dim or 2 for dim in spec.shape[1:]]
        count = int(np.prod(shape))
        texts = [WARMUP_TEXTS[i % len(WARMUP_TEXTS)] for i in range(count)]
        return np.array(texts, dtype=object).reshape(shape)
    if key in rows:
        return rows[key][:batch_size]
    return np.full([batch_size], WARMUP_PARAMETERS.get(key, 0), spec.dtype.as_numpy_dtype)


def _can_generate(model, generation):
    try:
        generation.can_generate(model)
    except ValueError:
        return False
    return True


def _attention_mode(compiled):
    from kerasllm.layers import without_xla

    return contextlib.nullcontext() if compiled else without_xla()


def _named(outputs):
    """One output dict: a single head's names as they are, several heads'
    prefixed by the head's name; ``embedding`` (key None) unprefixed."""
    heads = [name for name in outputs if name is not None]
    named = {}
    for head, values in outputs.items():
        for key, value in values.items():
            named[f"{head}_{key}" if head is not None and len(heads) > 1 else key] = value
    return named


def clean_strings(texts):
    """Invalid UTF-8 bytes → U+FFFD, so that no tokenizer fails on them."""
    return tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace",
                                        replacement_char=0xFFFD)


def _resources(roots, depth=6):
    """The lookup tables and other TensorFlow resources the tokenizer and heads
    hold, also those out of TensorFlow's tracking (keras-hub's BPE cache lives
    in a plain Python object): a SavedModel must own every resource its
    functions capture."""
    found, seen = [], set()

    def walk(value, level):
        if id(value) in seen or level > depth or isinstance(
                value, (str, bytes, int, float, bool, type(None), np.ndarray, tf.Tensor)):
            return
        seen.add(id(value))
        if isinstance(value, tf.saved_model.experimental.TrackableResource):
            found.append(value)
            return
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, (list, tuple, set)):
            children = list(value)
        else:
            children = list(getattr(value, "__dict__", {}).values())
        for child in children:
            walk(child, level + 1)

    for root in roots:
        walk(root, 0)
    return found
