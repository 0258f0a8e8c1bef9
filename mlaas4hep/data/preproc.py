"""MLaaS4HEP preprocessing: new branches from expressions, and cuts on events.

A preprocessing file is JSON with up to three sections (MLaaS4HEP's ``preproc.json``)::

    {
      "new_branch": {
        "log_partonE": {"def": "log(partonE)", "type": "jagged",
                        "cut_1": ["log_partonE<6.31", "any"], "remove": "False",
                        "keys_to_remove": ["partonE"]},
        "nJets_square": {"def": "nJets**2", "type": "flat", "cut": "1<=nJets_square<=16"}
      },
      "flat_cut": {"nLeptons": {"cut": "0<=nLeptons<=2", "remove": "False"}},
      "jagged_cut": {"partonPt": {"cut": ["partonPt>200", "all"], "remove": "False"}}
    }

* ``new_branch``: ``def`` computes a branch from others (arithmetic, comparisons and
  numpy functions such as ``log``, ``sqrt``, ``abs``); it becomes a feature unless
  ``remove`` is true; ``keys_to_remove`` drops the branches it replaces.
* flat cuts (``"cut"``/``"cut_N"`` strings) keep the events where the condition holds;
  chained comparisons (``0<=x<=2``) are allowed.
* jagged cuts (``[condition, "any"|"all"]``) keep the events where any or all of the
  list's values satisfy the condition.
* ``remove: "True"`` on a cut keeps that branch out of the features.

Every cut is applied together (logical and), in the read tasks, before the specs pass.
Expressions are parsed into a small safe subset of Python: no attribute access, no
calls other than the listed numpy functions.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import awkward as ak
import numpy as np

from mlaas4hep.data.errors import DataError
from mlaas4hep.spec import read_json_object

#: numpy functions an expression may call.
FUNCTIONS: dict[str, Callable[..., Any]] = {
    name: getattr(np, name)
    for name in (
        "abs", "sqrt", "exp", "log", "log10", "log2", "log1p", "sin", "cos", "tan",
        "arcsin", "arccos", "arctan", "arctan2", "sinh", "cosh", "tanh", "arcsinh",
        "arccosh", "arctanh", "hypot", "minimum", "maximum", "where", "sign", "floor", "ceil",
    )
}  # fmt: skip
FUNCTIONS["fabs"] = np.abs

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
_COMPARE = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


#: Bounds of one expression: its text, its syntax tree, and the constants it may compute.
MAX_EXPRESSION_CHARS = 1000
MAX_EXPRESSION_NODES = 200
MAX_EXPRESSION_DEPTH = 64
MAX_CONSTANT = 2.0**63  # |value| of any constant, written or computed (fits int64)
MAX_POWER_EXPONENT = 64
#: Expressions (new branches and cuts) in one preprocessing mapping.
MAX_PREPROC_EXPRESSIONS = 500


class Expression:
    """A parsed expression over branches; ``names`` are the branches it reads.

    Bounded at parse time: at most :data:`MAX_EXPRESSION_CHARS` characters,
    :data:`MAX_EXPRESSION_NODES` syntax nodes nested at most :data:`MAX_EXPRESSION_DEPTH`
    deep, numbers only (no strings), and every constant sub-expression folded into one
    number of magnitude below :data:`MAX_CONSTANT` (powers of exponents up to
    :data:`MAX_POWER_EXPONENT`), so that evaluation only ever combines bounded numbers
    with arrays.
    """

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        if not isinstance(text, str):
            raise DataError(f"{where}: an expression must be a string, not {type(text).__name__}")
        if len(text) > MAX_EXPRESSION_CHARS:
            raise DataError(
                f"{where}: {text[:60]!r}... is {len(text)} characters long; "
                f"an expression has at most {MAX_EXPRESSION_CHARS}"
            )
        try:
            self.tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as error:
            raise DataError(f"{where}: cannot parse {text!r}: {error.msg}") from None
        except (RecursionError, MemoryError, ValueError):
            raise DataError(f"{where}: cannot parse {text!r}: nested too deeply") from None
        self.names: list[str] = []
        self._nodes = 0
        self._check(self.tree, 1)
        self.tree = self._fold(self.tree)

    def _refuse(self, reason: str) -> DataError:
        shown = self.text if len(self.text) <= 120 else self.text[:100] + "..."
        return DataError(f"{self.where}: {shown!r} {reason}")

    def _check(self, node: ast.AST, depth: int) -> None:
        self._nodes += 1
        if self._nodes > MAX_EXPRESSION_NODES:
            raise self._refuse(f"has more than {MAX_EXPRESSION_NODES} terms, not allowed")
        if depth > MAX_EXPRESSION_DEPTH:
            raise self._refuse(f"nests deeper than {MAX_EXPRESSION_DEPTH} levels, not allowed")
        if isinstance(node, ast.Name):
            if node.id not in FUNCTIONS and node.id not in self.names:
                self.names.append(node.id)
            return
        if isinstance(node, ast.Constant):
            _check_number(node.value, self._refuse)
            return
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                called = ast.unparse(node.func)
                raise self._refuse(f"calls {called!r}, not allowed")
            if node.keywords:
                raise self._refuse(f"passes keyword arguments to {node.func.id!r}, not allowed")
            for arg in node.args:
                self._check(arg, depth + 1)
            return
        if isinstance(node, ast.BinOp) and type(node.op) not in _BINARY:
            raise self._refuse(f"uses the operator {type(node.op).__name__}, not allowed")
        allowed = (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp)
        if not isinstance(node, allowed):
            raise self._refuse(f"uses {type(node).__name__}, not allowed")
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.operator | ast.unaryop | ast.cmpop | ast.boolop):
                self._check(child, depth + 1)

    def _fold(self, node: ast.AST) -> ast.AST:
        """``node`` with its constant arithmetic computed, each step within the bounds."""
        if isinstance(node, ast.UnaryOp):
            node.operand = self._fold(node.operand)
            if isinstance(node.operand, ast.Constant) and type(node.op) in _UNARY:
                return ast.Constant(self._constant(_UNARY[type(node.op)], node.operand.value))
        elif isinstance(node, ast.BinOp):
            node.left, node.right = self._fold(node.left), self._fold(node.right)
            if isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant):
                return ast.Constant(self._binary_constant(node))
        elif isinstance(node, ast.Compare | ast.BoolOp | ast.Call):
            for name, value in ast.iter_fields(node):
                if isinstance(value, list):
                    setattr(node, name, [self._fold(v) for v in value])
                elif isinstance(value, ast.expr):
                    setattr(node, name, self._fold(value))
        exponent = (
            node.right if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) else None
        )
        if isinstance(exponent, ast.Constant) and abs(exponent.value) > MAX_POWER_EXPONENT:
            raise self._refuse(f"raises to the power {exponent.value}, above the bound")
        return node

    def _binary_constant(self, node: ast.BinOp) -> int | float:
        left, right = node.left.value, node.right.value
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_POWER_EXPONENT:
                raise self._refuse(f"raises to the power {right}, above the bound")
            if abs(left) > 1 and abs(right) * math.log2(abs(left)) > 63:
                raise self._refuse(f"computes {left!r}**{right!r}, above the bound")
        return self._constant(_BINARY[type(node.op)], left, right)

    def _constant(self, op: Callable[..., Any], *values: int | float) -> int | float:
        """``op(*values)`` of bounded numbers, refused unless the result is bounded too."""
        try:
            value = op(*values)
        except (ArithmeticError, ValueError, TypeError) as error:
            raise self._refuse(f"cannot be computed: {error}") from None
        return _check_number(value, self._refuse)

    def evaluate(self, arrays: Mapping[str, Any]) -> Any:
        """Evaluate over ``arrays`` (branch name → awkward or numpy array)."""
        missing = [n for n in self.names if n not in arrays]
        if missing:
            raise DataError(f"{self.where}: {self.text!r} uses unknown branch {missing[0]!r}")
        try:
            return self._eval(self.tree, arrays)
        except DataError:
            raise
        except (ArithmeticError, ValueError, TypeError) as error:
            raise self._refuse(f"cannot be evaluated: {error}") from None

    def _eval(self, node: ast.AST, arrays: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return arrays[node.id]
        if isinstance(node, ast.Call):
            return FUNCTIONS[node.func.id](*(self._eval(a, arrays) for a in node.args))
        if isinstance(node, ast.BinOp):
            op = _BINARY.get(type(node.op))
            if op is None:
                raise DataError(f"{self.where}: operator in {self.text!r} not allowed")
            return op(self._eval(node.left, arrays), self._eval(node.right, arrays))
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return ~self._eval(node.operand, arrays)
            return _UNARY[type(node.op)](self._eval(node.operand, arrays))
        if isinstance(node, ast.BoolOp):
            values = [self._eval(v, arrays) for v in node.values]
            combine = operator.and_ if isinstance(node.op, ast.And) else operator.or_
            result = values[0]
            for value in values[1:]:
                result = combine(result, value)
            return result
        assert isinstance(node, ast.Compare)
        left, result = self._eval(node.left, arrays), None
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self._eval(right_node, arrays)
            term = _COMPARE[type(op)](left, right)
            result = term if result is None else result & term
            left = right
        return result


def _check_number(value: Any, refuse: Callable[[str], DataError]) -> int | float:
    """``value`` when it is a number within :data:`MAX_CONSTANT`; ``refuse(reason)`` else."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, int | float):
        raise refuse(f"holds the constant {str(value)[:40]!r}; only numbers are allowed")
    if isinstance(value, int) and value.bit_length() > 63:
        raise refuse(f"holds a constant of about 2**{value.bit_length()}, above the bound 2**63")
    if abs(value) >= MAX_CONSTANT:
        raise refuse(f"holds a constant of magnitude {value:.3g}, above the bound 2**63")
    return value


