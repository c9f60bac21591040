"""Generation: the KV-cached XLA loop against full recomputation and transformers."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import SPECIAL_TOKENS

import kerasllm
from kerasllm import generation
from kerasllm.model import KerasLLMModel
from kerasllm.tokenizers import special_tokens


def family_model(family, objective="clm", **sizes):
    import keras
    import keras_hub

    keras.utils.set_random_seed(3)
    tokenizer = keras_hub.models.BertTokenizer(
        vocabulary=SPECIAL_TOKENS + [f"w{i}" for i in range(60)])
    model = {"family": family, "num_layers": 2, "num_heads": 4, "hidden_dim": 32,
             "intermediate_dim": 48, "max_sequence_length": 64, "dropout": 0.0, **sizes}
    return KerasLLMModel({"model": model, "objectives": [{"name": objective}],
                          "data": {"sequence_length": 32}}, tokenizer)


def recomputed_greedy(model, prompt, max_new_tokens, length=32):
    """Greedy decoding the slow way: the whole sequence through the model each
    step (right-padded to one ``length``, so XLA compiles the attention once)."""
    backbone, ids = model.backbone, list(prompt)

    def padded(row):
        return {"token_ids": np.array([row + [0] * (length - len(row))], "int32"),
                "padding_mask": np.array([[1] * len(row) + [0] * (length - len(row))], "int32")}

    if backbone.kind == "encoder_decoder":
        encoder, ids = padded(list(prompt)), [model.tokenizer.pad_token_id]
    for _ in range(max_new_tokens):
        if backbone.kind == "encoder_decoder":
            decoder = padded(ids)
            inputs = {**encoder, "decoder_token_ids": decoder["token_ids"],
                      "decoder_padding_mask": decoder["padding_mask"]}
        else:
            inputs = padded(ids)
        hidden = backbone(inputs)["sequence_output"]
        ids.append(int(np.argmax(backbone.logits(hidden)[0, len(ids) - 1])))
    return ids[1:] if backbone.kind == "encoder_decoder" else ids


PROMPTS = [[7, 12, 30, 9, 41], [22, 5, 17], [8, 9, 10, 11, 12, 13, 14, 15, 16]]


@pytest.mark.parametrize("family,sizes", [
    ("gpt2", {}),
    ("llama", {"num_key_value_heads": 2}),
    ("llama", {"num_key_value_heads": 1, "tie_embeddings": True}),
    ("t5", {"num_decoder_layers": 3, "head_dim": 6}),
    ("t5_v1_1", {}),
])
def test_cached_greedy_equals_full_recomputation(family, sizes):
    model = family_model(family, **sizes)
    generated = model.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[])
    for prompt, ids in zip(PROMPTS, generated):
        assert ids == recomputed_greedy(model, prompt, 10)
        expected_length = 10 if model.backbone.kind == "encoder_decoder" else len(prompt) + 10
        assert len(ids) == expected_length


def test_stop_tokens_end_each_row_where_it_generates_one():
    model = family_model("gpt2")
    free = model.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
    stop = free[0][len(PROMPTS[0]) + 3]  # the 4th token row 0 generates
    stopped = model.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[stop])
    for prompt, full, ids in zip(PROMPTS, free, stopped):
        generated = full[len(prompt):]
        end = generated.index(stop) + 1 if stop in generated else len(generated)
        assert ids == prompt + generated[:end]
    assert len(stopped[0]) < len(free[0])


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    model = family_model("llama", num_key_value_heads=2)

    def sample(**kwargs):
        return model.generate(PROMPTS, max_new_tokens=16, stop_token_ids=[], temperature=1.5,
                              **kwargs)

    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)
    greedy = model.generate(PROMPTS, max_new_tokens=16, stop_token_ids=[])
    assert sample(seed=4, top_k=1) == greedy
    assert sample(seed=4, top_p=1e-6) == greedy
    # Every sampled token is among the 3 most likely under the model.
    for prompt, ids in zip(PROMPTS, sample(seed=5, top_k=3)):
        inputs = {"token_ids": np.array([ids], "int32"),
                  "padding_mask": np.ones((1, len(ids)), "int32")}
        logits = model.backbone.logits(model.backbone(inputs)["sequence_output"])[0].numpy()
        for position in range(len(prompt), len(ids)):
            top3 = np.argsort(logits[position - 1])[-3:]
            assert ids[position] in top3


def test_sampling_follows_the_model_distribution():
    """Token frequencies of many one-token samples match softmax(logits / T)."""
    model = family_model("gpt2")
    prompt = [7, 12, 30]
    inputs = {"token_ids": np.array([prompt], "int32"), "padding_mask": np.ones((1, 3), "int32")}
    logits = model.backbone.logits(model.backbone(inputs)["sequence_output"])[0, -1].numpy()
    probabilities = np.exp(logits / 2.0 - (logits / 2.0).max())
    probabilities /= probabilities.sum()
    samples = model.generate([prompt] * 4000, max_new_tokens=1, temperature=2.0, seed=0,
                             stop_token_ids=[])
    counts = np.bincount([ids[-1] for ids in samples], minlength=len(logits)) / 4000
    assert np.abs(counts - probabilities).max() < 0.03


def test_generation_matches_transformers_greedy(tmp_path):
    hf_models = pytest.importorskip("hf_models")
    torch = hf_models.torch
    for name in ("gpt2-lm", "llama-gqa", "t5"):
        reference = hf_models.reference_model(name)
        model = kerasllm.from_hf(hf_models.save(reference, tmp_path / name),
                                 tokenizer=hf_models.tokenizer())
        ours = model.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[7])
        for prompt, ids in zip(PROMPTS, ours):
            with torch.no_grad():
                expected = reference.generate(
                    torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                    eos_token_id=7, pad_token_id=0,
                    use_cache=name != "t5",  # transformers' T5 cache assumes equal depths
                )[0].tolist()
            if name == "t5":
                expected = expected[1:]  # its decoder start token
            assert ids == expected, name


def test_generation_errors():
    encoder = family_model("bert", "mlm")
    with pytest.raises(ValueError, match="needs a decoder or an encoder-decoder"):
        encoder.generate([[5, 6]])
    model = family_model("gpt2")
    with pytest.raises(ValueError, match=r"= 74 exceeds the model's 64 learned positions"):
        model.generate([[5] * 10], max_new_tokens=64)
    with pytest.raises(ValueError, match=r"token id 1000000 is outside the model's vocabulary "
                                         r"\(0 to 64\)"):
        model.generate([[5, 10**6]])
    assert len(model.generate([5, 6], max_new_tokens=np.int64(2), top_k=np.int32(3))) == 4
    for kwargs, message in [({"max_new_tokens": 0}, "max_new_tokens must be a positive"),
                            ({"temperature": -1.0}, "temperature must be >= 0"),
                            ({"top_k": -2}, "top_k must be an integer >= 0"),
                            ({"top_p": 0.0}, r"top_p must be in \(0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            model.generate([[5, 6]], **kwargs)


def test_calls_with_other_shapes_compile_their_own_loop():
    """Each batch size and buffer length gets its own compiled loop; none breaks another."""
    model = family_model("gpt2")
    first = model.generate(PROMPTS, max_new_tokens=5, stop_token_ids=[])
    assert model.generate(PROMPTS[:1], max_new_tokens=5, stop_token_ids=[]) == first[:1]
    longer = model.generate(PROMPTS * 2, max_new_tokens=40, stop_token_ids=[])
    assert [ids[:len(p) + 5] for p, ids in zip(PROMPTS, longer)] == first
    assert model.generate(PROMPTS, max_new_tokens=5, stop_token_ids=[]) == first
    assert model._generation_loop._jit_compile


def test_single_prompt_gives_a_single_result():
    model = family_model("gpt2")
    assert model.generate([5, 6, 7], max_new_tokens=3, stop_token_ids=[]) == \
        model.generate([[5, 6, 7]], max_new_tokens=3, stop_token_ids=[])[0]


# === In a graph: graph_prompt_ids and graph_generate (the SavedModel's generate) ===

SPECS = {"max_new_tokens": tf.TensorSpec([None], tf.int32),
         "temperature": tf.TensorSpec([None], tf.float32),
         "top_k": tf.TensorSpec([None], tf.int32), "top_p": tf.TensorSpec([None], tf.float32),
         "seed": tf.TensorSpec([None], tf.int64)}


@pytest.fixture(scope="module")
def gpt2():
    return family_model("gpt2")


@pytest.fixture(scope="module")
def t5():
    return family_model("t5", num_decoder_layers=3, head_dim=6)


@pytest.fixture(scope="module")
def served():
    """One traced function per (model, inputs, options), as an exporter keeps one
    per signature: each XLA-compiles once per (batch, bucket) shape."""
    functions = {}

    def serve(model, inputs="ids", **options):
        key = (id(model), inputs, repr(sorted(options.items())))
        if key not in functions:
            prompt_spec = tf.RaggedTensorSpec([None, None], tf.int32) if inputs == "ids" \
                else tf.TensorSpec([None], tf.string)

            @tf.function(input_signature=[prompt_spec, *SPECS.values()], autograph=False)
            def function(prompts, max_new_tokens, temperature, top_k, top_p, seed):
                ids = prompts if inputs == "ids" else \
                    generation.graph_prompt_ids(model, prompts, max_new_tokens)
                return generation.graph_generate(model, ids, max_new_tokens, temperature,
                                                 top_k, top_p, seed, **options)

            functions[key] = function
        return functions[key]

    return serve


def run(function, prompts, max_new_tokens=10, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    """Call a served function with per-row parameters (scalars: the same for every row)."""
    rows = len(prompts)
    prompts = tf.ragged.constant(prompts, tf.int32, ragged_rank=1) \
        if not isinstance(prompts[0], str) else tf.constant(prompts)
    parameters = [np.broadcast_to(np.asarray(value, spec.dtype.as_numpy_dtype), [rows])
                  for value, spec in zip((max_new_tokens, temperature, top_k, top_p, seed),
                                         SPECS.values())]
    return {key: value.numpy() for key, value in function(prompts, *parameters).items()}


def unpadded(token_ids):
    return [[i for i in row if i != -1] for row in token_ids.tolist()]


def test_graph_generate_equals_generate_for_decoders(gpt2, served):
    free = gpt2.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[])
    stop = free[0][len(PROMPTS[0]) + 3]
    function = served(gpt2, stop_token_ids=[stop])
    assert unpadded(run(function, PROMPTS)["token_ids"]) == \
        gpt2.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[stop])
    # Per-row max_new_tokens: each row stops at its own length (or its stop token).
    outputs = unpadded(run(function, PROMPTS, max_new_tokens=[2, 7, 4])["token_ids"])
    for prompt, count, full, ids in zip(PROMPTS, [2, 7, 4], free, outputs):
        assert ids == generation._trim(full[:len(prompt) + count], len(prompt), [stop])
    assert len(outputs[1]) == len(PROMPTS[1]) + 7


def test_graph_generate_equals_generate_for_encoder_decoders(t5, served):
    outputs = run(served(t5, stop_token_ids=[]), PROMPTS)
    assert unpadded(outputs["token_ids"]) == t5.generate(PROMPTS, max_new_tokens=10,
                                                         stop_token_ids=[])
    assert outputs["token_ids"].shape == (3, 10)


def test_graph_generate_without_xla_gives_the_same_tokens(gpt2, served):
    function = served(gpt2, stop_token_ids=[], jit_compile=False)
    assert unpadded(run(function, PROMPTS)["token_ids"]) == \
        gpt2.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[])
    # Samples too: both draw the same random bits (`_gumbel_noise`).
    sampled = dict(temperature=[1.5, 1.0, 0.0], top_k=[0, 3, 0], top_p=[0.9, 1.0, 1.0],
                   seed=[1, 2, 3])
    compiled = run(served(gpt2, stop_token_ids=[]), PROMPTS, **sampled)["token_ids"]
    np.testing.assert_array_equal(run(function, PROMPTS, **sampled)["token_ids"], compiled)


def test_graph_text_equals_generate_on_strings(gpt2, t5, served):
    texts = ["w1 w2 w3", "w10 w11 w12 w13 w14 w15", "w40"]
    for model in (gpt2, t5):
        outputs = run(served(model, "text"), texts)
        expected = model.generate(texts, max_new_tokens=10)
        assert [text.decode() for text in outputs["text"]] == expected
        ids = model.generate(_tokenize(model, texts), max_new_tokens=10)
        assert unpadded(outputs["token_ids"]) == ids
        # The completion is the text of the generated tokens alone.
        generated = [row[len(prompt):] for prompt, row in zip(_tokenize(model, texts), ids)] \
            if model.backbone.kind == "decoder" else ids
        tokens = special_tokens(model.tokenizer)
        assert [text.decode() for text in outputs["completion"]] == \
            [generation.detokenize(model.tokenizer, row, tokens) for row in generated]


def test_each_row_samples_from_its_own_parameters_alone(gpt2, served):
    function = served(gpt2, stop_token_ids=[])
    row = dict(temperature=1.5, top_k=0, top_p=0.9, seed=11)
    alone = run(function, PROMPTS[:1], max_new_tokens=12, **row)["token_ids"][0]
    batched = run(function, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], max_new_tokens=[3, 12, 20],
                  temperature=[0.0, 1.5, 0.7], top_k=[0, 0, 5], top_p=[1.0, 0.9, 1.0],
                  seed=[5, 11, 2])["token_ids"]
    assert unpadded(batched[1:2]) == unpadded(alone[None])
    assert unpadded(batched[:1]) == [gpt2.generate(PROMPTS[2], max_new_tokens=3,
                                                   stop_token_ids=[])]
    other_seed = run(function, PROMPTS[:1], max_new_tokens=12, **{**row, "seed": 12})
    assert unpadded(other_seed["token_ids"]) != unpadded(alone[None])


def test_empty_and_overlong_prompts_are_mended(gpt2, t5, served):
    limit = gpt2.backbone.max_sequence_length  # 64 learned positions
    long_text = " ".join(f"w{i % 60}" for i in range(80))
    long_ids, short_ids = _tokenize(gpt2, [long_text, "w1 w2"])  # [CLS] + words
    start = gpt2.tokenizer.cls_token_id
    # Decoder: the last limit - max_new_tokens tokens (at least one).
    prompt_ids = generation.graph_prompt_ids(gpt2, tf.constant(["", long_text, "w1 w2"]),
                                             tf.constant([10, 10, 100]))
    assert prompt_ids.to_list() == [[start], long_ids[-(limit - 10):], short_ids[-1:]]
    # graph_generate mends token-id prompts alike: an empty one starts from the
    # start token; generation ends at the last learned position.
    outputs = run(served(gpt2, stop_token_ids=[]), [[], long_ids, short_ids],
                  max_new_tokens=[10, 10, 100])
    ids = unpadded(outputs["token_ids"])
    assert ids[:2] == gpt2.generate([[start], long_ids[-(limit - 10):]], max_new_tokens=10,
                                    stop_token_ids=[])
    assert len(ids[2]) == limit and ids[2][0] == short_ids[-1]

    # Encoder–decoder: the first tokens that fit the encoder, and the end token.
    prompt_ids = generation.graph_prompt_ids(t5, tf.constant([long_text, ""]), 10).to_list()
    full = _tokenize(t5, [long_text])[0]
    assert prompt_ids == [full[:limit - 1] + [full[-1]], _tokenize(t5, [""])[0]]
    assert full[-1] == t5.tokenizer.sep_token_id


def test_an_empty_prompt_starts_from_the_end_token_without_a_start_token():
    """GPT-2's convention: <|endoftext|> begins a text when there is no start token."""
    from kerasllm.tokenizer_layers import WordPieceTokenizer

    tokenizer = WordPieceTokenizer(SPECIAL_TOKENS + ["w1", "w2"],
                                   special_tokens={"pad": "[PAD]", "end": "[SEP]"})
    model = KerasLLMModel({"model": {"family": "gpt2", "num_layers": 1, "num_heads": 2,
                                     "hidden_dim": 8, "intermediate_dim": 8,
                                     "max_sequence_length": 16},
                           "objectives": [{"name": "clm"}], "data": {"sequence_length": 16}},
                          tokenizer)
    prompt_ids = generation.graph_prompt_ids(model, tf.constant(["", "w1 w2"]), 4)
    assert prompt_ids.to_list() == [[2], [5, 6]]


def _tokenize(model, texts):
    return generation._tokenize(model.tokenizer, texts, special_tokens(model.tokenizer),
                                model.backbone.kind)
