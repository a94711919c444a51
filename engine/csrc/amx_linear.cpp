// bf16 linear layers on Intel AMX for the row counts of decode (engine/linear.py).
//
// oneDNN's packed bf16 GEMM streams a decode step's weights at 10-18 GB/s here (1-32 rows);
// this kernel streams them at 20-27 GB/s, close to the DRAM's read bandwidth, because it does
// nothing but stream: the weight is packed once into AMX B tiles in the order they are read,
// and each thread walks its own contiguous run of them.
//
//   weight [N, K] ──amx_pack (engine/linear.py)──> [N/32, K/32, 2, 16, 16, 2]:
//     block j of 32 output columns, k-block of 32 inputs, two B tiles of 16 columns,
//     tile row r holding the input pairs (2r, 2r+1) of its 16 columns (AMX's VNNI layout).
//   y = x @ weight.T: for each block j (split over threads), for each 32 rows of x, the four
//     16x16 fp32 accumulators (2 row tiles x 2 column tiles) sum over the k-blocks; then one
//     round to bf16 (as oneDNN rounds its fp32 accumulators).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "amx_tiles.h"
#include "items.h"
#include <sys/syscall.h>
#include <unistd.h>

namespace {
constexpr long kReqXcompPerm = 0x1023;  // arch_prctl: ask Linux for the AMX tile state
constexpr long kXfeatureTileData = 18;
constexpr int64_t kRowBlock = 256;  // rows of x per pass over the weight: they stay in L2

// Tiles: 0,1 accumulate rows 0-15 x column tiles 0,1; 2,3 rows 16-31; 4,5 those rows of x;
// 6,7 the two weight tiles.
void configure(int rows0, int rows1) {
  TileConfig cfg;
  for (int t : {0, 1, 4}) cfg.rows[t] = rows0, cfg.colsb[t] = 64;
  if (rows1 > 0)
    for (int t : {2, 3, 5}) cfg.rows[t] = rows1, cfg.colsb[t] = 64;
  for (int t : {6, 7}) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  load_tile_config(cfg);
}

// out[r, 0:32] = bf16(acc[r, 0:32]) for the first `rows` rows.
void store_rows(const float (*acc)[32], int rows, c10::BFloat16* out, int64_t ld) {
  for (int r = 0; r < rows; ++r) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_load_ps(acc[r] + 16), _mm512_load_ps(acc[r]));
    _mm512_storeu_si512(out + r * ld, (__m512i)v);
  }
}

// 32 output columns (weight block `w`) of up to 32 rows of x.
void tile_block(const c10::BFloat16* x, int64_t K, const char* w, int rows0, int rows1,
                c10::BFloat16* out, int64_t ld) {
  alignas(64) float acc[32][32];
  _tile_zero(0);
  _tile_zero(1);
  if (rows1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < K / 32; ++kb) {
    const char* wk = w + kb * 2048;
    _tile_loadd(4, x + kb * 32, K * 2);
    _tile_loadd(6, wk, 64);
    _tile_loadd(7, wk + 1024, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (rows1) {
      _tile_loadd(5, x + 16 * K + kb * 32, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, acc[0], 128);
  _tile_stored(1, acc[0] + 16, 128);
  if (rows1) {
    _tile_stored(2, acc[16], 128);
    _tile_stored(3, acc[16] + 16, 128);
  }
  store_rows(acc, rows0 + rows1, out, ld);
}

}  // namespace

void amx_column_block(const c10::BFloat16* x, int64_t M, int64_t K, const char* w, int64_t j,
                      c10::BFloat16* out, int64_t ld, int (&have)[2]) {
  for (int64_t m = 0; m < M; m += 32) {
    const int rows0 = static_cast<int>(std::min<int64_t>(16, M - m));
    const int rows1 = static_cast<int>(std::clamp<int64_t>(M - m - 16, 0, 16));
    if (rows0 != have[0] || rows1 != have[1]) {
      configure(rows0, rows1);
      have[0] = rows0;
      have[1] = rows1;
    }
    tile_block(x + m * K, K, w + j * (K / 32) * 2048, rows0, rows1, out + m * ld, ld);
  }
}

void amx_release_tiles(int (&have)[2]) {
  if (have[0] >= 0) _tile_release();
  have[0] = have[1] = -1;
}

namespace {
// Rows [m_begin, m_end) of x times weight blocks [j0, j1): one thread's share of amx_linear.
void run_blocks(const c10::BFloat16* x, int64_t K, const char* w, int64_t N, int64_t m_begin,
                int64_t m_end, int64_t j0, int64_t j1, c10::BFloat16* out) {
  int have[2] = {-1, -1};
  for (int64_t j = j0; j < j1; ++j)
    amx_column_block(x + m_begin * K, m_end - m_begin, K, w, j, out + m_begin * N + j * 32, N,
                     have);
  amx_release_tiles(have);
}
}  // namespace

bool amx_available() {
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
  return ok;
}

torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(amx_available(), "amx_linear: the kernel did not get AMX from the OS");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "amx_linear: x is [M, K] bf16");
  TORCH_CHECK(packed.dim() == 6 && packed.size(2) == 2 && packed.size(3) == 16 &&
                  packed.size(4) == 16 && packed.size(5) == 2 && packed.is_contiguous(),
              "amx_linear: weight not packed by amx_pack");
  const int64_t M = x.size(0), K = x.size(1), J = packed.size(0), N = J * 32;
  TORCH_CHECK(packed.size(1) * 32 == K, "amx_linear: x has ", K, " columns, the weight ",
              packed.size(1) * 32);
  x = x.contiguous();
  auto out = torch::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const char* wp = reinterpret_cast<const char*>(packed.data_ptr<c10::BFloat16>());
  auto* op = out.data_ptr<c10::BFloat16>();
  for (int64_t mb = 0; mb < M; mb += kRowBlock) {
    const int64_t me = std::min(M, mb + kRowBlock);
    at::parallel_for(0, J, 1, [&](int64_t j0, int64_t j1) {
      run_blocks(xp, K, wp, N, mb, me, j0, j1, op);
    });
  }
  return out;
}

#else  // no AMX on the CPU this was built for: engine/linear.py keeps oneDNN's GEMM
#include "items.h"

void amx_column_block(const c10::BFloat16*, int64_t, int64_t, const char*, int64_t,
                      c10::BFloat16*, int64_t, int (&)[2]) {
  TORCH_CHECK(false, "amx_column_block: built for a CPU without AMX");
}
void amx_release_tiles(int (&)[2]) {}

bool amx_available() { return false; }

torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(false, "amx_linear: built for a CPU without AMX");
}

#endif
