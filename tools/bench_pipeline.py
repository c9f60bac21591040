"""Streaming benchmark: a large text file through the tf.data pipeline, then training.

Writes a text file of ``--gigabytes`` (documents from the built-in corpus,
repeated), then

1. runs the whole pipeline (read, tokenize, pack, mask) over every byte of it,
   reporting documents/s, MB/s, the padding fraction and peak RSS;
2. pretrains a small model on the same file with ``kerasllm pretrain``'s job for
   ``--steps`` steps, reporting s/step and peak RSS.

Memory is bounded if peak RSS stays flat however large the file: nothing holds
more than the shuffle buffer (rows) and tf.data's prefetch buffers. Peak RSS is
sampled every 0.2 s from /proc/self/status (VmHWM is the process-wide peak).

    python tools/bench_pipeline.py --gigabytes 1 --steps 200
"""

import argparse
import os
import pathlib
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def rss_mb():
    """(current, peak) resident set size of this process, in MB."""
    fields = dict(line.split(":", 1) for line in pathlib.Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


class RssSampler:
    """Records the current RSS every ``interval`` seconds in a background thread."""

    def __init__(self, interval=0.2):
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval):
        while not self._stop.wait(interval):
            self.samples.append((time.monotonic(), rss_mb()[0]))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        values = [value for _, value in self.samples]
        if not values:
            return "no samples"
        tenth = max(1, len(values) // 10)
        return (f"RSS first 10% max {max(values[:tenth]):.0f} MB, "
                f"last 10% max {max(values[-tenth:]):.0f} MB, overall max {max(values):.0f} MB")


def write_corpus(path, gigabytes):
    from kerasllm_plugins.builtin import pydoc_topics, stdlib_docstrings

    lines = [" ".join(document.split()) for document in pydoc_topics() + stdlib_docstrings()]
    lines = [line for line in lines if line]
    target = int(gigabytes * 2**30)
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        copy = 0
        while written < target:
            for line in lines:
                # A copy number keeps repeated documents distinct.
                text = f"{copy} {line}\n"
                handle.write(text)
                written += len(text.encode())
                if written >= target:
                    break
            copy += 1
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import kerasllm
    from kerasllm.builder import build_data_source
    from kerasllm.data import build_dataset
    from kerasllm.jobs import pretrain

    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="kerasllm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus.txt"
    if not corpus.exists() or corpus.stat().st_size < args.gigabytes * 2**30 * 0.99:
        start = time.monotonic()
        size = write_corpus(corpus, args.gigabytes)
        print(f"wrote {size / 2**20:.0f} MB to {corpus} in {time.monotonic() - start:.0f} s")
    size_mb = corpus.stat().st_size / 2**20

    config = kerasllm.load_config({
        "model": {"num_layers": 2, "num_heads": 4, "hidden_dim": 128, "intermediate_dim": 512},
        "tokenizer": {"vocabulary_size": 4096},
        "data": {"source": "text", "options": {"paths": str(corpus)}, "batch_size": 32,
                 "sequence_length": 128},
        "objectives": [{"name": "mlm"}],
        "training": {"steps": args.steps, "steps_per_epoch": min(100, args.steps),
                     "checkpoint_every": args.steps, "output": str(workdir / "run")},
    })
    # The vocabulary is trained on the built-in corpus: this measures streaming,
    # not tokenizer training over a gigabyte.
    builtin = kerasllm.load_config({**config.to_dict(), "data": {"source": "builtin"}})
    model = kerasllm.build_model(builtin)
    print(f"start: RSS {rss_mb()[0]:.0f} MB (TensorFlow, model, tokenizer)")

    source = build_data_source(config)
    batches = build_dataset(model, source.examples(), 32, 128, shuffle_buffer=4096, seed=0)
    rows = padding = 0
    start = time.monotonic()
    with RssSampler() as sampler:
        for x, _ in batches:
            mask = x["padding_mask"].numpy()
            rows += len(mask)
            padding += (mask == 0).sum()
    elapsed = time.monotonic() - start
    tokens = rows * 128
    print(f"pipeline over {size_mb:.0f} MB: {elapsed:.0f} s, {size_mb / elapsed:.1f} MB/s, "
          f"{tokens / elapsed:,.0f} tokens/s, {rows:,} rows of 128, padding "
          f"{padding / tokens:.4%}; {sampler.summary()}; peak (VmHWM) {rss_mb()[1]:.0f} MB")
    if source.report.counts:
        print(f"input report: {source.report}")

    vocabulary = workdir / "tokenizer"
    vocabulary.mkdir(exist_ok=True)
    factory = kerasllm.plugins.get_registry().get("tokenizer", "wordpiece", "tokenizer.name")
    factory.save(model.tokenizer, vocabulary)
    config = kerasllm.load_config({**config.to_dict(), "tokenizer": {
        **config.to_dict()["tokenizer"], "vocabulary": str(vocabulary)}})
    start = time.monotonic()
    with RssSampler() as sampler:
        pretrain(config, verbose=0, log=lambda line: print("  " + line))
    elapsed = time.monotonic() - start
    print(f"pretrain {args.steps} steps streaming from the file: {elapsed:.0f} s "
          f"({elapsed / args.steps:.3f} s/step incl. evaluation and saving); "
          f"{sampler.summary()}; peak (VmHWM) {rss_mb()[1]:.0f} MB")


if __name__ == "__main__":
    main()
