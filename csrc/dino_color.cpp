// fastssl::dino_color_u8: the DINO authors' per-crop colour pipeline on uint8 crops, on the CPU.
//
// Per crop, in the authors' order (DataAugmentationDINO on PIL images): ColorJitter's four ops in
// the crop's own order, RandomGrayscale, the Gaussian blur, solarisation, then ToTensor and
// Normalize, written once as float32. Every step works on 8-bit values as PIL does, with PIL's
// arithmetic where PIL defines the step:
//
//   brightness, contrast, saturation   Image.blend(degenerate, img, f): trunc(d + f * (x - d)),
//                                      clipped to 0..255 (d: black; the mean of the L image,
//                                      rounded; the pixel's L value), in float as PIL's Blend.c
//   hue                                torchvision's PIL path: RGB -> HSV (8-bit, PIL's rgb2hsv),
//                                      h += uint8(int32(f * 255)) modulo 256, HSV -> RGB (hsv2rgb)
//   grayscale                          L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 on all channels
//   solarize                           x >= 128 -> 255 - x (ImageOps.solarize)
//
// The blur is fastssl's definition (a Gaussian of kernel_size taps at sigma, reflect padding, as
// torchvision's tensor gaussian_blur; PIL approximates it with box filters): separable, sized per
// crop, in fp32 between the two passes, rounded once to 8 bits. One crop at a time per thread, in
// a working copy that stays in cache; at::parallel_for over crops.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_clones.h"

