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
// "tiled": one block of kTileThreads threads per strip of a crop: kTileX output columns by up to
// kStripRows rows, made as tiles of kTileY x kTileX pixels one after another.
//   1. The strip's horizontal and vertical taps (index, weight), once, into shared memory, a table
//      a thread; the barrier after it also tells every thread whether a window is too wide for the
//      tables. A strip rather than a tile a block: the tables, the block's setup and the stage's
//      columns are paid once for up to kStripTiles tiles.
//   2. For each tile, the source rows its vertical taps reach, [row_lo, row_hi), as many a pass as
//      the stage holds (at most kTileRows), for a pass of up to 3 channels:
//      a. stage: the pass's rows and the columns the strip's taps reach, copied to shared memory,
//         a row to as many lanes as its width needs (coalesced; each source pixel read once);
//      b. horizontal pass: tmp[c][r][x] = sum_k wx[x][k] * stage[c][r][ix[x][k]]. A thread owns one
//         column x and groups of kRowsAtOnce rows: per tap, one weight and index for 4 rows x 3
//         channels of multiply-adds;
//      c. vertical pass: each thread adds sum_k wy[y][k] * tmp[c][iy[y][k] - r0][x] over the taps
//         of its pixels that fall in this pass to its accumulators. Taps are in increasing row
//         order, so each sum is added in the order of the pixel program.
//   3. Normalise and store the tile (a warp writes 32 consecutive columns: coalesced).
//   Per output value this is about (taps_x * scale_y + taps_y) multiply-adds instead of
//   taps_x * taps_y. A strip whose window is wider than kTileTaps (a down-scale by more than ~7x
//   bilinear, ~3.5x bicubic), or whose columns reach wider than the stage's widest row pitch
//   (kMaxPitch: a down-scale by more than ~7.5x, which only plain bilinear or bicubic allow), runs
//   the pixel program instead, so every size works.
//   Blocks take crop-major boxes (MultiCrop's: crop k of every image, then crop k + 1) image by
//   image, so that the crops of one image run together and find it in L2 rather than read it again.
//
// Both programs add the same products in the same order as the CPU kernel; a GPU compiler may fuse
// a multiply and an add where the CPU compiler does not, so across devices values agree to rounding.
// Offsets inside one image are int32: the Python wrapper refuses images of 2^31 or more elements.
// So are the tiled program's offsets inside one crop's output (tiled_fits: bigger crops run `pixel`).
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

