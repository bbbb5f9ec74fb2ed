// fastssl::ema_update_: the EMA teacher update of CPU tensors, every tensor in one pass over memory.
//
//   teacher = round_to_teacher_dtype( fl(m * teacher) + fl((1 - m) * student) )
//
// in fp32 (fp64 when either side is fp64), both products rounded before the sum as the authors'
// `mul_(m)` then `add_((1 - m) * student)` round them (the extension is compiled with
// -ffp-contract=off: the compiler fuses no multiply-add here), then one rounding to the teacher's
// dtype (to nearest even). One loop runs over the elements of all tensors together, in chunks that the
// threads take in turn: a ViT's 150 tensors cost one call instead of three kernels each, and each
// byte is read (teacher, student) and written once. A pair that is not dense with one layout (rare
// for parameters) is made so in a copy first. fastssl/ema.py keeps no plan for this path: what a
// call relies on (devices, shapes, dtypes, aliasing) is checked here on every call, before any
// write; a refusal sends the caller to the validated path, which names the tensor.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/rsub.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastssl {
namespace {

// 16-bit values as their bits: integer loops the compiler vectorises (c10's types hide the bits
// behind constructors and a NaN branch).
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, NaN to the quiet NaN 0x7fc0: c10::BFloat16's rounding, without a branch.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
}

// The element as stored, and its conversions to and from the math type A.
template <typename T, typename A>
struct Bits {
  using type = T;
  static A load(T v) { return static_cast<A>(v); }
  static T store(A v) { return static_cast<T>(v); }
};
template <typename A>
struct Bits<c10::BFloat16, A> {
  using type = uint16_t;
  static A load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(A v) { return float_to_bf16(static_cast<float>(v)); }
};
template <typename A>
struct Bits<c10::Half, A> {
  using type = uint16_t;
  static A load(uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  static uint16_t store(A v) { return c10::detail::fp16_ieee_from_fp32_value(static_cast<float>(v)); }
};

struct Momentum {
  float m, w;      // for fp32 math
  double m64, w64;  // for fp64 math
};

#if defined(__GNUC__)
#define FASTSSL_INLINE __attribute__((always_inline)) inline  // into each instruction set's copy below
#else
#define FASTSSL_INLINE inline
#endif

template <typename T, typename S>
FASTSSL_INLINE void ema_loop(void* teacher, const void* student, int64_t begin, int64_t end, const Momentum& mom) {
  using A = std::conditional_t<std::is_same_v<T, double> || std::is_same_v<S, double>, double, float>;
  using TB = Bits<T, A>;
  using SB = Bits<S, A>;
  const A m = std::is_same_v<A, double> ? mom.m64 : mom.m;
  const A w = std::is_same_v<A, double> ? mom.w64 : mom.w;
  auto* __restrict t = static_cast<typename TB::type*>(teacher);
  const auto* __restrict s = static_cast<const typename SB::type*>(student);
  for (int64_t i = begin; i < end; ++i) {
    const A kept = TB::load(t[i]) * m;   // rounded ...
    const A taken = SB::load(s[i]) * w;  // ... and so is this: no fused multiply-add
    t[i] = TB::store(kept + taken);
  }
}

using SpanFn = void (*)(void*, const void*, int64_t, int64_t, const Momentum&);

// The loop compiled per instruction set, picked once per process. Measured on the development
// machine (AMD EPYC with AVX-512, ViT-Ti/16's 152 tensors, shuffled in-process A/B against
// _foreach_lerp_): with a 16-bit side the conversions make the loop compute-bound in cache and
// 512-bit vectors win (bf16 0.92-1.28 ms against 256-bit 1.12-1.61 ms); fp32 streams from memory
// and 256-bit vectors win (1.35-1.65 ms against 1.37-1.76 ms). Not target_clones: GCC's AVX-512
// clones use 256-bit vectors (its default tuning) and a clone cannot be given prefer-vector-width.
template <typename T, typename S>
void ema_span_base(void* t, const void* s, int64_t begin, int64_t end, const Momentum& mom) {
  ema_loop<T, S>(t, s, begin, end, mom);
}
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTSSL_EMA_X86 1
template <typename T, typename S>
__attribute__((target("avx2"))) void ema_span_avx2(void* t, const void* s, int64_t begin, int64_t end,
                                                   const Momentum& mom) {
  ema_loop<T, S>(t, s, begin, end, mom);
}
template <typename T, typename S>
__attribute__((target("avx512f,avx512bw,avx512vl,prefer-vector-width=512"))) void ema_span_avx512(
    void* t, const void* s, int64_t begin, int64_t end, const Momentum& mom) {
  ema_loop<T, S>(t, s, begin, end, mom);
}
#endif

template <typename T, typename S>
SpanFn span() {
#ifdef FASTSSL_EMA_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if constexpr (sizeof(T) == 2 || sizeof(S) == 2) {
    if (avx512) return &ema_span_avx512<T, S>;
  }
  if (avx2) return &ema_span_avx2<T, S>;
#endif
  return &ema_span_base<T, S>;
}

