// What the AMX kernels share (amx_linear.cpp, prefill_attention.cpp): the tile configuration
// that _tile_loadconfig reads (palette 1: 8 tiles, each up to 16 rows of 64 bytes).
#pragma once
#include <cstdint>

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
