"""Locate the PyPI-provided native dependencies (oneDNN, nlohmann_json).

Used by CMakeLists.txt at build time and by ``gemmalens/__init__.py`` at import time, so the
compiled module finds ``libdnnl.so.3`` without LD_LIBRARY_PATH.
"""
import importlib.metadata as md
import os
import sys

DNNL_RUNTIME = "onednn-cpu-gomp"
DNNL_DEVEL = "onednn-devel-cpu-gomp"


def _find(dist_name, suffix):
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or []:
        name = "/" + str(f).replace("\\", "/")
        if name.endswith("/" + suffix):
            return os.path.normpath(str(dist.locate_file(f)))
    return None


def dnnl_library():
    return _find(DNNL_RUNTIME, "libdnnl.so.3")


def dnnl_include():
    hpp = _find(DNNL_DEVEL, "include/oneapi/dnnl/dnnl.hpp")
    if hpp is None:
        return None
    return os.path.dirname(os.path.dirname(os.path.dirname(hpp)))


def nlohmann_include():
    import nlohmann_json

    return str(nlohmann_json.get_include())


if __name__ == "__main__":
    what = sys.argv[1]
    value = {"include-dnnl": dnnl_include, "lib-dnnl": dnnl_library, "include-nlohmann": nlohmann_include}[what]()
    if not value:
        sys.exit(f"gemmalens build: could not locate {what}; is {DNNL_RUNTIME}/{DNNL_DEVEL} installed?")
    print(value)
