// Sums of per-token values into segments (e.g. per-step or per-sequence log-probs) and the scatter back.
//
// The forward is one serial pass in token order, so its result is bitwise reproducible run to run whatever the
// thread count; it reads each value once and is memory-bound, so threads would buy little anyway.
#include <algorithm>

#include "../ra3_native.h"

namespace ra3::cpu {

void segment_sum_fwd(const SegmentSumFwdArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* v = cptr<T>(a.values);
    const int64_t* id = cptr<int64_t>(a.ids);
    T* o = mptr<T>(a.out);
    std::fill(o, o + std::max<int64_t>(a.num_segments, 0), T(0));
    for (int64_t i = 0; i < a.n; ++i) {
      const int64_t k = id[i];
      if (k >= 0 && k < a.num_segments) o[k] += v[i];  // negative ids mean "no segment"
    }
  });
}

void segment_sum_bwd(const SegmentSumBwdArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* go = cptr<T>(a.grad_out);
    const int64_t* id = cptr<int64_t>(a.ids);
    T* gv = mptr<T>(a.grad_values);
#pragma omp parallel for schedule(static) if (a.n >= (int64_t(1) << 16))
    for (int64_t i = 0; i < a.n; ++i) gv[i] = id[i] >= 0 ? go[id[i]] : T(0);
  });
}

}  // namespace ra3::cpu
