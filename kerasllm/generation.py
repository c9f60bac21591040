"""Text generation with a key/value cache, in one XLA-compiled loop.

Prompts of different lengths share one right-padded token buffer. A prefill
pass runs the buffer's first positions, up to the shortest prompt's end rounded
up to a bucket, through the decoder, filling the cache; the loop then starts at
the shortest prompt's end and, one position at a time, keeps the prompt's token
where there is one and otherwise picks the next token from the logits, writes
it, and runs only that token through the decoder (``Backbone.decode_step``).
Attention over the cache is causal, so the junk the prefill wrote past a
prompt's end is overwritten before any query sees it.
Encoder–decoders (T5) encode the prompt once and decode from the start token.

Every row carries its own sampling parameters, seed and length, so a row's
tokens depend on its own prompt and parameters only, not on the rows batched
with it. Two callers share the one loop (:func:`_generation_loop`):
:func:`generate` (``model.generate``) runs it eagerly on numpy batches, traced
per buffer shape; :func:`graph_prompt_ids` and :func:`graph_generate` build
the same generation inside a TensorFlow graph (the SavedModel's ``generate``
signature, ``kerasllm.export``), where shapes are unknown until run time.
"""

import contextlib
import numbers

import numpy as np
import tensorflow as tf

from kerasllm.tokenizers import special_tokens

# Buffers grow in steps of this many positions, so that nearby prompt lengths
# share one compiled loop.
_BUCKET = 32


def can_generate(model):
    """Raise ``ValueError`` (saying why) unless ``model`` can generate text: it
    must be a decoder or an encoder–decoder, with a trained output projection."""
    backbone = model.backbone
    if backbone.kind == "encoder":
        raise ValueError("generate needs a decoder or an encoder-decoder model; this model "
                         "is an encoder (bidirectional), which cannot predict text left to right")
    if not model.heads and not backbone.tie_embeddings:
        raise ValueError(
            "this model has no trained output projection: its embeddings are untied and "
            "it has no language-model objective (a base checkpoint such as LlamaModel "
            "imported without lm_head.weight); import the *ForCausalLM checkpoint instead")


# === In process: model.generate ===============================================


def generate(model, prompts, max_new_tokens=32, *, temperature=0.0, top_k=0, top_p=1.0,
             seed=None, stop_token_ids=None):
    """See :meth:`kerasllm.KerasLLMModel.generate`.

    Row ``i`` samples from its own seed, drawn from ``seed`` and ``i``: the same
    seed gives the same samples for the same batch, and a row's samples do not
    depend on the other prompts.
    """
    can_generate(model)
    backbone = model.backbone
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    max_new_tokens, top_k = int(max_new_tokens), int(top_k)
    tokens = special_tokens(model.tokenizer)
    single = isinstance(prompts, str) or _is_token_list(prompts)
    batch = [prompts] if single else list(prompts)
    if not batch:
        raise ValueError("prompts is empty")
    strings = isinstance(batch[0], str)
    prompt_ids = _tokenize(model.tokenizer, batch, tokens, backbone.kind) if strings \
        else [list(map(int, p)) for p in batch]
    if any(not p for p in prompt_ids) and backbone.kind == "decoder":
        raise ValueError("a prompt is empty; a decoder needs at least one token to start from")
    outside = [i for p in prompt_ids for i in p if not 0 <= i < backbone.vocabulary_size]
    if outside:
        raise ValueError(f"token id {outside[0]} is outside the model's vocabulary "
                         f"(0 to {backbone.vocabulary_size - 1})")
    if stop_token_ids is None:
        stop_token_ids = [tokens.end] if tokens.end is not None else []
    pad = tokens.pad  # the end token where the tokenizer has no pad token

    if backbone.kind == "encoder_decoder":
        encoder_inputs = _pad([p or [pad] for p in prompt_ids], pad,
                              _bucket(max(map(len, prompt_ids)) or 1))
        # T5 starts decoding from its pad token (`decoder_start_token_id`).
        start_ids = [[pad]] * len(prompt_ids)
    else:
        encoder_inputs = (np.zeros((0, 0), "int32"),) * 2
        start_ids = prompt_ids
    lengths = np.array([len(p) for p in start_ids], "int32")
    end = int(lengths.max()) + max_new_tokens
    limit = _position_limit(backbone)
    if backbone.position_embedding == "learned" and end > limit:
        raise ValueError(
            f"prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) = {end} "
            f"exceeds the model's {limit} learned positions; shorten one of them")
    buffer, prompt_mask = _pad(start_ids, pad, _buffer_length(backbone, end, min))
    rows = len(start_ids)
    seeds = np.random.SeedSequence(seed).generate_state(rows, np.uint64).view(np.int64)
    start = int(lengths.min())
    output = _run_loop(
        model, True, buffer, prompt_mask, encoder_inputs[0], encoder_inputs[1].astype("int32"),
        start, min(_bucket(start), buffer.shape[1]), lengths + max_new_tokens,
        sorted(set(stop_token_ids)) or [-1], pad, seeds, np.full(rows, temperature, "float32"),
        np.full(rows, min(top_k, 2**31 - 1), "int32"), np.full(rows, top_p, "float32"),
    ).numpy()
    results = []
    for row, length in zip(output, lengths):
        ids = _trim(row[:length + max_new_tokens].tolist(), int(length), stop_token_ids)
        if backbone.kind == "encoder_decoder":
            ids = ids[1:]  # drop the start token: the prompt went to the encoder
        results.append(detokenize(model.tokenizer, ids, tokens) if strings else ids)
    return results[0] if single else results


