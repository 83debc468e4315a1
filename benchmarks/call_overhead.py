"""Per-call time of the small ops on tiny CPU inputs, where the Python side of a kernel call shows.

    python benchmarks/call_overhead.py LABEL    (one thread; 5 rounds of 2000 calls per op, after 200 warm-up calls)

Prints min and median microseconds per call. Run two checkouts alternately to compare them (benchmarks/NOTES.md).
"""
import sys
import time

import torch

from ra3 import ops

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
n = 256
v, ids = torch.randn(n, generator=g), torch.randint(0, 8, (n,), generator=g)
lp, ref = torch.randn(n, generator=g), torch.randn(n, generator=g)
r, gid = torch.randn(64, generator=g), torch.arange(64) // 8
B, T = 8, 32
plp, adv, mask = torch.randn(B, T, generator=g), torch.randn(B, generator=g), torch.ones(B, T)
old = plp + 0.1
cases = {
  "segment_sum": lambda: ops.segment_sum(v, ids, 8, backend="cpu"),
  "kl": lambda: ops.kl(lp, ref, estimator="k3", backend="cpu"),
  "group_advantages": lambda: ops.group_advantages(r, group_ids=gid, backend="cpu"),
  "policy_loss": lambda: ops.policy_loss(plp, old, adv, mask, backend="cpu"),
}
res = {}
for _round in range(5):
    for name, f in cases.items():
        for _ in range(200): f()
        t = time.perf_counter()
        for _ in range(2000): f()
        res.setdefault(name, []).append((time.perf_counter() - t) / 2000 * 1e6)
for name, ts in res.items():
    print(f"{sys.argv[1] if len(sys.argv) > 1 else ''} {name}: min {min(ts):.1f} us  median {sorted(ts)[2]:.1f} us")
