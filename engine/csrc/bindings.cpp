// The Python module of splitserve's CPU kernels (engine/cpu_kernels.py builds it).
#include "kernels.h"
#include "team.h"

// Each kernel lets go of the GIL while it runs: a worker's asyncio and Ray threads (token
// delivery, KV transfer) keep going during a step's attention, as they do during torch's ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode", &paged_decode, release(), "paged decode attention (paged_decode.cpp)");
  m.def("add_rms_norm", &add_rms_norm, release(),
        "residual += x (in place); the RMS norm of it, bf16 (elementwise.cpp)");
  m.def("rope_write_kv", &rope_write_kv, release(),
        "rope q and k of qkv in place; k and v to their cache slots, bf16 (rope_kv.cpp)");
  m.def("amx_available", &amx_available, "the CPU has AMX and the OS lets this process use it");
  m.def("amx_linear", &amx_linear, release(), "x @ weight.T, weight packed in AMX tiles (amx_linear.cpp)");
  m.def("prefill_attention", &prefill_attention, release(),
        "causal attention of prefill chunks over the paged cache into out's rows, bf16 on AMX (prefill_attention.cpp)");
  m.def("decode_layers", &decode_layers, release(),
        "a decode step's decoder layers in one call, bf16 on AMX (decode_layers.cpp)");
  m.def("team_takeovers", &team_takeovers,
        "items of the fused decode taken over from a preempted thread (team.h)");
  m.def("team_debug_stall", &team_debug_stall, "tests: make a team thread hold items (team.h)");
  // the copies keep the GIL: releasing it measured slower for KV pages (kv_transfer.page_copy)
  m.def("copy_crc32c", &copy_crc32c, "dst[:] = src, returning the CRC-32C of the bytes (copy_crc.cpp)");
  m.def("copy_blocks_crc32c", &copy_blocks_crc32c,
        "blocks[ids] <-> flat (into_blocks: flat -> blocks), returning the flat bytes' CRC-32C (copy_crc.cpp)");
  m.def("silu_and_mul", &silu_and_mul, release(), "silu(gate) * up of x = [T, 2I] (elementwise.cpp)");
}
