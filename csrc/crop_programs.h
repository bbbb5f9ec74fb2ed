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
//   1. The tile's horizontal and vertical taps (index, weight), once, into shared memory; the
//      barrier after it also tells every thread whether a window is too wide for the tables.
//   2. The source rows its vertical taps reach, [row_lo, row_hi), kTileRows at a time:
//      a. horizontal pass: tmp[c][r][x] = sum_k wx[x][k] * image[c][r0 + r][ix[x][k]]. A thread owns
//         one column x (its taps read from shared memory once per tap, not once per row) and
//         kTileRows / kTileGroups rows, and all channels: 3 loads and 3 multiply-adds per tap and row.
//      b. vertical pass: each thread adds sum_k wy[y][k] * tmp[c][iy[y][k] - r0][x] over the taps
//         of its pixels that fall in this chunk to its accumulators. Taps are in increasing row
//         order, so each sum is added in the order of the pixel program.
//   3. Normalise and store (a warp writes 32 consecutive columns: coalesced).
//   Per output value this is about (taps_x * scale_y + taps_y) multiply-adds instead of
//   taps_x * taps_y. A tile whose window is wider than kTileTaps (a down-scale by more than ~7x
//   bilinear, ~3.5x bicubic) runs the pixel program instead, so every size works.
//   Blocks take crop-major boxes (MultiCrop's: crop k of every image, then crop k + 1) image by
//   image, so that the crops of one image run together and find it in L2 rather than read it again.
//
// Both programs add the same products in the same order as the CPU kernel; a GPU compiler may fuse
// a multiply and an add where the CPU compiler does not, so across devices values agree to rounding.
// Offsets inside one image are int32: the Python wrapper refuses images of 2^31 or more elements.
//
// Images of different sizes are one flat buffer with per-image offsets and shapes, so crops of any
// image share a launch. Box values are checked before the launch (Python, on the host or on the
// device); the programs clamp image indices and taps into range, so a bad box reads wrong pixels,
// never out of bounds.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
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

// A source pixel: element `offset` of an image of `size` elements. The CPU emulation of the programs
// (FASTSSL_CHECK_READS, resized_crops.cpp) checks every read against its crop's image, which a GPU
// would not report; the kernels read unchecked.
template <typename in_t>
FASTSSL_HD float read_source(const in_t* image, int64_t offset, int64_t size) {
#if defined(FASTSSL_CHECK_READS) && !defined(__CUDA_ARCH__)
  TORCH_CHECK(offset >= 0 && offset < size, "resized_crops program: read of element ", offset,
              " of an image of ", size);
#endif
  (void)size;
  return static_cast<float>(image[offset]);
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
  int64_t crops_per_image;  // K > 0: the boxes are crop-major, box k * (N / K) + i is crop k of image i
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
constexpr int kChannelChunk = 3;  // channels summed together (their taps' weights shared): RGB in one

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
    const in_t* image = a.src + s.offset;
    float acc[kChannelChunk] = {};
    for (int ky = 0; ky < ty.count; ++ky) {
      int64_t iy;
      const float wy = tap(ty, ky, iy);
      float row[kChannelChunk] = {};
      for (int kx = 0; kx < tx.count; ++kx) {
        int64_t ix;
        const float wx = tap(tx, kx, ix);
        const int64_t o = (c0 * s.H + iy) * s.W + ix;
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int c = 0; c < kChannelChunk; ++c) {
          if (c < nc) row[c] += wx * read_source(image, o + c * plane, a.C * plane);
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
constexpr int kTileGroups = kTileThreads / kTileX;            // thread tid: column tid % 32, group tid / 32
constexpr int kTilePixels = kTileY * kTileX / kTileThreads;  // output pixels per thread
constexpr int kTileRows = 64;                                 // source rows per horizontal pass
constexpr int kRowsPerThread = kTileRows / kTileGroups;       // of them, per thread
constexpr int kRowsAtOnce = 4;                                // of those, summed together
constexpr int kTileChannels = 3;                              // channels per pass: RGB in one
constexpr int kTileTaps = 16;                                 // widest window tabulated
static_assert(kTileThreads % kTileX == 0 && kTileY % kTileGroups == 0, "a warp's pixels share a row");
static_assert(kTileRows % kTileGroups == 0 && kRowsPerThread % kRowsAtOnce == 0, "rows shared out evenly");
static_assert(kTileX + kTileY <= kTileThreads, "one thread per tap table");

// One output column's (or row's) taps: 2 * kTileTaps + 1 words, an odd stride, so that 32 threads
// reading 32 columns' tables hit 32 different shared-memory banks.
struct TileTaps {
  int32_t count;  // may exceed kTileTaps: then the table is not filled and the block runs `pixels`
  int32_t index[kTileTaps];
  float weight[kTileTaps];
};

struct TileShared {
  TileTaps cols[kTileX];
  TileTaps rows[kTileY];
  float tmp[kTileChannels][kTileRows][kTileX];
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
  const in_t* image;  // the crop's image; offsets from here are int32
  int32_t W, plane;

  FASTSSL_HD CropTile(const CropArgs<in_t, out_t>& args, TileShared& shared, int64_t block, int64_t tiles_x,
                      int64_t tiles_y)
      : a(args), sh(shared) {
    const int64_t per_crop = tiles_x * tiles_y;
    const int64_t q = block / per_crop;
    // Image by image when the boxes are crop-major (K > 0), else in the order given.
    const int64_t K = a.crops_per_image;
    n = K > 0 ? (q % K) * (a.N / K) + q / K : q;
    const int64_t t = block - q * per_crop;
    y0 = (t / tiles_x) * kTileY;
    x0 = (t % tiles_x) * kTileX;
    s = crop_source(a, n);
    image = a.src + s.offset;
    W = static_cast<int32_t>(s.W);
    plane = static_cast<int32_t>(s.H * s.W);
  }

  // Step 1: thread j < kTileX tabulates column x0 + j, the next kTileY threads row y0 + j. Returns
  // whether its window is too wide for the table (the block then runs the pixel program).
  FASTSSL_HD bool tables(int tid) const {
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
      return false;
    }
    if (i >= a.S) {  // past the crop's edge: no taps, nothing stored
      t->count = 0;
      return false;
    }
    t->count = taps.count;
    // No taps at all cannot happen for a box inside its image; the pixel program copes if it does.
    if (taps.count > kTileTaps || taps.count == 0) return true;
    for (int k = 0; k < taps.count; ++k) {
      int64_t index;
      t->weight[k] = tap(taps, k, index);
      t->index[k] = static_cast<int32_t>(index);
    }
    return false;
  }

  // The source rows the tile's vertical taps reach, [row_lo, row_hi): a row's taps are clamp(first + k),
  // increasing in k and in the output row, so the first row's first tap and the last row's last bound them.
  FASTSSL_HD int64_t row_lo() const { return sh.rows[0].index[0]; }
  FASTSSL_HD int64_t row_hi() const {
    const TileTaps& last = sh.rows[(a.S - y0 < kTileY ? a.S - y0 : kTileY) - 1];
    return static_cast<int64_t>(last.index[last.count - 1]) + 1;
  }

  // A `wide` block: the pixel program for this thread's pixels.
  FASTSSL_HD void pixels(int tid) const {
    for (int p = 0; p < kTilePixels; ++p) {
      const int64_t y = y0 + tid / kTileX + p * kTileGroups, x = x0 + tid % kTileX;
      if (y < a.S && x < a.S) crop_pixel(a, n, y, x);
    }
  }

  // Step 2a: channels [c0, c0 + nc), source rows [r0, r0 + nr) resampled along x into tmp. The
  // thread's rows go kRowsAtOnce at a time (each tap's weight and index read once per batch of rows):
  // more at once costs registers (and so resident blocks) for fewer shared-memory reads.
  FASTSSL_HD void horizontal(int tid, int64_t c0, int nc, int64_t r0, int nr) const {
    const int x = tid % kTileX, g = tid / kTileX;
    const TileTaps& t = sh.cols[x];
    const int32_t size = static_cast<int32_t>(a.C) * plane;
    for (int j0 = 0; j0 < kRowsPerThread && g + j0 * kTileGroups < nr; j0 += kRowsAtOnce) {
      float acc[kRowsAtOnce][kTileChannels] = {};
      const int32_t line = static_cast<int32_t>(c0) * plane + static_cast<int32_t>(r0 + g + j0 * kTileGroups) * W;
      for (int k = 0; k < t.count; ++k) {
        const float w = t.weight[k];
        const int32_t o = line + t.index[k];
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int j = 0; j < kRowsAtOnce; ++j) {
          if (g + (j0 + j) * kTileGroups >= nr) break;  // the same for a whole warp
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int c = 0; c < kTileChannels; ++c) {
            if (c < nc) acc[j][c] += w * read_source(image, o + j * kTileGroups * W + c * plane, size);
          }
        }
      }
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int j = 0; j < kRowsAtOnce; ++j) {
        const int r = g + (j0 + j) * kTileGroups;
        if (r >= nr) break;
        for (int c = 0; c < kTileChannels; ++c) sh.tmp[c][r][x] = acc[j][c];
      }
    }
  }

  // Step 2b: the vertical taps of this thread's pixels that land in rows [r0, r0 + nr) (all of them
  // when the tile's rows fit one pass: `one_pass`).
  FASTSSL_HD void vertical(int tid, int nc, int64_t r0, int nr, bool one_pass, TileAcc& acc) const {
    const int x = tid % kTileX;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int p = 0; p < kTilePixels; ++p) {
      const TileTaps& t = sh.rows[tid / kTileX + p * kTileGroups];
      for (int k = 0; k < t.count; ++k) {
        const int r = static_cast<int>(t.index[k] - r0);
        if (!one_pass && (r < 0 || r >= nr)) continue;
        const float w = t.weight[k];
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int c = 0; c < kTileChannels; ++c) {
          if (c < nc) acc.v[p][c] += w * sh.tmp[c][r][x];
        }
      }
    }
  }

  // Step 3: normalise and store channels [c0, c0 + nc) of this thread's pixels.
  FASTSSL_HD void store(int tid, int64_t c0, int nc, const TileAcc& acc) const {
    float mult[kTileChannels], shift[kTileChannels];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int c = 0; c < kTileChannels; ++c) {
      const float inv = a.stdev != nullptr && c < nc ? 1.f / a.stdev[c0 + c] : 1.f;
      mult[c] = a.input_scale * inv;
      shift[c] = a.mean != nullptr && c < nc ? -a.mean[c0 + c] * inv : 0.f;
    }
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int p = 0; p < kTilePixels; ++p) {
      const int64_t y = y0 + tid / kTileX + p * kTileGroups, x = x0 + tid % kTileX;
      if (y >= a.S || x >= a.S) continue;
      out_t* o = a.dst + n * a.sn + y * a.sy + x * a.sx;
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int c = 0; c < kTileChannels; ++c) {
        if (c < nc) o[(c0 + c) * a.sc] = store_value<out_t>(acc.v[p][c] * mult[c] + shift[c]);
      }
    }
  }
};

// The tiled program's step sequence, for a `Block` that runs a step on every thread and then waits
// for all of them (`each`; `each_or` also ORs what the step returned on each thread), runs a step
// that touches no shared memory without waiting (`own`), and holds each thread's accumulators (`acc`).
template <typename in_t, typename out_t, typename Block>
FASTSSL_HD void run_tile(const CropTile<in_t, out_t>& tile, Block& block) {
  if (block.each_or([&](int tid) { return tile.tables(tid); })) {
    block.own([&](int tid) { tile.pixels(tid); });
    return;
  }
  const int64_t lo = tile.row_lo(), hi = tile.row_hi(), C = tile.a.C;
  const bool one_pass = hi - lo <= kTileRows;
  for (int64_t c0 = 0; c0 < C; c0 += kTileChannels) {
    const int nc = static_cast<int>(C - c0 < kTileChannels ? C - c0 : kTileChannels);
    block.own([&](int tid) { block.acc(tid) = TileAcc{}; });
    for (int64_t r0 = lo; r0 < hi; r0 += kTileRows) {
      const int nr = static_cast<int>(hi - r0 < kTileRows ? hi - r0 : kTileRows);
      block.each([&](int tid) { tile.horizontal(tid, c0, nc, r0, nr); });
      block.each([&](int tid) { tile.vertical(tid, nc, r0, nr, one_pass, block.acc(tid)); });
    }
    block.own([&](int tid) { tile.store(tid, c0, nc, block.acc(tid)); });
  }
}

// Grid sizes.
inline int64_t tiles_along(int64_t S, int64_t tile) { return (S + tile - 1) / tile; }

}  // namespace fastssl
