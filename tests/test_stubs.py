"""The typed API: gemmalens ships py.typed and gemmalens/_core.pyi (the native module's stubs), installed with the
package, and the stubs match the module: every public name of gemmalens._core (functions, classes, their methods and
properties) has a stub entry and every stub entry exists, with the same parameter names in the same order (read from
pybind11's signatures at run time; overloads as a set)."""
import ast
import inspect
import os
import re

import pytest

import gemmalens as gl
from gemmalens import _core

PKG = os.path.dirname(gl.__file__)
STUB = os.path.join(PKG, "_core.pyi")


def _split_top(s):
    """'a: list[int, str] = [1, 2], b' -> ['a: list[int, str] = [1, 2]', 'b'] (commas outside brackets / quotes)."""
    out, depth, cur, quote = [], 0, "", None
    for ch in s:
        if quote:
            cur += ch
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _names(params):
    return tuple(p.split(":")[0].split("=")[0].strip().lstrip("*") for p in params if p)


def runtime_signatures(obj, name):
    """The parameter-name tuples of a runtime callable (pybind11: from its docstring, one per overload; Python: from
    inspect), without self."""
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        ps = [p for p in inspect.signature(obj).parameters if p != "self"]
        return {tuple(ps)}
    doc = getattr(obj, "__doc__", "") or ""
    sigs = re.findall(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\) ->", doc, re.M)
    if len(sigs) > 1 and sigs[0] in ("*args, **kwargs",):  # "Overloaded function." header
        sigs = sigs[1:]
    out = set()
    for s in sigs:
        names = _names(_split_top(s))
        out.add(tuple(n for n in names if n != "self"))
    return out


def stub_signature(fn):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args] + ([a.vararg.arg] if a.vararg else []) + \
        [x.arg for x in a.kwonlyargs] + ([a.kwarg.arg] if a.kwarg else [])
    return tuple(n for n in names if n != "self")


def stub_entries(body):
    """{name: ("def", {signatures}) | ("property", has_setter) | ("attr", None) | ("class", node)}"""
    out = {}
    for node in body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = ("class", node)
        elif isinstance(node, ast.FunctionDef):
            decos = [ast.unparse(d) for d in node.decorator_list]
            if "property" in decos:
                out[node.name] = ("property", False)
            elif any(d.endswith(".setter") for d in decos):
                out[node.name] = ("property", True)
            else:
                kind, sigs = out.get(node.name, ("def", set()))
                sigs.add(stub_signature(node))
                out[node.name] = ("def", sigs)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = ("attr", None)
    return out


def public(name):
    return not name.startswith("_") or name == "__init__"


def test_py_typed_and_the_stub_are_installed():
    assert os.path.isfile(os.path.join(PKG, "py.typed"))
    assert os.path.isfile(STUB)
    ast.parse(open(STUB, encoding="utf-8").read())  # valid Python syntax


def test_the_stub_matches_the_native_module():
    tree = ast.parse(open(STUB, encoding="utf-8").read())
    top = {k: v for k, v in stub_entries(tree.body).items() if public(k)}
    module_names = {n for n in dir(_core) if public(n) and not inspect.ismodule(getattr(_core, n))}
    assert set(top) == module_names, (sorted(module_names - set(top)), sorted(set(top) - module_names))
    checked = 0
    for name, (kind, info) in top.items():
        obj = getattr(_core, name)
        if kind == "def":
            assert runtime_signatures(obj, name) == info, name
            checked += 1
            continue
        assert kind == "class" and inspect.isclass(obj), name
        members = {k: v for k, v in stub_entries(info.body).items() if public(k)}
        if issubclass(obj, Exception):
            assert not members, name
            continue
        # (a class without a constructor, such as Model, which gemmalens.load makes, has pybind11's refusing slot)
        runtime = {k: v for k, v in vars(obj).items() if public(k) and not (k == "__init__" and "Initialize self" in
                                                                              (getattr(v, "__doc__", "") or ""))}
        assert set(members) == set(runtime), (name, sorted(set(runtime) - set(members)), sorted(set(members) - set(runtime)))
        for m, (mkind, minfo) in members.items():
            robj = runtime[m]
            if isinstance(robj, property):
                assert mkind in ("property", "attr"), f"{name}.{m} is a property"
                if mkind == "property":
                    assert minfo == (robj.fset is not None), f"{name}.{m}: setter"
                continue
            assert mkind == "def", f"{name}.{m}"
            fn = robj.__func__ if isinstance(robj, staticmethod) else robj
            assert runtime_signatures(fn, m) == minfo, f"{name}.{m}: {runtime_signatures(fn, m)} != {minfo}"
            checked += 1
    assert checked > 40  # the functions and methods whose parameters were compared


def test_a_drifted_stub_is_caught(tmp_path, monkeypatch):
    """The comparison itself can fail: a stub missing a method, or with a renamed parameter, does not match."""
    text = open(STUB, encoding="utf-8").read()
    assert "def new_cache(self, batch:" in text
    for bad in (text.replace("def new_cache(self, batch:", "def new_cache(self, batches:"),
                text.replace("    def copy(self) -> KVCache:", "    def copy_all(self) -> KVCache:")):
        assert bad != text
        p = tmp_path / "_core.pyi"
        p.write_text(bad, encoding="utf-8")
        monkeypatch.setattr(__import__(__name__), "STUB", str(p))
        with pytest.raises(AssertionError):
            test_the_stub_matches_the_native_module()
