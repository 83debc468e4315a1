// What the CUDA build reports to Python: the runtime version it links (statically) and whether the installed
// driver can run it. Neither call creates a CUDA context. Plain C++ (host compiler): nvcc would add ~10 s per file.
#include <cuda_runtime.h>

#include "../ra3_native.h"

namespace ra3::cuda {

int runtime_version() { return CUDART_VERSION; }

bool driver_supports_runtime() {
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  // CUDA minor-version compatibility: a driver of the same major version (or newer) runs this runtime.
  return driver / 1000 >= CUDART_VERSION / 1000;
}

}  // namespace ra3::cuda
