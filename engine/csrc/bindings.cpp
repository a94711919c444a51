// The Python module of splitserve's CPU kernels (engine/cpu_kernels.py builds it).
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale);
torch::Tensor silu_and_mul(torch::Tensor x);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (csrc/paged_decode.cpp)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of x = [T, 2I] (csrc/elementwise.cpp)");
}