// Pixel (c, row, col) of a crop's image of C channels, `offset` elements from its start. The CPU
// emulation of the programs (FASTSSL_CHECK_READS, resized_crops.cpp) checks that it is that pixel
// and inside the image, which a GPU would not report; the kernels read unchecked.
template <typename in_t, typename I>
FASTSSL_HD in_t source_pixel(const in_t* image, const CropSource& s, int64_t C, I c, I row, I col, I offset) {
#if defined(FASTSSL_CHECK_READS) && !defined(__CUDA_ARCH__)
  TORCH_CHECK(c >= 0 && c < C && row >= 0 && row < s.H && col >= 0 && col < s.W &&
                  static_cast<int64_t>(offset) == (static_cast<int64_t>(c) * s.H + row) * s.W + col,
              "resized_crops program: read of pixel (", c, ", ", row, ", ", col, ") at ", offset, " of an image of ",
              C, "x", s.H, "x", s.W);
#endif
  (void)s, (void)C, (void)c, (void)row, (void)col;
  return image[offset];
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
          if (c < nc) row[c] += wx * static_cast<float>(source_pixel(image, s, a.C, c0 + c, iy, ix, o + c * plane));
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
constexpr int kTileRows = 64;                                 // source rows per pass, at most
constexpr int kRowsAtOnce = 4;                                // of them, summed together by a thread
constexpr int kTileChannels = 3;                              // channels per pass: RGB in one
constexpr int kTileTaps = 16;                                 // widest window tabulated
constexpr int kStageBytes = 24576;                            // the staged source rows of a pass
constexpr int kStripTiles = 8;                                // tiles of a block, down a strip
constexpr int kStripRows = kStripTiles * kTileY;
static_assert(kTileThreads % kTileX == 0 && kTileY % kTileGroups == 0, "a warp's pixels share a row");
static_assert(kTileX + kStripRows <= kTileThreads, "one thread per tap table");

// One output column's taps: 2 * kTileTaps + 1 words, an odd stride, so that 32 threads
// reading 32 columns' tables hit 32 different shared-memory banks.
struct TileTaps {
  int32_t count;  // may exceed kTileTaps: then the table is not filled and the block runs `pixels`
  int32_t index[kTileTaps];
  float weight[kTileTaps];
};

// One output row's taps. A warp's 32 threads read the same row's table (broadcast), so no odd
// stride is needed; `contiguous` says that tap k is index[0] + k (always with antialias: windows
// are cut to the box, not clamped), which lets the vertical pass walk tmp's rows without indices.
struct RowTaps {
  int32_t count;
  int32_t contiguous;
  int32_t index[kTileTaps];
  float weight[kTileTaps];
};

// Shared memory of a block: the strip's tap tables and the horizontal pass's output; the staged
// source rows (kStageBytes, of the images' dtype) follow it in the same allocation.
struct TileShared {
  TileTaps cols[kTileX];
  RowTaps rows[kStripRows];
  float tmp[kTileChannels][kTileRows][kTileX];
};
constexpr int kTileSharedBytes = static_cast<int>(sizeof(TileShared)) + kStageBytes;
static_assert(sizeof(TileShared) % 16 == 0, "the stage follows TileShared, aligned for word copies");

// A thread's accumulators: its kTilePixels pixels times kTileChannels channels.
struct TileAcc {
  float v[kTilePixels][kTileChannels];
};

// out = acc * mult + shift per channel: (resampled * input_scale - mean) / std.
template <int NC>
struct TileNorm {
  float mult[NC], shift[NC];
};

// The stage's columns: source columns [origin, origin + width) of each staged row, copied 4 bytes
// at a time (`words`) for uint8 images whose rows start 4-byte aligned (then origin and width are
// multiples of 4 and the words stay inside the row), else one element at a time.
struct StageSpan {
  int32_t origin;
  int32_t width;
  bool words;
};

// The stage's row pitch P (elements) is a compile-time constant, the least of these that holds a
// span: the horizontal pass then reaches its 4 rows x 3 channels of a tap at constant offsets from
// one address (a single add a tap, not twelve). Wider spans (a down-scale by more than ~7.5x) run
// the pixel program.
constexpr int kPitch1 = 64, kPitch2 = 128, kMaxPitch = 256;

// The steps of one block of the tiled program: block `block` of a grid of N * strips_y * tiles_x,
// the strip of columns [x0, x0 + kTileX) and rows [y0, y0 + kStripRows) of crop n; its tile t is
// rows y0 + t * kTileY on. The steps that touch channels take their count NC (1 to kTileChannels)
// as a template argument.
template <typename in_t, typename out_t>
struct CropTile {
  const CropArgs<in_t, out_t>& a;
  TileShared& sh;
  in_t* stage;  // [rows][NC][P] source pixels of one pass
  int64_t n;
  int32_t y0, x0;
  CropSource s;
  const in_t* image;  // the crop's image; offsets from here are int32
  int32_t W, plane;
  out_t* out;               // the crop's first output element; offsets from here are int32 too
  int32_t osc, osy, osx;    // the output's channel, row and column strides (tiled_fits)

  // 32-bit block arithmetic: a launch has fewer than 2^31 blocks and crops (checked before it).
  FASTSSL_HD CropTile(const CropArgs<in_t, out_t>& args, TileShared& shared, unsigned char* stage_bytes,
                      uint32_t block, uint32_t tiles_x, uint32_t strips_y)
      : a(args), sh(shared), stage(reinterpret_cast<in_t*>(stage_bytes)) {
    const uint32_t per_crop = tiles_x * strips_y;
    const uint32_t q = block / per_crop;
    const uint32_t t = block - q * per_crop;
    // Image by image when the boxes are crop-major (K > 0), else in the order given.
    const uint32_t K = static_cast<uint32_t>(a.crops_per_image);
    n = K > 0 ? (q % K) * (static_cast<uint32_t>(a.N) / K) + q / K : q;
    y0 = static_cast<int32_t>(t / tiles_x) * kStripRows;
    x0 = static_cast<int32_t>(t % tiles_x) * kTileX;
    s = crop_source(a, n);
    image = a.src + s.offset;
    W = static_cast<int32_t>(s.W);
    plane = static_cast<int32_t>(s.H * s.W);
    out = a.dst + static_cast<int64_t>(n) * a.sn;
    osc = static_cast<int32_t>(a.sc);
    osy = static_cast<int32_t>(a.sy);
    osx = static_cast<int32_t>(a.sx);
  }

  // Step 1: thread j < kTileX tabulates column x0 + j, the next kStripRows threads row y0 + j. Returns
  // whether its window is too wide for the table (the block then runs the pixel program).
  FASTSSL_HD bool tables(int tid) const {
    AxisTaps taps{};
    if (tid < kTileX) {
      const int64_t i = x0 + tid;
      if (i < a.S) {
        taps = axis_taps(s.box[2], s.box[4], s.W, a.S, s.flip ? a.S - 1 - i : i, a.cubic, a.antialias, false);
      }
      return fill(sh.cols[tid], i, taps);
    }
    if (tid < kTileX + kStripRows) {
      RowTaps& t = sh.rows[tid - kTileX];
      const int64_t i = y0 + tid - kTileX;
      if (i < a.S) taps = axis_taps(s.box[1], s.box[3], s.H, a.S, i, a.cubic, a.antialias, false);
      const bool wide = fill(t, i, taps);
      // Taps are clamp(first + k), never decreasing by steps of 0 or 1: contiguous iff they span count.
      t.contiguous = t.count > 0 && !wide && t.index[t.count - 1] - t.index[0] == t.count - 1;
      return wide;
    }
    return false;
  }

  // A table of output index i (no taps past the crop's edge: nothing is stored there); whether its
  // window is too wide for it. The weights are tap()'s, filter value * norm, with each filter value
  // computed once: stored, summed in tap order as axis_taps would, then scaled by the sum's inverse
  // (antialias; else norm is 1 and the values are the weights). Positions in int32: the same floats.
  template <typename Taps>
  FASTSSL_HD bool fill(Taps& t, int64_t i, const AxisTaps& taps) const {
    if (i >= a.S) {
      t.count = 0;
      return false;
    }
    t.count = taps.count;
    // No taps at all cannot happen for a box inside its image; the pixel program copes if it does.
    if (taps.count > kTileTaps || taps.count == 0) return true;
    const int32_t first = static_cast<int32_t>(taps.first), lo = static_cast<int32_t>(taps.lo),
                  hi = static_cast<int32_t>(taps.hi);
    float total = 0.f;
    for (int k = 0; k < taps.count; ++k) {
      const int32_t p = first + k;
      const float v = filter_weight((static_cast<float>(p) - taps.c) * taps.invscale, taps.cubic, taps.a);
      t.weight[k] = v;
      total += v;
      t.index[k] = p < lo ? lo : (p >= hi ? hi - 1 : p);
    }
    if (a.antialias) {
      const float norm = inverse_total(total);
      for (int k = 0; k < taps.count; ++k) t.weight[k] *= norm;
    }
    return false;
  }

  // What the tables say, read by every thread after step 1. Taps are clamp(first + k): increasing in
  // k and in the output index (decreasing along a flipped crop's columns), so the first and last
  // valid row (of tile t) or column bound them.
  FASTSSL_HD int32_t first_row(int t) const { return y0 + t * kTileY; }  // of the crop
  FASTSSL_HD int tiles() const {
    const int32_t rows = a.S - y0 < kStripRows ? static_cast<int32_t>(a.S) - y0 : kStripRows;
    return (rows + kTileY - 1) / kTileY;
  }
  FASTSSL_HD int32_t last_col() const { return (a.S - x0 < kTileX ? static_cast<int32_t>(a.S) - x0 : kTileX) - 1; }
  FASTSSL_HD int32_t row_lo(int t) const { return sh.rows[t * kTileY].index[0]; }
  FASTSSL_HD int32_t row_hi(int t) const {
    const int32_t rows = a.S - first_row(t) < kTileY ? static_cast<int32_t>(a.S) - first_row(t) : kTileY;
    const RowTaps& r = sh.rows[t * kTileY + rows - 1];
    return r.index[r.count - 1] + 1;
  }
  FASTSSL_HD int32_t col_lo() const {
    const int32_t a0 = sh.cols[0].index[0], b0 = sh.cols[last_col()].index[0];
    return a0 < b0 ? a0 : b0;
  }
  FASTSSL_HD int32_t col_hi() const {
    const TileTaps &f = sh.cols[0], &l = sh.cols[last_col()];
    const int32_t a1 = f.index[f.count - 1], b1 = l.index[l.count - 1];
    return (a1 > b1 ? a1 : b1) + 1;
  }

  // A `wide` block: the pixel program for this thread's pixels of the strip.
  FASTSSL_HD void pixels(int tid) const {
    for (int p = 0; p < kTilePixels * kStripTiles; ++p) {
      const int64_t y = y0 + tid / kTileX + p * kTileGroups, x = x0 + tid % kTileX;
      if (y < a.S && x < a.S) crop_pixel(a, n, y, x);
    }
  }

  // The stage's columns for source columns [cx0, cx0 + ncols).
  FASTSSL_HD StageSpan stage_span(int32_t cx0, int32_t ncols) const {
    StageSpan span{cx0, ncols, false};
    if (sizeof(in_t) == 1 && W % 4 == 0 && reinterpret_cast<uintptr_t>(image) % 4 == 0) {
      span.origin = cx0 & ~3;
      span.width = (cx0 + ncols - span.origin + 3) & ~3;  // <= W - origin, W a multiple of 4
      span.words = true;
    }
    return span;
  }

  // Step 2a: channels [c0, c0 + NC) of source rows [r0, r0 + nr), the span's columns, into the stage:
  // row r of channel c at (r * NC + c) * P. A source row (all NC channels) goes to 2^shift lanes, the
  // fewest its width needs up to a warp, so that narrow rows keep every lane busy; reads are
  // coalesced, each source pixel read once.
  template <int NC, int P>
  FASTSSL_HD void load_stage(int tid, int32_t c0, int32_t r0, int nr, StageSpan span) const {
    const int shift = lanes_shift(span.words ? span.width / 4 : span.width);  // a lane copies a word or an element
    const int lane = tid & ((1 << shift) - 1), lanes = 1 << shift;
    const int slot = tid >> shift, slots = kTileThreads >> shift;
    if (span.words) {
      load_stage_words<NC, P>(lane, lanes, slot, slots, c0, r0, nr, span);
      return;
    }
    for (int r = slot; r < nr; r += slots) {
      const int32_t from = c0 * plane + (r0 + r) * W + span.origin;
      in_t* to = stage + r * NC * P;
      for (int col = lane; col < span.width; col += lanes) {
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int c = 0; c < NC; ++c) {
          to[c * P + col] = source_pixel(image, s, a.C, c0 + c, r0 + r, span.origin + col, from + c * plane + col);
        }
      }
    }
  }

  // log2 of the lanes a row of `units` takes: the least power of two >= units, at most a warp.
  FASTSSL_HD static int lanes_shift(int units) {
#if defined(__CUDA_ARCH__)
    const int shift = units > 1 ? 32 - __clz(units - 1) : 0;
#else
    int shift = 0;
    while ((1 << shift) < units) ++shift;
#endif
    return shift < 5 ? shift : 5;
  }

  // uint8 rows, 4 bytes a lane, in groups of kRowsAtOnce rows: a group's loads (rows x NC channels) are
  // issued before its stores. Addressed in words (W, origin and plane are multiples of 4 here:
  // stage_span): a row's pointers once per group, then a word costs one wide multiply-add a load and
  // its NC stores lie at constant offsets c * P from one address. Only the last groups of a pass can
  // lack rows: they alone check each row.
  template <int NC, int P>
  FASTSSL_HD void load_stage_words(int lane, int lanes, int slot, int slots, int32_t c0, int32_t r0, int nr,
                                   StageSpan span) const {
    const uint32_t* const origin =
        reinterpret_cast<const uint32_t*>(image) + (c0 * (plane / 4) + r0 * (W / 4) + span.origin / 4);
    for (int first = slot; first < nr; first += slots * kRowsAtOnce) {
      if (first + (kRowsAtOnce - 1) * slots < nr) {
        stage_word_group<NC, P, false>(origin, lane, lanes, first, slots, c0, r0, nr, span);
      } else {
        stage_word_group<NC, P, true>(origin, lane, lanes, first, slots, c0, r0, nr, span);
      }
    }
  }

  // The rows first + j * slots (j < kRowsAtOnce) of a pass, those before nr with CHECKED, from `origin`
  // (the pass's first row's span in channel c0).
  template <int NC, int P, bool CHECKED>
  FASTSSL_HD void stage_word_group(const uint32_t* origin, int lane, int lanes, int first, int slots, int32_t c0,
                                   int32_t r0, int nr, StageSpan span) const {
    constexpr int32_t kPitchWords = P / 4;
    const int words = span.width / 4;
    const int32_t plane_words = plane / 4;
    // Word w of each row's span in channel c0 and in the stage, advanced with w. A row past nr points at
    // row 0 and is neither read nor written.
    const uint32_t* from[kRowsAtOnce];
    uint32_t* to[kRowsAtOnce];
    bool valid[kRowsAtOnce];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int j = 0; j < kRowsAtOnce; ++j) {
      const int r = first + j * slots;
      valid[j] = !CHECKED || r < nr;
      from[j] = origin + ((valid[j] ? r : 0) * (W / 4) + lane);
      to[j] = reinterpret_cast<uint32_t*>(stage) + ((valid[j] ? r : 0) * NC * kPitchWords + lane);
    }
    for (int w = lane; w < words; w += lanes) {
      uint32_t v[kRowsAtOnce][NC];  // of the valid rows, as the stores
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int j = 0; j < kRowsAtOnce; ++j) {
        if (valid[j]) {
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int c = 0; c < NC; ++c) {
            v[j][c] = source_word(from[j] + c * plane_words, c0 + c, r0 + first + j * slots, span.origin + 4 * w);
          }
        }
        from[j] += lanes;
      }
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int j = 0; j < kRowsAtOnce; ++j) {
        if (valid[j]) {
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int c = 0; c < NC; ++c) store_word(to[j] + c * kPitchWords, v[j][c]);
        }
        to[j] += lanes;
      }
    }
  }

  // The word at `from`: bytes col .. col + 3 of row `row` of channel c, little-endian (as a GPU loads
  // them). The CPU reads them one by one through source_pixel, at the offset `from` points to, so that
  // the emulation checks the address a GPU computes.
  FASTSSL_HD uint32_t source_word(const uint32_t* from, int32_t c, int32_t row, int32_t col) const {
#if defined(__CUDA_ARCH__)
    (void)c, (void)row, (void)col;
    return *from;
#else
    const int32_t offset = static_cast<int32_t>(reinterpret_cast<const in_t*>(from) - image);
    uint32_t v = 0;
    for (int b = 0; b < 4; ++b) {
      v |= static_cast<uint32_t>(source_pixel(image, s, a.C, c, row, col + b, offset + b)) << (8 * b);
    }
    return v;
#endif
  }

  FASTSSL_HD static void store_word(uint32_t* to, uint32_t v) {
#if defined(__CUDA_ARCH__)
    *to = v;
#else
    for (int b = 0; b < 4; ++b) reinterpret_cast<unsigned char*>(to)[b] = static_cast<unsigned char>(v >> (8 * b));
#endif
  }

  // Step 2b: the staged rows resampled along x into tmp. A thread owns one column; the pass's rows
  // go in groups of kRowsAtOnce consecutive ones, group m to warp m % kTileGroups (so that 39 rows
  // take 10 group-steps, not 8 warps x 2); a tap's weight and index are read once per group, and
  // its 4 rows x NC channels lie at constant offsets (j * NC + c) * P from one address. The rows of
  // the last group past nr read stage rows left from before (a pass's rows are a multiple of 4);
  // their sums are not stored.
  template <int NC, int P>
  FASTSSL_HD void horizontal(int tid, int nr, StageSpan span) const {
    const int x = tid % kTileX, g = tid / kTileX;
    const TileTaps& t = sh.cols[x];
    // Contiguous taps (index[0] + k: always with antialias, see tables) need no index a tap.
    const bool contiguous = t.count > 0 && t.index[t.count - 1] - t.index[0] == t.count - 1;
    for (int first = g * kRowsAtOnce; first < nr; first += kTileGroups * kRowsAtOnce) {
      float acc[kRowsAtOnce][NC] = {};
      const in_t* at = stage + (first * NC * P - span.origin);
      if (contiguous) {
        horizontal_taps<NC, P, true>(t, at + t.index[0], acc);
      } else {
        horizontal_taps<NC, P, false>(t, at, acc);
      }
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int j = 0; j < kRowsAtOnce; ++j) {
        const int r = first + j;
        if (r < nr) {
          for (int c = 0; c < NC; ++c) sh.tmp[c][r][x] = acc[j][c];
        }
      }
    }
  }

  // A group's sums over column t's taps; tap k at at + index[k], or at + k when CONTIGUOUS.
  template <int NC, int P, bool CONTIGUOUS>
  FASTSSL_HD static void horizontal_taps(const TileTaps& t, const in_t* at, float (&acc)[kRowsAtOnce][NC]) {
    for (int k = 0; k < t.count; ++k) {
      const float w = t.weight[k];
      const in_t* tap = at + (CONTIGUOUS ? k : t.index[k]);
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int j = 0; j < kRowsAtOnce; ++j) {
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int c = 0; c < NC; ++c) acc[j][c] += w * static_cast<float>(tap[(j * NC + c) * P]);
      }
    }
  }

  // Step 2c: the vertical taps of this thread's pixels of tile `tile` that land in rows
  // [r0, r0 + nr); with ONE_PASS (the tile's rows fit one pass) all of them, unchecked. Contiguous
  // taps are the rows k0 <= k < k1 of one column of tmp: no index and no check a tap.
  template <int NC, bool ONE_PASS>
  FASTSSL_HD void vertical(int tid, int tile, int32_t r0, int nr, TileAcc& acc) const {
    const int x = tid % kTileX;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int p = 0; p < kTilePixels; ++p) {
      const RowTaps& t = sh.rows[tile * kTileY + tid / kTileX + p * kTileGroups];
      if (t.contiguous) {
        const int first = t.index[0] - r0;
        int k0 = 0, k1 = t.count;
        if (!ONE_PASS) {
          k0 = first < 0 ? -first : 0;
          k1 = nr - first < k1 ? nr - first : k1;
        }
        if (k0 >= k1) continue;
        const float* col = &sh.tmp[0][first + k0][x];
        const float* w = t.weight + k0;
        for (int k = 0; k < k1 - k0; ++k) {
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int c = 0; c < NC; ++c) acc.v[p][c] += w[k] * col[(c * kTileRows + k) * kTileX];
        }
        continue;
      }
      for (int k = 0; k < t.count; ++k) {
        const int r = t.index[k] - r0;
        if (!ONE_PASS && (r < 0 || r >= nr)) continue;
        const float w = t.weight[k];
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int c = 0; c < NC; ++c) acc.v[p][c] += w * sh.tmp[c][r][x];
      }
    }
  }

  // The normalisation of channels [c0, c0 + NC), once per channel pass of a strip.
  template <int NC>
  FASTSSL_HD TileNorm<NC> norm(int32_t c0) const {
    TileNorm<NC> nm;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int c = 0; c < NC; ++c) {
      float inv = 1.f;
      if (a.stdev != nullptr) {
#if defined(__CUDA_ARCH__)
        inv = __frcp_rn(a.stdev[c0 + c]);  // correctly rounded, as 1.f / x
#else
        inv = 1.f / a.stdev[c0 + c];
#endif
      }
      nm.mult[c] = a.input_scale * inv;
      nm.shift[c] = a.mean != nullptr ? -a.mean[c0 + c] * inv : 0.f;
    }
    return nm;
  }

  // Step 3: normalise and store channels [c0, c0 + NC) of this thread's pixels of tile `tile`.
  template <int NC>
  FASTSSL_HD void store(int tid, int tile, int32_t c0, const TileNorm<NC>& nm, const TileAcc& acc) const {
#if defined(__CUDACC__)
#pragma unroll
#endif
    out_t* o = out + c0 * osc;
    for (int p = 0; p < kTilePixels; ++p) {
      const int32_t y = first_row(tile) + tid / kTileX + p * kTileGroups, x = x0 + tid % kTileX;
      if (y >= a.S || x >= a.S) continue;
      const int32_t at = y * osy + x * osx;
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int c = 0; c < NC; ++c) o[at + c * osc] = store_value<out_t>(acc.v[p][c] * nm.mult[c] + nm.shift[c]);
    }
  }
};