@dataclass(frozen=True)
class NewBranch:
    name: str
    expression: Expression
    kind: Literal["flat", "jagged"]


@dataclass(frozen=True)
class Cut:
    """Keep events where ``expression`` holds (flat), or holds for any/all values (jagged)."""

    expression: Expression
    mode: Literal["flat", "any", "all"]

    def passes(self, arrays: Mapping[str, Any]) -> np.ndarray:
        value = ak.Array(self.expression.evaluate(arrays))
        if self.mode != "flat":
            value = ak.all(value, axis=1) if self.mode == "all" else ak.any(value, axis=1)
        elif value.ndim != 1:
            raise DataError(f"{self.expression.where}: {self.expression.text!r} is not flat")
        return ak.to_numpy(value).astype(bool)


@dataclass
class Preproc:
    """Parsed preprocessing: new branches, cuts, and branches kept out of the features."""

    new_branches: list[NewBranch] = field(default_factory=list)
    cuts: list[Cut] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)

    def inputs(self) -> list[str]:
        """Tree branches the expressions read (new branches excluded), first use first."""
        new = {b.name for b in self.new_branches}
        names: list[str] = []
        for expression in [b.expression for b in self.new_branches] + [
            c.expression for c in self.cuts
        ]:
            names.extend(n for n in expression.names if n not in new and n not in names)
        return names

    def apply(self, arrays: dict[str, Any]) -> dict[str, Any]:
        """Add the new branches to ``arrays`` and keep only the events passing every cut."""
        for branch in self.new_branches:
            value = ak.Array(branch.expression.evaluate(arrays))
            if (value.ndim == 1) != (branch.kind == "flat"):
                raise DataError(
                    f"{branch.expression.where}: {branch.expression.text!r} gives "
                    f"{'flat' if value.ndim == 1 else 'jagged'} values, not {branch.kind}"
                )
            arrays[branch.name] = value
        if not self.cuts or not arrays:
            return arrays
        keep = np.logical_and.reduce([cut.passes(arrays) for cut in self.cuts])
        return {name: values[keep] for name, values in arrays.items()}


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in {"true", "1", "yes"}


