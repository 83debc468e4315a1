"""Kernel-level tests of the native extension ``ra3._C`` that only it has: build info, the exported entry
points, the argument structs against their Python mirror (ra3/ops/kernel_abi.py), the accuracy of the vectorised
exp of the CPU kernels, and the raw-address boundary.

The contract of every ``cpu_*`` (and ``cuda_*``) kernel, shared with the Triton backend, is tested once for all
backends in test_kernel_contracts.py; the op-level tests (autograd, dispatch, CUDA) live in test_ops_*.py.
"""
from __future__ import annotations

import importlib.util
import math
from collections import namedtuple

import pytest
import torch

if importlib.util.find_spec("ra3._C") is None:
    pytest.skip("ra3._C is not built (RA3_NO_NATIVE=1 or a pure-Python install); build it with `pip install -e .`",
                allow_module_level=True)
from kernel_helpers import CODE, DTYPES, LOGPROB, nan_like  # noqa: E402

from ra3 import _C  # noqa: E402  (a built module that fails to import must fail the tests, not skip them)
from ra3.ops import kernel_abi as abi  # noqa: E402


# --- build ----------------------------------------------------------------------------------------------------


def test_build_info_describes_the_build():
    info = _C.build_info()
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert isinstance(info["openmp"], bool)
    assert info["openmp_max_threads"] >= 1
    assert isinstance(info["cuda_archs"], list)
    assert isinstance(info["cpu_isa_variants"], list) and isinstance(info["cpu_arch"], str)
    assert isinstance(_C.cuda_usable(), bool)
    assert _C.has_cuda() == (info["cuda_version"] is not None)
    if _C.has_cuda():
        assert all(a.strip() for a in info["cuda_archs"]) and info["cuda_archs"]
        assert hasattr(_C, "cuda_vocab_softmax_fwd") and hasattr(_C, "cuda_policy_loss_fwd")
    else:
        assert info["cuda_archs"] == [] and not hasattr(_C, "cuda_vocab_softmax_fwd")
        assert _C.cuda_usable() is False


def test_every_contract_function_is_exported():
    for name in ("vocab_softmax_fwd", "vocab_softmax_grad", "segment_sum_fwd", "segment_sum_bwd", "kl_estimator_fwd",
                 "kl_estimator_bwd", "group_adv_fwd", "group_adv_bwd", "policy_loss_fwd"):
        assert callable(getattr(_C, "cpu_" + name)), name


# --- the argument structs and constants: one C++ struct, one Python NamedTuple ---------------------------------


def _python_mirrors() -> dict:
    return {name: cls for name, cls in vars(abi).items()
            if isinstance(cls, type) and issubclass(cls, tuple) and name.endswith("Args")}


def test_every_struct_has_its_python_mirror_field_for_field():
    structs = _C.abi()["structs"]
    mirrors = _python_mirrors()
    native = {name: cls for name, cls in mirrors.items() if cls not in abi.TRITON_ONLY}
    assert sorted(structs) == sorted(native), "C++ structs and Python NamedTuples differ in name"
    for name, fields in structs.items():
        assert list(mirrors[name]._fields) == fields, name


def test_every_kernel_entry_point_is_named_by_its_struct():
    prefixes = ("cpu_", "cuda_") if _C.has_cuda() else ("cpu_",)
    exported = {n.split("_", 1)[1] for n in dir(_C) if n.startswith(prefixes) and n != "cuda_usable"}
    kernels = {abi.kernel_name(cls) for name, cls in _python_mirrors().items()
               if name != "LinearSourceArgs" and cls not in abi.TRITON_ONLY}
    expected = kernels if _C.has_cuda() else {k for k in kernels if "_loop" not in k}
    assert exported == expected


def test_constants_match_the_c_enums():
    constants = _C.abi()["constants"]
    assert constants == {name: getattr(abi, name) for name in constants}
    assert abi.DTYPE_CODE == {torch.float32: constants["FLOAT32"], torch.float64: constants["FLOAT64"],
                              torch.bfloat16: constants["BFLOAT16"], torch.float16: constants["FLOAT16"]}


