"""The benchmark's accounting (tools/bench.py): FLOPs per token, window
statistics and the verdicts of its report. The timings themselves are never
asserted: they are benchmark results."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

import kerasllm

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_tool("bench")
SIZES = {"layers": 2, "hidden": 32, "heads": 4, "intermediate": 64, "vocabulary": 100,
         "mask_rate": 0.15, "dropout": 0.0}


def test_flops_per_token_of_the_issue_shapes_by_hand():
    case = {**bench.MODEL, "objective": "mlm", "sequence": 128}
    d, f, layers, vocabulary = 256, 1024, 4, 8192
    block = 4 * d * d + 2 * d * f + 9 * d + f  # projections, biases, two norms
    head = 19 / 128 * (d * d + 3 * d + d * vocabulary + vocabulary)  # 19 of 128 masked
    assert bench.flops_per_token(case) == pytest.approx(
        6 * (layers * block + head) + 12 * layers * d * 128)
    causal = {**case, "objective": "clm"}
    assert bench.flops_per_token(causal) == pytest.approx(
        6 * (layers * block + 2 * d + d * vocabulary) + 6 * layers * d * 128)


@pytest.mark.parametrize("objective, family", [("mlm", {"kind": "encoder", "pooler": False}),
                                               ("clm", {"family": "gpt2"})])
def test_flops_count_the_parameters_the_models_have(objective, family):
    """N in the formula is the built model's non-embedding parameter count."""
    model = kerasllm.KerasLLMModel({
        "model": {**family, "num_layers": 2, "num_heads": 4, "hidden_dim": 32,
                  "intermediate_dim": 64, "max_sequence_length": 16, "vocabulary_size": 100},
        "objectives": [{"name": objective}], "data": {"sequence_length": 16},
    }, bench_tokenizer())
    backbone = model.backbone
    embedding = sum(np.prod(w.shape) for w in backbone.embedding.weights)
    non_embedding = backbone.count_params() - embedding
    head_weights = model.heads[0].count_params()
    length = 16
    case = {**SIZES, "objective": objective, "sequence": length}
    attention = (12 if objective == "mlm" else 6) * 2 * 32 * length
    if objective == "mlm":
        # The head's weights (transform, norm, the tied embedding it projects
        # with, output bias) at the masked share of the positions.
        masked = round(0.15 * length) / length
        expected = non_embedding + masked * head_weights
    else:
        expected = non_embedding + 32 * 100
    assert bench.flops_per_token(case) == pytest.approx(6 * expected + attention)


def bench_tokenizer():
    import keras_hub

    return keras_hub.models.BertTokenizer(vocabulary=["[PAD]", "[CLS]", "[SEP]", "[UNK]",
                                                      "[MASK]"] + [f"t{i}" for i in range(95)])


def test_window_statistics():
    assert bench.summary([4.0, 1.0, 2.0, 3.0, 10.0]) == {
        "median": 3.0, "min": 1.0, "max": 10.0, "spread": 3.0}
    latencies = list(range(1, 201))
    assert bench.percentile(latencies, 0.5) == 101
    assert bench.percentile(latencies, 0.99) == 198


def test_report_compares_medians_and_marks_missed_targets():
    machine = {"cpu": "test CPU", "cores": 2, "tensorflow": "x", "keras": "x",
               "keras_hub": "x", "date": "today", "windows": 5}
    train = {**bench.MODEL, "kind": "train", "sequence": 128, "batch": 32}
    # A peak at which kerasllm's median (12 tokens/s) is 50% MFU, keras-hub's 10 is 42%.
    peak = 12 * bench.flops_per_token({**train, "objective": "mlm"}) / 1e9 / 0.5
    results = {
        "matmul": {"size": 4096, "windows": [peak] * 5, "shapes": {}},
        "mlm/kerasllm/T128/B32": {**train, "objective": "mlm", "windows": [12.0, 11.0, 13.0,
                                                                            1.0, 99.0]},
        "mlm/keras_hub/T128/B32": {**train, "objective": "mlm", "windows": [10.0] * 5},
        "clm/kerasllm/T128/B32": {**train, "objective": "clm", "windows": [10.0] * 5},
        "clm/keras_hub/T128/B32": {**train, "objective": "clm", "windows": [10.0] * 5},
        "serve/B1": {"windows": [80.0] * 5, "latencies": [0.010] * 98 + [0.5] * 2},
        "generate/kerasllm/B1": {"windows": [500.0] * 5, "first_token_seconds": [0.01] * 5,
                                 "first_call_seconds": 3.0},
        "generate/keras_hub/B1": {"windows": [260.0] * 5, "first_token_seconds": [0.02] * 5,
                                  "first_call_seconds": 2.0},
    }
    results["matmul"]["decoding_step"] = {"rows": 2, "megabytes": 21.0,
                                          "windows": [1.0, 0.5, 2.0, 1.0, 1.0]}
    table = bench.report(results, machine)
    assert "| kerasllm `model.generate` | 1 | 500 (500–500) | 10.0 | 1.92× **missed** | 3.0 |" \
        in table
    assert ("A decoding step's weight matrices alone (21.0 MB, 2 rows through each, every "
            "matrix its own variable, in an XLA loop): 1.00 (0.50–2.00) ms a step, 21 GB/s; "
            "1,000 new tokens/s at batch 1 if a step did nothing else.") in table
    assert ("| (a) masked LM encoder, 32 × 128 | 12 (1–99) | 10 (10–10) | 1.20× met | 50% | 42% |"
            in table)
    assert "| (b) causal LM decoder, 32 × 128 | 10 (10–10) | 10 (10–10) | 1.00× **missed** |" \
        in table
    assert "| 1 | 10.0 (target < 15: met) | 500.0 |" in table