# === In a graph: the SavedModel's generate signature ============================


def graph_prompt_ids(model, prompts, max_new_tokens):
    """Token ids of ``prompts`` for :func:`graph_generate`, built in a graph.

    The ids are those ``model.generate`` feeds its loop for string prompts:
    the start token where the tokenizer adds one (Llama's ``<s>``) and, for an
    encoder–decoder, the end token (T5's ``</s>``). Unlike ``model.generate``,
    nothing fails; rows are mended instead (:func:`_fit_prompts`):

    - an empty decoder prompt starts from the tokenizer's start token, or its
      end token where it has none (GPT-2's ``<|endoftext|>``);
    - a decoder prompt keeps its last ``limit - max_new_tokens`` tokens (at
      least one), ``limit`` being the positions the model knows:
      ``max_sequence_length - position_offset`` with learned positions,
      ``max_sequence_length`` (what it was built for) with rotary or relative
      ones;
    - an encoder–decoder prompt keeps its first ``limit - 1`` tokens and its
      last one (the end token) when the tokenizer adds an end token, else its
      first ``limit``.

    Args:
        model: a :class:`kerasllm.KerasLLMModel` that can generate (:func:`can_generate`).
        prompts: string ``(batch,)``.
        max_new_tokens: int ``(batch,)``, each row's own, or a scalar for all;
            each row is truncated for its own value (the longest prompt a row
            keeps must not depend on the rows batched with it).
    Returns:
        ragged int32 ``(batch, None)``.
    """
    can_generate(model)
    tokens = special_tokens(model.tokenizer)
    ids = _as_ragged(model.tokenizer(prompts))
    if tokens.add_start and tokens.start is not None:
        ids = tf.concat([_column(ids.nrows(), tokens.start), ids], axis=1)
    if model.backbone.kind == "encoder_decoder" and tokens.add_end and tokens.end is not None:
        ids = tf.concat([ids, _column(ids.nrows(), tokens.end)], axis=1)
    return _fit_prompts(model, ids, max_new_tokens)


