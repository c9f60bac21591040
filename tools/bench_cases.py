"""One benchmark case, run in a process of its own by ``tools/bench.py``.

    python tools/bench_cases.py '{"kind": "train", "side": "kerasllm", ...}'

Prints one JSON line: the case's timed windows (warm-up excluded) and what it
measured besides (compile time, peak memory, parameter counts). Both sides get
the same synthetic batches: token ids drawn uniformly from the vocabulary with
a fixed seed, so every kerasllm/keras-hub pair computes on identical data.
"""

import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
MASK_ID = SPECIAL_TOKENS.index("[MASK]")
MAX_POSITIONS = 1024  # the longest sequence the scaling sweep runs


def memory_mb():
    """(current, peak) resident set size of this process in MB (VmRSS, VmHWM)."""
    fields = dict(line.split(":", 1) for line in
                  pathlib.Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


def vocabulary(size):
    return SPECIAL_TOKENS + [f"t{i}" for i in range(size - len(SPECIAL_TOKENS))]


def token_ids(spec, rows, length, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(len(SPECIAL_TOKENS), spec["vocabulary"], (rows, length), dtype="int32")


def masked_batch(spec):
    """MLM inputs: ``round(rate * length)`` masked positions per row (never [CLS] at 0)."""
    batch, length = spec["batch"], spec["sequence"]
    ids = token_ids(spec, batch, length)
    count = round(spec["mask_rate"] * length)
    rng = np.random.default_rng(1)
    positions = np.sort(np.stack([rng.choice(np.arange(1, length), count, replace=False)
                                  for _ in range(batch)]), axis=1).astype("int32")
    labels = np.take_along_axis(ids, positions, axis=1)
    masked = ids.copy()
    np.put_along_axis(masked, positions, MASK_ID, axis=1)
    inputs = {"token_ids": masked, "padding_mask": np.ones_like(ids),
              "segment_ids": np.zeros_like(ids), "mask_positions": positions}
    return inputs, labels, np.ones_like(positions, "float32")


def causal_batch(spec):
    ids = token_ids(spec, spec["batch"], spec["sequence"])
    labels = np.pad(ids[:, 1:], [[0, 0], [0, 1]])
    weights = np.ones_like(ids, "float32")
    weights[:, -1] = 0.0
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}, labels, weights


def kerasllm_model(spec, objective, **model):
    import kerasllm

    family = {"mlm": {"kind": "encoder", "pooler": False}, "clm": {"family": "gpt2"}}[objective]
    config = {
        "model": {**family, "num_layers": spec["layers"], "num_heads": spec["heads"],
                  "hidden_dim": spec["hidden"], "intermediate_dim": spec["intermediate"],
                  "max_sequence_length": MAX_POSITIONS, "dropout": spec["dropout"], **model},
        "objectives": [{"name": objective}],
        "data": {"sequence_length": spec["sequence"], "batch_size": spec["batch"]},
        "training": {"learning_rate": 1e-4, "warmup_steps": 10, "steps": 1000,
                     "weight_decay": 0.01, "clipnorm": 1.0,
                     "jit_compile": spec.get("jit_compile", "auto")},
    }
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary(spec["vocabulary"]))
    return kerasllm.build_model(config, tokenizer)


def keras_hub_model(spec, objective):
    sizes = dict(vocabulary_size=spec["vocabulary"], num_layers=spec["layers"],
                 num_heads=spec["heads"], hidden_dim=spec["hidden"],
                 intermediate_dim=spec["intermediate"], dropout=spec["dropout"],
                 max_sequence_length=MAX_POSITIONS)
    if objective == "mlm":
        model = keras_hub.models.BertMaskedLM(keras_hub.models.BertBackbone(**sizes),
                                              preprocessor=None)
    else:
        model = keras_hub.models.GPT2CausalLM(keras_hub.models.GPT2Backbone(**sizes),
                                              preprocessor=None)
    return model


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch: one timed window (the epoch end waits for the step)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def train(spec):
    """Tokens per second of ``fit``: one warm-up epoch (compilation), then one
    epoch of ``steps`` steps per window."""
    keras.utils.set_random_seed(0)
    objective, side = spec["objective"], spec["side"]
    inputs, labels, weights = (masked_batch if objective == "mlm" else causal_batch)(spec)
    baseline = memory_mb()[0]
    if side == "kerasllm":
        model = kerasllm_model(spec, objective)
        data = (inputs, {objective: {"ids": labels, "weights": weights}})
        xla = model.jit_compile
    else:
        model = keras_hub_model(spec, objective)
        model.compile(
            optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.01, global_clipnorm=1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
            jit_compile=spec.get("jit_compile", True))
        data = (inputs, labels, weights)
        xla = model.jit_compile
    dataset = tf.data.Dataset.from_tensors(data).repeat().prefetch(2)
    timer = EpochTimer()
    history = model.fit(dataset, epochs=1 + spec["windows"], steps_per_epoch=spec["steps"],
                        callbacks=[timer], verbose=0)
    tokens = spec["batch"] * spec["sequence"] * spec["steps"]
    loss = history.history["loss"]
    return {
        "windows": [tokens / seconds for seconds in timer.seconds[1:]], "unit": "tokens/s",
        "warmup_seconds": timer.seconds[0], "jit_compile": bool(xla),
        "parameters": model.count_params(), "loss_first": loss[0], "loss_last": loss[-1],
        "baseline_rss_mb": baseline, "peak_rss_mb": memory_mb()[1],
    }