template <typename T>
SpanFn span_for_student(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return span<T, float>();
    case at::kDouble: return span<T, double>();
    case at::kBFloat16: return span<T, c10::BFloat16>();
    case at::kHalf: return span<T, c10::Half>();
    default: return nullptr;
  }
}

SpanFn span_for(at::ScalarType t, at::ScalarType s) {
  switch (t) {
    case at::kFloat: return span_for_student<float>(s);
    case at::kDouble: return span_for_student<double>(s);
    case at::kBFloat16: return span_for_student<c10::BFloat16>(s);
    case at::kHalf: return span_for_student<c10::Half>(s);
    default: return nullptr;
  }
}

Momentum read_momentum(double momentum, const std::optional<at::Tensor>& momentum_tensor) {
  if (momentum_tensor.has_value()) {
    // As `mul_(m)` and `(1 - m) * student` take a 0-dim tensor m: its value in the math type, and
    // 1 - m computed in m's own dtype.
    const at::Tensor& mt = *momentum_tensor;
    TORCH_CHECK(mt.dim() == 0 && mt.is_floating_point() && mt.device().is_cpu(),
                "ema_update_: momentum_tensor must be a 0-dim floating-point CPU tensor");
    const at::Tensor w = at::rsub(mt, 1);
    return {mt.item<float>(), w.item<float>(), mt.item<double>(), w.item<double>()};
  }
  // 1 - m in double, rounded once: what `(1 - m) * student` does with a Python float m.
  return {static_cast<float>(momentum), static_cast<float>(1.0 - momentum), momentum, 1.0 - momentum};
}

// The bytes [first, last + 1) a tensor's elements can touch (strides are never negative in torch).
std::pair<uintptr_t, uintptr_t> extent(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// Whether two tensors whose extents meet share a byte, element by element: for strided views whose
// extents interleave without sharing an element (x[:, 0] and x[:, 1]); rare for parameters.
bool elements_overlap(const at::Tensor& a, const at::Tensor& b) {
  std::vector<std::pair<uintptr_t, uintptr_t>> bytes;
  for (const at::Tensor* t : {&a, &b}) {
    const auto base = reinterpret_cast<uintptr_t>(t->const_data_ptr());
    const auto size = static_cast<uintptr_t>(t->element_size());
    std::vector<int64_t> index(t->dim(), 0);
    for (int64_t k = 0; k < t->numel(); ++k) {
      int64_t offset = 0;
      for (int64_t d = 0; d < t->dim(); ++d) offset += index[d] * t->stride(d);
      bytes.emplace_back(base + offset * size, base + offset * size + size);
      for (int64_t d = t->dim() - 1; d >= 0 && ++index[d] == t->size(d); --d) index[d] = 0;
    }
  }
  std::sort(bytes.begin(), bytes.end());
  uintptr_t reach = 0;
  for (const auto& [first, end] : bytes) {
    if (first < reach) return true;
    reach = std::max(reach, end);
  }
  return false;
}

// A teacher element reachable twice would be updated twice (checked on every call, before any write;
// the caller then takes its validated path, which names the tensors).
void check_no_aliases(at::TensorList teacher) {
  std::vector<std::tuple<uintptr_t, uintptr_t, size_t>> spans;
  for (size_t i = 0; i < teacher.size(); ++i) {
    if (teacher[i].numel() == 0) continue;
    const auto [first, end] = extent(teacher[i]);
    spans.emplace_back(first, end, i);
  }
  std::sort(spans.begin(), spans.end());
  std::vector<std::pair<uintptr_t, size_t>> open;  // (end, index) of the extents still reaching forward
  for (const auto& [first, end, i] : spans) {
    open.erase(std::remove_if(open.begin(), open.end(), [&](const auto& o) { return o.first <= first; }),
               open.end());
    for (const auto& [_, j] : open) {
      const at::Tensor& a = teacher[j];
      const at::Tensor& b = teacher[i];
      const bool shared = (a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense()) ||
                          elements_overlap(a, b);
      TORCH_CHECK_VALUE(!shared, "ema_update_: teacher tensors [", std::min(i, j), "] and [", std::max(i, j),
                        "] share memory; pass each tensor once");
    }
    open.emplace_back(end, i);
  }
}

struct Pair {
  at::Tensor teacher, student;  // dense, one layout (copies of the caller's where they were not)
  at::Tensor write_back;        // the caller's teacher when `teacher` is a copy
  void* t_data;                 // their first elements, taken before the threads start (taking a
  const void* s_data;           // copy-on-write tensor's mutable pointer copies it: not in a thread)
  SpanFn fn;
};

void ema_update_cpu(at::TensorList teacher, at::TensorList student, double momentum,
                    const std::optional<at::Tensor>& momentum_tensor) {
  TORCH_CHECK(teacher.size() == student.size(), "ema_update_: ", teacher.size(), " teacher tensors but ",
              student.size(), " student tensors");
  const Momentum mom = read_momentum(momentum, momentum_tensor);
  check_no_aliases(teacher);
  const size_t n = teacher.size();
  std::vector<Pair> pairs(n);
  std::vector<int64_t> starts(n + 1, 0);  // where each tensor begins in the elements of all of them
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    TORCH_CHECK(t.device().is_cpu() && s.device().is_cpu(), "ema_update_: tensor ", i, " is not on the CPU");
    // Before anything is written: its version counter is bumped at the end, as an in-place op's.
    TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), "ema_update_: teacher tensor ", i,
                " is an inference tensor: update it inside torch.inference_mode()");
    TORCH_CHECK(t.sizes() == s.sizes(), "ema_update_: tensor ", i, " has shape ", t.sizes(), " in the teacher but ",
                s.sizes(), " in the student");
    Pair& p = pairs[i];
    p.fn = span_for(t.scalar_type(), s.scalar_type());
    TORCH_CHECK(p.fn != nullptr, "ema_update_: tensor ", i, " has dtypes ", t.scalar_type(), " and ",
                s.scalar_type(), "; only floating-point tensors can be averaged");
    if (t.is_non_overlapping_and_dense() && s.strides() == t.strides()) {
      p.teacher = t;
      p.student = s;
    } else {  // walked as one block of memory: a dense copy of the teacher, the student in its layout
      p.teacher = t.is_non_overlapping_and_dense() ? t.clone() : t.contiguous();
      p.student = at::empty_like(p.teacher, s.options()).copy_(s);
      p.write_back = t;
    }
    p.t_data = p.teacher.mutable_data_ptr();
    p.s_data = p.student.const_data_ptr();
    starts[i + 1] = starts[i] + t.numel();
  }
  // Chunks handed out from a shared counter rather than one fixed share per thread: on shared cores a
  // thread that starts late (or is preempted) would leave the others waiting at the end of the call.
  constexpr int64_t kChunk = 1 << 18;  // measured: 1 MiB of fp32 beat 64 KiB, 256 KiB and 4 MiB
  const int64_t total = starts[n];
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t begin = c * kChunk;
      const int64_t end = std::min(total, begin + kChunk);
      // The first tensor this chunk reaches, then each one after it that the chunk covers.
      size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
      for (; i < n && starts[i] < end; ++i) {
        const int64_t lo = std::max(begin, starts[i]) - starts[i];
        const int64_t hi = std::min(end, starts[i + 1]) - starts[i];
        if (lo < hi) pairs[i].fn(pairs[i].t_data, pairs[i].s_data, lo, hi, mom);
      }
    }
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  if (workers <= 1) {
    work();
  } else {
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { work(); });
  }
  for (size_t i = 0; i < n; ++i) {
    if (pairs[i].write_back.defined()) {
      pairs[i].write_back.copy_(pairs[i].teacher);  // bumps its version itself
    } else {
      teacher[i].unsafeGetTensorImpl()->bump_version();  // as an in-place op does (autograd's check)
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastssl, m) {
  m.set_python_module("fastssl._ext");
  // In place; `momentum` is used when `momentum_tensor` is None.
  m.def("ema_update_(Tensor(a!)[] teacher, Tensor[] student, float momentum, Tensor? momentum_tensor) -> ()");
}

TORCH_LIBRARY_IMPL(fastssl, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace fastssl
