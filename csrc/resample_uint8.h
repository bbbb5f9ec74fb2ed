// The uint8-in, uint8-out CPU path of fastssl::resized_crops: torch's fixed-point resize.
//
// For uint8 images on CPU, torchvision's resize (bicubic always, bilinear on AVX2 CPUs) calls
// torch's uint8 kernels (_upsample_bilinear2d_aa / _upsample_bicubic2d_aa, and upsample_bilinear2d /
// upsample_bicubic2d without antialias). They are not the float definition rounded at the end:
//
//   1. per axis, the weights are computed in double, then scaled to int16 at the largest precision
//      p (bits) for which twice the axis's largest weight still fits: w_int = round(w * 2^p), halves
//      away from zero;
//   2. the horizontal pass runs first, each output an integer dot product plus 2^(p-1), shifted
//      down by p (floor) and clamped to 0..255 -- an intermediate uint8 image;
//   3. the vertical pass does the same on that image.
//
// The clamp after step 2 is what moves bicubic (negative lobes) up to ~30 units away from the float
// definition; bilinear differs by at most 1. Emulated here exactly for integer boxes.
//
// Weights (double, in the box's own pixel units, `f` = the box origin's fractional part, 0 for
// integer boxes; `scale` = box length / out_size):
//   antialias (_compute_indices_min_size_weights_aa): support = s * max(scale, 1) (s = 1 triangle,
//     2 cubic with a = -0.5), centre = f + scale * (i + 0.5), first = max(trunc(centre - support + 0.5), 0),
//     count = min(trunc(centre + support + 0.5), n) - first, weights filter((first + j - centre + 0.5) /
//     max(scale, 1)) normalised to sum 1;
//   no antialias (_compute_indices_min_size_weights): real = f + scale * (i + 0.5) - 0.5 (bilinear: the
//     offset part clamped at 0), index = min(floor(float(real)), n - 1), lambda = clamp(real - index, 0, 1),
//     the 2 or 4 taps' weights filter(k + 1 - s - lambda) (cubic a = -0.75), where a tap falls outside the
//     box its weight is added to the edge tap (edge replication).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastssl {

// One axis of the fixed-point resize: out_size rows of `width` (index, int weight) pairs.
struct FixedAxis {
  int width = 1;
  int precision = 0;
  std::vector<int64_t> index;   // absolute pixel indices, padding taps point at a valid pixel
  std::vector<int32_t> weight;  // 0 for padding taps
};

inline double filter_weight_f64(double x, bool cubic, double a) {
  x = std::fabs(x);
  if (!cubic) return x < 1.0 ? 1.0 - x : 0.0;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
  return 0.0;
}

// The box covers [origin, origin + length) of an axis of `extent` pixels; flip reverses the outputs.
inline FixedAxis make_fixed_axis(float origin, float length, int64_t extent, int64_t out_size, bool cubic,
                                 bool antialias, bool flip) {
  int64_t lo = static_cast<int64_t>(std::floor(origin));
  int64_t hi = static_cast<int64_t>(std::ceil(static_cast<double>(origin) + length));
  lo = std::min<int64_t>(std::max<int64_t>(lo, 0), extent - 1);  // refused by the checks; never read past
  hi = std::min<int64_t>(hi, extent);
  if (hi <= lo) hi = lo + 1;
  const int64_t n = hi - lo;  // the box's pixels: torch's input_size for an integer box
  const double f = static_cast<double>(origin) - static_cast<double>(lo);
  const double scale = static_cast<double>(length) / static_cast<double>(out_size);
  const int interp = cubic ? 4 : 2;

  int max_taps;
  double support = 0.0;
  if (antialias) {
    support = scale >= 1.0 ? interp * 0.5 * scale : interp * 0.5;
    max_taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  } else {
    max_taps = interp;
  }
  std::vector<double> w(out_size * max_taps, 0.0);
  std::vector<int64_t> first(out_size, 0);
  double w_max = 0.0;
  for (int64_t i = 0; i < out_size; ++i) {
    double* wi = w.data() + i * max_taps;
    if (antialias) {
      const double a = -0.5;
      const double centre = f + scale * (static_cast<double>(i) + 0.5);
      const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
      // Truncation, as torch's static_cast: the same as floor once clamped at 0.
      const int64_t xmin = std::max<int64_t>(static_cast<int64_t>(centre - support + 0.5), 0);
      int64_t count = std::min<int64_t>(static_cast<int64_t>(centre + support + 0.5), n) - xmin;
      count = std::clamp<int64_t>(count, 0, max_taps);
      double total = 0.0;
      for (int64_t j = 0; j < count; ++j) {
        wi[j] = filter_weight_f64((static_cast<double>(j + xmin) - centre + 0.5) * invscale, cubic, a);
        total += wi[j];
      }
      if (total != 0.0) {
        for (int64_t j = 0; j < count; ++j) {
          wi[j] /= total;
          w_max = std::max(w_max, wi[j]);
        }
      }
      first[i] = xmin;
    } else {
      const double a = -0.75;
      double src = scale * (static_cast<double>(i) + 0.5) - 0.5;
      if (!cubic && src < 0.0) src = 0.0;
      const double real = f + src;
      // torch's guard_index_and_lambda floors through float (floorf of a double).
      const int64_t index = std::min<int64_t>(static_cast<int64_t>(std::floor(static_cast<float>(real))), n - 1);
      const double lambda = std::min(std::max(real - static_cast<double>(index), 0.0), 1.0);
      const int64_t s = max_taps / 2;
      const int64_t umin = index - s + 1, umax = index + s + 1;
      const int64_t xmin = std::max<int64_t>(umin, 0);
      const int64_t count = std::clamp<int64_t>(std::min(umax, n) - xmin, 0, max_taps);
      // Taps outside the box fold onto the edge taps; the running sums count towards the maximum.
      int64_t slot = 0;
      for (int64_t j = 0; j < max_taps; ++j) {
        const double v = filter_weight_f64(static_cast<double>(j + 1 - s) - lambda, cubic, a);
        if (umin + j <= 0) {
          slot = 0;
        } else if (umin + j >= n - 1) {
          slot = count - 1;
        }
        wi[slot] += v;
        w_max = std::max(w_max, wi[slot]);
        ++slot;
      }
      first[i] = xmin;
    }
  }
  FixedAxis ax;
  ax.width = max_taps;
  int p = 0;
  for (p = 0; p < 22; ++p) {
    if (static_cast<int>(0.5 + w_max * (1 << (p + 1))) >= (1 << 15)) break;
  }
  ax.precision = p;
  ax.index.assign(out_size * max_taps, lo);
  ax.weight.assign(out_size * max_taps, 0);
  for (int64_t o = 0; o < out_size; ++o) {
    const int64_t i = flip ? out_size - 1 - o : o;
    for (int k = 0; k < max_taps; ++k) {
      const double v = w[i * max_taps + k] * static_cast<double>(1 << p);
      const int32_t q = v < 0 ? static_cast<int32_t>(-0.5 + v) : static_cast<int32_t>(0.5 + v);
      ax.weight[o * max_taps + k] = q;
      ax.index[o * max_taps + k] = std::min<int64_t>(lo + first[i] + k, hi - 1);
    }
  }
  return ax;
}

// A fixed-point sum (2^(p-1) added) to uint8: shifted down by p (arithmetic: floor, as torch), clamped.
inline uint8_t clamp_shifted(int32_t acc, int precision) {
  acc >>= precision;
  return static_cast<uint8_t>(acc < 0 ? 0 : (acc > 255 ? 255 : acc));
}

}  // namespace fastssl
