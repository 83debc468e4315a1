// Sums of per-token values into segments (e.g. per-step or per-sequence log-probs) and the scatter back.
//
// The forward is one serial pass in token order, so its result is bitwise reproducible run to run whatever the
// thread count; it reads each value once and is memory-bound, so threads would buy little anyway.
#include <algorithm>

#include "../ra3_native.h"

namespace ra3::cpu {

void segment_sum_fwd(RA3_KERNEL_ARGS_SEGMENT_SUM_FWD) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* v = cptr<T>(values);
    const int64_t* id = cptr<int64_t>(ids);
    T* o = mptr<T>(out);
    std::fill(o, o + std::max<int64_t>(num_segments, 0), T(0));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = id[i];
      if (k >= 0 && k < num_segments) o[k] += v[i];  // negative ids mean "no segment"
    }
  });
}

void segment_sum_bwd(RA3_KERNEL_ARGS_SEGMENT_SUM_BWD) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* go = cptr<T>(grad_out);
    const int64_t* id = cptr<int64_t>(ids);
    T* gv = mptr<T>(grad_values);
#pragma omp parallel for schedule(static) if (n >= (int64_t(1) << 16))
    for (int64_t i = 0; i < n; ++i) gv[i] = id[i] >= 0 ? go[id[i]] : T(0);
  });
}

}  // namespace ra3::cpu
