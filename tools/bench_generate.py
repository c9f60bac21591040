"""Generation speed: the KV-cached XLA loop against recomputing the whole sequence.

    python tools/bench_generate.py [--family gpt2] [--layers 6] [--hidden 512]
        [--batch 4] [--prompt 32] [--new 64]

A randomly initialised model of the given family and size; reports new tokens per
second for ``model.generate`` (greedy, with the first call's compilation too;
sampled; sampled with top-k/top-p filtering) and for the naive greedy loop that
runs the full padded sequence through the backbone at every step.
"""

import argparse
import time

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from kerasllm.model import KerasLLMModel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="gpt2", choices=["gpt2", "llama"])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocabulary", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    vocabulary = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + [
        f"t{i}" for i in range(args.vocabulary - 5)]
    model = KerasLLMModel({
        "model": {"family": args.family, "num_layers": args.layers, "num_heads": args.heads,
                  "hidden_dim": args.hidden, "intermediate_dim": 4 * args.hidden,
                  "max_sequence_length": 1024, "dropout": 0.0},
        "objectives": [{"name": "clm"}],
    }, keras_hub.models.BertTokenizer(vocabulary=vocabulary))
    rng = np.random.default_rng(0)
    prompts = rng.integers(5, args.vocabulary, (args.batch, args.prompt)).tolist()
    new_tokens = args.batch * args.new

    start = time.perf_counter()
    model.generate(prompts, max_new_tokens=args.new, stop_token_ids=[])
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompts, max_new_tokens=args.new, stop_token_ids=[])
    cached = time.perf_counter() - start

    timings = {}
    for name, options in [("sampled", {"temperature": 0.8}),
                          ("sampled, top-k 40 / top-p 0.95",
                           {"temperature": 0.8, "top_k": 40, "top_p": 0.95})]:
        model.generate(prompts, max_new_tokens=args.new, stop_token_ids=[], seed=0, **options)
        start = time.perf_counter()
        model.generate(prompts, max_new_tokens=args.new, stop_token_ids=[], seed=1, **options)
        timings[name] = time.perf_counter() - start

    length = args.prompt + args.new
    step = tf.function(lambda ids, mask: model.backbone.logits(
        model.backbone({"token_ids": ids, "padding_mask": mask})["sequence_output"]),
        jit_compile=True)
    ids = np.zeros((args.batch, length), "int32")
    ids[:, :args.prompt] = prompts
    step(ids, np.ones_like(ids))  # compile
    start = time.perf_counter()
    for position in range(args.prompt, length):
        mask = (np.arange(length) < position)[None].repeat(args.batch, 0).astype("int32")
        ids[:, position] = np.argmax(step(ids, mask)[:, position - 1], axis=-1)
    naive = time.perf_counter() - start

    print(f"{args.family}: {args.layers} layers, hidden {args.hidden}, batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens, {model.count_params():,} parameters")
    print(f"cached, greedy: {new_tokens / cached:8.1f} tokens/s ({cached:.2f} s; "
          f"first call with compilation {first:.2f} s)")
    for name, seconds in timings.items():
        print(f"cached, {name}: {new_tokens / seconds:8.1f} tokens/s ({seconds:.2f} s)")
    print(f"full recomputation, greedy: {new_tokens / naive:8.1f} tokens/s ({naive:.2f} s)")


if __name__ == "__main__":
    main()