def generation_prompts(spec):
    return token_ids(spec, spec["batch"], spec["prompt"], seed=2)


def generate(spec):
    """New tokens per second over ``new`` greedy tokens, and the time to the
    first token (a call that generates one), each after a warm-up call."""
    keras.utils.set_random_seed(0)
    prompts = generation_prompts(spec)
    if spec["side"] == "kerasllm":
        model = kerasllm_model(spec, "clm", dropout=0.0)

        def run(new):
            outputs = model.generate(prompts.tolist(), max_new_tokens=new, stop_token_ids=[])
            return sum(len(row) for row in outputs) - prompts.size
    else:
        model = keras_hub_model({**spec, "dropout": 0.0}, "clm")
        model.compile(sampler="greedy", jit_compile=True)

        def run(new):
            ids = np.pad(prompts, [[0, 0], [0, new]])
            mask = np.zeros(ids.shape, bool)
            mask[:, :spec["prompt"]] = True
            outputs = model.generate({"token_ids": ids, "padding_mask": mask},
                                     stop_token_ids=None)
            return int(np.sum(outputs["padding_mask"])) - prompts.size
    return timed_generation(spec, run)


def timed_generation(spec, run):
    start = time.perf_counter()
    produced = run(spec["new"])
    compile_seconds = time.perf_counter() - start
    windows, seconds = [], []
    for _ in range(spec["windows"]):
        start = time.perf_counter()
        produced = run(spec["new"])
        seconds.append(time.perf_counter() - start)
        windows.append(produced / seconds[-1])
    run(1)
    first = []
    for _ in range(spec["windows"]):
        start = time.perf_counter()
        run(1)
        first.append(time.perf_counter() - start)
    return {"windows": windows, "unit": "new tokens/s", "new_tokens": produced,
            "first_call_seconds": compile_seconds, "call_seconds": seconds,
            "first_token_seconds": first, "peak_rss_mb": memory_mb()[1]}


def export(spec):
    """Write the SavedModels the serving cases load: a causal LM for generation
    and a quickstart-size classifier, under ``spec["directory"]``."""
    import kerasllm

    keras.utils.set_random_seed(0)
    directory = pathlib.Path(spec["directory"])
    model = kerasllm_model(spec, "clm", dropout=0.0)
    generator = kerasllm.export_savedmodel(model, "generator", root=directory,
                                           max_new_tokens=spec["new"], verify=False)
    config = kerasllm.load_config("quickstart").to_dict()
    config["objectives"] = []
    config["head"] = {"name": "classification", "options": {"num_classes": 2}}
    config["model"]["pooler"] = True
    classifier = kerasllm.export_savedmodel(kerasllm.build_model(config), "classifier",
                                            root=directory, verify=False)
    return {"generator": str(generator), "classifier": str(classifier)}


def session_signature(path, name):
    """A session holding the SavedModel at ``path``, loaded under the ``serve``
    tag, and a function running signature ``name`` by its tensor names, as
    TF Serving's Predict does."""
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
    signature = meta_graph.signature_def[name]
    outputs = {key: value.name for key, value in signature.outputs.items()}

    def call(**inputs):
        return session.run(outputs, {signature.inputs[key].name: value
                                     for key, value in inputs.items()})
    return call


