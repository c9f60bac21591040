"""The plugin registry: discovery, broken plugins, malformed hooks, conflicts, errors.

Most tests build a ``Registry`` from fake entry points in-process; one installs a
real, broken distribution with pip and runs ``kerasllm plugins list`` on it.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import types

import pytest

import kerasllm
import kerasllm.cli
import kerasllm.plugins
from kerasllm.plugins import Registry

FIRST_PARTY = {
    "mlm": "objective",
    "clm": "objective",
    "classification": "task head",
    "text": "data source",
    "builtin": "data source",
    "wordpiece": "tokenizer",
}


# --- Fakes -----------------------------------------------------------------------


class FakeDist:
    def __init__(self, name, version):
        self.name, self.version = name, version


class FakeEntryPoint:
    """What ``importlib.metadata.entry_points()`` yields: name, dist and load()."""

    def __init__(self, name, target, dist="fake-dist", version="1.0"):
        self.name = name
        self.dist = FakeDist(dist, version)
        self._target = target

    def load(self):
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


def hook_module(name, **hooks):
    """A module whose attributes are the given functions, marked as kerasllm hooks."""
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        function.__name__ = hook
        setattr(module, hook, kerasllm.hookimpl(function))
    return module


class Bow(kerasllm.Head):
    pass


class OtherHead(kerasllm.Head):
    pass


class Lines(kerasllm.DataSource):
    pass


class Chars(kerasllm.TokenizerFactory):
    pass


def good_entry_point(name="good", dist="good-dist", version="1.0", **offers):
    """An entry point whose module offers ``offers`` (hook name -> dict)."""
    hooks = {hook: (lambda value=value: value) for hook, value in offers.items()}
    return FakeEntryPoint(name, hook_module(f"{name}_module", **hooks), dist, version)


def broken_entry_point(name="broken", dist="broken-dist", version="0.0.1"):
    return FakeEntryPoint(name, ImportError("needs a missing dependency"), dist, version)


def plugin_named(registry, name):
    (plugin,) = [p for p in registry.plugins if p.name == name]
    return plugin


# --- The installed plugins ---------------------------------------------------------


def test_installed_registry_finds_first_party_plugins():
    registry = kerasllm.plugins.get_registry()
    assert registry is kerasllm.plugins.get_registry()  # loaded once per process
    version = importlib.metadata.version("kerasllm")
    for name, kind in FIRST_PARTY.items():
        plugin = plugin_named(registry, name)
        assert (plugin.distribution, plugin.version) == ("kerasllm", version)
        assert (plugin.status, plugin.reason) == ("ok", "")
        assert plugin.provides == [(kind, name)]
        assert registry.conflicts(plugin) == []
    assert {"mlm", "clm"} <= set(registry.names("objective"))
    assert "classification" in registry.names("task head")
    assert {"text", "builtin"} <= set(registry.names("data source"))
    assert "wordpiece" in registry.names("tokenizer")


def test_installed_classes_subclass_the_documented_bases():
    registry = Registry.from_installed()
    assert registry is not kerasllm.plugins.get_registry()
    for name, kind in FIRST_PARTY.items():
        cls = registry.get(kind, name, "somewhere")
        assert issubclass(cls, kerasllm.plugins.KIND_BY_NAME[kind].base), (name, cls)
    assert registry.get("objective", "mlm", "x").requires_causal is False
    assert registry.get("objective", "clm", "x").requires_causal is True


def test_installed_unknown_objective_lists_first_party_names():
    with pytest.raises(kerasllm.PluginError) as error:
        kerasllm.plugins.get_registry().get("objective", "mlmm", "objectives[0].name")
    assert re.match(r"unknown objective 'mlmm' in objectives\[0\]\.name; known: .*\bclm, .*\bmlm\b",
                    str(error.value)), str(error.value)


# --- A plugin that fails to import ----------------------------------------------------


def test_import_error_makes_only_that_plugin_broken():
    registry = Registry([
        broken_entry_point(),
        good_entry_point(kerasllm_objectives={"bow": Bow},
                         kerasllm_data_sources={"lines": Lines}),
    ])
    broken = plugin_named(registry, "broken")
    assert broken.status == "broken"
    assert broken.reason == "ImportError: needs a missing dependency"
    assert broken.provides == []
    assert (broken.distribution, broken.version) == ("broken-dist", "0.0.1")

    good = plugin_named(registry, "good")
    assert (good.status, good.reason) == ("ok", "")
    assert good.provides == [("objective", "bow"), ("data source", "lines")]
    assert registry.get("objective", "bow", "objectives[0].name") is Bow
    assert registry.get("data source", "lines", "data.source") is Lines


def test_any_exception_at_import_makes_the_plugin_broken():
    registry = Registry([FakeEntryPoint("syntax", SyntaxError("invalid syntax"))])
    assert plugin_named(registry, "syntax").status == "broken"
    assert plugin_named(registry, "syntax").reason == "SyntaxError: invalid syntax"


def test_entry_point_without_distribution_is_still_listed():
    entry_point = FakeEntryPoint("orphan", ImportError("gone"))
    entry_point.dist = None
    registry = Registry([entry_point])
    plugin = plugin_named(registry, "orphan")
    assert (plugin.distribution, plugin.status, plugin.reason) == (
        "unknown", "broken", "ImportError: gone")


# --- Malformed hook results ---------------------------------------------------------


def assert_broken(registry, name, *fragments):
    plugin = plugin_named(registry, name)
    assert plugin.status == "broken", plugin
    assert plugin.provides == []
    for fragment in fragments:
        assert fragment in plugin.reason, (fragment, plugin.reason)
    return plugin


@pytest.mark.parametrize("result, type_name", [
    (["bow"], "list"),
    (None, "NoneType"),
    (Bow, "type"),
])
def test_hook_returning_a_non_dict_breaks_the_plugin(result, type_name):
    registry = Registry([
        good_entry_point("bad", kerasllm_objectives=result),
        good_entry_point("fine", kerasllm_objectives={"fine": Bow}),
    ])
    plugin = assert_broken(registry, "bad", "hook kerasllm_objectives must return a dict",
                           "Head subclass", f"got {type_name}")
    assert plugin.reason.startswith("PluginError: ")
    assert registry.get("objective", "fine", "objectives[0].name") is Bow


@pytest.mark.parametrize("name", ["Bow", "my-bow", "2bow", "", 3])
def test_hook_returning_a_bad_name_breaks_the_plugin(name):
    registry = Registry([good_entry_point("bad", kerasllm_objectives={name: Bow})])
    assert_broken(registry, "bad", "hook kerasllm_objectives",
                  f"returned the name {name!r}", "lowercase identifiers")


@pytest.mark.parametrize("hook, value, base", [
    ("kerasllm_objectives", Lines, "kerasllm.Head"),
    ("kerasllm_objectives", object, "kerasllm.Head"),
    ("kerasllm_task_heads", Chars, "kerasllm.Head"),
    ("kerasllm_task_heads", len, "kerasllm.Head"),  # a function, not a class
    ("kerasllm_data_sources", Bow, "kerasllm.DataSource"),
    ("kerasllm_tokenizers", Lines, "kerasllm.TokenizerFactory"),
    ("kerasllm_tokenizers", "wordpiece", "kerasllm.TokenizerFactory"),
])
def test_hook_returning_a_wrong_class_breaks_the_plugin(hook, value, base):
    registry = Registry([good_entry_point("bad", **{hook: {"thing": value}})])
    assert_broken(registry, "bad", f"hook {hook} returned {value!r} for 'thing'",
                  f"expected a subclass of {base}")


def test_one_bad_hook_withdraws_all_of_the_plugins_offers():
    registry = Registry([good_entry_point(
        "half", kerasllm_objectives={"bow": Bow}, kerasllm_tokenizers={"chars": Lines})])
    assert_broken(registry, "half", "kerasllm_tokenizers", "kerasllm.TokenizerFactory")
    with pytest.raises(kerasllm.PluginError) as error:
        registry.get("objective", "bow", "objectives[0].name")
    message = str(error.value)
    assert "unknown objective 'bow' in objectives[0].name; known: none" in message
    assert "plugins that failed to load: plugin 'half' (distribution good-dist 1.0)" in message


def test_hook_raising_breaks_the_plugin():
    def explode():
        raise RuntimeError("no GPU here")

    registry = Registry([
        FakeEntryPoint("raiser", hook_module("raiser", kerasllm_objectives=explode)),
        good_entry_point(kerasllm_objectives={"bow": Bow}),
    ])
    assert_broken(registry, "raiser")
    assert plugin_named(registry, "raiser").reason == "RuntimeError: no GPU here"
    assert registry.get("objective", "bow", "objectives[0].name") is Bow


def test_hook_with_arguments_the_spec_lacks_breaks_the_plugin():
    def takes_arguments(config):
        return {"bow": Bow}

    registry = Registry([
        FakeEntryPoint("wrongsig", hook_module("wrongsig", kerasllm_objectives=takes_arguments)),
    ])
    assert_broken(registry, "wrongsig", "PluginValidationError", "config")


# --- Conflicts ----------------------------------------------------------------------


def conflicting_entry_points():
    return [
        good_entry_point("alpha", "alpha-dist", "1.0",
                         kerasllm_objectives={"bow": Bow, "alpha_only": OtherHead}),
        good_entry_point("beta", "beta-dist", "2.5", kerasllm_objectives={"bow": OtherHead},
                         kerasllm_task_heads={"bow": Bow}),
    ]


@pytest.fixture
def conflicting():
    return Registry(conflicting_entry_points())


def test_name_offered_twice_raises_naming_both_plugins(conflicting):
    with pytest.raises(kerasllm.PluginError) as error:
        conflicting.get("objective", "bow", "objectives[0].name")
    message = str(error.value)
    assert message.startswith("objective 'bow' in objectives[0].name is offered by ")
    assert "plugin 'alpha' (distribution alpha-dist 1.0)" in message
    assert "plugin 'beta' (distribution beta-dist 2.5)" in message
    assert "uninstall one of them" in message


def test_conflicts_are_reported_per_plugin_and_leave_other_names_alone(conflicting):
    alpha, beta = plugin_named(conflicting, "alpha"), plugin_named(conflicting, "beta")
    assert conflicting.conflicts(alpha) == [("objective", "bow")]
    assert conflicting.conflicts(beta) == [("objective", "bow")]
    assert alpha.status == beta.status == "ok"
    assert conflicting.names("objective") == ["alpha_only"]
    assert conflicting.get("objective", "alpha_only", "objectives[0].name") is OtherHead
    # The same name as another kind is no conflict.
    assert conflicting.get("task head", "bow", "head.name") is Bow


# --- Unknown names ------------------------------------------------------------------


def test_unknown_name_lists_known_names_and_broken_plugins():
    registry = Registry([
        good_entry_point(kerasllm_objectives={"mlm": Bow, "clm": OtherHead, "bow": Bow}),
        broken_entry_point(),
    ])
    with pytest.raises(kerasllm.PluginError) as error:
        registry.get("objective", "mlmm", "objectives[0].name")
    message = str(error.value)
    assert message.startswith(
        "unknown objective 'mlmm' in objectives[0].name; known: bow, clm, mlm; ")
    assert ("plugins that failed to load: plugin 'broken' (distribution broken-dist 0.0.1): "
            "ImportError: needs a missing dependency") in message


def test_unknown_name_without_broken_plugins_says_only_what_is_known():
    registry = Registry([good_entry_point(kerasllm_data_sources={"lines": Lines})])
    with pytest.raises(kerasllm.PluginError) as error:
        registry.get("data source", "txt", "data.source")
    assert str(error.value) == "unknown data source 'txt' in data.source; known: lines"
    with pytest.raises(kerasllm.PluginError, match=r"unknown tokenizer 'bpe' in "
                       r"tokenizer\.name; known: none$"):
        registry.get("tokenizer", "bpe", "tokenizer.name")


# --- `kerasllm plugins list` --------------------------------------------------------


def parse_table(text):
    """The rows of ``plugins list`` output, cut at the header's column starts."""
    header, *lines = text.splitlines()
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    assert [header[a:b].strip() for a, b in zip(starts, starts[1:] + [None])] == [
        "NAME", "KIND", "DISTRIBUTION", "VERSION", "STATUS"]
    return [tuple(line[a:b].strip() for a, b in zip(starts, starts[1:] + [None]))
            for line in lines]


