"""Mutation fuzzing of every file format gemmalens loads (GGUF, safetensors, config.json, gemma_pytorch .ckpt,
Orbax metadata, SAE folders, GGUF tokenizer metadata).

    python -m tests.fuzz --minutes 10                 # all formats, 10 minutes in all (run from the repo root)
    python -m tests.fuzz --seconds 60 --formats gguf,ckpt
    python -m tests.fuzz --replay                     # every seed and saved crasher, once each

Each case runs in a forked child (memory cap, timeout, batches of cases per child). Findings (unexpected
exception types, signals, hangs, allocations beyond twice the seed's tensor bytes) are confirmed alone,
minimised and saved under tests/fuzz/crashers/<format>/ as regression cases for tests/test_fuzz.py.
See engine.py for the outcome classes and harnesses.py for what each format's target does.
"""
