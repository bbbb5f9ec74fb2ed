// The resampling math shared by the CPU and CUDA kernels of fastssl::resized_crops.
//
// A resize along one axis is a weighted sum of source pixels: for output index i, the taps
// first, first + 1, ..., first + count - 1 (clamped to the box's rows or columns), with weight
// filter((p - c) * invscale) * norm for source pixel p, where c is the source coordinate of the
// output pixel centre in pixel-index units. It is the definition of torch.nn.functional.interpolate
// (align_corners=False), which torchvision's resize calls, generalised to a box with a fractional
// origin (the box's pixels are then the integer pixels it overlaps):
//
//   scale = box_length / out_size
//   antialias (torch's _upsample_*_aa): the filter support widens by the scale when down-scaling,
//     support = s * max(scale, 1), invscale = 1 / max(scale, 1), s = 1 (triangle) or 2 (cubic, a = -0.5);
//     centre = origin + scale * (i + 0.5), c = centre - 0.5,
//     taps floor(centre - support + 0.5) .. floor(centre + support + 0.5) - 1 cut to the box,
//     weights normalised to sum 1.
//   no antialias, bilinear (upsample_bilinear2d): c = origin + max(scale * (i + 0.5) - 0.5, 0),
//     taps floor(c), floor(c) + 1, the second one clamped to the last pixel of the box.
//   no antialias, bicubic (upsample_bicubic2d): c = origin + scale * (i + 0.5) - 0.5, taps
//     floor(c) - 1 .. floor(c) + 2 clamped to the box (edge pixels replicated), cubic a = -0.75.
//
// A 2-D resize is the separable product of the two axes' weights.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTSSL_HD __host__ __device__ __forceinline__
#else
#define FASTSSL_HD inline
#endif

namespace fastssl {

enum Interp : int { kBilinear = 0, kBicubic = 1 };

// Layout of one packed image: where it starts in the flat buffer and its height and width.
// The op gets these as rows of an int64 tensor [B, 3].
constexpr int kInfoCols = 3;
// A box row: image index, top, left, height, width.
constexpr int kBoxCols = 5;

struct AxisTaps {
  float c;         // source coordinate of the output pixel, in pixel-index units
  float invscale;  // filter argument scale (1 / max(scale, 1) with antialias, else 1)
  float norm;      // 1 / sum of the weights
  float a;         // cubic coefficient
  int64_t first;   // first tap (may lie outside [lo, hi) without antialias: then clamped)
  int count;       // number of taps
  int64_t lo, hi;  // the box's pixels along this axis: [lo, hi)
  bool cubic;
};

FASTSSL_HD float filter_weight(float x, bool cubic, float a) {
  x = fabsf(x);
  if (!cubic) return x < 1.f ? 1.f - x : 0.f;
  if (x < 1.f) return ((a + 2.f) * x - (a + 3.f)) * x * x + 1.f;
  if (x < 2.f) return (((x - 5.f) * x + 8.f) * x - 4.f) * a;
  return 0.f;
}

// 1 / the sum of an antialiased window's filter values (0 for an empty sum).
FASTSSL_HD float inverse_total(float total) { return total != 0.f ? 1.f / total : 0.f; }

// The taps of output index i along an axis: the box covers [origin, origin + length) of an axis
// whose pixels run over [0, extent); out_size outputs. With normalise false, an antialiased window's
// norm is left at 1 for a caller that sums the filter values itself (the tiled program's tables).
FASTSSL_HD AxisTaps axis_taps(float origin, float length, int64_t extent, int64_t out_size, int64_t i,
                              bool cubic, bool antialias, bool normalise = true) {
  AxisTaps t;
  t.cubic = cubic;
  t.lo = static_cast<int64_t>(floorf(origin));
  t.hi = static_cast<int64_t>(ceilf(origin + length));
  if (t.lo < 0) t.lo = 0;
  if (t.lo > extent - 1) t.lo = extent - 1;  // refused by the checks; never read past the image
  if (t.hi > extent) t.hi = extent;
  if (t.hi <= t.lo) t.hi = t.lo + 1;
  const float scale = length / static_cast<float>(out_size);
  if (antialias) {
    t.a = -0.5f;
    const float base = cubic ? 2.f : 1.f;
    const float support = scale >= 1.f ? base * scale : base;
    t.invscale = scale >= 1.f ? 1.f / scale : 1.f;
    const float centre = origin + scale * (static_cast<float>(i) + 0.5f);
    int64_t first = static_cast<int64_t>(floorf(centre - support + 0.5f));
    int64_t last = static_cast<int64_t>(floorf(centre + support + 0.5f));
    if (first < t.lo) first = t.lo;
    if (last > t.hi) last = t.hi;
    t.first = first;
    t.count = last > first ? static_cast<int>(last - first) : 0;
    t.c = centre - 0.5f;
    t.norm = 1.f;
    if (normalise) {
      float total = 0.f;
      for (int k = 0; k < t.count; ++k)
        total += filter_weight((static_cast<float>(t.first + k) - t.c) * t.invscale, cubic, t.a);
      t.norm = inverse_total(total);
    }
  } else {
    t.a = -0.75f;
    t.invscale = 1.f;
    t.norm = 1.f;
    float src = scale * (static_cast<float>(i) + 0.5f) - 0.5f;
    if (!cubic && src < 0.f) src = 0.f;
    t.c = origin + src;
    const int64_t base = static_cast<int64_t>(floorf(t.c));
    t.first = cubic ? base - 1 : base;
    t.count = cubic ? 4 : 2;
  }
  return t;
}

// Tap k of t: its source pixel (clamped to the box) and its weight.
FASTSSL_HD float tap(const AxisTaps& t, int k, int64_t& index) {
  const int64_t p = t.first + k;
  index = p < t.lo ? t.lo : (p >= t.hi ? t.hi - 1 : p);
  return filter_weight((static_cast<float>(p) - t.c) * t.invscale, t.cubic, t.a) * t.norm;
}

}  // namespace fastssl
