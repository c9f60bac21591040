"""The contract between kerasllm and its plugins.

A plugin is a Python module registered under the ``kerasllm`` entry-point group
of its distribution, for example in ``setup.cfg``::

    [options.entry_points]
    kerasllm =
        bow = my_package.bow_objective

The module implements one or more of the hooks below, each marked with
``@kerasllm.hookimpl``. kerasllm's own objectives, heads, data sources and
tokenizers are plugins registered in exactly this way.

Every hook is called once per process, when the plugin registry is first built
(``kerasllm.plugins.get_registry()``), takes no arguments and returns a dict
mapping names to classes. Names are what configs use (``objectives[].name``,
``head.name``, ``data.source``, ``tokenizer.name``): lowercase identifiers,
unique across all installed plugins of the same kind. A return value that is not
such a dict, or a class that does not subclass the documented base, marks the
plugin as broken; it is then listed as such by ``kerasllm plugins list`` and its
names are unavailable, while every other plugin keeps working.
"""

import pluggy

PROJECT_NAME = "kerasllm"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- Model heads -------------------------------------------------------------


@hookspec
def kerasllm_objectives():
    """Return the pretraining objectives this plugin provides.

    Returns:
        dict mapping objective name to a subclass of :class:`kerasllm.Head`.
        The builder instantiates the class as
        ``cls(backbone=..., tokenizer=..., **options)`` with ``options`` taken
        from ``objectives[i].options`` in the config, so the constructor's
        keyword arguments are the objective's documented options.
    """


@hookspec
def kerasllm_task_heads():
    """Return the fine-tuning task heads this plugin provides.

    Returns:
        dict mapping head name to a subclass of :class:`kerasllm.Head`,
        instantiated like an objective with ``head.options`` from the config.
    """


# --- Data ----------------------------------------------------------------------


@hookspec
def kerasllm_data_sources():
    """Return the data sources this plugin provides.

    Returns:
        dict mapping source name to a subclass of :class:`kerasllm.DataSource`,
        instantiated as ``cls(**options)`` with ``data.options`` from the config.
    """


@hookspec
def kerasllm_tokenizers():
    """Return the tokenizer types this plugin provides.

    Returns:
        dict mapping tokenizer name to a subclass of
        :class:`kerasllm.TokenizerFactory`, which trains a vocabulary from a
        data source or loads one from a file and returns a keras-hub tokenizer.
    """