def generate_savedmodel(spec):
    """The exported ``generate`` signature, greedy, from a session."""
    call = session_signature(spec["path"], "generate")
    prompts = generation_prompts(spec)
    words = vocabulary(spec["vocabulary"])
    texts = np.array([" ".join(words[i] for i in row) for row in prompts], dtype=object)
    rows = len(texts)

    def tokens(new):
        outputs = call(prompts=texts, max_new_tokens=np.full([rows], new, np.int32),
                       temperature=np.zeros([rows], np.float32),
                       top_k=np.zeros([rows], np.int32), top_p=np.ones([rows], np.float32),
                       seed=np.zeros([rows], np.int64))
        return int(np.sum(outputs["token_ids"] >= 0))

    # Each row generates at least one token: what one new token adds beyond
    # the rows is the prompts as the signature tokenized them.
    prompt_tokens = tokens(1) - rows
    return {**timed_generation(spec, lambda new: tokens(new) - prompt_tokens),
            "prompt_tokens": prompt_tokens}


def serve(spec):
    """The exported classifier's ``serving_default``, strings in, from a session:
    latency of each request (batch 1) or examples per second (larger batches)."""
    from kerasllm_plugins.builtin import pydoc_topics

    call = session_signature(spec["path"], "serving_default")
    # Documentation paragraphs of 60 words, more than the model's 128 tokens
    # after WordPiece: every request runs full rows.
    words = " ".join(pydoc_topics()).split()
    texts = [" ".join(words[i:i + 60]) for i in range(0, 60 * 400, 60)]
    batch = spec["batch"]
    requests = [np.array(texts[i:i + batch], dtype=object)
                for i in range(0, len(texts) - batch + 1, batch)]
    for request in requests[:3]:
        call(text=request)
    windows, latencies = [], []
    for window in range(spec["windows"]):
        start = time.perf_counter()
        for index in range(spec["requests"]):
            request = requests[(window * spec["requests"] + index) % len(requests)]
            begin = time.perf_counter()
            call(text=request)
            latencies.append(time.perf_counter() - begin)
        windows.append(batch * spec["requests"] / (time.perf_counter() - start))
    return {"windows": windows, "unit": "examples/s", "latencies": latencies,
            "peak_rss_mb": memory_mb()[1]}


def matmul(spec):
    """GFLOP/s of float32 matmuls: the large square one (the machine's peak) and
    those of the benchmark models' layers."""
    shapes = {"peak": (spec["size"],) * 3, **{name: tuple(shape) for name, shape in
                                                spec["model_shapes"].items()}}
    results = {}
    for name, (m, k, n) in shapes.items():
        a = tf.random.normal((m, k))
        b = tf.random.normal((k, n))
        product = tf.function(tf.matmul)
        repeats = max(1, int(2e10 // (2 * m * k * n)))
        product(a, b).numpy()
        windows = []
        for _ in range(spec["windows"]):
            start = time.perf_counter()
            for _ in range(repeats):
                result = product(a, b)
            result.numpy()
            windows.append(2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9)
        results[name] = {"shape": [m, k, n], "windows": windows}
    return {"windows": results.pop("peak")["windows"], "unit": "GFLOP/s", "shapes": results,
            "decoding_step": decoding_step(spec)}


def decoding_step(spec, steps=100):
    """Milliseconds a step of ``decoding_rows`` rows through every matrix in
    ``decoding_weights`` takes, as the matmuls of one decoding step: each matrix
    a variable of its own, so that, as in the model, a step streams them all
    from memory rather than reusing one that stays in cache."""
    weights = [tf.Variable(tf.random.normal(shape, stddev=0.05))
               for shape in spec["decoding_weights"]]
    width = weights[0].shape[0]

    @tf.function(jit_compile=True)
    def loop(rows):
        def body(step, rows):
            # Activations by width: each product reads the latest one its
            # matrix fits, and every output feeds the next step's rows.
            activations, used = {width: rows}, 0.0
            for weight in weights:
                inner, columns = weight.shape
                output = tf.tanh(tf.matmul(activations[inner], weight))
                used += tf.reduce_mean(output)
                activations[columns] = output
            return step + 1, activations[width] + 1e-3 * used

        return tf.while_loop(lambda step, rows: step < steps, body, (0, rows))[1]

    rows = tf.random.normal((spec["decoding_rows"], width))
    loop(rows).numpy()
    windows = []
    for _ in range(spec["windows"]):
        start = time.perf_counter()
        loop(rows).numpy()
        windows.append((time.perf_counter() - start) / steps * 1e3)
    megabytes = sum(weight.shape[0] * weight.shape[1] * 4 for weight in weights) / 1e6
    return {"rows": spec["decoding_rows"], "megabytes": megabytes, "windows": windows}


CASES = {"train": train, "generate": generate, "generate_savedmodel": generate_savedmodel,
         "export": export, "serve": serve, "matmul": matmul}

if __name__ == "__main__":
    case = json.loads(sys.argv[1])
    print(json.dumps(CASES[case["kind"]](case)))
