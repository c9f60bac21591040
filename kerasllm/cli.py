"""The ``kerasllm`` command line."""

import argparse
import sys


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from kerasllm.errors import KerasLLMError

    try:
        return args.run(args) or 0
    except KerasLLMError as error:
        print(f"kerasllm: error: {error}", file=sys.stderr)
        return 2


def _parser():
    parser = argparse.ArgumentParser(
        prog="kerasllm",
        description="Pretrain, fine-tune and serve Transformer language models with Keras.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    pretrain = commands.add_parser(
        "pretrain", help="pretrain a model from a config",
        description="Pretrain the model a config describes on its data source. Resumes "
                    "from the latest checkpoint in the output folder if there is one.",
    )
    _training_arguments(pretrain, "a YAML config file, or 'quickstart' for the built-in one")
    pretrain.set_defaults(run=_pretrain)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a task head from a config",
        description="Fine-tune the task head(s) a config describes (head or heads) on its "
                    "labelled data, from training.initialize_from (a kerasllm model or a "
                    "Hugging Face checkpoint) or from scratch. Resumes from the latest "
                    "checkpoint in the output folder; prints the held-out task metrics and "
                    "writes them to OUTPUT/metrics.json.",
    )
    _training_arguments(finetune, "a YAML config file")
    finetune.add_argument("--initialize-from", metavar="MODEL",
                          help="the model to start from (overrides training.initialize_from)")
    finetune.set_defaults(run=_finetune)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a trained model on a config's held-out data",
        description="Evaluate a trained model on the held-out part of the config's data "
                    "(the examples training held out): the loss and each task head's "
                    "standard metrics (accuracy, macro-F1, Matthews correlation, Pearson and "
                    "Spearman, entity F1, SQuAD exact match and F1). Prints them and writes "
                    "them as JSON.",
    )
    evaluate.add_argument("config", metavar="CONFIG", help="a YAML config file")
    evaluate.add_argument("--model", help="the model: a .keras file or a folder holding "
                          "model.keras (default: training.output)")
    evaluate.add_argument("--json", dest="output_json",
                          help="where to write the metrics (default: metrics.json beside "
                          "the model)")
    evaluate.set_defaults(run=_evaluate)

    convert = commands.add_parser(
        "convert", help="import a Hugging Face checkpoint as a kerasllm model",
        description="Import a checkpoint directory written by transformers' save_pretrained "
                    "(config.json, model.safetensors or its shards, tokenizer files) and save "
                    "it as OUT/model.keras, which kerasllm.load_model(OUT) loads.",
    )
    convert.add_argument("--from-hf", required=True, metavar="DIR", dest="source",
                         help="the Hugging Face checkpoint directory")
    convert.add_argument("--out", required=True, metavar="DIR", help="output folder")
    convert.set_defaults(run=_convert)

    export = commands.add_parser(
        "export", help="export a model as a SavedModel for TF Serving",
        description="Export a trained model as ROOT/NAME/VERSION (VERSION the next integer), "
                    "the layout TF Serving watches, with text-in signatures (tokenization in "
                    "the graph), warm-up requests, and NAME listed in ROOT/models.config. "
                    "The model is checked first: only TensorFlow and tensorflow-text ops, "
                    "and the same answers when reloaded in a fresh process.",
    )
    export.add_argument("model", metavar="MODEL",
                        help="the model: a .keras file or a folder holding model.keras")
    export.add_argument("--name", required=True, help="the model's name in TF Serving")
    export.add_argument("--root", default="savedmodels",
                        help="the folder TF Serving serves (default: savedmodels)")
    export.add_argument("--base-path", metavar="DIR",
                        help="where the model server sees ROOT, e.g. /models in Docker "
                             "(default: ROOT's absolute path)")
    export.add_argument("--xla", choices=("generate", "all", "none"), default="generate",
                        help="signatures compiled with XLA: generate (default), all, none; "
                             "on CPU TF Serving needs --xla_cpu_compilation_enabled=true")
    export.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip reloading the export in a fresh process to check it")
    export.set_defaults(run=_export)

    plugins = commands.add_parser("plugins", help="inspect installed plugins",
                                  description="Inspect installed plugins.")
    plugin_commands = plugins.add_subparsers(title="commands", metavar="COMMAND")
    listing = plugin_commands.add_parser(
        "list", help="list plugins and what they provide",
        description="List every plugin of the 'kerasllm' entry-point group: the name, "
                    "kind, distribution, version and status of what it provides.",
    )
    listing.set_defaults(run=_plugins_list)
    plugins.set_defaults(run=lambda args: plugins.print_help() or 2)
    return parser