namespace fastssl {
namespace {

constexpr int kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3;  // torchvision's numbering

inline uint8_t luma(uint8_t r, uint8_t g, uint8_t b) {  // PIL's "L" (ITU-R 601-2), fixed point
  return static_cast<uint8_t>((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16);
}

// Image.blend(degenerate, img, alpha) for one value: in float, truncated; clipped when alpha is
// outside [0, 1] (inside it the result cannot leave 0..255).
inline uint8_t blend(int degenerate, int x, float alpha) {
  const float temp = static_cast<float>(degenerate) + alpha * static_cast<float>(x - degenerate);
  if (temp <= 0.0f) return 0;
  if (temp >= 255.0f) return 255;
  return static_cast<uint8_t>(temp);
}

struct Planes {  // the three 8-bit planes of one crop
  uint8_t* r;
  uint8_t* g;
  uint8_t* b;
  int64_t n;  // pixels
};

void blend_all(const Planes& p, int degenerate, float alpha) {
  for (uint8_t* c : {p.r, p.g, p.b}) {
    for (int64_t i = 0; i < p.n; ++i) c[i] = blend(degenerate, c[i], alpha);
  }
}

void adjust_contrast(const Planes& p, float alpha) {
  int64_t sum = 0;  // ImageStat's mean of the L image, then int(mean + 0.5)
  for (int64_t i = 0; i < p.n; ++i) sum += luma(p.r[i], p.g[i], p.b[i]);
  const int mean = static_cast<int>(static_cast<double>(sum) / static_cast<double>(p.n) + 0.5);
  blend_all(p, mean, alpha);
}

void adjust_saturation(const Planes& p, float alpha) {
  for (int64_t i = 0; i < p.n; ++i) {
    const int l = luma(p.r[i], p.g[i], p.b[i]);
    p.r[i] = blend(l, p.r[i], alpha);
    p.g[i] = blend(l, p.g[i], alpha);
    p.b[i] = blend(l, p.b[i], alpha);
  }
}

// PIL's rgb2hsv_row and hsv2rgb (Convert.c), with their float and double steps as PIL writes them,
// written without branches (selects instead), so that the loop vectorises: fmod of a value in
// [0, 2) as a subtraction, round() of a non-negative value from its exact fraction, the terms of h
// and s that hsv2rgb takes from tables.
struct HsvTables {
  std::array<int32_t, 256> sector;
  std::array<float, 256> frac, fs;
  HsvTables() {
    for (int x = 0; x < 256; ++x) {
      sector[x] = static_cast<int32_t>(std::floor(static_cast<float>(x) * 6.0 / 255.0)) % 6;
      frac[x] = static_cast<float>(static_cast<float>(x) * 6.0 / 255.0 - std::floor(static_cast<float>(x) * 6.0 / 255.0));
      fs[x] = static_cast<float>(static_cast<float>(x) / 255.0);
    }
  }
};

inline int32_t round_half_away(double x) {  // std::round for x >= 0: x - trunc(x) is exact
  const auto whole = static_cast<int32_t>(x);
  return whole + (x - static_cast<double>(whole) >= 0.5 ? 1 : 0);
}

inline int32_t clip8i(int32_t v) { return v <= 0 ? 0 : v < 256 ? v : 255; }

FASTSSL_VECTOR_CLONES void adjust_hue(const Planes& p, float factor) {
  static const HsvTables tab;
  // torchvision: np_h += np.int32(hue_factor * 255).astype(np.uint8), wrapping.
  const auto shift = static_cast<uint8_t>(static_cast<int32_t>(static_cast<double>(factor) * 255.0));
  for (int64_t i = 0; i < p.n; ++i) {
    const int32_t r = p.r[i], g = p.g[i], b = p.b[i];
    const int32_t maxc = std::max(r, std::max(g, b));
    const int32_t minc = std::min(r, std::min(g, b));
    // rgb2hsv_row
    const bool flat = minc == maxc;
    const float cr = static_cast<float>(flat ? 1 : maxc - minc);
    const float sat = static_cast<float>(maxc - minc) / static_cast<float>(flat ? 1 : maxc);
    const float rc = static_cast<float>(maxc - r) / cr;
    const float gc = static_cast<float>(maxc - g) / cr;
    const float bc = static_cast<float>(maxc - b) / cr;
    // Every candidate computed, then one selected: no branch (the compiler does not speculate
    // floating-point work itself).
    const float hue_r = bc - gc;
    const float hue_g = static_cast<float>(2.0 + rc - bc);
    const float hue_b = static_cast<float>(4.0 + gc - rc);
    const double turns = (r == maxc ? hue_r : g == maxc ? hue_g : hue_b) / 6.0 + 1.0;
    const double turns_less_one = turns - 1.0;
    const float hue = static_cast<float>(turns >= 1.0 ? turns_less_one : turns);
    const int32_t h = flat ? 0 : clip8i(static_cast<int32_t>(hue * 255.0));
    const int32_t s = flat ? 0 : clip8i(static_cast<int32_t>(sat * 255.0));
    // the shift, then hsv2rgb
    const int32_t hh = (h + shift) & 255;
    const float f = tab.frac[hh];
    const float fs = tab.fs[s];
    const double v = static_cast<double>(static_cast<float>(maxc));
    const int32_t pp = clip8i(round_half_away(v * (1.0 - fs)));
    const int32_t qq = clip8i(round_half_away(v * (1.0 - fs * f)));
    const int32_t tt = clip8i(round_half_away(v * (1.0 - fs * (1.0 - f))));
    const int32_t sector = tab.sector[hh];
    const int32_t ro = sector == 0 || sector == 5 ? maxc : sector == 1 ? qq : sector == 4 ? tt : pp;
    const int32_t go = sector == 1 || sector == 2 ? maxc : sector == 0 ? tt : sector == 3 ? qq : pp;
    const int32_t bo = sector == 3 || sector == 4 ? maxc : sector == 2 ? tt : sector == 5 ? qq : pp;
    p.r[i] = static_cast<uint8_t>(s == 0 ? maxc : ro);
    p.g[i] = static_cast<uint8_t>(s == 0 ? maxc : go);
    p.b[i] = static_cast<uint8_t>(s == 0 ? maxc : bo);
  }
}

void grayscale(const Planes& p) {
  for (int64_t i = 0; i < p.n; ++i) p.r[i] = p.g[i] = p.b[i] = luma(p.r[i], p.g[i], p.b[i]);
}

void solarize(const Planes& p) {
  for (uint8_t* c : {p.r, p.g, p.b}) {
    for (int64_t i = 0; i < p.n; ++i) c[i] = c[i] >= 128 ? static_cast<uint8_t>(255 - c[i]) : c[i];
  }
}

inline int64_t reflect(int64_t i, int64_t n) {  // torch's "reflect" padding (the edge not repeated)
  return i < 0 ? -i : i >= n ? 2 * (n - 1) - i : i;
}

// The Gaussian of `k` taps at `sigma`, normalised (torchvision's _get_gaussian_kernel1d), applied
// along rows then columns of each plane, rounded to nearest (even) once. Each pass adds whole
// (reflect-padded) rows per tap, so the compiler vectorises over x.
FASTSSL_VECTOR_CLONES void gaussian_blur(const Planes& p, int64_t side, int64_t k, float sigma,
                                         std::vector<float>& tmp) {
  const int64_t r = k / 2;
  std::vector<float> w(k);
  float total = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    const float x = static_cast<float>(j - r) / sigma;
    w[j] = std::exp(-0.5f * x * x);
    total += w[j];
  }
  for (float& v : w) v /= total;
  tmp.resize(side * side);
  std::vector<float> padded(side + 2 * r), acc(side);
  for (uint8_t* c : {p.r, p.g, p.b}) {
    for (int64_t y = 0; y < side; ++y) {
      const uint8_t* row = c + y * side;
      for (int64_t x = 0; x < side + 2 * r; ++x) padded[x] = static_cast<float>(row[reflect(x - r, side)]);
      float* out = tmp.data() + y * side;
      std::fill(out, out + side, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const float wj = w[j];
        const float* src = padded.data() + j;
        for (int64_t x = 0; x < side; ++x) out[x] += wj * src[x];
      }
    }
    for (int64_t y = 0; y < side; ++y) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const float wj = w[j];
        const float* src = tmp.data() + reflect(y - r + j, side) * side;
        for (int64_t x = 0; x < side; ++x) acc[x] += wj * src[x];
      }
      uint8_t* dst = c + y * side;
      for (int64_t x = 0; x < side; ++x) dst[x] = static_cast<uint8_t>(std::clamp(std::nearbyint(acc[x]), 0.0f, 255.0f));
    }
  }
}

