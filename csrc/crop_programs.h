// The two GPU programs of fastssl::resized_crops, written so that the CPU can run them too.
//
// A CUDA kernel is a program run by the threads of a block between barriers. Each program here is
// written as steps, `step(tid)` for every thread id of a block, with a barrier after each step, and
// as state: what the block shares (`TileShared`) and what one thread keeps across steps (its
// accumulators). The .cu file runs the steps as a kernel (one step, then __syncthreads()); the CPU
// runs the very same steps one thread after another (resized_crops.cpp, `_resized_crops_program`),
// which is an exact emulation when no step reads what another thread writes in the same step. That
// is how the tests check the GPU programs, index by index, on a machine without a GPU.
//
// "pixel": one thread per output pixel (crop n, row y, column x). It computes the two axes' taps of
// its pixel (resample.h), sums the separable product over the window (horizontal first) for every
// channel, normalises and stores. Simple, but every pixel recomputes its weights and every channel
// value costs (taps_y * taps_x) loads: about 6-12% of the copy bandwidth on an H100 by estimate.
//
// "tiled": one block of kTileThreads threads per output tile of kTileY x kTileX pixels of a crop.
//   1. The tile's horizontal and vertical taps (index, weight), once, into shared memory.
//   2. The source rows its vertical taps reach, [row_lo, row_hi), kTileRows at a time:
//      a. horizontal pass: tmp[c][r][x] = sum_k wx[x][k] * image[c][row_lo + r][ix[x][k]], for the
//         tile's kTileX columns (every tap read once per channel, not once per output row);
//      b. vertical pass: each thread adds sum_k wy[y][k] * tmp[c][iy[y][k] - r0][x] for the taps of
//         its pixels that fall in this chunk to its accumulators. Taps are in increasing row order,
//         so the sums are added in the order of the pixel program: the same floats.
//   3. Normalise and store (a warp writes 32 consecutive columns: coalesced).
//   Per output value this is about (taps_x * scale_y + taps_y) multiply-adds instead of
//   taps_x * taps_y. A tile whose window is wider than kTileTaps (a down-scale by more than ~7x
//   bilinear, ~3.5x bicubic) runs the pixel program instead, so every size works.
//
// Images of different sizes are one flat buffer with per-image offsets and shapes, so crops of any
// image share a launch. Box values are checked before the launch (Python, on the host or on the
// device); the programs clamp image indices and taps into range, so a bad box reads wrong pixels,
// never out of bounds.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "resample.h"

namespace fastssl {

template <typename out_t>
FASTSSL_HD out_t store_value(float v) {
  return static_cast<out_t>(v);
}

// uint8 output rounds half to even (nearbyint) and clamps to 0..255, as torchvision's float-to-uint8.
template <>
FASTSSL_HD uint8_t store_value<uint8_t>(float v) {
  v = nearbyintf(v);
  return static_cast<uint8_t>(fminf(fmaxf(v, 0.f), 255.f));
}

// Everything a program reads: the packed images, the boxes and the output's layout.
template <typename in_t, typename out_t>
struct CropArgs {
  const in_t* src;
  const int64_t* info;   // [B, kInfoCols]: offset, H, W
  const float* boxes;    // [N, kBoxCols]
  const bool* flips;     // [N] or null
  const float* mean;     // [C] or null
  const float* stdev;    // [C] or null
  int64_t B, N, C, S;
  bool cubic, antialias;
  float input_scale;
  out_t* dst;
  int64_t sn, sc, sy, sx;  // output strides (channels-last or not)
};

// The image a crop reads, its box and flip.
struct CropSource {
  const float* box;
  int64_t offset, H, W;
  bool flip;
};

template <typename in_t, typename out_t>
FASTSSL_HD CropSource crop_source(const CropArgs<in_t, out_t>& a, int64_t n) {
  CropSource s;
  s.box = a.boxes + n * kBoxCols;
  int64_t img = static_cast<int64_t>(s.box[0]);
  img = img < 0 ? 0 : (img >= a.B ? a.B - 1 : img);
  s.offset = a.info[img * kInfoCols];
  s.H = a.info[img * kInfoCols + 1];
  s.W = a.info[img * kInfoCols + 2];
  s.flip = a.flips != nullptr && a.flips[n];
  return s;
}

// out = (resampled * input_scale - mean) / std = resampled * mult + shift, then the cast.
template <typename in_t, typename out_t>
FASTSSL_HD void store_channel(const CropArgs<in_t, out_t>& a, out_t* o, int64_t c, float v) {
  const float inv = a.stdev != nullptr ? 1.f / a.stdev[c] : 1.f;
  const float shift = a.mean != nullptr ? -a.mean[c] * inv : 0.f;
  o[c * a.sc] = store_value<out_t>(v * (a.input_scale * inv) + shift);
}

// ------------------------------------------------------------------------------------ pixel program

constexpr int kPixelThreads = 256;
constexpr int kChannelChunk = 4;  // channels summed together (their taps' weights shared)

// Every channel of output pixel (n, y, x).
template <typename in_t, typename out_t>
FASTSSL_HD void crop_pixel(const CropArgs<in_t, out_t>& a, int64_t n, int64_t y, int64_t x) {
  const CropSource s = crop_source(a, n);
  const AxisTaps ty = axis_taps(s.box[1], s.box[3], s.H, a.S, y, a.cubic, a.antialias);
  const AxisTaps tx = axis_taps(s.box[2], s.box[4], s.W, a.S, s.flip ? a.S - 1 - x : x, a.cubic, a.antialias);
  const int64_t plane = s.H * s.W;
  out_t* o = a.dst + n * a.sn + y * a.sy + x * a.sx;
  for (int64_t c0 = 0; c0 < a.C; c0 += kChannelChunk) {
    const int64_t nc = a.C - c0 < kChannelChunk ? a.C - c0 : kChannelChunk;
    const in_t* base = a.src + s.offset + c0 * plane;
    float acc[kChannelChunk] = {0.f, 0.f, 0.f, 0.f};
    for (int ky = 0; ky < ty.count; ++ky) {
      int64_t iy;
      const float wy = tap(ty, ky, iy);
      if (wy == 0.f) continue;
      float row[kChannelChunk] = {0.f, 0.f, 0.f, 0.f};
      for (int kx = 0; kx < tx.count; ++kx) {
        int64_t ix;
        const float wx = tap(tx, kx, ix);
        const in_t* p = base + iy * s.W + ix;
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int c = 0; c < kChannelChunk; ++c) {
          if (c < nc) row[c] += wx * static_cast<float>(p[c * plane]);
        }
      }
      for (int c = 0; c < kChannelChunk; ++c) acc[c] += wy * row[c];
    }
    // Constant trip counts: an array indexed by a runtime value would live in local memory on a GPU.
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int c = 0; c < kChannelChunk; ++c) {
      if (c < nc) store_channel(a, o, c0 + c, acc[c]);
    }
  }
}

// ------------------------------------------------------------------------------------ tiled program

constexpr int kTileY = 16;
constexpr int kTileX = 32;
constexpr int kTileThreads = 256;
constexpr int kTilePixels = kTileY * kTileX / kTileThreads;  // output pixels per thread
constexpr int kTileRows = 64;                                 // source rows per horizontal pass
constexpr int kTileChannels = 4;                              // channels per pass
constexpr int kTileTaps = 16;                                 // widest window tabulated
static_assert(kTileY * kTileX % kTileThreads == 0, "a thread owns whole pixels");
static_assert(kTileThreads % kTileX == 0, "a warp's pixels share a row");
static_assert(kTileX + kTileY <= kTileThreads, "one thread per tap table");

// One output column's (or row's) taps: 2 * kTileTaps + 1 words, an odd stride, so that 32 threads
// reading 32 columns' tables hit 32 different shared-memory banks.
struct TileTaps {
  int32_t count;  // may exceed kTileTaps: then the table is not filled and the block is `wide`
  int32_t index[kTileTaps];
  float weight[kTileTaps];
};

