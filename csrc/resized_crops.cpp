// fastssl::resized_crops: the schema, the shared argument checks and the CPU kernel.
//
// Every crop is independent: at::parallel_for runs over crops. Per crop, the per-axis taps
// (resample.h) are computed once, then a horizontal pass over the box's rows into a float
// buffer and a vertical pass into the output, with the normalisation and the cast folded into
// the store. uint8 images to uint8 crops take torch's fixed-point path instead (resample_uint8.h),
// what torchvision computes for uint8 images on CPU.

#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

// The CPU runs the GPU programs only to test them: every source read checked (crop_programs.h).
#define FASTSSL_CHECK_READS 1
#include "cpu_clones.h"
#include "crop_programs.h"
#include "ops.h"
#include "resample.h"
#include "resample_uint8.h"

namespace fastssl {

namespace {

bool is_supported_input(at::ScalarType t) {
  return t == at::kByte || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_supported_output(at::ScalarType t) {
  return t == at::kByte || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

int check_resized_crops_args(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                             const std::optional<at::Tensor>& flips, int64_t channels, int64_t size,
                             const std::string& interpolation, const std::optional<at::Tensor>& mean,
                             const std::optional<at::Tensor>& stdev, at::ScalarType out_dtype) {
  TORCH_CHECK(interpolation == "bilinear" || interpolation == "bicubic",
              "resized_crops: interpolation must be 'bilinear' or 'bicubic', got '", interpolation, "'");
  TORCH_CHECK(size > 0, "resized_crops: size must be positive, got ", size);
  TORCH_CHECK(channels > 0, "resized_crops: channels must be positive, got ", channels);
  TORCH_CHECK(data.dim() == 1 && data.is_contiguous(), "resized_crops: data must be a contiguous 1-D buffer, got ",
              data.sizes());
  TORCH_CHECK(is_supported_input(data.scalar_type()),
              "resized_crops: images must be uint8, float32, float16 or bfloat16, got ", data.scalar_type());
  TORCH_CHECK(is_supported_output(out_dtype),
              "resized_crops: out_dtype must be uint8, float32, float16 or bfloat16, got ", out_dtype);
  TORCH_CHECK(image_info.dim() == 2 && image_info.size(1) == kInfoCols && image_info.size(0) > 0 &&
                  image_info.scalar_type() == at::kLong && image_info.is_contiguous(),
              "resized_crops: image_info must be a contiguous int64 [B, 3] tensor with B > 0, got ",
              image_info.scalar_type(), " ", image_info.sizes());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == kBoxCols && boxes.scalar_type() == at::kFloat &&
                  boxes.is_contiguous(),
              "resized_crops: boxes must be a contiguous float32 [N, 5] tensor, got ", boxes.scalar_type(), " ",
              boxes.sizes());
  const auto dev = data.device();
  TORCH_CHECK(image_info.device() == dev && boxes.device() == dev,
              "resized_crops: data, image_info and boxes must be on one device, got ", dev, ", ",
              image_info.device(), ", ", boxes.device());
  if (flips.has_value()) {
    TORCH_CHECK(flips->dim() == 1 && flips->size(0) == boxes.size(0) && flips->scalar_type() == at::kBool &&
                    flips->is_contiguous() && flips->device() == dev,
                "resized_crops: flips must be a contiguous bool [N] tensor on ", dev, " with N=", boxes.size(0),
                ", got ", flips->scalar_type(), " ", flips->sizes(), " on ", flips->device());
  }
  for (const auto* t : {&mean, &stdev}) {
    if (t->has_value()) {
      const at::Tensor& v = t->value();
      TORCH_CHECK(v.dim() == 1 && v.size(0) == channels && v.scalar_type() == at::kFloat && v.is_contiguous() &&
                      v.device() == dev,
                  "resized_crops: mean and std must be contiguous float32 [C] tensors on ", dev, " with C=",
                  channels, ", got ", v.scalar_type(), " ", v.sizes(), " on ", v.device());
    }
  }
  return interpolation == "bicubic" ? kBicubic : kBilinear;
}

at::Tensor empty_crops(const at::Tensor& data, int64_t n, int64_t channels, int64_t size, at::ScalarType out_dtype,
                       bool channels_last) {
  auto opts = data.options().dtype(out_dtype);
  if (channels_last) {
    return at::empty({n, channels, size, size}, opts, at::MemoryFormat::ChannelsLast);
  }
  return at::empty({n, channels, size, size}, opts);
}

namespace {

struct Axis {
  int width = 0;                 // taps per output (the widest window along the axis)
  std::vector<int64_t> index;    // [out_size * width]
  std::vector<float> weight;     // [out_size * width], 0 for padding taps
};

Axis make_axis(float origin, float length, int64_t extent, int64_t out_size, bool cubic, bool antialias,
               bool flip) {
  std::vector<AxisTaps> taps(out_size);
  int width = 1;
  for (int64_t i = 0; i < out_size; ++i) {
    taps[i] = axis_taps(origin, length, extent, out_size, flip ? out_size - 1 - i : i, cubic, antialias);
    width = std::max(width, taps[i].count);
  }
  Axis a;
  a.width = width;
  a.index.assign(out_size * width, taps.empty() ? 0 : taps[0].lo);
  a.weight.assign(out_size * width, 0.f);
  for (int64_t i = 0; i < out_size; ++i) {
    for (int k = 0; k < taps[i].count; ++k) {
      a.weight[i * width + k] = tap(taps[i], k, a.index[i * width + k]);
    }
  }
  return a;
}

template <typename in_t, typename out_t>
void crops_cpu_kernel(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                      const std::optional<at::Tensor>& flips, const std::optional<at::Tensor>& mean,
                      const std::optional<at::Tensor>& stdev, int64_t C, int64_t S, bool cubic, bool antialias,
                      float input_scale, at::Tensor& out) {
  const in_t* src = data.const_data_ptr<in_t>();
  const int64_t* info = image_info.const_data_ptr<int64_t>();
  const float* box = boxes.const_data_ptr<float>();
  const bool* flip = flips.has_value() ? flips->const_data_ptr<bool>() : nullptr;
  const float* mu = mean.has_value() ? mean->const_data_ptr<float>() : nullptr;
  const float* sd = stdev.has_value() ? stdev->const_data_ptr<float>() : nullptr;
  out_t* dst = out.mutable_data_ptr<out_t>();
  const int64_t sn = out.stride(0), sc = out.stride(1), sy = out.stride(2), sx = out.stride(3);
  const int64_t N = boxes.size(0);

  std::vector<float> shift(C, 0.f), mult(C, input_scale);
  for (int64_t c = 0; c < C; ++c) {
    const float inv = sd ? 1.f / sd[c] : 1.f;
    mult[c] = input_scale * inv;
    shift[c] = mu ? -mu[c] * inv : 0.f;
  }

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows;
    for (int64_t n = begin; n < end; ++n) {
      const float* b = box + n * kBoxCols;
      const int64_t img = static_cast<int64_t>(b[0]);
      const int64_t offset = info[img * kInfoCols], H = info[img * kInfoCols + 1], W = info[img * kInfoCols + 2];
      const Axis ay = make_axis(b[1], b[3], H, S, cubic, antialias, false);
      const Axis ax = make_axis(b[2], b[4], W, S, cubic, antialias, flip != nullptr && flip[n]);
      // The box's rows [y0, y1): every row a vertical tap can land on.
      const int64_t y0 = *std::min_element(ay.index.begin(), ay.index.end());
      const int64_t y1 = *std::max_element(ay.index.begin(), ay.index.end()) + 1;
      const int64_t R = y1 - y0;
      rows.assign(C * R * S, 0.f);
      // Horizontal pass: rows[c][r][x] = sum_k wx * image[c][y0 + r][ix].
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t r = 0; r < R; ++r) {
          const in_t* line = src + offset + (c * H + y0 + r) * W;
          float* o = rows.data() + (c * R + r) * S;
          for (int64_t x = 0; x < S; ++x) {
            const int64_t* ix = ax.index.data() + x * ax.width;
            const float* wx = ax.weight.data() + x * ax.width;
            float acc = 0.f;
            for (int k = 0; k < ax.width; ++k) acc += wx[k] * static_cast<float>(line[ix[k]]);
            o[x] = acc;
          }
        }
      }
      // Vertical pass, then normalise and store.
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t y = 0; y < S; ++y) {
          const int64_t* iy = ay.index.data() + y * ay.width;
          const float* wy = ay.weight.data() + y * ay.width;
          out_t* o = dst + n * sn + c * sc + y * sy;
          for (int64_t x = 0; x < S; ++x) {
            float acc = 0.f;
            for (int k = 0; k < ay.width; ++k) acc += wy[k] * rows[(c * R + iy[k] - y0) * S + x];
            o[x * sx] = store_value<out_t>(acc * mult[c] + shift[c]);
          }
        }
      }
    }
  });
}

