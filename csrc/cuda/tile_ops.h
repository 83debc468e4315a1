// Dtype conversion of logits / gradient tiles between the fused linear ops' GEMMs (tile_ops.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ra3::cuda {

// hi[i] = bfloat16(src[i]) rounded to nearest even and, unless lo is 0, lo[i] = bfloat16(src[i] - hi[i]), for
// `count` contiguous elements; asynchronous on `stream`.
void round_to_bf16(uintptr_t src, uintptr_t hi, uintptr_t lo, int64_t count, cudaStream_t stream);

// logs[i] = log(s[i]) of a finished online-softmax state (dtype: the DType code kFloat32 or kFloat64 of ra3_native.h).
void log_of(int dtype, uintptr_t s, uintptr_t logs, int64_t n, cudaStream_t stream);

}  // namespace ra3::cuda
