"""Regenerate python/gemmalens/_core.pyi, the type stubs of the native module, from the installed build.

    pip install pybind11-stubgen==3.0.0 && python tools/gen_core_stub.py

pybind11-stubgen writes the stubs from the module's pybind11 signatures and docstrings; this script then makes the
few edits it cannot (one file instead of a package, typed Python-added Gemma3Config helpers, Optional defaults).
tests/test_stubs.py checks the result against the module.
"""
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "python", "gemmalens", "_core.pyi")

HEADER = '''"""Type stubs for gemmalens._core, the pybind11 native module (private: use the gemmalens package).

Generated with pybind11-stubgen 3.0.0 and tools/gen_core_stub.py (run it after changing csrc/bindings/);
tests/test_stubs.py checks that every public name of the module has an entry here and the reverse, and the
parameters of each function.
"""
'''

EDITS = [
    ('"""\ngemmalens native core (private; use the gemmalens package).\n"""\n', HEADER),
    ("import numpy.typing\nimport typing\nfrom . import _testing\n",
     "import numpy.typing\nimport os\nimport types\nimport typing\n"
     "_testing: types.ModuleType  # kernels for the tests and bench/run.py (not API)\n"),
    ("    attn_logit_softcapping: typing.Any\n    final_logit_softcapping: typing.Any\n    rope_scaling: typing.Any\n",
     "    attn_logit_softcapping: float | None\n    final_logit_softcapping: float | None\n"
     "    rope_scaling: dict[str, typing.Any] | None\n"),
    ("    def from_dict(d):\n        ...\n",
     '    def from_dict(d: dict[str, typing.Any]) -> Gemma3Config:\n        """\n        A config from a dict of HF '
     'config.json fields (added by gemmalens.config).\n        """\n'),
    ("    def from_pretrained(path):\n", "    def from_pretrained(path: str | os.PathLike[str]) -> Gemma3Config:\n"),
    ("    def __eq__(self, other):\n", "    def __eq__(self, other: object) -> bool:\n"),
    ("    def __repr__(self):\n", "    def __repr__(self) -> str:\n"),
    ("    def save_pretrained(self, directory):\n        ...\n",
     '    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:\n        """\n        Write config.json '
     'into directory (added by gemmalens.config).\n        """\n'),
    ("    def to_dict(self):\n        ...\n",
     '    def to_dict(self) -> dict[str, typing.Any]:\n        """\n        The HF config.json fields (added by '
     'gemmalens.config).\n        """\n'),
]


def main():
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pybind11_stubgen", "gemmalens._core", "-o", d], check=True)
        text = open(os.path.join(d, "gemmalens", "_core", "__init__.pyi"), encoding="utf-8").read()
    for old, new in EDITS:
        if old not in text:
            sys.exit(f"gen_core_stub: the generated stub no longer contains {old!r}: update EDITS")
        text = text.replace(old, new)
    # a None default means "or None"
    text = re.sub(r": (LoadProgress|KVCache|GradTape|HookSet) = None", r": \1 | None = None", text)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