// uint8 to uint8 (no normalisation): torch's fixed-point separable resize, horizontal pass first
// into an intermediate uint8 image, then the vertical pass (resample_uint8.h).
// One crop of the fixed-point path: the horizontal pass on the box transposed (a column of R
// values contiguous, so each tap is one weight times a whole column), then the vertical pass a
// whole intermediate row per tap: the compiler vectorises both (for AVX-512 and AVX2 too).
FASTSSL_VECTOR_CLONES void fixed_point_crop(const uint8_t* image, int64_t H, int64_t W, int64_t C, int64_t S,
                                            const FixedAxis& ay, const FixedAxis& ax, uint8_t* dst, int64_t sc,
                                            int64_t sy, int64_t sx, std::vector<uint8_t>& rows,
                                            std::vector<uint8_t>& columns, std::vector<int32_t>& acc) {
  const int64_t y0 = *std::min_element(ay.index.begin(), ay.index.end());
  const int64_t R = *std::max_element(ay.index.begin(), ay.index.end()) + 1 - y0;
  const int64_t x0 = *std::min_element(ax.index.begin(), ax.index.end());
  const int64_t X = *std::max_element(ax.index.begin(), ax.index.end()) + 1 - x0;
  const int32_t half_x = ax.precision > 0 ? 1 << (ax.precision - 1) : 0;
  const int32_t half_y = ay.precision > 0 ? 1 << (ay.precision - 1) : 0;
  rows.resize(C * R * S);
  columns.resize(X * R);
  acc.resize(std::max(R, S));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t r = 0; r < R; ++r) {
      const uint8_t* line = image + (c * H + y0 + r) * W + x0;
      for (int64_t x = 0; x < X; ++x) columns[x * R + r] = line[x];
    }
    for (int64_t x = 0; x < S; ++x) {
      const int64_t* ix = ax.index.data() + x * ax.width;
      const int32_t* wx = ax.weight.data() + x * ax.width;
      std::fill(acc.begin(), acc.begin() + R, half_x);
      for (int k = 0; k < ax.width; ++k) {
        const int32_t w = wx[k];
        if (w == 0) continue;  // a padding tap
        const uint8_t* column = columns.data() + (ix[k] - x0) * R;
        for (int64_t r = 0; r < R; ++r) acc[r] += w * static_cast<int32_t>(column[r]);
      }
      uint8_t* o = rows.data() + c * R * S + x;
      for (int64_t r = 0; r < R; ++r) o[r * S] = clamp_shifted(acc[r], ax.precision);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t y = 0; y < S; ++y) {
      const int64_t* iy = ay.index.data() + y * ay.width;
      const int32_t* wy = ay.weight.data() + y * ay.width;
      std::fill(acc.begin(), acc.begin() + S, half_y);
      for (int k = 0; k < ay.width; ++k) {
        const int32_t w = wy[k];
        if (w == 0) continue;
        const uint8_t* row = rows.data() + (c * R + iy[k] - y0) * S;
        for (int64_t x = 0; x < S; ++x) acc[x] += w * static_cast<int32_t>(row[x]);
      }
      uint8_t* o = dst + c * sc + y * sy;
      for (int64_t x = 0; x < S; ++x) o[x * sx] = clamp_shifted(acc[x], ay.precision);
    }
  }
}

