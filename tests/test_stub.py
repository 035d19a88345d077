"""kpg/_C.pyi against the compiled module: the same public names, argument names and kinds of types.

pybind11 writes each function's signature at the start of its ``__doc__`` (``name(arg: type, ...) ->
type``); the spelling of a type differs between pybind11 versions (``int`` or ``typing.SupportsInt |
typing.SupportsIndex``), so types are compared by kind: int, float, bool, array, dict, tuple, None.
"""

import ast
import re
from pathlib import Path

import pytest

from kpg import _C

STUB = Path(__file__).parents[1] / "kpg" / "_C.pyi"


def _stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text(), filename=str(STUB))


def _stub_functions() -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in _stub_tree().body if isinstance(node, ast.FunctionDef)}


def _stub_classes() -> dict[str, ast.ClassDef]:
    return {node.name: node for node in _stub_tree().body if isinstance(node, ast.ClassDef)}


def _stub_constants() -> dict[str, str]:
    return {
        node.target.id: ast.unparse(node.annotation)
        for node in _stub_tree().body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def _public(names):
    return {name for name in names if not name.startswith("_")}


def _split_top_level(text: str) -> list[str]:
    """Splits at the commas outside brackets: ``a: x[1, 2], b: y`` -> ``a: x[1, 2]``, ``b: y``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "[("
        depth -= char in "])"
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


def _doc_signature(name: str) -> tuple[list[tuple[str, str]], str]:
    """[(argument, type)] and the return type from the pybind11 docstring of ``_C.<name>``."""
    first_line = getattr(_C, name).__doc__.splitlines()[0]
    match = re.fullmatch(rf"{name}\((?P<args>.*)\) -> (?P<ret>.+)", first_line)
    assert match, f"{name}: no pybind11 signature at the start of the docstring: {first_line!r}"
    args = []
    for part in _split_top_level(match["args"]):
        arg_name, arg_type = part.split(": ", 1)
        args.append((arg_name, arg_type.split(" = ")[0]))
    return args, match["ret"]


def _kind(annotation: str) -> str:
    """The kind of a type as either side spells it."""
    for boundary in ("UpdateBuffers", "NormBuffers"):
        if annotation.endswith(boundary):
            return boundary
    container = re.match(r"(dict|tuple)\b", annotation)
    if container:
        return container[1]
    if "ArrayLike" in annotation or "NDArray" in annotation or annotation.startswith("numpy.ndarray"):
        return "array"
    for kind, spellings in {
        "int": ("int", "typing.SupportsInt | typing.SupportsIndex"),
        "float": ("float", "typing.SupportsFloat | typing.SupportsIndex"),
        "bool": ("bool",),
        "str": ("str",),
        "None": ("None",),
    }.items():
        if annotation in spellings:
            return kind
    raise AssertionError(f"no kind known for the type {annotation!r}; extend _kind")


def test_stub_declares_exactly_the_public_names_of_the_module():
    declared = set(_stub_functions()) | set(_stub_constants()) | set(_stub_classes())
    assert declared == _public(dir(_C)), (
        f"missing from kpg/_C.pyi: {sorted(_public(dir(_C)) - declared)}; "
        f"in the stub but not the module: {sorted(declared - _public(dir(_C)))}"
    )


@pytest.mark.parametrize("name", sorted(_stub_constants()))
def test_stub_constant_type_matches_module(name):
    assert _stub_constants()[name] == type(getattr(_C, name)).__name__


@pytest.mark.parametrize("name", sorted(_stub_functions()))
def test_stub_signature_matches_pybind11_docstring(name):
    function = _stub_functions()[name]
    stub_args = [(arg.arg, _kind(ast.unparse(arg.annotation))) for arg in function.args.args]
    assert not (function.args.vararg or function.args.kwarg or function.args.kwonlyargs), f"{name}: extra arguments"
    doc_args, doc_return = _doc_signature(name)
    assert [arg for arg, _ in stub_args] == [arg for arg, _ in doc_args], f"{name}: argument names differ"
    assert stub_args == [(arg, _kind(t)) for arg, t in doc_args], f"{name}: argument types differ"
    assert _kind(ast.unparse(function.returns)) == _kind(doc_return), f"{name}: return types differ"


@pytest.mark.parametrize("name", sorted(_stub_classes()))
def test_stub_class_declares_exactly_the_attributes_of_the_module(name):
    declared = {node.target.id for node in _stub_classes()[name].body if isinstance(node, ast.AnnAssign)}
    compiled = getattr(_C, name)
    properties = {attr for attr in dir(compiled) if isinstance(getattr(compiled, attr), property)}
    assert declared == _public(properties), f"{name}: stub {sorted(declared)} != module {sorted(properties)}"
