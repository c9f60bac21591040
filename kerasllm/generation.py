"""Text generation with a key/value cache, in one XLA-compiled loop.

Prompts of different lengths share one right-padded token buffer of static
shape. A prefill pass runs the whole buffer through the decoder, filling the
cache; the loop then starts at the shortest prompt's end and, one position at
a time, keeps the prompt's token where there is one and otherwise picks the
next token from the logits, writes it, and runs only that token through the
decoder (``Backbone.decode_step``). Attention over the cache is causal, so the
junk the prefill wrote past a prompt's end is overwritten before any query
sees it. Encoder–decoders (T5) encode the prompt once and decode from the
start token.
"""

import numbers

import numpy as np
import tensorflow as tf

from kerasllm.tokenizers import special_tokens

# Buffers grow in steps of this many positions, so that nearby prompt lengths
# share one compiled loop.
_BUCKET = 32


def generate(model, prompts, max_new_tokens=32, *, temperature=0.0, top_k=0, top_p=1.0,
             seed=None, stop_token_ids=None):
    """See :meth:`kerasllm.KerasLLMModel.generate`."""
    backbone = model.backbone
    if backbone.kind == "encoder":
        raise ValueError("generate needs a decoder or an encoder-decoder model; this model "
                         "is an encoder (bidirectional), which cannot predict text left to right")
    if not model.heads and not backbone.tie_embeddings:
        raise ValueError(
            "this model has no trained output projection: its embeddings are untied and "
            "it has no language-model objective (a base checkpoint such as LlamaModel "
            "imported without lm_head.weight); import the *ForCausalLM checkpoint instead")
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
        encoder_inputs = None
        start_ids = prompt_ids
    lengths = np.array([len(p) for p in start_ids])
    end = int(lengths.max()) + max_new_tokens
    limit = backbone.max_sequence_length - backbone.position_offset
    if backbone.position_embedding == "learned" and end > limit:
        raise ValueError(
            f"prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) = {end} "
            f"exceeds the model's {limit} learned positions; shorten one of them")
    buffer_length = min(_bucket(end), limit) if backbone.position_embedding == "learned" \
        else _bucket(end)
    buffer, prompt_mask = _pad(start_ids, pad, buffer_length)
    loop = _compiled_loop(model)
    seed = np.random.SeedSequence(seed).generate_state(2).astype("int32") % (2**31 - 1)
    output = loop(
        tf.constant(buffer), tf.constant(prompt_mask),
        tf.constant(encoder_inputs[0]) if encoder_inputs else tf.zeros((0, 0), tf.int32),
        tf.constant(encoder_inputs[1], tf.int32) if encoder_inputs
        else tf.zeros((0, 0), tf.int32),
        tf.constant(int(lengths.min())), tf.constant(end),
        tf.constant(sorted(set(stop_token_ids)) or [-1], tf.int32), tf.constant(pad),
        tf.constant(seed), tf.constant(float(temperature)),
        tf.constant(min(int(top_k), 2**31 - 1)),
        tf.constant(float(top_p)),
    ).numpy()
    results = []
    for row, length in zip(output, lengths):
        ids = _trim(row[:length + max_new_tokens].tolist(), int(length), stop_token_ids)
        if backbone.kind == "encoder_decoder":
            ids = ids[1:]  # drop the start token: the prompt went to the encoder
        results.append(detokenize(model.tokenizer, ids, tokens) if strings else ids)
    return results[0] if single else results