void crops_cpu_uint8_fixed(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                           const std::optional<at::Tensor>& flips, int64_t C, int64_t S, bool cubic, bool antialias,
                           at::Tensor& out) {
  const uint8_t* src = data.const_data_ptr<uint8_t>();
  const int64_t* info = image_info.const_data_ptr<int64_t>();
  const float* box = boxes.const_data_ptr<float>();
  const bool* flip = flips.has_value() ? flips->const_data_ptr<bool>() : nullptr;
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  const int64_t sn = out.stride(0), sc = out.stride(1), sy = out.stride(2), sx = out.stride(3);
  const int64_t N = boxes.size(0);

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> rows, columns;
    std::vector<int32_t> acc;
    for (int64_t n = begin; n < end; ++n) {
      const float* b = box + n * kBoxCols;
      const int64_t img = static_cast<int64_t>(b[0]);
      const int64_t offset = info[img * kInfoCols], H = info[img * kInfoCols + 1], W = info[img * kInfoCols + 2];
      const FixedAxis ay = make_fixed_axis(b[1], b[3], H, S, cubic, antialias, false);
      const FixedAxis ax = make_fixed_axis(b[2], b[4], W, S, cubic, antialias, flip != nullptr && flip[n]);
      fixed_point_crop(src + offset, H, W, C, S, ay, ax, dst + n * sn, sc, sy, sx, rows, columns, acc);
    }
  });
}

// The values of the boxes: each inside its image, positive sides, a valid image index.
void check_box_values(const at::Tensor& image_info, const at::Tensor& boxes) {
  const int64_t B = image_info.size(0);
  const int64_t* info = image_info.const_data_ptr<int64_t>();
  const float* box = boxes.const_data_ptr<float>();
  for (int64_t n = 0; n < boxes.size(0); ++n) {
    const float* b = box + n * kBoxCols;
    const float idx = b[0];
    TORCH_CHECK(idx >= 0 && idx < static_cast<float>(B) && std::floor(idx) == idx, "resized_crops: box ", n,
                " has image index ", idx, ", out of range for ", B, " images");
    const int64_t i = static_cast<int64_t>(idx);
    const int64_t H = info[i * kInfoCols + 1], W = info[i * kInfoCols + 2];
    // Written so that NaN fails every check; a box starts inside its image (top < H, left < W).
    TORCH_CHECK(b[3] > 0 && b[4] > 0, "resized_crops: box ", n, " has non-positive height/width (", b[3], ", ",
                b[4], ")");
    TORCH_CHECK(b[1] >= 0 && b[2] >= 0 && b[1] < static_cast<float>(H) && b[2] < static_cast<float>(W) &&
                    b[1] + b[3] <= static_cast<float>(H) + 1e-3f && b[2] + b[4] <= static_cast<float>(W) + 1e-3f,
                "resized_crops: box ", n, " (top=", b[1], ", left=", b[2], ", height=", b[3], ", width=", b[4],
                ") is outside its image ", i, " of height ", H, " and width ", W);
  }
}

at::Tensor resized_crops_cpu(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                             const std::optional<at::Tensor>& flips, int64_t channels, int64_t size,
                             std::string interpolation, bool antialias, const std::optional<at::Tensor>& mean,
                             const std::optional<at::Tensor>& stdev, double input_scale, at::ScalarType out_dtype,
                             bool channels_last, int64_t crops_per_image) {
  const int interp = check_resized_crops_args(data, image_info, boxes, flips, channels, size, interpolation, mean,
                                              stdev, out_dtype);
  check_crops_per_image(crops_per_image, boxes.size(0));  // the order of the GPU's blocks; none here
  check_box_values(image_info, boxes);
  at::Tensor out = empty_crops(data, boxes.size(0), channels, size, out_dtype, channels_last);
  if (boxes.size(0) == 0) return out;
  const bool cubic = interp == kBicubic;
  const float scale = static_cast<float>(input_scale);
  if (data.scalar_type() == at::kByte && out_dtype == at::kByte && !mean.has_value() && !stdev.has_value()) {
    crops_cpu_uint8_fixed(data, image_info, boxes, flips, channels, size, cubic, antialias, out);
    return out;
  }
  dispatch_crop_dtypes(data.scalar_type(), out_dtype, [&](auto in_tag, auto out_tag) {
    crops_cpu_kernel<typename decltype(in_tag)::type, typename decltype(out_tag)::type>(
        data, image_info, boxes, flips, mean, stdev, channels, size, cubic, antialias, scale, out);
  });
  return out;
}

// The CPU as a GPU: one of the GPU programs (crop_programs.h) run thread by thread, a step of every
// thread of a block before the next step, so that the tests check the CUDA kernels' indexing here.
// Odd blocks run their threads in reverse order and find shared memory poisoned with another
// pattern: a step that read what another thread of the same step writes would then differ.
struct EmulatedBlock {
  std::vector<TileAcc> accs = std::vector<TileAcc>(kTileThreads);
  bool reverse = false;
  template <typename Step>
  void own(Step step) {
    for (int i = 0; i < kTileThreads; ++i) step(reverse ? kTileThreads - 1 - i : i);
  }
  template <typename Step>
  void each(Step step) {
    own(step);
  }
  template <typename Step>
  bool each_or(Step step) {
    bool any = false;
    own([&](int tid) { any = step(tid) || any; });
    return any;
  }
  TileAcc& acc(int tid) { return accs[tid]; }
};

