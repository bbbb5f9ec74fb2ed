// fastssl::resized_crops on CUDA: one launch for every crop of a call.
//
// One thread per output pixel (crop n, row y, column x), a grid-stride loop over all N * S * S
// of them: the thread computes the two axes' taps of its pixel (resample.h, the same math as the
// CPU kernel), sums the separable product over the window for up to four channels at a time
// (horizontal first, as the CPU kernel), normalises and stores. Images of different sizes are
// one flat buffer with per-image offsets and shapes, so crops of any image share the launch.
//
// The values of the boxes are validated by the Python wrapper (a device sync here); the kernel
// clamps image indices and taps into range, so a bad box reads wrong pixels, never out of bounds.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>

#include "ops.h"
#include "resample.h"

namespace fastssl {

namespace {

constexpr int kThreads = 256;
constexpr int kChannelChunk = 4;

template <typename out_t>
__device__ __forceinline__ out_t store_value(float v) {
  return static_cast<out_t>(v);
}

template <>
__device__ __forceinline__ uint8_t store_value<uint8_t>(float v) {
  v = nearbyintf(v);
  return static_cast<uint8_t>(fminf(fmaxf(v, 0.f), 255.f));
}

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    resized_crops_kernel(const in_t* __restrict__ src, const int64_t* __restrict__ info,
                         const float* __restrict__ boxes, const bool* __restrict__ flips,
                         const float* __restrict__ mean, const float* __restrict__ stdev, int64_t B, int64_t N,
                         int64_t C, int64_t S, bool cubic, bool antialias, float input_scale,
                         out_t* __restrict__ dst, int64_t sn, int64_t sc, int64_t sy, int64_t sx) {
  const int64_t total = N * S * S;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t x = idx % S;
    const int64_t y = (idx / S) % S;
    const int64_t n = idx / (S * S);
    const float* b = boxes + n * kBoxCols;
    int64_t img = static_cast<int64_t>(b[0]);
    img = img < 0 ? 0 : (img >= B ? B - 1 : img);
    const int64_t offset = info[img * kInfoCols];
    const int64_t H = info[img * kInfoCols + 1];
    const int64_t W = info[img * kInfoCols + 2];
    const bool flip = flips != nullptr && flips[n];
    const AxisTaps ty = axis_taps(b[1], b[3], H, S, y, cubic, antialias);
    const AxisTaps tx = axis_taps(b[2], b[4], W, S, flip ? S - 1 - x : x, cubic, antialias);
    const int64_t plane = H * W;
    out_t* o = dst + n * sn + y * sy + x * sx;

    for (int64_t c0 = 0; c0 < C; c0 += kChannelChunk) {
      const int64_t nc = C - c0 < kChannelChunk ? C - c0 : kChannelChunk;
      const in_t* base = src + offset + c0 * plane;
      float acc[kChannelChunk] = {0.f, 0.f, 0.f, 0.f};
      for (int ky = 0; ky < ty.count; ++ky) {
        int64_t iy;
        const float wy = tap(ty, ky, iy);
        if (wy == 0.f) continue;
        float row[kChannelChunk] = {0.f, 0.f, 0.f, 0.f};
        for (int kx = 0; kx < tx.count; ++kx) {
          int64_t ix;
          const float wx = tap(tx, kx, ix);
          const in_t* p = base + iy * W + ix;
#pragma unroll
          for (int c = 0; c < kChannelChunk; ++c) {
            if (c < nc) row[c] += wx * static_cast<float>(p[c * plane]);
          }
        }
#pragma unroll
        for (int c = 0; c < kChannelChunk; ++c) acc[c] += wy * row[c];
      }
#pragma unroll
      for (int c = 0; c < kChannelChunk; ++c) {
        if (c < nc) {
          const int64_t ch = c0 + c;
          const float inv = stdev != nullptr ? 1.f / stdev[ch] : 1.f;
          const float shift = mean != nullptr ? -mean[ch] * inv : 0.f;
          o[ch * sc] = store_value<out_t>(acc[c] * (input_scale * inv) + shift);
        }
      }
    }
  }
}

template <typename in_t, typename out_t>
void launch(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
            const std::optional<at::Tensor>& flips, const std::optional<at::Tensor>& mean,
            const std::optional<at::Tensor>& stdev, int64_t C, int64_t S, bool cubic, bool antialias,
            float input_scale, at::Tensor& out) {
  const int64_t N = boxes.size(0);
  const int64_t total = N * S * S;
  const int64_t blocks64 = (total + kThreads - 1) / kThreads;
  const unsigned int blocks = static_cast<unsigned int>(blocks64 < (1LL << 30) ? blocks64 : (1LL << 30));
  auto stream = c10::cuda::getCurrentCUDAStream(data.device().index());
  resized_crops_kernel<in_t, out_t><<<blocks, kThreads, 0, stream.stream()>>>(
      data.const_data_ptr<in_t>(), image_info.const_data_ptr<int64_t>(), boxes.const_data_ptr<float>(),
      flips.has_value() ? flips->const_data_ptr<bool>() : nullptr,
      mean.has_value() ? mean->const_data_ptr<float>() : nullptr,
      stdev.has_value() ? stdev->const_data_ptr<float>() : nullptr, image_info.size(0), N, C, S, cubic, antialias,
      input_scale, out.mutable_data_ptr<out_t>(), out.stride(0), out.stride(1), out.stride(2), out.stride(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename in_t>
void launch_out(at::ScalarType out_dtype, const at::Tensor& data, const at::Tensor& image_info,
                const at::Tensor& boxes, const std::optional<at::Tensor>& flips,
                const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& stdev, int64_t C, int64_t S,
                bool cubic, bool antialias, float input_scale, at::Tensor& out) {
  switch (out_dtype) {
    case at::kFloat:
      return launch<in_t, float>(data, image_info, boxes, flips, mean, stdev, C, S, cubic, antialias, input_scale,
                                 out);
    case at::kHalf:
      return launch<in_t, c10::Half>(data, image_info, boxes, flips, mean, stdev, C, S, cubic, antialias,
                                     input_scale, out);
    case at::kBFloat16:
      return launch<in_t, c10::BFloat16>(data, image_info, boxes, flips, mean, stdev, C, S, cubic, antialias,
                                         input_scale, out);
    case at::kByte:
      return launch<in_t, uint8_t>(data, image_info, boxes, flips, mean, stdev, C, S, cubic, antialias,
                                   input_scale, out);
    default:
      TORCH_CHECK(false, "resized_crops: unsupported out_dtype ", out_dtype);
  }
}

at::Tensor resized_crops_cuda(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                              const std::optional<at::Tensor>& flips, int64_t channels, int64_t size,
                              std::string interpolation, bool antialias, const std::optional<at::Tensor>& mean,
                              const std::optional<at::Tensor>& stdev, double input_scale, at::ScalarType out_dtype,
                              bool channels_last) {
  const int interp = check_resized_crops_args(data, image_info, boxes, flips, channels, size, interpolation, mean,
                                              stdev, out_dtype);
  c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out = empty_crops(data, boxes.size(0), channels, size, out_dtype, channels_last);
  if (boxes.size(0) == 0) return out;
  const bool cubic = interp == kBicubic;
  const float scale = static_cast<float>(input_scale);
  switch (data.scalar_type()) {
    case at::kByte:
      launch_out<uint8_t>(out_dtype, data, image_info, boxes, flips, mean, stdev, channels, size, cubic, antialias,
                          scale, out);
      break;
    case at::kFloat:
      launch_out<float>(out_dtype, data, image_info, boxes, flips, mean, stdev, channels, size, cubic, antialias,
                        scale, out);
      break;
    case at::kHalf:
      launch_out<c10::Half>(out_dtype, data, image_info, boxes, flips, mean, stdev, channels, size, cubic,
                            antialias, scale, out);
      break;
    case at::kBFloat16:
      launch_out<c10::BFloat16>(out_dtype, data, image_info, boxes, flips, mean, stdev, channels, size, cubic,
                                antialias, scale, out);
      break;
    default:
      TORCH_CHECK(false, "resized_crops: unsupported image dtype ", data.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastssl, CUDA, m) { m.impl("resized_crops", &resized_crops_cuda); }

}  // namespace fastssl
