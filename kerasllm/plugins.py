"""The plugin registry: every installed ``kerasllm`` entry point, loaded once.

Loading never raises for a single bad plugin. A plugin that fails to import,
fails pluggy's validation, or returns something malformed from a hook is kept
in ``Registry.plugins`` with status ``broken`` and the reason; a name offered by
two plugins is reported by ``Registry.conflicts`` for both. Asking for such a name
(``Registry.get``) raises :class:`PluginError` naming the plugins and their
distributions, so the problem surfaces exactly where it matters.
"""

import dataclasses
import functools
import importlib.metadata

import pluggy

from kerasllm import hookspecs
from kerasllm.data import DataSource
from kerasllm.errors import PluginError
from kerasllm.heads import Head
from kerasllm.tokenizers import TokenizerFactory

ENTRY_POINT_GROUP = "kerasllm"


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str  # as shown to users: "objective", "task head", ...
    hook: str
    base: type


KINDS = (
    Kind("objective", "kerasllm_objectives", Head),
    Kind("task head", "kerasllm_task_heads", Head),
    Kind("data source", "kerasllm_data_sources", DataSource),
    Kind("tokenizer", "kerasllm_tokenizers", TokenizerFactory),
)
KIND_BY_NAME = {kind.name: kind for kind in KINDS}


@dataclasses.dataclass
class Plugin:
    """One entry point of the ``kerasllm`` group and what it contributed."""

    name: str
    distribution: str
    version: str
    status: str = "ok"  # ok | broken
    reason: str = ""
    provides: list = dataclasses.field(default_factory=list)  # [(kind, name)]

    @property
    def origin(self):
        return f"plugin '{self.name}' (distribution {self.distribution} {self.version})"


@dataclasses.dataclass
class Component:
    kind: str
    name: str
    cls: type
    plugin: Plugin


class Registry:
    """Objectives, task heads, data sources and tokenizers offered by plugins."""

    def __init__(self, entry_points):
        self.plugins = []
        self._offers = {kind.name: {} for kind in KINDS}  # kind -> name -> [Component]
        manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        for entry_point in entry_points:
            self._load(manager, entry_point)

    @classmethod
    def from_installed(cls):
        return cls(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))

    def _load(self, manager, entry_point):
        dist = getattr(entry_point, "dist", None)
        plugin = Plugin(
            name=entry_point.name,
            distribution=dist.name if dist else "unknown",
            version=dist.version if dist else "?",
        )
        self.plugins.append(plugin)
        try:
            module = entry_point.load()
            manager.register(module, name=f"{plugin.distribution}:{plugin.name}")
        except Exception as error:  # noqa: BLE001 - any import failure makes it broken
            plugin.status, plugin.reason = "broken", f"{type(error).__name__}: {error}"
            return
        try:
            manager.check_pending()  # a misspelled hook name, e.g. kerasllm_objective
            offers = [
                offer
                for kind in KINDS
                for impl in getattr(manager.hook, kind.hook).get_hookimpls()
                if impl.plugin is module
                for offer in _validate_offer(kind, impl.function())
            ]
        except Exception as error:  # noqa: BLE001 - a failing hook makes it broken
            plugin.status, plugin.reason = "broken", f"{type(error).__name__}: {error}"
            manager.unregister(module)
            return
        for kind, name, cls in offers:
            plugin.provides.append((kind.name, name))
            self._offers[kind.name].setdefault(name, []).append(
                Component(kind.name, name, cls, plugin)
            )

    def names(self, kind):
        """Names of a kind that resolve to exactly one plugin."""
        return sorted(n for n, offers in self._offers[kind].items() if len(offers) == 1)

    def offers(self, kind, name):
        """Every plugin's offer of ``name`` as ``kind``."""
        return list(self._offers[kind].get(name, []))

    def conflicts(self, plugin):
        """The (kind, name) pairs this plugin offers that another plugin offers too."""
        return [
            (kind, name) for kind, name in plugin.provides if len(self._offers[kind][name]) > 1
        ]

    def get(self, kind, name, where):
        """The class registered as ``name`` of ``kind``; ``where`` is its config key."""
        offers = self._offers[kind].get(name, [])
        if len(offers) == 1:
            return offers[0].cls
        if len(offers) > 1:
            origins = " and ".join(offer.plugin.origin for offer in offers)
            raise PluginError(
                f"{kind} '{name}' in {where} is offered by {origins}; "
                "uninstall one of them or disable its entry point"
            )
        message = f"unknown {kind} '{name}' in {where}; known: {', '.join(self.names(kind)) or 'none'}"
        broken = [p for p in self.plugins if p.status == "broken"]
        if broken:
            message += "; plugins that failed to load: " + "; ".join(
                f"{p.origin}: {p.reason}" for p in broken
            )
        raise PluginError(message)


def _validate_offer(kind, result):
    if not isinstance(result, dict):
        raise PluginError(
            f"hook {kind.hook} must return a dict of name -> {kind.base.__name__} "
            f"subclass, got {type(result).__name__}"
        )
    offers = []
    for name, cls in result.items():
        if not (isinstance(name, str) and name.isidentifier() and name == name.lower()):
            raise PluginError(
                f"hook {kind.hook} returned the name {name!r}; names must be "
                "lowercase identifiers"
            )
        if not (isinstance(cls, type) and issubclass(cls, kind.base)):
            raise PluginError(
                f"hook {kind.hook} returned {cls!r} for '{name}'; expected a "
                f"subclass of kerasllm.{kind.base.__name__}"
            )
        offers.append((kind, name, cls))
    return offers


@functools.cache
def get_registry():
    """The registry of installed plugins, loaded on first use."""
    return Registry.from_installed()
