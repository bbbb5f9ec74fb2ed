// Declarations shared by the CPU and CUDA implementations of the fastssl ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>

#include "crop_programs.h"

namespace fastssl {

// The schema (registered in resized_crops.cpp):
//
//   fastssl::resized_crops(Tensor data, Tensor image_info, Tensor boxes, Tensor? flips, int channels,
//                          int size, str interpolation, bool antialias, Tensor? mean, Tensor? std,
//                          float input_scale, ScalarType out_dtype, bool channels_last,
//                          int crops_per_image=0) -> Tensor
//
// data: every image packed into one flat buffer, channel-major ([C, H_i, W_i] each);
// image_info: int64 [B, 3] rows (offset into data, H_i, W_i); boxes: float32 [N, 5] rows
// (image index, top, left, height, width); flips: bool [N]; mean, std: float32 [channels].
// Output [N, channels, size, size]: ((resampled * input_scale) - mean) / std, cast to out_dtype
// (uint8: rounded and clamped to [0, 255]). crops_per_image = K > 0 says the boxes are crop-major
// (box k * N / K + i is crop k of image i): the CUDA kernel then makes the crops image by image.
//
//   fastssl::_resized_crops_program(<the same arguments>, str program) -> Tensor
//
// runs one named GPU program of crop_programs.h ('pixel' or 'tiled'): launched on CUDA (for the
// benchmark), emulated thread by thread on CPU (for the tests). resized_crops on CUDA is 'tiled'.

// Checks shared by both devices (shapes, dtypes, devices; not the values of the boxes, which
// would need a device sync on CUDA); returns the parsed interpolation.
int check_resized_crops_args(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                             const std::optional<at::Tensor>& flips, int64_t channels, int64_t size,
                             const std::string& interpolation, const std::optional<at::Tensor>& mean,
                             const std::optional<at::Tensor>& stdev, at::ScalarType out_dtype);

at::Tensor empty_crops(const at::Tensor& data, int64_t n, int64_t channels, int64_t size, at::ScalarType out_dtype,
                       bool channels_last);

// The GPU programs (crop_programs.h), by name: what `_resized_crops_program` takes.
enum class CropProgram { kPixel, kTiled };

inline CropProgram parse_crop_program(const std::string& name) {
  TORCH_CHECK(name == "pixel" || name == "tiled", "_resized_crops_program: program must be 'pixel' or 'tiled', got '",
              name, "'");
  return name == "pixel" ? CropProgram::kPixel : CropProgram::kTiled;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<in_t>{}, TypeTag<out_t>{}) for the images' and the output's dtypes (both already
// checked by check_resized_crops_args).
template <typename F>
void dispatch_crop_dtypes(at::ScalarType in, at::ScalarType out, F&& f) {
  auto with_out = [&](auto in_tag) {
    switch (out) {
      case at::kFloat: return f(in_tag, TypeTag<float>{});
      case at::kHalf: return f(in_tag, TypeTag<c10::Half>{});
      case at::kBFloat16: return f(in_tag, TypeTag<c10::BFloat16>{});
      case at::kByte: return f(in_tag, TypeTag<uint8_t>{});
      default: TORCH_CHECK(false, "resized_crops: unsupported out_dtype ", out);
    }
  };
  switch (in) {
    case at::kByte: return with_out(TypeTag<uint8_t>{});
    case at::kFloat: return with_out(TypeTag<float>{});
    case at::kHalf: return with_out(TypeTag<c10::Half>{});
    case at::kBFloat16: return with_out(TypeTag<c10::BFloat16>{});
    default: TORCH_CHECK(false, "resized_crops: unsupported image dtype ", in);
  }
}

inline void check_crops_per_image(int64_t crops_per_image, int64_t n_boxes) {
  TORCH_CHECK(crops_per_image >= 0 && (crops_per_image == 0 || n_boxes % crops_per_image == 0),
              "resized_crops: crops_per_image must be 0 or divide the number of boxes (", n_boxes, "), got ",
              crops_per_image);
}

// Calls f(args) with the CropArgs<in_t, out_t> of a call, for the images' and the output's dtypes.
template <typename F>
void with_crop_args(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                    const std::optional<at::Tensor>& flips, const std::optional<at::Tensor>& mean,
                    const std::optional<at::Tensor>& stdev, int64_t channels, int64_t size, bool cubic, bool antialias,
                    double input_scale, int64_t crops_per_image, at::Tensor& out, F&& f) {
  dispatch_crop_dtypes(data.scalar_type(), out.scalar_type(), [&](auto in_tag, auto out_tag) {
    using in_t = typename decltype(in_tag)::type;
    using out_t = typename decltype(out_tag)::type;
    CropArgs<in_t, out_t> a;
    a.src = data.const_data_ptr<in_t>();
    a.info = image_info.const_data_ptr<int64_t>();
    a.boxes = boxes.const_data_ptr<float>();
    a.flips = flips.has_value() ? flips->const_data_ptr<bool>() : nullptr;
    a.mean = mean.has_value() ? mean->const_data_ptr<float>() : nullptr;
    a.stdev = stdev.has_value() ? stdev->const_data_ptr<float>() : nullptr;
    a.crops_per_image = crops_per_image;
    a.B = image_info.size(0);
    a.N = boxes.size(0);
    a.C = channels;
    a.S = size;
    a.cubic = cubic;
    a.antialias = antialias;
    a.input_scale = static_cast<float>(input_scale);
    a.dst = out.mutable_data_ptr<out_t>();
    a.sn = out.stride(0);
    a.sc = out.stride(1);
    a.sy = out.stride(2);
    a.sx = out.stride(3);
    f(a);
  });
}


}  // namespace fastssl
