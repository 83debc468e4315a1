"""`import ra3` is lean, and a missing extension degrades to the PyTorch path with one clear warning."""
import os
import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    # A plain user environment: without the TRITON_INTERPRET=1 that conftest.py sets for the CPU suite, which
    # would make the triton backend available on CPU tensors.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env=env)


def test_import_is_lean():
    res = _run("""
        import sys, ra3
        heavy = [m for m in ("torch", "transformers", "triton", "ra3._C") if m in sys.modules]
        assert not heavy, heavy
        from ra3 import ops  # loads torch, but initialises no CUDA and compiles nothing
        import torch
        assert not torch.cuda.is_initialized()
        assert "triton" not in sys.modules
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def test_missing_extension_falls_back_with_one_warning():
    res = _run("""
        import sys, warnings
        sys.modules["ra3._C"] = None  # makes `from ra3 import _C` raise ImportError
        import torch
        from ra3 import ops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ops.available_backends("cpu") == ["torch"], ops.available_backends("cpu")
            out = ops.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]))
            ops.segment_sum(out, torch.tensor([0, 0, 1]), 2)
        msgs = [str(w.message) for w in caught if "ra3._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "pip install -e ." in msgs[0]
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout
