// What the AMX kernels share (amx_linear.cpp, prefill_attention.cpp): the tile configuration
// that ldtilecfg reads (palette 1: 8 tiles, each up to 16 rows of 64 bytes), and its load.
#pragma once
#include <cstdint>

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// ldtilecfg of all 64 bytes. GCC's _tile_loadconfig tells the compiler it reads only the first
// 8, so the stores of rows and colsb before it could be dropped as dead (seen here: a config of
// zero rows, and a #GP on the load), depending on how configure() was inlined.
inline void load_tile_config(const TileConfig& cfg) {
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}