// One channel pass (NC channels from c0) of the tiled program: the strip's tiles one after another,
// with the stage's row pitch P.
template <int NC, int P, typename in_t, typename out_t, typename Block>
FASTSSL_HD void run_channels(const CropTile<in_t, out_t>& tile, Block& block, int32_t c0, StageSpan span) {
  // As many rows a pass as the stage holds, a multiple of kRowsAtOnce (the horizontal pass reads
  // whole groups), 64 at most (tmp's rows).
  constexpr int kFit = (kStageBytes / (NC * P * static_cast<int>(sizeof(in_t)))) / kRowsAtOnce * kRowsAtOnce;
  constexpr int kRows = kFit < kTileRows ? kFit : kTileRows;
  static_assert(kRows >= kRowsAtOnce, "the stage holds a group of rows at the widest pitch");
  const TileNorm<NC> nm = tile.template norm<NC>(c0);
  for (int t = 0; t < tile.tiles(); ++t) {
    const int32_t lo = tile.row_lo(t), hi = tile.row_hi(t);
    block.own([&](int tid) { block.acc(tid) = TileAcc{}; });
    for (int32_t r0 = lo; r0 < hi; r0 += kRows) {
      const int nr = hi - r0 < kRows ? hi - r0 : kRows;
      block.each([&](int tid) { tile.template load_stage<NC, P>(tid, c0, r0, nr, span); });
      block.each([&](int tid) { tile.template horizontal<NC, P>(tid, nr, span); });
      if (hi - lo <= kRows) {
        block.each([&](int tid) { tile.template vertical<NC, true>(tid, t, r0, nr, block.acc(tid)); });
      } else {
        block.each([&](int tid) { tile.template vertical<NC, false>(tid, t, r0, nr, block.acc(tid)); });
      }
    }
    block.own([&](int tid) { tile.template store<NC>(tid, t, c0, nm, block.acc(tid)); });
  }
}