def _training_arguments(parser, config_help):
    parser.add_argument("config", metavar="CONFIG", help=config_help)
    parser.add_argument("--steps", type=_positive_int,
                        help="total optimizer steps (overrides training.steps)")
    parser.add_argument("--output", help="output folder (overrides training.output)")
    from kerasllm.config import STRATEGIES

    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="tf.distribute strategy (overrides training.strategy); "
                             "multi_worker_mirrored reads the cluster from TF_CONFIG")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _pretrain(args):
    from kerasllm.config import load_config

    # Config mistakes surface before TensorFlow loads.
    config = _with_training(load_config(args.config), strategy=args.strategy)
    from kerasllm.jobs import pretrain

    _print_result(pretrain(config, steps=args.steps, output=args.output))


def _finetune(args):
    from kerasllm.config import load_config

    config = _with_training(load_config(args.config), strategy=args.strategy,
                            initialize_from=args.initialize_from)
    from kerasllm.jobs import finetune

    result = finetune(config, steps=args.steps, output=args.output)
    _print_result(result)
    print()
    _print_metrics(result["task_metrics"])


def _with_training(config, **values):
    """``config`` with the ``training`` keys the command line sets."""
    from kerasllm.config import load_config

    values = {key: value for key, value in values.items() if value is not None}
    config = config.to_dict()
    return load_config({**config, "training": {**config["training"], **values}})


def _evaluate(args):
    from kerasllm.config import load_config

    config = load_config(args.config)
    from kerasllm.jobs import evaluate

    _print_metrics(evaluate(config, model=args.model, output_json=args.output_json))


def _print_result(result):
    start, end = result["start"], result["end"]
    width = max([24, *(len(name) + 2 for name in end)])
    print("\nHeld-out evaluation")
    print(f"{'metric':<{width}}{'before':>12}{'after':>12}")
    for name in sorted(end):
        print(f"{name:<{width}}{start[name]:>12.4f}{end[name]:>12.4f}")


def _print_metrics(metrics):
    width = max([24, *(len(name) + 2 for name in metrics)])
    print(f"{'metric':<{width}}{'value':>12}")
    for name, value in sorted(metrics.items()):
        print(f"{name:<{width}}{value:>12.4f}")


def _convert(args):
    import os
    import pathlib

    from kerasllm.hf import from_hf

    model = from_hf(args.source)
    output = pathlib.Path(args.out)
    output.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: an interrupted convert leaves no half model.keras.
    partial = output / "model.partial.keras"
    model.save(partial)
    os.replace(partial, output / "model.keras")
    config = model.config.model
    heads = ", ".join(head.name for head in model.heads) or "none (backbone only)"
    print(f"{config.family} {config.kind}: {config.num_layers} layers, hidden "
          f"{config.hidden_dim}, {model.count_params():,} parameters; heads: {heads}")
    print(f"saved {output / 'model.keras'}")


def _export(args):
    from kerasllm.builder import load_model
    from kerasllm.export import export_savedmodel, signature_summary

    model = load_model(args.model)
    path = export_savedmodel(model, args.name, root=args.root, base_path=args.base_path,
                             xla=args.xla, verify=args.verify)
    print(f"exported {path}")
    print(signature_summary(path))
    print(f"serve with: tensorflow_model_server --rest_api_port=8501 "
          f"--model_config_file={path.parent.parent.resolve() / 'models.config'}")


def _plugins_list(args):
    from kerasllm.plugins import get_registry

    registry = get_registry()
    rows = []
    for plugin in registry.plugins:
        conflicts = registry.conflicts(plugin)
        for kind, name in plugin.provides or [("-", plugin.name)]:
            status = plugin.status
            if (kind, name) in conflicts:
                others = [c.plugin.origin for c in registry.offers(kind, name) if c.plugin is not plugin]
                status = f"conflict: also offered by {', '.join(others)}"
            elif plugin.status == "broken":
                status = f"broken: {plugin.reason}"
            rows.append((name, kind, plugin.distribution, plugin.version, status))
    header = ("NAME", "KIND", "DISTRIBUTION", "VERSION", "STATUS")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    for row in [header, *sorted(rows)]:
        print("  ".join([*(str(cell).ljust(width) for cell, width in zip(row, widths)), row[4]]))


if __name__ == "__main__":
    sys.exit(main())