def test_a_field_missing_misplaced_or_of_the_wrong_type_is_a_type_error_naming_it():
    x, ids, out = torch.arange(3.0), torch.tensor([0, 1, 1]), torch.empty(2)
    good = abi.SegmentSumFwdArgs(dtype=abi.FLOAT32, values=x, ids=ids, n=3, num_segments=2, out=out)
    _C.cpu_segment_sum_fwd(good)
    assert out.tolist() == [0.0, 3.0]
    _C.cpu_segment_sum_fwd(good._replace(values=x.data_ptr(), ids=ids.data_ptr(), out=out.data_ptr()))  # addresses
    assert out.tolist() == [0.0, 3.0]
    other = abi.SegmentSumBwdArgs(dtype=abi.FLOAT32, grad_out=out, ids=ids, n=3, grad_values=x)
    with pytest.raises(TypeError, match="SegmentSumFwdArgs has no field 'values' at position 1 .*'grad_out'"):
        _C.cpu_segment_sum_fwd(other)
    swapped = namedtuple("SegmentSumFwdArgs", "dtype ids values n num_segments out")(*good)
    with pytest.raises(TypeError, match="SegmentSumFwdArgs has no field 'values' at position 1 .*'ids'"):
        _C.cpu_segment_sum_fwd(swapped)  # same names, another order: refused, never read by position
    longer = namedtuple("SegmentSumFwdArgs", "dtype values ids n num_segments out extra")(*good, 0)
    with pytest.raises(TypeError, match="SegmentSumFwdArgs has 6 fields, its tuple 7"):
        _C.cpu_segment_sum_fwd(longer)
    with pytest.raises(TypeError, match="expected the NamedTuple ra3.ops.kernel_abi.SegmentSumFwdArgs, got tuple"):
        _C.cpu_segment_sum_fwd(tuple(good))
    with pytest.raises(TypeError, match=r"SegmentSumFwdArgs\.n: cannot take 'three'"):
        _C.cpu_segment_sum_fwd(good._replace(n="three"))
    with pytest.raises(TypeError, match=r"SegmentSumFwdArgs\.values: cannot take 2.5"):
        _C.cpu_segment_sum_fwd(good._replace(values=2.5))  # a pointer is a tensor, None or an address


# --- the vectorised exp of the CPU kernels -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorised_exp_is_accurate_over_its_range(dtype):
    # vocab_softmax_grad mode 0 with m = logs = 0, g = -1, inv_temp = 1 and no target in the chunk writes exp(z) itself.
    lo, hi = (-745.0, 709.0) if dtype == torch.float64 else (-104.0, 88.0)
    z = torch.cat([torch.linspace(lo, hi, 20001, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, math.log(2), -math.inf, math.inf, math.nan, 1e4, -1e4],
                                dtype=torch.float64)]).to(dtype)[None]
    n = z.shape[1]
    out = nan_like((1, n), dtype)
    one = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
    zero, g, t = one(0.0), one(-1.0), torch.tensor([-1], dtype=torch.int64)
    _C.cpu_vocab_softmax_grad(abi.VocabSoftmaxGradArgs(
        mode=LOGPROB, dtype=CODE[dtype], z=z, ldz=n, r=None, ldr=0, out=out, ldo=n, n=1, vc=n, v_offset=0,
        inv_temp=1.0, targets=t, m=zero, logs=zero, q=None, g=g))
    expected = z.double().exp()
    tiny = torch.finfo(dtype).tiny
    normal = (expected >= tiny * 2) & expected.isfinite()
    eps = torch.finfo(dtype).eps
    rel = ((out.double() - expected).abs() / expected)[normal[0][None]]
    assert rel.max() <= 4 * eps, f"max relative error {rel.max():.3g}"
    # Below the smallest normal the result flushes to (or stays near) zero; above the overflow bound it is inf.
    assert (out[~normal & (expected < tiny * 2)] <= tiny * 2).all()
    assert out[0, -5] == 0 and out[0, -4] == math.inf and math.isnan(out[0, -3]) and out[0, -2] == math.inf
    assert out[0, -1] == 0


# --- the raw-address boundary ---------------------------------------------------------------------------------


def test_negative_address_is_not_a_pointer():
    x = torch.zeros(4)
    with pytest.raises(TypeError):
        _C.cpu_segment_sum_fwd(abi.SegmentSumFwdArgs(dtype=abi.FLOAT32, values=-1, ids=0, n=0, num_segments=1,
                                                     out=x.data_ptr()))  # a negative address is not a pointer
