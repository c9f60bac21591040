"""Benchmarks: kerasllm against keras-hub and against the machine's matmul peak.

    python tools/bench.py                     # every case (about 20 min on 2 CPU cores)
    python tools/bench.py --only 'mlm|clm'    # the cases whose id matches a regex
    python -m pip install -e ".[bench]"       # matplotlib, for the plots

Cases (each in a fresh process, ``tools/bench_cases.py``; warm-up excluded; the
median of ``--windows`` timed windows, with their min–max):

- ``matmul``: float32 GFLOP/s of a large square matmul (the peak MFU is taken
  against) and of the benchmark models' own matmul shapes; and the time of
  a batch-1 decoding step's matmuls alone, which bounds (c) at batch 1.
- ``mlm/*``, ``clm/*``: ``fit`` tokens/s of a 4-layer, hidden-256, 4-head,
  FFN-1024 encoder (masked LM, 15% masked; keras-hub: ``BertMaskedLM``) and
  GPT-2-style decoder (causal LM; keras-hub: ``GPT2CausalLM``), vocabulary
  8192, both sides with dropout 0.1, AdamW and global-norm clipping, both
  with the whole step XLA-compiled (kerasllm's default on one device, keras-hub's
  ``jit_compile=True``) and kerasllm also without, at batch 32 × sequence 128.
  The scaling cases vary the encoder's sequence (at 4096 tokens a batch) and
  batch (at sequence 128).
- ``generate/*``: greedy decoding with a KV cache, 32-token prompts, 128 new
  tokens, batch 1 and 8: kerasllm's ``model.generate``, its exported SavedModel's
  ``generate`` signature run from a session, keras-hub's ``GPT2CausalLM.generate``.
- ``serve/*``: the quickstart-size classifier exported, strings in, signature
  ``serving_default`` run from a session as TF Serving runs it: latency at
  batch 1, throughput at batch 32.

``--rounds R`` runs the selected cases R times, every other round in reverse
order, and pools each case's windows: on a machine whose speed drifts (a shared
cloud VM), the two sides of a comparison then sample the same stretch of time.

Writes ``RESULTS/bench.json`` (every window), ``RESULTS/bench.md`` (the tables)
and PNG plots, where RESULTS is ``--results`` (default ``tools/results``).
Cases rerun with ``--only`` replace their earlier results in ``bench.json``;
it refuses to keep results from another machine or software stack beside them.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
MODEL = {"layers": 4, "hidden": 256, "heads": 4, "intermediate": 1024, "vocabulary": 8192,
         "dropout": 0.1, "mask_rate": 0.15}
SIDES = ("kerasllm", "keras_hub")
SEQUENCE_SWEEP = (128, 256, 512, 1024)  # at TOKENS_PER_BATCH
BATCH_SWEEP = (8, 32, 64)  # at sequence 128
TOKENS_PER_BATCH = 4096
FLOPS_FORMULA = (
    "FLOPs/token = 6·N + 12·L·d·T (attention term halved for causal models): N = the "
    "non-embedding parameters (blocks, final norm) plus the LM head's matmuls as computed "
    "(masked LM: the transform and the vocabulary projection at the masked fraction of "
    "positions; causal LM: the vocabulary projection at every position), L layers, "
    "d hidden size, T sequence length")
TARGETS = {"training": 1.15, "mfu": 0.80, "generation": 2.0, "latency_ms": 15.0}


# === Cases ===

def train_cases():
    """(a) and (b) at batch 32 × 128; the scaling sweeps for (a)."""
    sweep = {(length, TOKENS_PER_BATCH // length) for length in SEQUENCE_SWEEP}
    sweep |= {(128, batch) for batch in BATCH_SWEEP}
    points = {"mlm": sorted(sweep), "clm": [(128, 32)]}
    cases = [{"id": f"{objective}/{side}/T{length}/B{batch}", "kind": "train",
              "objective": objective, "side": side, "sequence": length, "batch": batch,
              **MODEL} for objective, sizes in points.items() for length, batch in sizes
             for side in SIDES]
    # kerasllm without whole-step XLA (training.jit_compile: false, what `auto`
    # gives under a strategy on CPU devices): what compiling the step is worth.
    return cases + [{**case, "id": case["id"].replace("kerasllm", "kerasllm_uncompiled"),
                     "jit_compile": False} for case in cases
                    if case["side"] == "kerasllm" and case["batch"] * case["sequence"] == 4096
                    and case["sequence"] == 128]


def decoding_weights():
    """(inner, columns) of every weight matrix one decoding step of the (c)
    model reads, grouped by shape (a step reads each once, so their order does
    not matter): each layer's query, key, value and output projections and two
    feed-forward matrices, and the tied vocabulary projection."""
    d, f = MODEL["hidden"], MODEL["intermediate"]
    return [[d, d]] * 4 * MODEL["layers"] + [[d, f], [f, d]] * MODEL["layers"] + [
        [d, MODEL["vocabulary"]]]


def all_cases(workdir):
    cases = [{"id": "matmul", "kind": "matmul", "size": 4096, "model_shapes": {
        # (rows, inner, columns) of the benchmark models' matmuls at batch 32 × 128.
        "attention projection 4096×256 · 256×256": [4096, 256, 256],
        "feed-forward in 4096×256 · 256×1024": [4096, 256, 1024],
        "feed-forward out 4096×1024 · 1024×256": [4096, 1024, 256],
        "vocabulary 4096×256 · 256×8192": [4096, 256, 8192],
    }, "decoding_weights": decoding_weights(), "decoding_rows": 2}]
    cases += train_cases()
    generation = {"prompt": 32, "new": 128, **MODEL}
    cases.append({"id": "export", "kind": "export", "directory": str(workdir), "sequence": 160,
                  "batch": 1, **generation})
    for batch in (1, 8):
        cases += [
            {"id": f"generate/kerasllm/B{batch}", "kind": "generate", "side": "kerasllm",
             "batch": batch, "sequence": 160, **generation},
            {"id": f"generate/kerasllm_savedmodel/B{batch}", "kind": "generate_savedmodel",
             "path": "{generator}", "batch": batch, **generation},
            {"id": f"generate/keras_hub/B{batch}", "kind": "generate", "side": "keras_hub",
             "batch": batch, "sequence": 160, **generation},
        ]
    cases += [{"id": "serve/B1", "kind": "serve", "path": "{classifier}", "batch": 1,
               "requests": 40},
              {"id": "serve/B32", "kind": "serve", "path": "{classifier}", "batch": 32,
               "requests": 4}]
    return cases


def run_case(case, windows, steps, exported, timeout=1800):
    """Run one case in a fresh process; its JSON result."""
    case = {"windows": windows, "steps": steps, **case}
    case = {key: value.format(**exported) if isinstance(value, str) else value
            for key, value in case.items()}
    process = subprocess.run([sys.executable, str(HERE / "bench_cases.py"), json.dumps(case)],
                             capture_output=True, text=True, timeout=timeout)
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode or not lines:
        raise RuntimeError(f"benchmark case {case['id']} failed (exit {process.returncode}):\n"
                           f"{process.stderr[-3000:]}")
    return {**case, **json.loads(lines[-1])}


# === Accounting ===

def pooled(earlier, later):
    """One case's results over two rounds: every per-window list joined, the
    rest (compile times, parameter counts) from the first round."""
    return {**later, **earlier, **{key: earlier[key] + value for key, value in later.items()
                                   if isinstance(value, list) and isinstance(earlier.get(key),
                                                                             list)}}


def pooled_cases(results):
    """The report's note on the cases whose windows were pooled over rounds."""
    cases = [f"{case} ({result['rounds']})" for case, result in results.items()
             if result.get("rounds", 1) > 1]
    return (" Windows pooled over rounds (alternating order; rounds in brackets): "
            + ", ".join(cases) + ".") if cases else ""