def graph_generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                   stop_token_ids=None, jit_compile=True):
    """Generation in a TensorFlow graph: the loop of ``model.generate``, per-row parameters.

    Call it inside a ``tf.function``; shapes may be unknown (any batch size).
    Every parameter is per row, batch first, as TF Serving's row format and
    server-side batching need, and row ``i``'s tokens depend only on its own
    prompt, parameters and seed. Each row stops after its own
    ``max_new_tokens``, after a stop token, or at the last learned position.
    Values ``model.generate`` refuses are clamped instead: ``max_new_tokens``
    below 0 to 0, ``temperature`` ≤ 0 is greedy, ``top_k`` ≤ 0 and
    ``top_p`` ≥ 1 do not limit, ``top_p`` ≤ 0 keeps the most likely token.
    Prompts are mended as :func:`graph_prompt_ids` describes (a no-op on its
    output), so token-id prompts cannot fail either; their ids must be in the
    vocabulary.

    The loop runs XLA-compiled, once per batch size and bucket of buffer
    lengths, like ``model.generate``.

    Args:
        model: a :class:`kerasllm.KerasLLMModel` that can generate (:func:`can_generate`).
        prompt_ids: ragged int32 ``(batch, None)`` (a dense ``(batch, length)``
            tensor is taken as rows of that length), e.g. from :func:`graph_prompt_ids`.
        max_new_tokens: int32 ``(batch,)``.
        temperature: float32 ``(batch,)``; 0: greedy.
        top_k: int32 ``(batch,)``; 0: no limit.
        top_p: float32 ``(batch,)``; 1: no limit.
        seed: int64 ``(batch,)``: row ``i`` draws its step-``t`` noise from the
            stateless seed ``(seed[i], t)``. A scalar parameter is broadcast to
            all rows.
        stop_token_ids: a row ends after generating one of these (a list of
            ints); default: the tokenizer's end token.
        jit_compile: False builds the same loop uncompiled, attention
            included, for servers without XLA.
    Returns:
        a dict of
        ``token_ids``: int32 ``(batch, length)``, padded with -1: for a decoder
        the prompt (as mended) and its continuation, up to and including a stop
        token (what ``model.generate`` returns for token ids); for an
        encoder–decoder the decoded output without the start token.
        ``text``: string ``(batch,)``, what ``model.generate`` returns for
        string prompts (decoder: prompt and continuation; special and added
        tokens left out), valid UTF-8.
        ``completion``: string ``(batch,)``, the text of the generated tokens only.
    """
    can_generate(model)
    backbone = model.backbone
    tokens = special_tokens(model.tokenizer)
    pad = tokens.pad
    prompt_ids = _as_ragged(prompt_ids)
    batch_size = prompt_ids.nrows(out_type=tf.int32)

    def per_row(value, dtype):
        return tf.broadcast_to(tf.cast(value, dtype), [batch_size])

    max_new_tokens = tf.maximum(per_row(max_new_tokens, tf.int32), 0)
    prompt_ids = _fit_prompts(model, prompt_ids, max_new_tokens)
    if stop_token_ids is None:
        stop_token_ids = [tokens.end] if tokens.end is not None else []
    stop_ids = tf.unique(tf.concat([tf.reshape(tf.cast(stop_token_ids, tf.int32), [-1]),
                                    [-1]], 0)).y

    if backbone.kind == "encoder_decoder":
        # An empty encoder input is one pad token, as in model.generate.
        encoder_rows = _fill_empty(prompt_ids, pad)
        encoder_lengths = tf.cast(encoder_rows.row_lengths(), tf.int32)
        encoder_length = _bucket(tf.maximum(tf.reduce_max(encoder_lengths), 1))
        encoder_ids = encoder_rows.to_tensor(pad, shape=tf.stack([batch_size, encoder_length]))
        encoder_mask = tf.sequence_mask(encoder_lengths, encoder_length, tf.int32)
        start_ids = _column(batch_size, pad)  # T5's `decoder_start_token_id`
    else:
        encoder_ids = encoder_mask = tf.zeros((0, 0), tf.int32)
        start_ids = prompt_ids
    lengths = tf.cast(start_ids.row_lengths(), tf.int32)
    ends = lengths + max_new_tokens
    if backbone.position_embedding == "learned":
        ends = tf.minimum(ends, _position_limit(backbone))
    buffer_length = _buffer_length(backbone, tf.reduce_max(ends), tf.minimum)
    buffer = start_ids.to_tensor(pad, shape=tf.stack([batch_size, buffer_length]))
    prompt_mask = tf.sequence_mask(lengths, buffer_length)
    start = tf.reduce_min(lengths)
    output = _run_loop(
        model, jit_compile, buffer, prompt_mask, encoder_ids, encoder_mask,
        start, tf.minimum(_bucket(start), buffer_length), ends, stop_ids, pad,
        per_row(seed, tf.int64), per_row(temperature, tf.float32),
        tf.maximum(per_row(top_k, tf.int32), 0), per_row(top_p, tf.float32))

    # Each row up to and including its first generated stop token (`_trim`).
    positions = tf.range(buffer_length)[None, :]
    generated = (positions >= lengths[:, None]) & (positions < ends[:, None])
    stopped = generated & tf.reduce_any(output[:, :, None] == stop_ids[None, None, :], axis=-1)
    kept = tf.where(tf.reduce_any(stopped, axis=1),
                    tf.argmax(tf.cast(stopped, tf.int32), axis=1, output_type=tf.int32) + 1, ends)
    rows = tf.RaggedTensor.from_tensor(output, lengths=kept)
    if backbone.kind == "encoder_decoder":
        rows = rows[:, 1:]  # the start token; the prompt went to the encoder
        text = completion = _graph_detokenize(model.tokenizer, rows, tokens)
    else:
        text = _graph_detokenize(model.tokenizer, rows, tokens)
        new = _positions(rows) >= tf.gather(lengths, rows.value_rowids())
        completion = _graph_detokenize(
            model.tokenizer, tf.ragged.boolean_mask(rows, rows.with_flat_values(new)), tokens)
    return {"token_ids": rows.to_tensor(-1), "text": text, "completion": completion}