struct TileShared {
  TileTaps cols[kTileX];
  TileTaps rows[kTileY];
  float tmp[kTileChannels][kTileRows][kTileX];
  int64_t row_lo, row_hi;  // the source rows the tile's vertical taps read
  int32_t wide;            // a window wider than kTileTaps: the block runs the pixel program
};

// A thread's accumulators: its kTilePixels pixels times kTileChannels channels.
struct TileAcc {
  float v[kTilePixels][kTileChannels];
};

// The steps of one block of the tiled program: block `block` of a grid of N * tiles_y * tiles_x.
template <typename in_t, typename out_t>
struct CropTile {
  const CropArgs<in_t, out_t>& a;
  TileShared& sh;
  int64_t n, y0, x0;
  CropSource s;

  FASTSSL_HD CropTile(const CropArgs<in_t, out_t>& args, TileShared& shared, int64_t block, int64_t tiles_x,
                      int64_t tiles_y)
      : a(args), sh(shared) {
    const int64_t per_crop = tiles_x * tiles_y;
    n = block / per_crop;
    const int64_t t = block - n * per_crop;
    y0 = (t / tiles_x) * kTileY;
    x0 = (t % tiles_x) * kTileX;
    s = crop_source(a, n);
  }

  // Step 1: thread j < kTileX tabulates column x0 + j, the next kTileY threads row y0 + j.
  FASTSSL_HD void tables(int tid) const {
    TileTaps* t;
    int64_t i;
    AxisTaps taps;
    if (tid < kTileX) {
      t = &sh.cols[tid];
      i = x0 + tid;
      if (i < a.S) taps = axis_taps(s.box[2], s.box[4], s.W, a.S, s.flip ? a.S - 1 - i : i, a.cubic, a.antialias);
    } else if (tid < kTileX + kTileY) {
      t = &sh.rows[tid - kTileX];
      i = y0 + tid - kTileX;
      if (i < a.S) taps = axis_taps(s.box[1], s.box[3], s.H, a.S, i, a.cubic, a.antialias);
    } else {
      return;
    }
    if (i >= a.S) {  // past the crop's edge: no taps, nothing stored
      t->count = 0;
      return;
    }
    t->count = taps.count;
    if (taps.count > kTileTaps) return;
    for (int k = 0; k < taps.count; ++k) {
      int64_t index;
      t->weight[k] = tap(taps, k, index);
      t->index[k] = static_cast<int32_t>(index);
    }
  }

  // Step 2 (thread 0): the rows the vertical taps reach, and whether a window is too wide. A row's
  // taps are clamp(first + k) for k = 0, 1, ...: increasing, so its first and last taps bound it.
  FASTSSL_HD void plan(int tid) const {
    if (tid != 0) return;
    int32_t widest = 0;
    for (int j = 0; j < kTileX; ++j) widest = sh.cols[j].count > widest ? sh.cols[j].count : widest;
    int64_t lo = s.H, hi = 0;
    for (int j = 0; j < kTileY; ++j) {
      const TileTaps& r = sh.rows[j];
      widest = r.count > widest ? r.count : widest;
      if (r.count == 0 || r.count > kTileTaps) continue;
      lo = r.index[0] < lo ? r.index[0] : lo;
      hi = r.index[r.count - 1] + 1 > hi ? r.index[r.count - 1] + 1 : hi;
    }
    sh.wide = widest > kTileTaps;
    sh.row_lo = lo;
    sh.row_hi = hi > lo ? hi : lo;
  }

  FASTSSL_HD bool wide() const { return sh.wide != 0; }
  FASTSSL_HD int64_t row_lo() const { return sh.row_lo; }
  FASTSSL_HD int64_t row_hi() const { return sh.row_hi; }

  // A `wide` block: the pixel program for this thread's pixels.
  FASTSSL_HD void pixels(int tid) const {
    for (int p = 0; p < kTilePixels; ++p) {
      const int64_t y = y0 + (tid + p * kTileThreads) / kTileX, x = x0 + (tid + p * kTileThreads) % kTileX;
      if (y < a.S && x < a.S) crop_pixel(a, n, y, x);
    }
  }