def summary(windows):
    """Median and range of a case's windows."""
    return {"median": statistics.median(windows), "min": min(windows), "max": max(windows),
            "spread": (max(windows) - min(windows)) / statistics.median(windows)}


def flops_per_token(case):
    """Training FLOPs per token of a train case (``FLOPS_FORMULA``)."""
    layers, d, f, vocabulary = (case[key] for key in
                                ("layers", "hidden", "intermediate", "vocabulary"))
    length = case["sequence"]
    # Per block: query, key, value and output projections with biases, the two
    # feed-forward matmuls with biases, two layer norms.
    block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    if case["objective"] == "mlm":
        masked = round(case["mask_rate"] * length) / length
        # keras-hub's MaskedLMHead: dense transform, layer norm, tied projection with bias.
        head = masked * (d * d + d + 2 * d + d * vocabulary + vocabulary)
        parameters, attention = layers * block + head, 12 * layers * d * length
    else:
        head = d * vocabulary  # tied projection, no bias
        parameters, attention = layers * block + 2 * d + head, 6 * layers * d * length
    return 6 * parameters + attention


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# === Report ===

def fmt(value, digits=0):
    return f"{value:,.{digits}f}"


def span(result, digits=0, scale=1.0):
    s = summary([w * scale for w in result["windows"]])
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"


def verdict(ok):
    return "met" if ok else "**missed**"


