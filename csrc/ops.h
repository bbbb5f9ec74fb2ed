// Declarations shared by the CPU and CUDA implementations of the fastssl ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

namespace fastssl {

// The schema (registered in resized_crops.cpp):
//
//   fastssl::resized_crops(Tensor data, Tensor image_info, Tensor boxes, Tensor? flips, int channels,
//                          int size, str interpolation, bool antialias, Tensor? mean, Tensor? std,
//                          float input_scale, ScalarType out_dtype, bool channels_last) -> Tensor
//
// data: every image packed into one flat buffer, channel-major ([C, H_i, W_i] each);
// image_info: int64 [B, 3] rows (offset into data, H_i, W_i); boxes: float32 [N, 5] rows
// (image index, top, left, height, width); flips: bool [N]; mean, std: float32 [channels].
// Output [N, channels, size, size]: ((resampled * input_scale) - mean) / std, cast to out_dtype
// (uint8: rounded and clamped to [0, 255]).

// Checks shared by both devices (shapes, dtypes, devices; not the values of the boxes, which
// would need a device sync on CUDA); returns the parsed interpolation.
int check_resized_crops_args(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                             const std::optional<at::Tensor>& flips, int64_t channels, int64_t size,
                             const std::string& interpolation, const std::optional<at::Tensor>& mean,
                             const std::optional<at::Tensor>& stdev, at::ScalarType out_dtype);

at::Tensor empty_crops(const at::Tensor& data, int64_t n, int64_t channels, int64_t size, at::ScalarType out_dtype,
                       bool channels_last);


}  // namespace fastssl