def _fit_prompts(model, ids, max_new_tokens):
    """``ids`` (ragged int32) mended as :func:`graph_prompt_ids` documents;
    ``max_new_tokens``: int ``(batch,)`` or a scalar."""
    tokens = special_tokens(model.tokenizer)
    limit = _position_limit(model.backbone)
    if model.backbone.kind == "decoder":
        ids = _fill_empty(ids, tokens.start if tokens.start is not None else tokens.end)
    lengths = tf.gather(tf.cast(ids.row_lengths(), tf.int32), ids.value_rowids())
    position = _positions(ids)
    if model.backbone.kind == "decoder":
        max_new_tokens = tf.broadcast_to(tf.cast(max_new_tokens, tf.int32), [ids.nrows()])
        kept = tf.maximum(limit - tf.maximum(max_new_tokens, 0), 1)
        keep = position >= lengths - tf.gather(kept, ids.value_rowids())
    elif tokens.add_end and tokens.end is not None:
        keep = (position < limit - 1) | (position == lengths - 1)
    else:
        keep = position < limit
    return tf.ragged.boolean_mask(ids, ids.with_flat_values(keep))


def _graph_detokenize(tokenizer, ids, tokens):
    """:func:`detokenize` of each row of ``ids`` (ragged), in a graph; invalid
    UTF-8 (a byte-level token cut in two) becomes U+FFFD."""
    skipped = tf.constant(sorted(_skipped_ids(tokenizer, tokens)) or [-1], tf.int32)
    kept = ~tf.reduce_any(ids.flat_values[:, None] == skipped[None, :], axis=1)
    text = tokenizer.detokenize(tf.ragged.boolean_mask(ids, ids.with_flat_values(kept)))
    return tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")


def _as_ragged(ids):
    """``ids`` as a ragged int32 matrix: a dense one's rows are whole; a list
    (what keras-hub tokenizers give eagerly) may be ragged."""
    if isinstance(ids, (list, tuple)):
        return tf.ragged.constant(ids, tf.int32, ragged_rank=1)
    if not isinstance(ids, tf.RaggedTensor):
        ids = tf.RaggedTensor.from_tensor(ids)
    return tf.cast(ids, tf.int32).with_row_splits_dtype(tf.int64)


def _column(rows, value):
    """Ragged ``(rows, 1)`` int32 of ``value``."""
    return tf.RaggedTensor.from_tensor(tf.fill(tf.stack([tf.cast(rows, tf.int32), 1]), value))


def _fill_empty(ids, value):
    """``ids`` (ragged) with each empty row replaced by ``[value]``."""
    empty = tf.cast(ids.row_lengths() == 0, tf.int64)
    filler = tf.RaggedTensor.from_row_lengths(
        tf.fill([tf.reduce_sum(tf.cast(empty, tf.int32))], value), empty)
    return tf.concat([ids, filler], axis=1)