def _cuts_of(entry: Mapping[str, Any], where: str, kind: str) -> list[Cut]:
    cuts = []
    for key, value in entry.items():
        if not key.startswith("cut"):
            continue
        at = f"{where}.{key}"
        if kind == "flat":
            if not isinstance(value, str):
                raise DataError(f"{at}: a flat cut is a condition string such as '0<=x<=2'")
            cuts.append(Cut(Expression(value, at), "flat"))
        else:
            if (
                not isinstance(value, list | tuple)
                or len(value) != 2
                or value[1] not in ("any", "all")
            ):
                raise DataError(f"{at}: a jagged cut is [condition, 'any' or 'all']")
            cuts.append(Cut(Expression(value[0], at), value[1]))
    return cuts


def parse_preproc(data: Mapping[str, Any], source: str = "preproc") -> Preproc:
    """Parse MLaaS4HEP's preprocessing mapping; raise :class:`DataError` naming the field."""
    unknown = set(data) - {"new_branch", "flat_cut", "jagged_cut"}
    if unknown:
        raise DataError(f"{source}: unknown sections {', '.join(sorted(unknown))}")
    result = Preproc()
    for name, entry in (data.get("new_branch") or {}).items():
        where = f"{source}: new_branch.{name}"
        if not isinstance(entry, Mapping) or "def" not in entry:
            raise DataError(f"{where}: needs a 'def' expression")
        kind = entry.get("type", "flat")
        if kind not in ("flat", "jagged"):
            raise DataError(f"{where}: type must be 'flat' or 'jagged', not {kind!r}")
        result.new_branches.append(NewBranch(name, Expression(entry["def"], where), kind))
        result.cuts.extend(_cuts_of(entry, f"{source}: new_branch.{name}", kind))
        if _truthy(entry.get("remove", False)):
            result.removed.add(name)
        result.removed.update(entry.get("keys_to_remove", []))
    for section, kind in (("flat_cut", "flat"), ("jagged_cut", "jagged")):
        for name, entry in (data.get(section) or {}).items():
            if not isinstance(entry, Mapping):
                raise DataError(f"{source}: {section}.{name} must be a mapping with a 'cut'")
            result.cuts.extend(_cuts_of(entry, f"{source}: {section}.{name}", kind))
            if _truthy(entry.get("remove", False)):
                result.removed.add(name)
    count = len(result.new_branches) + len(result.cuts)
    if count > MAX_PREPROC_EXPRESSIONS:
        raise DataError(
            f"{source}: {count} expressions; a preprocessing has at most {MAX_PREPROC_EXPRESSIONS}"
        )
    return result


def load_preproc(value: str | Path | Mapping[str, Any] | None) -> Preproc | None:
    """Load preprocessing from a JSON file path or a mapping (None gives None)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return parse_preproc(value)
    path = Path(value)
    return parse_preproc(read_json_object(path, "preprocessing", DataError), str(path))