def _compiled_loop(model):
    """One ``tf.function(jit_compile=True)`` per model, traced and compiled once per
    buffer shape (no ``reduce_retracing``: the cache needs static sizes)."""
    if getattr(model, "_generation_loop", None) is None:
        backbone = model.backbone

        @tf.function(jit_compile=True)
        def loop(buffer, prompt_mask, encoder_ids, encoder_mask, start, end, stop_ids, pad,
                 seed, temperature, top_k, top_p):
            batch_size, length = buffer.shape
            context = context_mask = None
            if backbone.kind == "encoder_decoder":
                context = backbone.encode({"token_ids": encoder_ids,
                                           "padding_mask": encoder_mask})
                context_mask = encoder_mask
            hidden, cache = backbone.decode_step(
                buffer, backbone.empty_cache(batch_size, length), 0, context, context_mask)
            logits = backbone.logits(tf.gather(hidden, start - 1, axis=1))
            done = tf.zeros((batch_size,), tf.bool)

            def body(index, buffer, done, logits, cache):
                step_seed = tf.stack([seed[0], seed[1] + index])
                chosen = _choose(logits, step_seed, temperature, top_k, top_p)
                in_prompt = prompt_mask[:, index]
                token = tf.where(in_prompt, buffer[:, index], chosen)
                token = tf.where(done, pad, token)
                buffer = tf.tensor_scatter_nd_update(
                    buffer, tf.stack([tf.range(batch_size), tf.fill([batch_size], index)], 1),
                    token)
                stopped = tf.reduce_any(token[:, None] == stop_ids[None, :], axis=1)
                done = done | (~in_prompt & stopped)
                hidden, cache = backbone.decode_step(token[:, None], cache, index, context,
                                                     context_mask)
                return index + 1, buffer, done, backbone.logits(hidden[:, -1]), cache

            def running(index, buffer, done, logits, cache):
                return (index < end) & ~tf.reduce_all(done)

            _, buffer, _, _, _ = tf.while_loop(
                running, body, (start, buffer, done, logits, cache))
            return buffer

        model._generation_loop = loop
    return model._generation_loop


def _choose(logits, seed, temperature, top_k, top_p):
    """Greedy when ``temperature`` is 0; otherwise a sample from the
    temperature-scaled distribution, restricted to the ``top_k`` most likely
    tokens (0: all) and to the smallest set whose probability reaches ``top_p``."""
    logits = tf.cast(logits, tf.float32)
    # A conditional, not a select: greedy decoding skips the vocabulary sort.
    return tf.cond(temperature > 0,
                   lambda: _sample(logits, seed, temperature, top_k, top_p),
                   lambda: tf.argmax(logits, axis=-1, output_type=tf.int32))


def _sample(logits, seed, temperature, top_k, top_p):
    scaled = logits / temperature
    filtered = tf.cond((top_k > 0) | (top_p < 1),
                       lambda: _filter(scaled, top_k, top_p), lambda: scaled)
    # Gumbel-max: argmax(logits + Gumbel noise) is a sample of softmax(logits).
    uniform = tf.random.stateless_uniform(tf.shape(filtered), seed, minval=1e-9, maxval=1.0,
                                          alg="philox")
    return tf.argmax(filtered - tf.math.log(-tf.math.log(uniform)), axis=-1,
                     output_type=tf.int32)


def _filter(scaled, top_k, top_p):
    """``scaled`` with the tokens outside the top k and the top-p nucleus at -1e9.

    A full sort of the vocabulary, the costly part of sampling: XLA's top_k needs
    a static k."""
    ordered = tf.sort(scaled, axis=-1, direction="DESCENDING")
    vocabulary = tf.shape(scaled)[-1]
    k = tf.where(top_k > 0, tf.minimum(top_k, vocabulary), vocabulary)
    kth = tf.gather(ordered, k - 1, axis=-1)[:, None]
    # Nucleus: keep tokens whose preceding cumulative probability is below top_p
    # (the most likely token always survives).
    probabilities = tf.nn.softmax(ordered, axis=-1)
    before = tf.cumsum(probabilities, axis=-1, exclusive=True)
    kept = tf.reduce_sum(tf.cast(before < top_p, tf.int32), axis=-1)
    nucleus = tf.gather(ordered, tf.maximum(kept, 1) - 1, axis=-1, batch_dims=1)[:, None]
    return tf.where(scaled >= tf.maximum(kth, nucleus), scaled, -1e9)


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
    special = {tokens.start, tokens.end, tokens.pad, tokens.mask}
    special |= {tokenizer.token_to_id(token["content"])
                for token in getattr(tokenizer, "added_tokens", ())}
    kept = [i for i in ids if i not in special]
    text = _as_list(tokenizer.detokenize(tf.constant([kept], tf.int32)))[0]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


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


def _bucket(length):
    return -(-length // _BUCKET) * _BUCKET


def _trim(ids, prompt_length, stop_token_ids):
    """Up to and including the first generated stop token."""
    for i in range(prompt_length, len(ids)):
        if ids[i] in stop_token_ids:
            return ids[:i + 1]
    return ids