def _positions(ids):
    """Each value's position in its row, int32, for ``ids.flat_values``."""
    starts = tf.gather(ids.row_starts(), ids.value_rowids())
    return tf.cast(tf.range(tf.size(ids.flat_values, tf.int64)) - starts, tf.int32)


# === The loop both share ========================================================


def _run_loop(model, jit_compile, *arguments):
    """The generation loop's output buffer; without XLA, attention is traced
    as plain ops too (``kerasllm.layers.without_xla``)."""
    from kerasllm.layers import without_xla

    loop = _generation_loop(model, jit_compile)
    with contextlib.nullcontext() if jit_compile else without_xla():
        return loop(*[tf.convert_to_tensor(argument) for argument in arguments])


def _generation_loop(model, jit_compile=True):
    """The generation ``tf.function`` of ``model``, one per ``jit_compile``.

    ``model.generate`` calls it with concrete shapes, so it is traced (and
    XLA-compiled) per batch size and buffer length; :func:`graph_generate`
    traces it once with unknown dimensions, and XLA compiles that trace per
    shape at run time. Hence every size below comes from :func:`_shape`.

    Args (tensors): ``buffer`` int32 ``(batch, length)``, the prompts
    right-padded; ``prompt_mask`` bool, where ``buffer`` holds a prompt token;
    ``encoder_ids``, ``encoder_mask`` int32 ``(batch, encoder_length)``
    (``(0, 0)`` for a decoder); ``start`` int32, the shortest prompt's
    length; ``prefill`` int32, how many of the buffer's first positions the
    prefill runs (``start`` rounded up to a bucket, at most ``length``; XLA
    takes it as a compile-time constant, so there is one compilation per
    value); ``ends`` int32 ``(batch,)``, where each row stops (at most
    ``length``); ``stop_ids`` int32 ``(n,)``; ``pad`` int32; ``seeds`` int64,
    ``temperature`` float32, ``top_k`` int32, ``top_p`` float32, all
    ``(batch,)``. Returns the filled buffer; a row is ``pad`` after it stops.

    Compiled, a batch of one runs as two rows (the row twice): XLA on CPU
    multiplies a single row by the attention's 3-D kernels with a naive loop
    (its small matrix-vector fusion), and two rows take less time than one
    (measured: 1.4x the new tokens/s at batch 1).
    """
    name = "_generation_loop" if jit_compile else "_uncompiled_generation_loop"
    if getattr(model, name, None) is None:
        backbone = model.backbone

        def loop(buffer, prompt_mask, encoder_ids, encoder_mask, start, prefill, ends,
                 stop_ids, pad, seeds, temperature, top_k, top_p):
            rows = _shape(buffer)[0]
            if not jit_compile or (isinstance(rows, int) and rows > 1):
                return fill(buffer, prompt_mask, encoder_ids, encoder_mask, start, prefill,
                            ends, stop_ids, pad, seeds, temperature, top_k, top_p)

            def two_rows(tensor):
                return tf.concat([tensor, tensor[:tf.maximum(2 - rows, 0)]], 0)

            filled = fill(*map(two_rows, (buffer, prompt_mask, encoder_ids, encoder_mask)),
                          start, prefill, two_rows(ends), stop_ids, pad,
                          *map(two_rows, (seeds, temperature, top_k, top_p)))
            return filled[:rows]

        def fill(buffer, prompt_mask, encoder_ids, encoder_mask, start, prefill, ends,
                 stop_ids, pad, seeds, temperature, top_k, top_p):
            batch_size, length = _shape(buffer)
            context = context_mask = None
            if backbone.kind == "encoder_decoder":
                context = backbone.encode({"token_ids": encoder_ids,
                                           "padding_mask": encoder_mask})
                context_mask = encoder_mask
            hidden, cache = backbone.decode_step(
                buffer[:, :prefill], backbone.empty_cache(batch_size, length), 0, context,
                context_mask)
            output_matrix = backbone.output_matrix()
            logits = backbone.logits(tf.gather(hidden, start - 1, axis=1), output_matrix)
            done = tf.zeros_like(ends, tf.bool)
            rows = tf.range(batch_size)

            def body(index, buffer, done, logits, cache):
                done = done | (index >= ends)
                chosen = _choose(logits, seeds, index, temperature, top_k, top_p)
                in_prompt = prompt_mask[:, index]
                token = tf.where(in_prompt, buffer[:, index], chosen)
                token = tf.where(done, pad, token)
                buffer = tf.tensor_scatter_nd_update(
                    buffer, tf.stack([rows, tf.fill(tf.shape(rows), index)], 1), token)
                stopped = tf.reduce_any(token[:, None] == stop_ids[None, :], axis=1)
                done = done | (~in_prompt & stopped)
                hidden, cache = backbone.decode_step(token[:, None], cache, index, context,
                                                     context_mask)
                return (index + 1, buffer, done, backbone.logits(hidden[:, -1], output_matrix),
                        cache)

            def running(index, buffer, done, logits, cache):
                return (index < tf.reduce_max(ends)) & ~tf.reduce_all(done)

            _, buffer, _, _, _ = tf.while_loop(
                running, body, (start, buffer, done, logits, cache))
            return buffer

        setattr(model, name, tf.function(loop, jit_compile=jit_compile))
    return getattr(model, name)


