"""The built-in corpus: Python's own documentation, present on every machine.

Documents are the topics of ``pydoc_data.topics`` (the language reference that
``help()`` shows) and, for each standard-library module, its module, class and
function docstrings joined into one document. Modules are read with ``ast``,
never imported: importing some (``antigravity``, ``this``) has side effects.
"""

import ast
import functools
import pathlib
import sysconfig

import tensorflow as tf

import kerasllm

# Tests, tools and demos rather than documented library code.
SKIPPED_FOLDERS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                   "turtledemo", "ensurepip"}


class BuiltinCorpus(kerasllm.DataSource):
    """Args:
        parts: which parts to include: ``topics`` and/or ``docstrings``.
    """

    def __init__(self, parts=("topics", "docstrings")):
        unknown = sorted(set(parts) - {"topics", "docstrings"})
        if unknown or not parts:
            raise ValueError(f"parts must be a non-empty subset of topics, docstrings; got {list(parts)}")
        self.parts = tuple(parts)

    def examples(self):
        documents = []
        if "topics" in self.parts:
            documents += pydoc_topics()
        if "docstrings" in self.parts:
            documents += stdlib_docstrings()
        return tf.data.Dataset.from_tensor_slices({"text": documents})


@functools.cache
def pydoc_topics():
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


@functools.cache
def stdlib_docstrings():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if SKIPPED_FOLDERS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # e.g. a file for another Python version
            continue
        docstrings = [
            ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        document = "\n\n".join(d for d in docstrings if d)
        if document:
            documents.append(document)
    return documents


@kerasllm.hookimpl
def kerasllm_data_sources():
    return {"builtin": BuiltinCorpus}
