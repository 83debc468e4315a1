// Dtype conversion of logits / gradient tiles between the fused linear ops' GEMMs (tile_ops.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ra3::cuda {

// hi[i] = bfloat16(src[i]) rounded to nearest even and, unless lo is 0, lo[i] = bfloat16(src[i] - hi[i]), for
// `count` contiguous elements; asynchronous on `stream`.
void round_to_bf16(uintptr_t src, uintptr_t hi, uintptr_t lo, int64_t count, cudaStream_t stream);

// lse[i] = m[i] + log(s[i]): the log-sum-exp of a finished online-softmax state (dtype 0 float32, 1 float64).
void lse_from_state(int dtype, uintptr_t m, uintptr_t s, uintptr_t lse, int64_t n, cudaStream_t stream);

}  // namespace ra3::cuda