def _choose(logits, seeds, step, temperature, top_k, top_p):
    """Per row: greedy where ``temperature`` is 0; otherwise a sample from the
    temperature-scaled distribution, restricted to the ``top_k`` most likely
    tokens (0: all) and to the smallest set whose probability reaches ``top_p``."""
    logits = tf.cast(logits, tf.float32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    sampling = temperature > 0
    # A conditional, not a select: a greedy batch skips the noise and the sort.
    return tf.cond(
        tf.reduce_any(sampling),
        lambda: tf.where(sampling, _sample(logits, seeds, step, temperature, top_k, top_p),
                         greedy),
        lambda: greedy)


def _sample(logits, seeds, step, temperature, top_k, top_p):
    sampling = temperature > 0
    scaled = logits / tf.where(sampling, temperature, 1.0)[:, None]
    filtering = sampling & ((top_k > 0) | (top_p < 1))
    filtered = tf.cond(tf.reduce_any(filtering),
                       lambda: _filter(scaled, top_k, top_p), lambda: scaled)
    # Gumbel-max: argmax(logits + Gumbel noise) is a sample of softmax(logits).
    return tf.argmax(filtered + _gumbel_noise(seeds, step, scaled), axis=-1,
                     output_type=tf.int32)


def _gumbel_noise(seeds, step, logits):
    """Gumbel noise shaped like ``logits``, row ``i`` from the stateless seed
    ``(seeds[i], step)`` alone.

    One draw per row (``map_fn``: stateless random ops take one seed), Philox
    named explicitly: XLA on CPU runs the default "auto_select" algorithm far
    slower. Random bits, not floats: XLA and TensorFlow's kernels give the same
    bits but turn them into different floats, and the loop with and without
    XLA should sample alike."""
    step = tf.cast(step, tf.int64)
    vocabulary = logits.shape[-1] or tf.shape(logits)[-1]

    def row(seed):
        bits = tf.random.stateless_uniform([vocabulary], tf.stack([seed, step]), minval=None,
                                           maxval=None, dtype=tf.int32, alg="philox")
        # 24 random bits, exact in float32: uniform in (0, 1), never 0 or 1.
        uniform = (tf.cast(tf.bitwise.bitwise_and(bits, 2**24 - 1), tf.float32) + 0.5) * 2**-24
        return -tf.math.log(-tf.math.log(uniform))

    return tf.map_fn(row, seeds, fn_output_signature=tf.float32)


def _filter(scaled, top_k, top_p):
    """``scaled`` with, per row, the tokens outside the top ``k`` and the top-p
    nucleus at -1e9.

    A full sort of the vocabulary, the costly part of sampling: XLA's top_k needs
    a static k."""
    ordered = tf.sort(scaled, axis=-1, direction="DESCENDING")
    vocabulary = tf.shape(scaled)[-1]
    k = tf.where(top_k > 0, tf.minimum(top_k, vocabulary), vocabulary)
    kth = tf.gather(ordered, k - 1, axis=-1, batch_dims=1)
    # Nucleus: keep tokens whose preceding cumulative probability is below top_p
    # (the most likely token always survives).
    probabilities = tf.nn.softmax(ordered, axis=-1)
    before = tf.cumsum(probabilities, axis=-1, exclusive=True)
    kept = tf.reduce_sum(tf.cast(before < top_p[:, None], tf.int32), axis=-1)
    nucleus = tf.gather(ordered, tf.maximum(kept, 1) - 1, axis=-1, batch_dims=1)
    # top_p = 1 keeps all: the cumulative sum may round to 1 before the last token.
    threshold = tf.where(top_p < 1, tf.maximum(kth, nucleus), kth)
    return tf.where(scaled >= threshold[:, None], scaled, -1e9)


def _shape(tensor):
    """The dimensions of ``tensor``: ints where static, scalar tensors where not."""
    dynamic = tf.shape(tensor)
    return [size if size is not None else dynamic[i]
            for i, size in enumerate(tensor.shape.as_list())]


# === Helpers ====================================================================


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _is_token_list(prompts):
    return len(prompts) > 0 and all(isinstance(t, numbers.Integral) for t in prompts)


def _tokenize(tokenizer, texts, tokens, kind):
    """Token ids of each prompt with the start token the tokenizer adds (Llama's
    ``<s>``) and, for an encoder input, the end token (T5's ``</s>``)."""
    ids = _as_list(tokenizer(texts))
    start = [tokens.start] if tokens.add_start and tokens.start is not None else []
    end = [tokens.end] if kind == "encoder_decoder" and tokens.add_end else []
    return [start + list(map(int, row)) + end for row in ids]


def detokenize(tokenizer, ids, tokens):
    """The text of ``ids`` without special and added tokens (T5's sentinels), as
    Hugging Face's ``decode(..., skip_special_tokens=True)`` gives it."""
    special = _skipped_ids(tokenizer, tokens)
    kept = [i for i in ids if i not in special]
    text = _as_list(tokenizer.detokenize(tf.constant([kept], tf.int32)))[0]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def _skipped_ids(tokenizer, tokens):
    """The ids :func:`detokenize` leaves out: special and added tokens."""
    special = {tokens.start, tokens.end, tokens.pad, tokens.mask}
    special |= {tokenizer.token_to_id(token["content"])
                for token in getattr(tokenizer, "added_tokens", ())}
    return special - {None}


def _as_list(outputs):
    """keras-hub tokenizers give Python lists when called eagerly, tensors in graphs."""
    if isinstance(outputs, tf.RaggedTensor):
        return outputs.to_list()
    if isinstance(outputs, tf.Tensor):
        return outputs.numpy().tolist()
    return outputs


def _pad(rows, pad, length):
    """``(ids, mask)`` int32 arrays ``(batch, length)``, rows right-padded."""
    ids = np.full((len(rows), length), pad, "int32")
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = True
    return ids, mask


def _position_limit(backbone):
    """The longest sequence the backbone's positions cover."""
    if backbone.position_embedding == "learned":
        return backbone.max_sequence_length - backbone.position_offset
    return backbone.max_sequence_length


def _buffer_length(backbone, end, minimum):
    """The buffer for sequences up to ``end``: a bucket, within the learned
    positions. ``minimum``: ``min`` for ints, ``tf.minimum`` for tensors."""
    if backbone.position_embedding == "learned":
        return minimum(_bucket(end), _position_limit(backbone))
    return _bucket(end)


def _bucket(length):
    """``length`` rounded up to a multiple of ``_BUCKET`` (an int or an int tensor)."""
    return -(-length // _BUCKET) * _BUCKET


def _trim(ids, prompt_length, stop_token_ids):
    """Up to and including the first generated stop token."""
    for i in range(prompt_length, len(ids)):
        if ids[i] in stop_token_ids:
            return ids[:i + 1]
    return ids
