"""Generation: the KV-cached XLA loop against full recomputation and transformers."""

import numpy as np
import pytest
from conftest import SPECIAL_TOKENS

import kerasllm
from kerasllm.model import KerasLLMModel


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