  // Step 3a: channels [c0, c0 + nc), source rows [r0, r0 + nr) resampled along x into tmp.
  FASTSSL_HD void horizontal(int tid, int64_t c0, int nc, int64_t r0, int nr) const {
    const int64_t plane = s.H * s.W;
    for (int item = tid; item < nr * kTileX; item += kTileThreads) {
      const int r = item / kTileX, x = item % kTileX;
      const TileTaps& t = sh.cols[x];
      const in_t* line = a.src + s.offset + c0 * plane + (r0 + r) * s.W;
      float acc[kTileChannels] = {0.f, 0.f, 0.f, 0.f};
      for (int k = 0; k < t.count; ++k) {
        const float w = t.weight[k];
        const in_t* p = line + t.index[k];
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int c = 0; c < kTileChannels; ++c) {
          if (c < nc) acc[c] += w * static_cast<float>(p[c * plane]);
        }
      }
      for (int c = 0; c < kTileChannels; ++c) sh.tmp[c][r][x] = acc[c];
    }
  }

  // Step 3b: the vertical taps of this thread's pixels that land in rows [r0, r0 + nr).
  FASTSSL_HD void vertical(int tid, int nc, int64_t r0, int nr, TileAcc& acc) const {
    for (int p = 0; p < kTilePixels; ++p) {
      const int j = (tid + p * kTileThreads) / kTileX, x = (tid + p * kTileThreads) % kTileX;
      const TileTaps& t = sh.rows[j];
      for (int k = 0; k < t.count; ++k) {
        const int64_t r = t.index[k] - r0;
        const float w = t.weight[k];
        if (r < 0 || r >= nr || w == 0.f) continue;
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int c = 0; c < kTileChannels; ++c) {
          if (c < nc) acc.v[p][c] += w * sh.tmp[c][r][x];
        }
      }
    }
  }

  // Step 4: normalise and store channels [c0, c0 + nc) of this thread's pixels.
  FASTSSL_HD void store(int tid, int64_t c0, int nc, const TileAcc& acc) const {
    for (int p = 0; p < kTilePixels; ++p) {
      const int64_t y = y0 + (tid + p * kTileThreads) / kTileX, x = x0 + (tid + p * kTileThreads) % kTileX;
      if (y >= a.S || x >= a.S) continue;
      out_t* o = a.dst + n * a.sn + y * a.sy + x * a.sx;
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int c = 0; c < kTileChannels; ++c) {
        if (c < nc) store_channel(a, o, c0 + c, acc.v[p][c]);
      }
    }
  }
};

// The tiled program's step sequence, for a `Block` that runs a step on every thread and then
// waits for all of them (`each`), and holds each thread's accumulators (`acc(tid)`).
template <typename in_t, typename out_t, typename Block>
FASTSSL_HD void run_tile(const CropTile<in_t, out_t>& tile, Block& block) {
  block.each([&](int tid) { tile.tables(tid); });
  block.each([&](int tid) { tile.plan(tid); });
  if (tile.wide()) {
    block.each([&](int tid) { tile.pixels(tid); });
    return;
  }
  const int64_t C = tile.a.C;
  for (int64_t c0 = 0; c0 < C; c0 += kTileChannels) {
    const int nc = static_cast<int>(C - c0 < kTileChannels ? C - c0 : kTileChannels);
    block.each([&](int tid) { block.acc(tid) = TileAcc{}; });
    for (int64_t r0 = tile.row_lo(); r0 < tile.row_hi(); r0 += kTileRows) {
      const int nr = static_cast<int>(tile.row_hi() - r0 < kTileRows ? tile.row_hi() - r0 : kTileRows);
      block.each([&](int tid) { tile.horizontal(tid, c0, nc, r0, nr); });
      block.each([&](int tid) { tile.vertical(tid, nc, r0, nr, block.acc(tid)); });
    }
    block.each([&](int tid) { tile.store(tid, c0, nc, block.acc(tid)); });
  }
}

// Grid sizes.
inline int64_t tiles_along(int64_t S, int64_t tile) { return (S + tile - 1) / tile; }

}  // namespace fastssl