at::Tensor dino_color_u8_cpu(const at::Tensor& crops, const at::Tensor& order, const at::Tensor& factors,
                             const at::Tensor& jitter, const at::Tensor& gray, const at::Tensor& blur,
                             const at::Tensor& solar, const at::Tensor& sigma, const at::Tensor& kernel_size,
                             const at::Tensor& mean, const at::Tensor& stdev) {
  TORCH_CHECK(crops.dim() == 4 && crops.size(1) == 3 && crops.size(2) == crops.size(3) &&
                  crops.scalar_type() == at::kByte && crops.is_contiguous() && crops.device().is_cpu(),
              "dino_color_u8: crops must be a contiguous uint8 CPU tensor [N, 3, S, S], got ", crops.scalar_type(),
              " ", crops.sizes());
  const int64_t N = crops.size(0), S = crops.size(2);
  auto check = [&](const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const char* name) {
    TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous() && t.device().is_cpu(),
                "dino_color_u8: ", name, " must be a contiguous ", dtype, " CPU tensor of shape ", shape, ", got ",
                t.scalar_type(), " ", t.sizes());
  };
  check(order, at::kLong, {N, 4}, "order");
  check(factors, at::kFloat, {N, 4}, "factors");
  for (const auto& [t, name] : {std::pair{&jitter, "jitter"}, {&gray, "grayscale"}, {&blur, "blur"},
                                {&solar, "solarize"}}) {
    check(*t, at::kBool, {N}, name);
  }
  check(sigma, at::kFloat, {N}, "sigma");
  check(kernel_size, at::kLong, {N}, "kernel_size");
  check(mean, at::kFloat, {3}, "mean");
  check(stdev, at::kFloat, {3}, "std");
  at::Tensor out = at::empty({N, 3, S, S}, crops.options().dtype(at::kFloat));
  if (N == 0) return out;

  const auto* ord = order.const_data_ptr<int64_t>();
  const auto* fac = factors.const_data_ptr<float>();
  const auto* ks = kernel_size.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(!blur.const_data_ptr<bool>()[n] || (ks[n] >= 1 && ks[n] % 2 == 1 && ks[n] / 2 < S),
                "dino_color_u8: crop ", n, " has blur kernel size ", ks[n], "; it must be odd, positive and below "
                "twice the crop side ", S);
    for (int j = 0; j < 4; ++j) TORCH_CHECK(ord[4 * n + j] >= 0 && ord[4 * n + j] < 4, "dino_color_u8: bad order");
  }
  // ToTensor then Normalize, as the authors compute them in fp32: (v / 255 - mean) / std per value.
  std::array<std::array<float, 256>, 3> lut;
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) {
      lut[c][v] = (static_cast<float>(v) / 255.0f - mean.const_data_ptr<float>()[c]) / stdev.const_data_ptr<float>()[c];
    }
  }
  const int64_t plane = S * S;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> work(3 * plane);
    std::vector<float> tmp;
    for (int64_t n = begin; n < end; ++n) {
      std::memcpy(work.data(), crops.const_data_ptr<uint8_t>() + n * 3 * plane, 3 * plane);
      const Planes p{work.data(), work.data() + plane, work.data() + 2 * plane, plane};
      if (jitter.const_data_ptr<bool>()[n]) {
        for (int j = 0; j < 4; ++j) {
          const int64_t op = ord[4 * n + j];
          const float f = fac[4 * n + op];
          if (op == kBrightness) blend_all(p, 0, f);
          else if (op == kContrast) adjust_contrast(p, f);
          else if (op == kSaturation) adjust_saturation(p, f);
          else adjust_hue(p, f);
        }
      }
      if (gray.const_data_ptr<bool>()[n]) grayscale(p);
      if (blur.const_data_ptr<bool>()[n] && ks[n] > 1) {
        gaussian_blur(p, S, ks[n], sigma.const_data_ptr<float>()[n], tmp);
      }
      if (solar.const_data_ptr<bool>()[n]) solarize(p);
      float* dst = out.mutable_data_ptr<float>() + n * 3 * plane;
      for (int c = 0; c < 3; ++c) {
        const uint8_t* src = work.data() + c * plane;
        for (int64_t i = 0; i < plane; ++i) dst[c * plane + i] = lut[c][src[i]];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastssl, m) {
  m.set_python_module("fastssl._ext");
  m.def(
      "dino_color_u8(Tensor crops, Tensor order, Tensor factors, Tensor jitter, Tensor grayscale, Tensor blur, "
      "Tensor solarize, Tensor sigma, Tensor kernel_size, Tensor mean, Tensor std) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastssl, CPU, m) { m.impl("dino_color_u8", &dino_color_u8_cpu); }

}  // namespace fastssl