// A channel pass at the least pitch that holds the span.
template <int NC, typename in_t, typename out_t, typename Block>
FASTSSL_HD void run_channels(const CropTile<in_t, out_t>& tile, Block& block, int32_t c0, StageSpan span) {
  if (span.width <= kPitch1) {
    run_channels<NC, kPitch1>(tile, block, c0, span);
  } else if (span.width <= kPitch2) {
    run_channels<NC, kPitch2>(tile, block, c0, span);
  } else {
    run_channels<NC, kMaxPitch>(tile, block, c0, span);
  }
}

// The tiled program's step sequence, for a `Block` that runs a step on every thread and then waits
// for all of them (`each`; `each_or` also ORs what the step returned on each thread), runs a step
// that touches no shared memory without waiting (`own`), and holds each thread's accumulators (`acc`).
template <typename in_t, typename out_t, typename Block>
FASTSSL_HD void run_tile(const CropTile<in_t, out_t>& tile, Block& block) {
  if (block.each_or([&](int tid) { return tile.tables(tid); })) {
    block.own([&](int tid) { tile.pixels(tid); });
    return;
  }
  const StageSpan span = tile.stage_span(tile.col_lo(), tile.col_hi() - tile.col_lo());
  if (span.width > kMaxPitch) {
    block.own([&](int tid) { tile.pixels(tid); });  // wider than the widest pitch: rare, see kMaxPitch
    return;
  }
  const int32_t C = static_cast<int32_t>(tile.a.C);
  for (int32_t c0 = 0; c0 < C; c0 += kTileChannels) {
    const int32_t nc = C - c0;
    if (nc >= 3) {
      run_channels<3>(tile, block, c0, span);
    } else if (nc == 2) {
      run_channels<2>(tile, block, c0, span);
    } else {
      run_channels<1>(tile, block, c0, span);
    }
  }
}

// Grid sizes.
inline int64_t tiles_along(int64_t S, int64_t tile) { return (S + tile - 1) / tile; }

// The tiled program addresses a crop's output with int32 offsets: its last element must lie less
// than 2^31 elements past its first (C * S * S for the layouts the op allocates). Larger crops (a
// side of ~26,000 pixels and more) run the pixel program.
template <typename in_t, typename out_t>
bool tiled_fits(const CropArgs<in_t, out_t>& a) {
  return (a.S - 1) * (a.sy + a.sx) + (a.C - 1) * a.sc < (int64_t{1} << 31);
}

}  // namespace fastssl
