"""The command line's first minutes: --version, the fast mode by default, and --verbose saying which mode runs."""
import subprocess
import sys

import pytest

import gemmalens as gl
from gemmalens.__main__ import _parser, main


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "gemmalens", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_version():
    for argv in (["-m", "gemmalens", "--version"], ["-c", "from gemmalens.__main__ import main; main(['--version'])"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"gemmalens {gl.__version__} (oneDNN {gl._core.dnnl_version()})"
    assert gl.__version__ == "0.1.0"


def test_generate_defaults_to_the_fast_mode(capsys):
    args = _parser().parse_args(["generate", "hi"])
    assert (args.dtype, args.weights, args.threads) == ("bfloat16", "auto", None)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "gl.load in Python keeps float32 native weights" in help_text


def test_cli_verbose_names_the_mode(real_gguf_path):
    out = _cli("generate", "--max-new-tokens", "3", "--verbose", "The capital of France is")
    assert out.returncode == 0, out.stderr
    # the default mode: bf16 compute, the Q4_K_M file's weights kept as int8 blocks (--weights auto)
    assert "dtype bfloat16, weights int8 (--weights auto)" in out.stderr
    ref = _cli("generate", "--max-new-tokens", "3", "--verbose", "--dtype", "float32", "--weights", "native", "hi")
    assert ref.returncode == 0, ref.stderr
    assert "dtype float32, weights native," in ref.stderr