def test_plugins_list_shows_conflicts_and_broken_plugins(monkeypatch, capsys):
    registry = Registry([*conflicting_entry_points(), broken_entry_point()])
    monkeypatch.setattr(kerasllm.plugins, "get_registry", lambda: registry)
    assert kerasllm.cli.main(["plugins", "list"]) == 0
    assert parse_table(capsys.readouterr().out) == [  # sorted by name, then kind
        ("alpha_only", "objective", "alpha-dist", "1.0", "ok"),
        ("bow", "objective", "alpha-dist", "1.0",
         "conflict: also offered by plugin 'beta' (distribution beta-dist 2.5)"),
        ("bow", "objective", "beta-dist", "2.5",
         "conflict: also offered by plugin 'alpha' (distribution alpha-dist 1.0)"),
        ("bow", "task head", "beta-dist", "2.5", "ok"),
        ("broken", "-", "broken-dist", "0.0.1", "broken: ImportError: needs a missing dependency"),
    ]


BROKEN_MODULE = 'raise ImportError("needs a missing dependency")\n'

BROKEN_SETUP_CFG = """\
[metadata]
name = kerasllm-broken-example
version = 0.0.1

[options]
py_modules = kerasllm_broken_example

[options.entry_points]
kerasllm =
    broken = kerasllm_broken_example
"""

BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"
"""


def test_plugins_list_cli_with_an_installed_broken_distribution(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    (source / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (source / "setup.cfg").write_text(BROKEN_SETUP_CFG)
    (source / "kerasllm_broken_example.py").write_text(BROKEN_MODULE)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
         str(source)],
        check=True, capture_output=True, timeout=300,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "kerasllm.cli", "plugins", "list"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    rows = parse_table(result.stdout)
    version = importlib.metadata.version("kerasllm")
    for name, kind in FIRST_PARTY.items():
        assert (name, kind, "kerasllm", version, "ok") in rows
    assert ("broken", "-", "kerasllm-broken-example", "0.0.1",
            "broken: ImportError: needs a missing dependency") in rows
    # The broken distribution spoils nothing else.
    assert [row for row in rows if row[4] != "ok"] == [
        ("broken", "-", "kerasllm-broken-example", "0.0.1",
         "broken: ImportError: needs a missing dependency")]