def report(results, machine):
    """The markdown tables of ``results`` (by case id)."""
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores; TensorFlow "
             f"{machine['tensorflow']}, Keras {machine['keras']}, keras-hub "
             f"{machine['keras_hub']}; {machine['date']}. Medians of {machine['windows']} "
             "timed windows (min–max) per round, warm-up excluded, each case in a fresh "
             "process." + pooled_cases(results), ""]
    peak = results.get("matmul")
    if peak:
        peak_gflops = summary(peak["windows"])["median"]
        lines += ["| float32 matmul | GFLOP/s |", "|---|---|",
                  f"| {' × '.join(map(str, [peak['size']] * 2))} square (peak) | {span(peak)} |"]
        lines += [f"| {name} | {span(shape)} |" for name, shape in peak["shapes"].items()]
        lines.append("")
    else:
        peak_gflops = None
    lines += ["| training (batch × sequence) | kerasllm tokens/s | keras-hub tokens/s | ratio "
              "(target ≥ 1.15×) | kerasllm MFU | keras-hub MFU |", "|---|---|---|---|---|---|"]
    for objective, name in (("mlm", "(a) masked LM encoder"), ("clm", "(b) causal LM decoder")):
        for key in sorted({key.split("/", 2)[2] for key in results if key.startswith(objective)},
                          key=lambda k: tuple(int(p[1:]) for p in k.split("/"))):
            theirs = results.get(f"{objective}/keras_hub/{key}")
            length, batch = (int(part[1:]) for part in key.split("/"))
            for side, variant in (("kerasllm", ""),
                                  ("kerasllm_uncompiled", ", `jit_compile: false`")):
                ours = results.get(f"{objective}/{side}/{key}")
                if not (ours and theirs):
                    continue
                ratio = summary(ours["windows"])["median"] / summary(theirs["windows"])["median"]
                mfu = [summary(r["windows"])["median"] * flops_per_token(r) / 1e9 / peak_gflops
                       if peak_gflops else None for r in (ours, theirs)]
                lines.append(
                    f"| {name}, {batch} × {length}{variant} | {span(ours)} | {span(theirs)} | "
                    f"{ratio:.2f}× {verdict(ratio >= TARGETS['training'])} | "
                    + " | ".join("–" if m is None else f"{m:.0%}" for m in mfu) + " |")
    lines += ["", FLOPS_FORMULA + f"; MFU target for (a) at 32 × 128: ≥ {TARGETS['mfu']:.0%}.",
              ""]
    generation = [key for key in results if key.startswith("generate/")]
    if generation:
        lines += ["| (c) greedy generation, 32-token prompt, 128 new | batch | new tokens/s | "
                  "time to first token (ms) | vs keras-hub (target ≥ 2×) | first call (s) |",
                  "|---|---|---|---|---|---|"]
        for batch in (1, 8):
            hub = results.get(f"generate/keras_hub/B{batch}")
            for side in ("kerasllm", "kerasllm_savedmodel", "keras_hub"):
                result = results.get(f"generate/{side}/B{batch}")
                if not result:
                    continue
                ratio = "–"
                if hub and side != "keras_hub":
                    value = (summary(result["windows"])["median"]
                             / summary(hub["windows"])["median"])
                    ratio = f"{value:.2f}× {verdict(value >= TARGETS['generation'])}"
                first = summary([s * 1e3 for s in result["first_token_seconds"]])
                label = {"kerasllm": "kerasllm `model.generate`",
                         "kerasllm_savedmodel": "kerasllm SavedModel, session",
                         "keras_hub": "keras-hub `GPT2CausalLM.generate`"}[side]
                lines.append(f"| {label} | {batch} | {span(result)} | {fmt(first['median'], 1)} "
                             f"| {ratio} | {result['first_call_seconds']:.1f} |")
        lines.append("")
        streamed = peak and peak.get("decoding_step")
        if streamed:
            step = summary(streamed["windows"])
            lines += [
                f"A decoding step's weight matrices alone ({streamed['megabytes']:.1f} MB, "
                f"{streamed['rows']} rows through each, every matrix its own variable, in an "
                f"XLA loop): {span(streamed, 2)} ms a step, "
                f"{streamed['megabytes'] / step['median']:.0f} GB/s; "
                f"{fmt(1e3 / step['median'])} new tokens/s at batch 1 if a step did nothing "
                "else.", ""]
    serving = [results.get(f"serve/B{batch}") for batch in (1, 32)]
    if any(serving):
        lines += ["| (d) exported classifier, `serving_default` from a session | batch | p50 ms "
                  "| p99 ms | examples/s |", "|---|---|---|---|---|"]
        for batch, result in zip((1, 32), serving):
            if result:
                p50, p99 = (percentile(result["latencies"], q) * 1e3 for q in (0.5, 0.99))
                target = (f" (target < {TARGETS['latency_ms']:.0f}: "
                          f"{verdict(p50 < TARGETS['latency_ms'])})") if batch == 1 else ""
                lines.append(f"| quickstart-size encoder, 2 classes | {batch} | "
                             f"{p50:.1f}{target} | {p99:.1f} | {span(result)} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, folder):
    """``scaling.png`` (tokens/s against sequence and batch) and ``memory.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(objective, side, vary):
        points = []
        for key, result in results.items():
            if result.get("kind") != "train" or not key.startswith(f"{objective}/{side}/"):
                continue
            if vary == "sequence" and result["sequence"] * result["batch"] == TOKENS_PER_BATCH:
                points.append((result["sequence"], result))
            if vary == "batch" and result["sequence"] == 128:
                points.append((result["batch"], result))
        return sorted(points, key=lambda point: point[0])

    styles = {"kerasllm": "-o", "keras_hub": "--s"}
    for name, value, label in (("scaling", lambda r: summary(r["windows"])["median"],
                                "tokens/s"),
                               ("memory", lambda r: r["peak_rss_mb"], "peak RSS (MB)")):
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for axis, vary in zip(axes, ("sequence", "batch")):
            for objective in ("mlm", "clm"):
                for side in SIDES:
                    points = series(objective, side, vary)
                    if points:
                        axis.plot([x for x, _ in points], [value(r) for _, r in points],
                                  styles[side], label=f"{side} {objective}")
            axis.set_xscale("log", base=2)
            axis.set_xlabel(f"sequence length (batch × sequence = {TOKENS_PER_BATCH})"
                            if vary == "sequence" else "batch size (sequence 128)")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        figure.suptitle(f"{label}, 4 layers, hidden 256, vocabulary 8192")
        figure.tight_layout()
        figure.savefig(folder / f"{name}.png", dpi=90)
        plt.close(figure)


def machine_info(windows):
    import keras
    import keras_hub
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "keras_hub": keras_hub.__version__,
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "date": datetime.date.today().isoformat(), "windows": windows}


MACHINE_IDENTITY = ("cpu", "cores", "tensorflow", "keras", "keras_hub", "gpus")


def foreign_results(stored, machine, rerun):
    """The stored case ids that were measured on another machine or software
    stack and that rerunning the cases in ``rerun`` would leave in place: one
    table must not mix two machines under one machine line."""
    before = stored.get("machine")
    if before is None or all(before.get(key) == machine[key] for key in MACHINE_IDENTITY):
        return []
    return sorted(set(stored["results"]) - set(rerun))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose id matches this regex")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="training steps per window")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the cases this many times, alternating their order, "
                             "and pool each case's windows")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--list", action="store_true", help="print the case ids and exit")
    args = parser.parse_args()
    if args.windows < 5:
        parser.error("--windows must be at least 5")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    folder = pathlib.Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench.json"
    stored = json.loads(path.read_text()) if path.exists() else {"results": {}}
    with tempfile.TemporaryDirectory(prefix="kerasllm-bench-") as workdir:
        cases = all_cases(workdir)
        if args.list:
            print("\n".join(case["id"] for case in cases))
            return
        selected = [case for case in cases if case["kind"] != "export"
                    and (not args.only or re.search(args.only, case["id"]))]
        machine = machine_info(args.windows)
        kept = foreign_results(stored, machine, [case["id"] for case in selected])
        if kept:
            before = stored["machine"]
            parser.error(
                f"{path} holds results measured on {before['cpu']} ({before['cores']} cores, "
                f"TensorFlow {before['tensorflow']}, keras-hub {before['keras_hub']}) that "
                f"this run would not replace ({', '.join(kept[:3])}"
                f"{', ...' if len(kept) > 3 else ''}); this machine is {machine['cpu']} "
                f"({machine['cores']} cores). Run every case (no --only), or write to "
                f"another folder with --results.")
        exported = {}
        if any("{" in str(case.get("path", "")) for case in selected):
            export = next(case for case in cases if case["kind"] == "export")
            exported = run_case(export, args.windows, args.steps, {})
        measured = {}
        for round_ in range(args.rounds):
            for case in selected[::-1] if round_ % 2 else selected:
                result = run_case(case, args.windows, args.steps, exported)
                result["measured"] = datetime.datetime.now().isoformat(timespec="seconds")
                result.pop("directory", None)
                if case["id"] in measured:
                    result = pooled(measured[case["id"]], result)
                result["rounds"] = round_ + 1
                measured[case["id"]] = stored["results"][case["id"]] = result
                s = summary(result["windows"])
                print(f"{case['id']}: {fmt(s['median'], 1)} {result['unit']} "
                      f"(spread {s['spread']:.1%}, round {round_ + 1})", flush=True)
                stored["machine"] = machine
                stored["flops_formula"] = FLOPS_FORMULA
                path.write_text(json.dumps(stored, indent=1))
    table = report(stored["results"], stored["machine"])
    (folder / "bench.md").write_text(table + "\n")
    print(table)
    try:
        plot(stored["results"], folder)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
