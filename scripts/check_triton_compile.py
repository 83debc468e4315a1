"""Compiles every Triton kernel of ``ra3.kernels`` for a CUDA target, without a GPU, to catch what the
interpreter does not check (types of loop-carried values, constexpr branches, dot shapes, float64 support).

Each launcher runs once per case below on CPU tensors with kernel launches intercepted: every launch's
arguments give a signature (pointer dtypes, integer widths, constexpr values), and each distinct
(kernel, signature) is compiled by Triton down to a cubin for the target (ptxas ships with triton).

    python scripts/check_triton_compile.py              # all cases, sm_90
    python scripts/check_triton_compile.py --arch 80 --quick

Exit status 1 if any kernel fails to compile, or if a float32 vocab_softmax tile kernel's PTX
holds an fma. TRITON_INTERPRET must be unset (the interpreter replaces the
kernels by Python functions); this script clears it for itself.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Shared memory per block, opt-in maximum (CUDA programming guide, compute capabilities 8.0 and 9.0).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


def _signature(fn: JITFunction, args, kwargs):
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    sig, constexprs = {}, {}
    for kp, (name, value) in zip(fn.params, bound.arguments.items()):
        if kp.is_constexpr or value is None or (isinstance(value, int) and not isinstance(value, bool)
                                                 and value == 1):
            # Triton specialises None and the integer 1 to constants, like constexpr parameters.
            sig[name] = "constexpr"
            constexprs[name] = value
        elif kp.annotation_type:
            sig[name] = kp.annotation_type
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.fn.__name__}: cannot type argument {name}={value!r}")
    return sig, constexprs


def _cases(quick: bool):
    """(description, thunk) pairs; each thunk calls launchers with small CPU tensors."""
    from ra3.kernels import group_advantages, kl_estimator, policy_loss, segment_sum, vocab_softmax, vocab_softmax_fused
    from ra3.ops import kernel_abi as abi

    cases = []
    dtypes = (torch.float32,) if quick else (torch.float32, torch.float64)
    n, vc, V, H = 5, 40, 70, 24
    modes = (abi.LOGPROB, abi.ENTROPY, abi.EXACT_KL)
    for dt in dtypes:
        code = abi.dtype_code(dt)
        z, r = torch.randn(n, vc, dtype=dt), torch.randn(n, vc, dtype=dt)
        tg = torch.tensor([0, 3, -1, 39, 2])
        st = [torch.zeros(n, dtype=dt) for _ in range(6)]
        for mode in modes:
            cases.append((f"vocab_softmax_fwd mode {mode} {dt}", lambda mode=mode, z=z, r=r, st=st, code=code:
                          vocab_softmax.vocab_softmax_fwd(abi.VocabSoftmaxFwdArgs(
                              mode=mode, dtype=code, z=z, ldz=vc, r=r, ldr=vc, n=n, vc=vc, v_offset=0, inv_temp=0.7,
                              targets=tg, m=st[0], s=st[1], a=st[2], mr=st[3], sr=st[4], tgt=st[5]))))
            cases.append((f"vocab_softmax_grad mode {mode} {dt}", lambda mode=mode, z=z, r=r, st=st, code=code:
                          vocab_softmax.vocab_softmax_grad(abi.VocabSoftmaxGradArgs(
                              mode=mode, dtype=code, z=z, ldz=vc, r=r, ldr=vc, out=z.clone(), ldo=vc, n=n, vc=vc,
                              v_offset=0, inv_temp=0.7, targets=tg, m=st[0], logs=st[1], q=st[2], g=st[3]))))
        for src in ((torch.float32, torch.bfloat16) if dt == torch.float32 else (torch.float64,)):
            if quick and src != torch.bfloat16 and dt == torch.float32:
                continue
            h, w, b = torch.randn(n, H).to(src), torch.randn(V, H).to(src), torch.randn(V).to(src)
            lse, aux, g = torch.zeros(n, dtype=dt), torch.zeros(n, dtype=dt), torch.ones(n, dtype=dt)
            for mode in modes:
                ref = (h, w, b) if mode == abi.EXACT_KL else (None, None, None)
                cases.append((f"vocab_softmax_fused_fwd mode {mode} {src}->{dt} (2 splits)",
                              lambda mode=mode, h=h, w=w, b=b, ref=ref, code=code, dt=dt:
                              vocab_softmax_fused.vocab_softmax_fused_fwd(abi.VocabSoftmaxFusedFwdArgs(
                                  mode=mode, dtype=code, hidden=h, weight=w, bias=b, ref_hidden=ref[0],
                                  ref_weight=ref[1], ref_bias=ref[2], targets=tg, inv_temp=0.7,
                                  **{k: torch.zeros(n, dtype=dt) for k in ("m", "s", "a", "mr", "sr", "tgt")}),
                                  splits=2)))
                cases.append((f"vocab_softmax_fused_grad mode {mode} {src}->{dt}",
                              lambda mode=mode, h=h, w=w, b=b, ref=ref, code=code, dt=dt, lse=lse, aux=aux, g=g:
                              vocab_softmax_fused.vocab_softmax_fused_grad(abi.VocabSoftmaxFusedGradArgs(
                                  mode=mode, dtype=code, hidden=h, weight=w, bias=b, ref_hidden=ref[0],
                                  ref_weight=ref[1], ref_bias=ref[2], targets=tg, inv_temp=0.7, m=lse, logs=lse,
                                  q=aux, g=g, grad_hidden=torch.zeros(n, H, dtype=dt),
                                  grad_weight=torch.zeros(V, H, dtype=dt), grad_bias=torch.zeros(V, dtype=dt)))))
        x, ids = torch.randn(50, dtype=dt), torch.randint(-1, 4, (50,))
        cases.append((f"segment_sum {dt}", lambda x=x, ids=ids, code=code: (
            segment_sum.segment_sum_fwd(abi.SegmentSumFwdArgs(dtype=code, values=x, ids=ids, n=50, num_segments=4,
                                                              out=torch.empty(4, dtype=x.dtype))),
            segment_sum.segment_sum_bwd(abi.SegmentSumBwdArgs(dtype=code, grad_out=torch.ones(4, dtype=x.dtype),
                                                              ids=ids, n=50, grad_values=torch.empty_like(x))))))
        for est in (1, 2, 3):
            cases.append((f"kl_estimator k{est} {dt}", lambda est=est, x=x, code=code: (
                kl_estimator.kl_estimator_fwd(abi.KlEstimatorFwdArgs(dtype=code, estimator=est, lp=x, ref=x, n=50,
                                                                     out=torch.empty_like(x))),
                kl_estimator.kl_estimator_bwd(abi.KlEstimatorBwdArgs(dtype=code, estimator=est, lp=x, ref=x, g=x,
                                                                     n=50, grad_lp=torch.empty_like(x))))))
        gid = torch.randint(0, 4, (50,))
        for norm in (0, 1, 2, 3, 4):
            def adv(norm=norm, x=x, code=code, dt=dt):
                out, mean, std = torch.empty_like(x), torch.empty(4, dtype=dt), torch.empty(4, dtype=dt)
                group_advantages.group_adv_fwd(abi.GroupAdvFwdArgs(
                    dtype=code, rewards=x, gids=gid, n=50, num_groups=4, normalize=norm, eps=1e-6, out=out, mean=mean,
                    std_dev=std))
                group_advantages.group_adv_bwd(abi.GroupAdvBwdArgs(
                    dtype=code, rewards=x, gids=gid, n=50, num_groups=4, normalize=norm, eps=1e-6, mean=mean,
                    std_dev=std, g=x, grad_r=torch.empty_like(x)))
            cases.append((f"group_advantages normalize {norm} {dt}", adv))
        B, T = 3, 9
        lp = torch.randn(B, T, dtype=dt)
        for agg in (0, 1, 2, 3):
            # (ratio level, surrogate): token PPO, and sequence (GSPO) with PPO and CISPO
            for (level, surrogate), per_token, ref in (((0, 0), False, None), ((0, 0), True, lp),
                                                       ((1, 0), False, lp), ((1, 1), True, None)):
                cases.append((f"policy_loss agg {agg} level {level} surrogate {surrogate} per_token {per_token} "
                              f"kl {ref is not None} {dt}",
                              lambda agg=agg, level=level, surrogate=surrogate, per_token=per_token, ref=ref, lp=lp,
                              code=code, dt=dt:
                              policy_loss.policy_loss_fwd(abi.PolicyLossFwdArgs(
                                  dtype=code, B=B, T=T, lp=lp, old=lp, adv=lp if per_token else lp[:, 0].clone(),
                                  adv_per_token=int(per_token), mask=torch.ones(B, T, dtype=dt), ref=ref, kl_coef=0.1,
                                  kl_estimator=3, clip_low=0.2, clip_high=0.28, ratio_level=level,
                                  surrogate=surrogate, aggregation=agg, agg_norm=5.0, loss_out=torch.empty(1, dtype=dt),
                                  grad_lp=torch.empty(B, T, dtype=dt), stats_out=torch.empty(4, dtype=dt)))))
            cases.append((f"policy_loss B=1 T=1 agg {agg} {dt}", lambda agg=agg, code=code, dt=dt:
                          policy_loss.policy_loss_fwd(abi.PolicyLossFwdArgs(
                              dtype=code, B=1, T=1, lp=torch.zeros(1, 1, dtype=dt), old=torch.zeros(1, 1, dtype=dt),
                              adv=torch.zeros(1, dtype=dt), adv_per_token=0, mask=torch.ones(1, 1, dtype=dt), ref=None,
                              kl_coef=0.0, kl_estimator=1, clip_low=0.2, clip_high=0.2, ratio_level=0, surrogate=0,
                              aggregation=agg, agg_norm=1.0, loss_out=torch.empty(1, dtype=dt),
                              grad_lp=torch.empty(1, 1, dtype=dt), stats_out=torch.empty(4, dtype=dt)))))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 or 90")
    parser.add_argument("--quick", action="store_true", help="float32 only, one operand dtype per fused kernel")
    args = parser.parse_args(argv)
    launches = []
    original = JITFunction.run

    def capture(self, *a, grid, warmup, **kw):
        launches.append((self, a, kw))

    JITFunction.run = capture
    try:
        for what, thunk in _cases(args.quick):
            thunk()
    finally:
        JITFunction.run = original
    target = GPUTarget("cuda", args.arch, 32)
    seen, failures, cubin_bytes, max_shared = set(), [], 0, 0
    start = time.monotonic()
    for fn, a, kw in launches:
        # Keywords that are not the kernel's parameters are compile options (enable_fp_fusion, num_warps, ...).
        params = set(inspect.signature(fn.fn).parameters)
        options = {k: kw.pop(k) for k in list(kw) if k not in params}
        sig, constexprs = _signature(fn, a, kw)
        key = (fn.fn.__qualname__, tuple(sig.items()), tuple((k, repr(v)) for k, v in constexprs.items()),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                                      options=options)
            cubin_bytes += len(compiled.asm["cubin"])
            shared = compiled.metadata.shared
            max_shared = max(max_shared, shared)
            # float32 only: float64 exp is libdevice's, whose own explicit fmas are meant to be there
            if fn.fn.__module__.endswith(".vocab_softmax") and "fma.rn.f32" in compiled.asm["ptx"]:
                failures.append(f"{fn.fn.__name__} {constexprs}: an fma in the PTX (kernels/vocab_softmax.py launches "
                                f"its tile kernels with enable_fp_fusion=False so z * inv_temp is rounded alone)")
            if shared > SHARED_LIMIT.get(args.arch, SHARED_LIMIT[80]):
                failures.append(f"{fn.fn.__name__} {constexprs}: {shared} bytes of shared memory, over the "
                                f"sm_{args.arch} limit")
        except Exception as exc:  # report every failure, not only the first
            failures.append(f"{fn.fn.__name__} {constexprs}: {type(exc).__name__}: {exc}")
    print(f"compiled {len(seen)} kernel variants for sm_{args.arch} ({cubin_bytes >> 10} KiB of cubin, at most "
          f"{max_shared >> 10} KiB of shared memory) in {time.monotonic() - start:.0f} s; {len(failures)} failed")
    for f in failures:
        print("FAILED", f[:4000], file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