def test_rounds_pool_every_window_list_and_keep_the_first_rounds_scalars():
    first = {"windows": [1.0, 2.0], "first_token_seconds": [0.1], "first_call_seconds": 3.0,
             "unit": "new tokens/s"}
    second = {"windows": [5.0], "first_token_seconds": [0.2], "first_call_seconds": 9.0,
              "unit": "new tokens/s", "peak_rss_mb": 7.0}
    assert bench.pooled(first, second) == {
        "windows": [1.0, 2.0, 5.0], "first_token_seconds": [0.1, 0.2],
        "first_call_seconds": 3.0, "unit": "new tokens/s", "peak_rss_mb": 7.0}
    machine = {"cpu": "test CPU", "cores": 2, "tensorflow": "x", "keras": "x",
               "keras_hub": "x", "date": "today", "windows": 5}
    results = {"serve/B1": {"windows": [80.0] * 10, "latencies": [0.01] * 100, "rounds": 2},
               "serve/B32": {"windows": [90.0] * 5, "latencies": [0.01] * 100}}
    assert ("Medians of 5 timed windows (min–max) per round, warm-up excluded, each case in "
            "a fresh process. Windows pooled over rounds (alternating order; rounds in "
            "brackets): serve/B1 (2).") in bench.report(results, machine)


def test_the_decoding_floor_reads_every_matrix_of_the_generation_model():
    cases = load_tool("bench_cases")
    model = cases.kerasllm_model({**bench.MODEL, "sequence": 160, "batch": 1}, "clm",
                                 dropout=0.0)
    matrices = [variable for variable in model.backbone.weights
                if variable.path.endswith("/kernel") or "token_embedding" in variable.path]
    assert sorted(int(np.prod(variable.shape)) for variable in matrices) == sorted(
        inner * columns for inner, columns in bench.decoding_weights())


def test_a_rerun_on_another_machine_must_replace_every_stored_result():
    machine = {"cpu": "CPU A", "cores": 2, "tensorflow": "2.21", "keras": "3", "keras_hub": "0.32",
               "gpus": [], "date": "monday", "windows": 5}
    stored = {"machine": machine, "results": {"matmul": {}, "serve/B1": {}, "serve/B32": {}}}
    later = {**machine, "date": "tuesday", "windows": 7}
    assert bench.foreign_results(stored, later, ["serve/B1"]) == []
    other = {**machine, "cpu": "CPU B"}
    assert bench.foreign_results(stored, other, ["serve/B1"]) == ["matmul", "serve/B32"]
    assert bench.foreign_results(stored, other, ["matmul", "serve/B1", "serve/B32"]) == []
    upgraded = {**machine, "tensorflow": "2.22"}
    assert bench.foreign_results(stored, upgraded, []) == ["matmul", "serve/B1", "serve/B32"]
    assert bench.foreign_results({"results": {}}, other, []) == []


def test_the_command_refuses_to_mix_machines_in_one_table(tmp_path, monkeypatch, capsys):
    stored = {"machine": {"cpu": "a CPU this is not", "cores": 64, "tensorflow": "0",
                          "keras": "0", "keras_hub": "0", "gpus": [], "date": "d",
                          "windows": 5},
              "results": {"matmul": {"windows": [1.0] * 5}}}
    (tmp_path / "bench.json").write_text(json.dumps(stored))
    monkeypatch.setattr("sys.argv", ["bench.py", "--only", "^serve/B1$",
                                     "--results", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "holds results measured on a CPU this is not (64 cores" in error
    assert "would not replace (matmul)" in error
    assert "Run every case (no --only), or write to another folder with --results." in error
    assert json.loads((tmp_path / "bench.json").read_text()) == stored
