"""MLaaS4HEP model files read without being run: parse, check, read.

A model file is plain Python defining ``model(idim)``. Nothing here executes it: the
API checks a submission with :func:`check_model_file`, and the sandbox runner
(:mod:`mlaas4hep.train.sandbox_runner`) is the only place that runs one.
"""

from __future__ import annotations

import ast
from pathlib import Path

#: Name of the function a model file must define.
MODEL_FUNCTION = "model"


class ModelSourceError(ValueError):
    """A model file that cannot give a model; the message names the file and the line."""


def _syntax_error(path: str, error: SyntaxError) -> ModelSourceError:
    where = f"{path}, line {error.lineno}" if error.lineno else path
    return ModelSourceError(f"{where}: syntax error: {error.msg}")


def _parse(source: str, path: str) -> ast.Module:
    try:
        tree = ast.parse(source, filename=path)
        compile(tree, path, "exec")  # catches errors ast accepts ('return' outside function...)
    except SyntaxError as error:
        raise _syntax_error(path, error) from None
    except ValueError as error:  # null bytes
        raise ModelSourceError(f"{path}: not a Python source file: {error}") from None
    return tree


def _check_model_function(tree: ast.Module, path: str) -> None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == MODEL_FUNCTION:
            args = node.args
            positional = len(args.posonlyargs) + len(args.args)
            if positional == 0 and args.vararg is None:
                raise ModelSourceError(
                    f"{path}, line {node.lineno}: {MODEL_FUNCTION}() must take the input "
                    f"dimension: def {MODEL_FUNCTION}(idim)"
                )
            return
    raise ModelSourceError(
        f"{path}: no top-level function {MODEL_FUNCTION}(idim) returning a compiled Keras model"
    )


def parse_model_source(source: str, path: str) -> ast.Module:
    """Parse model-file ``source`` (reported as ``path``) without running it.

    Returns its syntax tree; :class:`ModelSourceError` naming the file (and line) when it
    does not parse or defines no top-level ``model(idim)``.
    """
    tree = _parse(source, path)
    _check_model_function(tree, path)
    return tree


def check_model_file(path: str | Path) -> None:
    """Check a model file without running it: it parses and defines ``model(idim)``.

    Raises :class:`ModelSourceError` naming the file (and line) otherwise.
    """
    path = str(path)
    parse_model_source(read_model_source(path), path)


def read_model_source(path: str | Path) -> str:
    """Return the text of a model file; :class:`ModelSourceError` if it cannot be read."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise ModelSourceError(f"{path}: model file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelSourceError(f"{path}: cannot read model file: {error}") from None