template <typename in_t, typename out_t>
void emulate_program(const CropArgs<in_t, out_t>& a, CropProgram program) {
  if (program == CropProgram::kPixel || !tiled_fits(a)) {
    at::parallel_for(0, a.N * a.S * a.S, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) crop_pixel(a, i / (a.S * a.S), (i / a.S) % a.S, i % a.S);
    });
    return;
  }
  const int64_t tiles_x = tiles_along(a.S, kTileX), strips_y = tiles_along(a.S, kStripRows);
  TORCH_CHECK(a.N * tiles_x * strips_y < (int64_t{1} << 31), "resized_crops: too many crops for one launch");
  at::parallel_for(0, a.N * tiles_x * strips_y, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::max_align_t> memory(kTileSharedBytes / sizeof(std::max_align_t) + 1);
    unsigned char* smem = reinterpret_cast<unsigned char*>(memory.data());
    EmulatedBlock block;
    for (int64_t b = begin; b < end; ++b) {
      // Poisoned, as a GPU's shared memory holds whatever the last block left there.
      block.reverse = b % 2 == 1;
      std::memset(smem, block.reverse ? 0x7f : 0xff, kTileSharedBytes);
      run_tile(CropTile<in_t, out_t>(a, *reinterpret_cast<TileShared*>(smem), smem + sizeof(TileShared),
                                     static_cast<uint32_t>(b), static_cast<uint32_t>(tiles_x),
                                     static_cast<uint32_t>(strips_y)),
               block);
    }
  });
}

at::Tensor resized_crops_program_cpu(const at::Tensor& data, const at::Tensor& image_info, const at::Tensor& boxes,
                                     const std::optional<at::Tensor>& flips, int64_t channels, int64_t size,
                                     std::string interpolation, bool antialias, const std::optional<at::Tensor>& mean,
                                     const std::optional<at::Tensor>& stdev, double input_scale,
                                     at::ScalarType out_dtype, bool channels_last, int64_t crops_per_image,
                                     std::string program) {
  const CropProgram which = parse_crop_program(program);
  check_crops_per_image(crops_per_image, boxes.size(0));
  const int interp = check_resized_crops_args(data, image_info, boxes, flips, channels, size, interpolation, mean,
                                              stdev, out_dtype);
  check_box_values(image_info, boxes);
  at::Tensor out = empty_crops(data, boxes.size(0), channels, size, out_dtype, channels_last);
  if (boxes.size(0) == 0) return out;
  with_crop_args(data, image_info, boxes, flips, mean, stdev, channels, size, interp == kBicubic, antialias,
                 input_scale, crops_per_image, out, [&](const auto& args) { emulate_program(args, which); });
  return out;
}

}  // namespace

TORCH_LIBRARY(fastssl, m) {
  // Where torch finds the fake (meta) implementation, registered in Python.
  m.set_python_module("fastssl._ext");
  m.def(
      "resized_crops(Tensor data, Tensor image_info, Tensor boxes, Tensor? flips, int channels, int size, "
      "str interpolation, bool antialias, Tensor? mean, Tensor? std, float input_scale, ScalarType out_dtype, "
      "bool channels_last, int crops_per_image=0) -> Tensor");
  // The same op run by a named GPU program ('pixel' or 'tiled', crop_programs.h): on CUDA, for the
  // benchmark; on CPU, emulated thread by thread, for the tests.
  m.def(
      "_resized_crops_program(Tensor data, Tensor image_info, Tensor boxes, Tensor? flips, int channels, int size, "
      "str interpolation, bool antialias, Tensor? mean, Tensor? std, float input_scale, ScalarType out_dtype, "
      "bool channels_last, int crops_per_image, str program) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("resized_crops", &resized_crops_cpu);
  m.impl("_resized_crops_program", &resized_crops_program_cpu);
}

}  // namespace fastssl

// A Python extension module, so that `import fastssl._C` loads the library and runs the
// registrations above; it has no Python-level functions (the ops live under torch.ops.fastssl).
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define FASTSSL_CONCAT_(a, b) a##b
#define FASTSSL_CONCAT(a, b) FASTSSL_CONCAT_(a, b)
#define FASTSSL_STR_(a) #a
#define FASTSSL_STR(a) FASTSSL_STR_(a)

static PyModuleDef fastssl_module = {PyModuleDef_HEAD_INIT, FASTSSL_STR(TORCH_EXTENSION_NAME),
                                     "fastssl C++/CUDA ops (registered under torch.ops.fastssl)", -1, nullptr};

PyMODINIT_FUNC FASTSSL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&fastssl_module); }
