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
    pretrain.add_argument("config", metavar="CONFIG",
                          help="a YAML config file, or 'quickstart' for the built-in one")
    pretrain.add_argument("--steps", type=_positive_int,
                          help="total optimizer steps (overrides training.steps)")
    pretrain.add_argument("--output", help="output folder (overrides training.output)")
    pretrain.set_defaults(run=_pretrain)

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

    config = load_config(args.config)  # config mistakes surface before TensorFlow loads
    from kerasllm.jobs import pretrain

    result = pretrain(config, steps=args.steps, output=args.output)
    start, end = result["start"], result["end"]
    print("\nHeld-out evaluation")
    print(f"{'metric':<24}{'before':>12}{'after':>12}")
    for name in sorted(end):
        print(f"{name:<24}{start[name]:>12.4f}{end[name]:>12.4f}")


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
