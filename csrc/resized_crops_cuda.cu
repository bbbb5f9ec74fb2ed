// fastssl::resized_crops on CUDA: one launch for every crop of a call.
//
// The programs (what each thread computes) are in crop_programs.h, shared with the CPU, which runs
// them thread by thread in the tests. This file launches them: `resized_crops` runs the tiled
// program; `_resized_crops_program` runs the one it is asked for, so that the benchmark can weigh
// one against the other.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "crop_programs.h"
#include "ops.h"

namespace fastssl {

namespace {

// A CUDA block as run_tile wants it: a step on every thread, then a barrier; accumulators in registers.
struct CudaBlock {
  TileAcc acc_;
  template <typename Step>
  __device__ __forceinline__ void each(Step step) {
    step(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
  template <typename Step>
  __device__ __forceinline__ bool each_or(Step step) {
    return __syncthreads_or(step(static_cast<int>(threadIdx.x))) != 0;
  }
  template <typename Step>
  __device__ __forceinline__ void own(Step step) {
    step(static_cast<int>(threadIdx.x));
  }
  __device__ __forceinline__ TileAcc& acc(int) { return acc_; }
};

// Blocks of the tiled program resident per SM, at least: caps the registers a thread may take
// (65536 / (256 * 2) = 128; it takes 110-115). 3 (85 registers) spills, which CI refuses.
constexpr int kTileMinBlocks = 2;

// __grid_constant__: the programs take the arguments by reference without a per-thread copy.
template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kTileThreads, kTileMinBlocks)
    tiled_kernel(const __grid_constant__ CropArgs<in_t, out_t> a, uint32_t tiles_x, uint32_t strips_y) {
  extern __shared__ __align__(16) unsigned char smem[];  // TileShared, then the stage
  const CropTile<in_t, out_t> tile(a, *reinterpret_cast<TileShared*>(smem), smem + sizeof(TileShared), blockIdx.x,
                                   tiles_x, strips_y);
  CudaBlock block;
  run_tile(tile, block);
}

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kPixelThreads) pixel_kernel(const __grid_constant__ CropArgs<in_t, out_t> a) {
  const int64_t total = a.N * a.S * a.S;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    crop_pixel(a, i / (a.S * a.S), (i / a.S) % a.S, i % a.S);
  }
}

template <typename in_t, typename out_t>
void launch(const CropArgs<in_t, out_t>& a, CropProgram program, cudaStream_t stream) {
  if (program == CropProgram::kTiled && tiled_fits(a)) {
    const int64_t tiles_x = tiles_along(a.S, kTileX), strips_y = tiles_along(a.S, kStripRows);
    const int64_t blocks = a.N * tiles_x * strips_y;
    TORCH_CHECK(blocks < (int64_t{1} << 31) && a.N < (int64_t{1} << 31), "resized_crops: ", a.N, " crops of ",
                a.S, "x", a.S, " need more blocks than one launch holds; split the boxes");
    // More than the 48 KB of shared memory a block gets without asking.
    C10_CUDA_CHECK(cudaFuncSetAttribute(tiled_kernel<in_t, out_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kTileSharedBytes));
    tiled_kernel<in_t, out_t><<<static_cast<unsigned int>(blocks), kTileThreads, kTileSharedBytes, stream>>>(
        a, static_cast<uint32_t>(tiles_x), static_cast<uint32_t>(strips_y));
  } else {
    const int64_t blocks = (a.N * a.S * a.S + kPixelThreads - 1) / kPixelThreads;
    const unsigned int grid = static_cast<unsigned int>(blocks < (int64_t{1} << 30) ? blocks : (int64_t{1} << 30));
    pixel_kernel<in_t, out_t><<<grid, kPixelThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor crops_cuda(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                      const std::optional<at::Tensor>& flips, int64_t channels, int64_t size,
                      const std::string& interpolation, bool antialias, const std::optional<at::Tensor>& mean,
                      const std::optional<at::Tensor>& stdev, double input_scale, at::ScalarType out_dtype,
                      bool channels_last, int64_t crops_per_image, CropProgram program) {
  const int interp = check_resized_crops_args(data, image_info, boxes, flips, channels, size, interpolation, mean,
                                              stdev, out_dtype);
  check_crops_per_image(crops_per_image, boxes.size(0));
  c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out = empty_crops(data, boxes.size(0), channels, size, out_dtype, channels_last);
  if (boxes.size(0) == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(data.device().index()).stream();
  with_crop_args(data, image_info, boxes, flips, mean, stdev, channels, size, interp == kBicubic, antialias,
                 input_scale, crops_per_image, out, [&](const auto& args) { launch(args, program, stream); });
  return out;
}

at::Tensor resized_crops_cuda(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                              const std::optional<at::Tensor>& flips, int64_t channels, int64_t size,
                              std::string interpolation, bool antialias, const std::optional<at::Tensor>& mean,
                              const std::optional<at::Tensor>& stdev, double input_scale, at::ScalarType out_dtype,
                              bool channels_last, int64_t crops_per_image) {
  return crops_cuda(data, image_info, boxes, flips, channels, size, interpolation, antialias, mean, stdev,
                    input_scale, out_dtype, channels_last, crops_per_image, CropProgram::kTiled);
}

at::Tensor resized_crops_program_cuda(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                                      const std::optional<at::Tensor>& flips, int64_t channels, int64_t size,
                                      std::string interpolation, bool antialias,
                                      const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& stdev,
                                      double input_scale, at::ScalarType out_dtype, bool channels_last,
                                      int64_t crops_per_image, std::string program) {
  return crops_cuda(data, image_info, boxes, flips, channels, size, interpolation, antialias, mean, stdev,
                    input_scale, out_dtype, channels_last, crops_per_image, parse_crop_program(program));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastssl, CUDA, m) {
  m.impl("resized_crops", &resized_crops_cuda);
  m.impl("_resized_crops_program", &resized_crops_program_cuda);
}

}  // namespace fastssl
