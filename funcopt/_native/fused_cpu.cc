// torch's fused CPU optimizer kernels (ATen FusedAdamKernel.cpp,
// FusedSGDKernel.cpp, FusedAdagradKernel.cpp, torch 2.13) as XLA FFI
// handlers: one pass per element, in place (the results alias the inputs;
// `update`, and a step on gradients it computes, write the param over the
// gradient, `run_segment`), each op rounded as torch's kernel rounds it.
//
// * Scalar math (bias corrections, step sizes, `1 - lr * wd`, Adagrad's
//   `clr`) in C++ double as ATen computes it. torch's AVX2/AVX-512 builds
//   contract `1 - lr * wd` (AdamW) and `1 + (step - 1) * lr_decay` (Adagrad)
//   into an FMA; its `default` build has no FMA: the `fma` attribute picks.
// * The element loop: torch's vectorised body (32-byte vectors: 8 float32,
//   4 float64 elements) and its scalar tail (the last `numel % width`
//   elements of each leaf), each with its own FMA placement; `fma` false is
//   torch's `default` build (every product rounded).
// * This file is compiled with -ffp-contract=off: only explicit fmas fuse.
// * 16-bit params (bfloat16, float16) with `fused=True` (Adam/AdamW, SGD,
//   Adagrad): torch's kernels compute them in float32 ("opmath"), each
//   buffer rounded once where it is stored (`Storage`); their vectors hold
//   16 elements, so the scalar tail is a leaf's last `numel % 16`.
// * Hyperparameters arrive as 0-d buffers (float64 with x64; without x64,
//   float32, read back as the shortest decimal that rounds to them: the
//   Python float the user wrote, for values of up to 7 significant digits).
//
// * `single_tensor`: torch's default step instead (`_single_tensor_adam`,
//   `_single_tensor_sgd`, `_single_tensor_adagrad`: one ATen op after another,
//   each rounded as the fused kernel's vectorised body rounds it), every
//   element as that body, and the scalar math as Python computes it
//   (`bias_correction2 ** 0.5` is C's pow; `1 - lr * wd` and
//   `1 + (step - 1) * lr_decay` unfused).
// * RMSprop, Adamax, Adadelta, RAdam, Rprop, NAdam and ASGD: torch has no
//   fused kernel for them; their handlers compute its default step only
//   (`single_tensor` true), op by op in the same way (each section lists
//   torch's ops).
//
// Attributes: `fma`, `maximize`, `single_tensor` (and the `decoupled` of
// Adam, RAdam and NAdam, SGD's `nesterov`) as bools, `sizes`/`spans` (int64
// arrays, one entry per leaf packed into the buffer: its element count and
// the elements it occupies; empty: one leaf, the whole buffer; NAdam's and
// ASGD's `rows`: see `PerLeaf`). The step buffer holds one count, or one per
// leaf. A call's segments are split over XLA's intra-op thread
// pool as one range (`Plan`); the `*_many` handlers (Adam/AdamW, SGD,
// Adagrad, RMSprop) step many leaves in one call, each in its own buffers
// or its state packed. Each kernel's segment function is built for AVX2+FMA
// and for the baseline, picked at run time (`ForCpu`, `select_flags`).

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FUNCOPT_X86 1
#define FUNCOPT_INLINE inline __attribute__((always_inline))
#define FUNCOPT_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FUNCOPT_X86 0
#define FUNCOPT_INLINE inline
#define FUNCOPT_LAMBDA_INLINE
#endif

FUNCOPT_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FUNCOPT_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// `a` where `mask` is all ones, else `b` (a select GCC vectorises)
FUNCOPT_INLINE uint32_t pick(uint32_t mask, uint32_t a, uint32_t b) {
  return (a & mask) | (b & ~mask);
}

FUNCOPT_INLINE uint32_t all_ones_if(bool c) { return 0u - uint32_t(c); }

// `c ? a : b`, for float as bit operations: with 16-bit buffers GCC turns
// a float ternary into a branch (it reuses the stored bits on one side) or
// keeps a select on a loop-invariant flag scalar, and vectorises neither
template <typename T>
FUNCOPT_INLINE T choose(bool c, T a, T b) {
  if constexpr (std::is_same_v<T, float>) {
    return bits_float(pick(all_ones_if(c), float_bits(a), float_bits(b)));
  } else {
    return c ? a : b;
  }
}

// where torch stores a 16-bit value, for the bits of a NaN: a vectorised
// loop of its AVX2/AVX-512 builds (bfloat16 0xffff, float16 the payload
// kept, as F16C keeps it), their scalar tail (bfloat16 0x7fc0, float16 as
// there), or any loop of its `default` build, c10's scalar conversions
// (bfloat16 0x7fc0, float16 0x7e00 and the sign)
enum class Store { kVectorX86, kScalarX86, kC10 };

// `Store` of a kernel's loop: FMA (an AVX2/AVX-512 build) and TAIL
template <bool FMA, bool TAIL>
constexpr Store kStore = !FMA   ? Store::kC10
                         : TAIL ? Store::kScalarX86
                                : Store::kVectorX86;

// 16-bit buffer elements (torch's c10::BFloat16, c10::Half): their bits
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

// how a buffer of storage type S is read and written: as T ("opmath_t",
// float for 16-bit types), rounded to nearest even where stored. The
// conversions are bit operations and selects, so the loops vectorise
// (GCC 12 does not vectorise `_Float16` conversions); they are exact
// (`widen`) and torch's rounding (`narrow`; a NaN as torch stores it
// there, `Store`), checked
// against every float16 value, 2^22 float32 bit patterns and the ties
// (tests/test_native_fused.py)
template <typename S>
struct Storage {
  using T = S;
  static FUNCOPT_INLINE T widen(S x) { return x; }
  template <Store>
  static FUNCOPT_INLINE S narrow(T x) {
    return x;
  }
};

template <>
struct Storage<BF16> {
  using T = float;
  static FUNCOPT_INLINE float widen(BF16 x) {
    return bits_float(uint32_t{x.bits} << 16);
  }
  template <Store STORE>
  static FUNCOPT_INLINE BF16 narrow(float x) {
    const uint32_t u = float_bits(x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = STORE == Store::kVectorX86 ? 0xffffu : 0x7fc0u;
    return {static_cast<uint16_t>(pick(all_ones_if(x != x), nan, rounded))};
  }
};

template <>
struct Storage<F16> {
  using T = float;
  static FUNCOPT_INLINE float widen(F16 x) {
    const uint32_t h = x.bits;
    // exponent and mantissa at float's places, times 2^112 (exact; a
    // subnormal float16 is a subnormal float there, kept while the
    // kernel runs); inf and NaN (2^16 and up) get float's all-ones exponent
    const float scaled = bits_float((h & 0x7fffu) << 13) * bits_float(239u << 23);
    const uint32_t special = all_ones_if(scaled >= bits_float(143u << 23));
    const uint32_t out = float_bits(scaled) | (special & (255u << 23));
    return bits_float(out | ((h & 0x8000u) << 16));
  }
  template <Store STORE>
  static FUNCOPT_INLINE F16 narrow(float x) {
    uint32_t u = float_bits(x);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    // overflow to inf (NaN: quiet, the payload's top bits kept but by c10);
    // below 2^-14 the float addition of 0.5 rounds at float16's subnormal
    // step; else round the mantissa
    const uint32_t payload = STORE == Store::kC10 ? 0u : (u >> 13) & 0x3ffu;
    const uint32_t nan = 0x7e00u | payload;
    const uint32_t big = pick(all_ones_if(u > (255u << 23)), nan, 0x7c00u);
    const uint32_t small =
        float_bits(bits_float(u) + bits_float(126u << 23)) - (126u << 23);
    const uint32_t normal =
        (u + (uint32_t(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    const uint32_t out = pick(all_ones_if(u >= (143u << 23)), big,
                              pick(all_ones_if(u < (113u << 23)), small, normal));
    return {static_cast<uint16_t>(out | (sign >> 16))};
  }
};

// a float16 element staged as a float (`staged_f16`): the kernels' loops
// run on float blocks with float16's semantics (`element_t`)
struct StagedF16 {
  float value;
};

template <>
struct Storage<StagedF16> {
  using T = float;
  static FUNCOPT_INLINE float widen(StagedF16 x) { return x.value; }
  template <Store>
  static FUNCOPT_INLINE StagedF16 narrow(float x) {
    return {x};
  }
};

template <typename S>
using compute_t = typename Storage<S>::T;

// the element type of torch's kernel for storage type S: its vectors'
// width, its `scalar_t`
template <typename S>
struct Element {
  using type = S;
};

template <>
struct Element<StagedF16> {
  using type = F16;
};

template <typename S>
using element_t = typename Element<S>::type;

template <typename S>
constexpr bool kSixteenBit = sizeof(element_t<S>) == 2;

template <typename S>
FUNCOPT_INLINE compute_t<S> widen(S x) {
  return Storage<S>::widen(x);
}

// x stored as S where torch stores it (`Store`: NaN bits only)
template <typename S, Store STORE = Store::kScalarX86>
FUNCOPT_INLINE S narrow(compute_t<S> x) {
  return Storage<S>::template narrow<STORE>(x);
}

// torch's vectors hold 32 bytes: 8 float32, 4 float64, 16 16-bit elements
template <typename S>
constexpr int64_t kVectorWidth = 32 / sizeof(element_t<S>);

// a * b + c: rounded once (FMA) or twice
template <bool FMA, typename T>
FUNCOPT_INLINE T madd(T a, T b, T c) {
  if constexpr (FMA) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
}

// torch's `start.lerp_(end, weight)` with a scalar weight, its CPU kernel's
// two branches as one multiply-add: `start + weight * (end - start)` where
// |weight| < 0.5 (SMALL), else `end + (weight - 1) * (end - start)`;
// `coeff` is the weight, or weight - 1 (`lerp_coefficient`)
template <bool FMA, bool SMALL, typename T>
FUNCOPT_INLINE T lerp(T start, T end, T coeff) {
  return madd<FMA>(coeff, end - start, SMALL ? start : end);
}

// `lerp`'s `coeff` for `weight`, and its branch (SMALL)
template <typename T>
bool lerp_coefficient(T weight, T* coeff) {
  const bool small = std::abs(weight) < T(0.5);
  *coeff = small ? weight : weight - T(1);
  return small;
}

// a hyperparameter buffer's value as the C++ double torch's kernel reads
double scalar_value(const ffi::AnyBuffer& b, int64_t index = 0) {
  if (b.element_type() == ffi::DataType::F64) {
    return b.typed_data<double>()[index];
  }
  float f = b.typed_data<float>()[index];
  if (!std::isfinite(f) || f == 0.0f) return static_cast<double>(f);
  // the shortest decimal that rounds to f, read as a double
  char text[64];
  auto res = std::to_chars(text, text + sizeof(text), f);
  double d = static_cast<double>(f);
  std::from_chars(text, res.ptr, d);
  return d;
}

double step_value(const ffi::AnyBuffer& b, int64_t index) {
  if (b.element_count() <= 1) index = 0;
  if (b.element_type() == ffi::DataType::F64) {
    return b.typed_data<double>()[index];
  }
  return static_cast<double>(b.typed_data<float>()[index]);
}

// the buffer `b`'s elements, of storage type S
template <typename S>
const S* elements(const ffi::AnyBuffer& b) {
  return static_cast<const S*>(b.untyped_data());
}

// the result buffer `out` holding `in`'s values: the results alias the
// inputs (XLA passes the same address); a copy where XLA gave another buffer
template <typename T>
T* in_place(ffi::AnyBuffer& in, ffi::AnyBuffer* out) {
  T* dst = static_cast<T*>(out->untyped_data());
  if (dst != in.untyped_data()) {
    std::memcpy(dst, in.untyped_data(), in.size_bytes());
  }
  return dst;
}

// the param's result: the param itself where XLA aliased the two (a step,
// updated in place); else (`update`, whose param stays live, or a step on
// gradients it computes) the gradient's buffer, its last use, which
// `run_segment` writes as it reads the param (`from`) and the gradient
template <typename T>
struct Param {
  T* to;
  const T* from;  // null: in place
};

template <typename T>
Param<T> param_result(const ffi::AnyBuffer& in, ffi::AnyBuffer* out) {
  T* to = static_cast<T*>(out->untyped_data());
  const T* from = static_cast<const T*>(in.untyped_data());
  return {to, to == from ? nullptr : from};
}

// a leaf's elements in the buffer: `size` from `offset`, then padding up to
// `end` (the next leaf's offset; a packed bucket's rows are whole)
struct Segment {
  int64_t offset, size, end;
};

ffi::Error segments(int64_t total, ffi::Span<const int64_t> sizes,
                    ffi::Span<const int64_t> spans, std::vector<Segment>& out) {
  if (sizes.size() == 0) {
    out.push_back({0, total, total});
    return ffi::Error::Success();
  }
  if (sizes.size() != spans.size()) {
    return ffi::Error::InvalidArgument("sizes and spans differ in length");
  }
  int64_t offset = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] > spans[i] || offset + spans[i] > total) {
      return ffi::Error::InvalidArgument("segments exceed the buffer");
    }
    out.push_back({offset, sizes[i], offset + spans[i]});
    offset += spans[i];
  }
  if (offset != total) {
    return ffi::Error::InvalidArgument("segments do not cover the buffer");
  }
  return ffi::Error::Success();
}

// `typed(S{})` for the param's storage type S: float or double; BF16 or
// F16 too where SIXTEEN (torch's fused kernels); an error otherwise
template <bool SIXTEEN = false, typename F>
ffi::Error by_float_type(const ffi::AnyBuffer& param, const char* target,
                         F&& typed) {
  switch (param.element_type()) {
    case ffi::DataType::F32:
      return typed(float{});
    case ffi::DataType::F64:
      return typed(double{});
    case ffi::DataType::BF16:
      if constexpr (SIXTEEN) return typed(BF16{});
      break;
    case ffi::DataType::F16:
      if constexpr (SIXTEEN) return typed(F16{});
      break;
    default:
      break;
  }
  return ffi::Error::InvalidArgument(
      std::string(target) +
      (SIXTEEN ? ": float32/float64/bfloat16/float16 only" : ": float32/float64 only"));
}

// a 16-bit param on torch's single-tensor path: never sent (the JAX rules
// round each op to 16 bits there)
template <typename S>
ffi::Error single_tensor_16bit(bool single_tensor, const char* target) {
  if (kSixteenBit<S> && single_tensor) {
    return ffi::Error::InvalidArgument(std::string(target) +
                                       ": 16-bit params take fused kernels only");
  }
  return ffi::Error::Success();
}

// A call's work: every leaf segment it updates (`Plan::add`, by
// `run_segment`), run once all are known (`Plan::run`), their elements
// split over XLA's intra-op thread pool as one range, so that a bucket of
// many small leaves, or many leaves in one call, takes every thread once.
// Cuts fall at whole 32-byte vectors of a segment (the last piece of a
// segment holds its scalar tail, so each element takes the loop it takes
// in one call). The caller takes pieces too and returns once every piece
// is done; a pool task that starts late finds none left (no deadlock,
// whatever the pool does). Split from 2 x 16,384 elements (measured with
// one split per leaf, before `Plan`: Adam on 100 leaves of 100,000
// float32, one call each, took 17.5 ms a step with a grain of 65,536,
// every call on one thread, and 11.5 ms with this one; 2-core AMD EPYC).
constexpr int64_t kGrain = int64_t{1} << 14;

// While in scope: subnormal inputs and results kept, as torch's CPU kernels
// keep them. XLA runs its CPU threads with them flushed to zero (x86 MXCSR
// FTZ and DAZ set): a kernel ran so gave 0 where torch gives 2.5e-39.
class KeepSubnormals {
 public:
#if FUNCOPT_X86
  KeepSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~kFlush); }
  ~KeepSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlush = 0x8040;  // FTZ (bit 15), DAZ (bit 6)
  unsigned saved_;
#endif
};

class Plan {
 public:
  explicit Plan(ffi::ThreadPool& pool) : pool_(pool) {}

  // `body(begin, end)` over [0, n) of one segment whose vectors hold `width`
  // elements
  void add(int64_t n, int64_t width, std::function<void(int64_t, int64_t)> body) {
    if (n > 0) {
      items_.push_back({n, width, std::move(body)});
      total_ += n;
    }
  }

  // every segment's body, then `recorded` (a handler's error: nothing runs)
  ffi::Error run(ffi::Error recorded) {
    if (recorded.failure()) return recorded;
    const int64_t threads = total_ >= 2 * kGrain ? pool_.num_threads() : 0;
    const int64_t chunks = threads <= 1 ? 1 : std::min<int64_t>(threads, total_ / kGrain);
    cuts_ = {{0, 0}};
    for (int64_t c = 1; c < chunks; ++c) cuts_.push_back(cut(total_ * c / chunks));
    cuts_.push_back({items_.size(), 0});
    if (chunks == 1) {
      KeepSubnormals keep;
      run_chunk(0);
      return recorded;
    }
    struct Shared {
      Plan* plan;
      int64_t chunks;
      std::atomic<int64_t> next{0}, done{0};
    };
    auto shared = std::make_shared<Shared>();
    shared->plan = this;
    shared->chunks = chunks;
    auto work = [](Shared& sh) {
      KeepSubnormals keep;
      for (int64_t c; (c = sh.next.fetch_add(1)) < sh.chunks;) {
        sh.plan->run_chunk(c);
        sh.done.fetch_add(1, std::memory_order_release);
      }
    };
    for (int64_t t = 1; t < chunks; ++t) {
      pool_.Schedule([shared, work]() { work(*shared); });
    }
    work(*shared);
    while (shared->done.load(std::memory_order_acquire) < chunks) {
      std::this_thread::yield();
    }
    return recorded;
  }

 private:
  struct Item {
    int64_t n, width;
    std::function<void(int64_t, int64_t)> body;
  };
  // a place in the work: element `offset` of segment `item`
  struct Cut {
    size_t item;
    int64_t offset;
  };

  // the place of element `at` of the whole range, moved back to a whole
  // vector of its segment
  Cut cut(int64_t at) const {
    size_t i = 0;
    for (; at >= items_[i].n; ++i) at -= items_[i].n;
    return {i, at / items_[i].width * items_[i].width};
  }

  void run_chunk(int64_t c) const {
    const Cut from = cuts_[c], to = cuts_[c + 1];
    for (size_t i = from.item; i < items_.size() && i <= to.item; ++i) {
      const int64_t begin = i == from.item ? from.offset : 0;
      const int64_t end = i == to.item ? to.offset : items_[i].n;
      if (end > begin) items_[i].body(begin, end);
    }
  }

  ffi::ThreadPool& pool_;
  std::vector<Item> items_;
  int64_t total_ = 0;
  std::vector<Cut> cuts_;
};

// a handler's work: `record(plan)` adds it, then it runs (`Plan`)
template <typename F>
ffi::Error planned(ffi::ThreadPool& pool, F&& record) {
  Plan plan(pool);
  return plan.run(record(plan));
}

// Out of place, the kernel runs one block at a time: the block of the
// gradient copied aside where the result is written over it, the param's
// copied to the result, then updated there (in cache): each buffer read
// once and the result written once, as in place. Whole vectors, so each
// element takes the loop it takes in one call (`Plan`).
constexpr int64_t kBlock = 1024;

// `fn(param, grad, buffers..., elements, &scalars)` over one leaf's
// segment, added to `plan` (the scalars copied: a handler changes them
// between segments), each buffer advanced to the piece the plan runs; a
// null buffer (absent) stays null. Out of place (`p.from`), the segment's
// padding is copied as it is, now.
template <typename T, typename Fn, typename S, typename... Buffers>
void run_segment(Plan& plan, const Segment& seg, Fn fn, const S& scalars,
                 Param<T> p, const T* g, Buffers... buffers) {
  const int64_t pad = seg.offset + seg.size;
  if (p.from && seg.end > pad) {
    std::memcpy(p.to + pad, p.from + pad, (seg.end - pad) * sizeof(T));
  }
  plan.add(seg.size, 32 / sizeof(T), [=](int64_t c, int64_t e) {
    const int64_t at = seg.offset + c, stop = seg.offset + e;
    if (!p.from) {
      fn(p.to + at, g + at, (buffers ? buffers + at : buffers)..., e - c,
         &scalars);
      return;
    }
    alignas(32) T grad[kBlock];
    for (int64_t b = at; b < stop; b += kBlock) {
      const int64_t n = std::min(kBlock, stop - b);
      const T* g_block = g + b;
      if (p.to == g) {
        std::memcpy(grad, g_block, n * sizeof(T));
        g_block = grad;
      }
      std::memcpy(p.to + b, p.from + b, n * sizeof(T));
      fn(p.to + b, g_block, (buffers ? buffers + b : buffers)..., n, &scalars);
    }
  });
}

bool has_avx2_fma() {
#if FUNCOPT_X86
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// `Segment` (a kernel's segment function) for the CPU it runs on: compiled
// for AVX2+FMA where the CPU has them (its loops vectorise to 8 float32
// lanes), else for the baseline
template <auto Segment, typename Signature = decltype(Segment)>
struct ForCpu;

template <auto Segment, typename... Args>
struct ForCpu<Segment, void (*)(Args...)> {
  static void generic(Args... args) { Segment(args...); }
#if FUNCOPT_X86
  __attribute__((target("avx2,fma"))) static void avx2(Args... args) {
    Segment(args...);
  }
#endif
  static auto pick() {
#if FUNCOPT_X86
    if (has_avx2_fma()) return &avx2;
#endif
    return &generic;
  }
};

// runtime flags -> one instantiation, `Kernel::segment<T, flags...>`, for
// this CPU
template <typename Kernel, typename T, size_t N, bool... Flags>
auto select_flags(const bool* flags) {
  if constexpr (sizeof...(Flags) == N) {
    return ForCpu<&Kernel::template segment<T, Flags...>>::pick();
  } else {
    return flags[0] ? select_flags<Kernel, T, N, Flags..., true>(flags + 1)
                    : select_flags<Kernel, T, N, Flags..., false>(flags + 1);
  }
}

// float16 blocks to float and back: F16C (one instruction per 8 elements,
// round to nearest even; torch's vectorised loops take the same) where the
// CPU has it, else `Storage<F16>`'s bit operations; torch's `default`
// build's NaNs (`Store::kC10`) by the bit operations
using WidenF16 = void (*)(const F16*, float*, int64_t);
using NarrowF16 = void (*)(const float*, F16*, int64_t);

void widen_f16_bits(const F16* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = widen(in[i]);
}

template <Store STORE>
void narrow_f16_bits(const float* in, F16* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = narrow<F16, STORE>(in[i]);
}

#if FUNCOPT_X86
__attribute__((target("avx,f16c"))) void widen_f16_f16c(const F16* in,
                                                          float* out,
                                                          int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  widen_f16_bits(in + i, out + i, n - i);
}

__attribute__((target("avx,f16c"))) void narrow_f16_f16c(const float* in,
                                                           F16* out,
                                                           int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i),
                                      _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  narrow_f16_bits<Store::kScalarX86>(in + i, out + i, n - i);
}
#endif

bool has_f16c() {
#if FUNCOPT_X86
  static const bool yes =
      __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

WidenF16 widen_f16_block() {
#if FUNCOPT_X86
  if (has_f16c()) return &widen_f16_f16c;
#endif
  return &widen_f16_bits;
}

template <bool FMA>
NarrowF16 narrow_f16_block() {
  if constexpr (!FMA) return &narrow_f16_bits<Store::kC10>;
#if FUNCOPT_X86
  if (has_f16c()) return &narrow_f16_f16c;
#endif
  return &narrow_f16_bits<Store::kScalarX86>;
}

// `segment(p, g, buffers..., k)` over a float16 segment of n elements, in
// blocks widened to float (`StagedF16` elements), the param and the
// buffers (null: absent) narrowed back: F16C converts a block in a few
// instructions per 8 elements where `Storage<F16>`'s bit operations take
// ~20 per element in the loop (Adam on 10M float16, 2-core AMD EPYC: 10.8
// ms a step with them in the loop, 4.3 ms staged, torch fused 3.3-3.5 ms).
// Blocks of whole vectors, so each element takes the loop it takes in one
// call.
constexpr int64_t kStage = 256;

// FMA: torch's AVX2/AVX-512 build (its NaNs), else its `default` build
template <bool FMA, typename Fn, size_t... I, typename... Buffers>
FUNCOPT_INLINE void staged_f16(std::index_sequence<I...>, Fn segment, F16* p,
                               const F16* g, int64_t n, Buffers*... buffers) {
  static_assert((std::is_same_v<Buffers, F16> && ...), "float16 buffers");
  static_assert(kStage % kVectorWidth<F16> == 0, "whole vectors");
  const WidenF16 widen_block = widen_f16_block();
  const NarrowF16 narrow_block = narrow_f16_block<FMA>();
  alignas(32) float pf[kStage], gf[kStage];
  alignas(32) float bf[sizeof...(Buffers) + 1][kStage];
  for (int64_t at = 0; at < n; at += kStage) {
    const int64_t k = std::min(kStage, n - at);
    widen_block(p + at, pf, k);
    widen_block(g + at, gf, k);
    ((buffers ? widen_block(buffers + at, bf[I], k) : void()), ...);
    segment(pf, gf, (buffers ? bf[I] : static_cast<float*>(nullptr))..., k);
    narrow_block(pf, p + at, k);
    ((buffers ? narrow_block(bf[I], buffers + at, k) : void()), ...);
  }
}

template <bool FMA, typename Fn, typename... Buffers>
FUNCOPT_INLINE void staged_f16(Fn segment, void* p, const void* g, int64_t n,
                               Buffers... buffers) {
  staged_f16<FMA>(std::index_sequence_for<Buffers...>{}, segment,
             static_cast<F16*>(p), static_cast<const F16*>(g), n,
             static_cast<F16*>(buffers)...);
}

// ---------------------------------------------------------------------------
// Adam / AdamW (adam_math)
// ---------------------------------------------------------------------------

template <typename T>
struct AdamScalars {
  // sign: -1 to maximize; decay: AdamW's factor (1 without decoupled decay);
  // coeff, small: the lerp's weight (or weight - 1) and which base it takes
  T sign, wd, decay, coeff, b2, one_minus_b2, bc2_sqrt, eps, neg_step_size;
  bool small;
  // torch's single-tensor (default) path: every element as the vectorised
  // loop (its ops round alike in the scalar tail)
  bool single_tensor;
};

// WD: coupled weight decay (`grad += param * wd`); SMALL: the lerp's branch
// (`s.small`), a template parameter because GCC does not vectorise a select
// on the runtime flag in the larger loops (coupled weight decay with AMSGrad
// ran scalar: 22-26 ms a step at 10M float32, vectorised 7.2-8.4 ms)
// S: the buffers' storage type, T its compute type (16-bit: the stored
// exp_avg, exp_avg_sq and maximum are rounded, the update reads them
// unrounded, as torch's kernel keeps them in float registers)
template <typename S, bool FMA, bool TAIL, bool WD, bool AMS, bool SMALL,
          typename T = compute_t<S>>
FUNCOPT_INLINE void adam_loop(S* __restrict p, const S* __restrict g,
                              S* __restrict m, S* __restrict v,
                              S* __restrict vmax, int64_t n,
                              const AdamScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    T param = widen(p[i]);
    T grad = widen(g[i]) * s.sign;
    if constexpr (WD) grad = madd<FMA>(param, s.wd, grad);
    param = param * s.decay;
    // exp_avg.lerp_(grad, 1 - beta1): blendv, then one fmadd
    T mi = widen(m[i]);
    mi = lerp<FMA, SMALL>(mi, grad, s.coeff);
    T vi = widen(v[i]);
    T weighted = s.one_minus_b2 * grad;
    // the vectorised loop fuses the second product, the tail the first
    vi = TAIL ? madd<FMA>(vi, s.b2, weighted * grad)
              : madd<FMA>(weighted, grad, vi * s.b2);
    m[i] = narrow<S, kStore<FMA, TAIL>>(mi);
    v[i] = narrow<S, kStore<FMA, TAIL>>(vi);
    if constexpr (AMS) {
      T old = widen(vmax[i]);
      vi = choose((old > vi) | (old != old), old, vi);
      vmax[i] = narrow<S, kStore<FMA, TAIL>>(vi);
    }
    T denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
    p[i] = narrow<S, kStore<FMA, TAIL>>(param + (s.neg_step_size * mi) / denom);
  }
}

template <typename S, bool FMA, bool WD, bool AMS, bool SMALL>
FUNCOPT_INLINE void adam_segment_lerp(S* p, const S* g, S* m, S* v, S* vmax,
                                      int64_t n,
                                      const AdamScalars<compute_t<S>>& s) {
  int64_t body = s.single_tensor ? n : n - n % kVectorWidth<S>;
  adam_loop<S, FMA, false, WD, AMS, SMALL>(p, g, m, v, vmax, body, s);
  adam_loop<S, FMA, true, WD, AMS, SMALL>(p + body, g + body, m + body,
                                          v + body, AMS ? vmax + body : vmax,
                                          n - body, s);
}

struct AdamKernel {
  template <typename S, bool FMA, bool WD, bool AMS>
  static FUNCOPT_INLINE void segment(void* pv, const void* gv, void* mv,
                                     void* vv, void* vmaxv, int64_t n,
                                     const void* sv) {
    if constexpr (std::is_same_v<S, F16>) {
      auto staged = [sv](float* p, const float* g, float* m, float* v,
                         float* vmax, int64_t k) FUNCOPT_LAMBDA_INLINE {
        segment<StagedF16, FMA, WD, AMS>(p, g, m, v, vmax, k, sv);
      };
      staged_f16<FMA>(staged, pv, gv, n, mv, vv, vmaxv);
    } else {
      const auto& s = *static_cast<const AdamScalars<compute_t<S>>*>(sv);
      S* p = static_cast<S*>(pv);
      const S* g = static_cast<const S*>(gv);
      S* m = static_cast<S*>(mv);
      S* v = static_cast<S*>(vv);
      S* vmax = static_cast<S*>(vmaxv);
      if (s.small) {
        adam_segment_lerp<S, FMA, WD, AMS, true>(p, g, m, v, vmax, n, s);
      } else {
        adam_segment_lerp<S, FMA, WD, AMS, false>(p, g, m, v, vmax, n, s);
      }
    }
  }
};

template <typename S, typename T = compute_t<S>>
ffi::Error adam_typed(Plan& plan, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                      ffi::AnyBuffer exp_avg, ffi::AnyBuffer exp_avg_sq,
                      ffi::AnyBuffer* max_sq, ffi::AnyBuffer step,
                      ffi::AnyBuffer lr_b, ffi::AnyBuffer betas,
                      ffi::AnyBuffer eps_b, ffi::AnyBuffer wd_b,
                      ffi::AnyBuffer* out_p, ffi::AnyBuffer* out_m,
                      ffi::AnyBuffer* out_v, ffi::AnyBuffer* out_max, bool fma,
                      bool maximize, bool decoupled, bool single_tensor,
                      ffi::Span<const int64_t> sizes,
                      ffi::Span<const int64_t> spans) {
  ffi::Error refused = single_tensor_16bit<S>(single_tensor, "funcopt_adam");
  if (refused.failure()) return refused;
  KeepSubnormals keep;  // the scalar math too
  const int64_t total = param.element_count();
  const Param<S> p = param_result<S>(param, out_p);
  S* m = in_place<S>(exp_avg, out_m);
  S* v = in_place<S>(exp_avg_sq, out_v);
  S* vmax = max_sq ? in_place<S>(*max_sq, out_max) : nullptr;
  const S* g = elements<S>(grad);
  std::vector<Segment> list;
  ffi::Error bad = segments(total, sizes, spans, list);
  if (bad.failure()) return bad;

  const double lr = scalar_value(lr_b);
  const double beta1 = scalar_value(betas, 0);
  const double beta2 = scalar_value(betas, 1);
  const double eps = scalar_value(eps_b);
  const double wd = scalar_value(wd_b);
  AdamScalars<T> s;
  s.sign = maximize ? T(-1) : T(1);
  s.wd = static_cast<T>(wd);
  // AdamW's `1 - lr * weight_decay`: contracted where torch's build has FMA
  // (the fused kernel's C++), rounded twice in Python (the default path)
  s.decay = T(1);
  if (decoupled) {
    s.decay = static_cast<T>(fma && !single_tensor ? std::fma(-lr, wd, 1.0)
                                                   : 1.0 - lr * wd);
  }
  s.single_tensor = single_tensor;
  s.small = lerp_coefficient(static_cast<T>(1 - beta1), &s.coeff);
  s.b2 = static_cast<T>(beta2);
  s.one_minus_b2 = static_cast<T>(1 - beta2);
  s.eps = static_cast<T>(eps);
  const bool flags[3] = {fma, !decoupled && wd != 0, vmax != nullptr};
  auto fn = select_flags<AdamKernel, S, 3>(flags);
  for (size_t k = 0; k < list.size(); ++k) {
    const double t = step_value(step, static_cast<int64_t>(k));
    const double bias_correction1 = 1 - std::pow(beta1, t);
    const double bias_correction2 = 1 - std::pow(beta2, t);
    const double step_size = lr / bias_correction1;
    // Python's `bias_correction2**0.5` is C's pow, the fused kernel's sqrt
    s.bc2_sqrt = static_cast<T>(single_tensor ? std::pow(bias_correction2, 0.5)
                                              : std::sqrt(bias_correction2));
    s.neg_step_size = static_cast<T>(-step_size);
    run_segment<S>(plan, list[k], fn, s, p, g, m, v, vmax);
  }
  return ffi::Error::Success();
}

ffi::Error adam_any(Plan& plan, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                    ffi::AnyBuffer exp_avg, ffi::AnyBuffer exp_avg_sq,
                    ffi::AnyBuffer* max_sq, ffi::AnyBuffer step,
                    ffi::AnyBuffer lr, ffi::AnyBuffer betas, ffi::AnyBuffer eps,
                    ffi::AnyBuffer wd, ffi::AnyBuffer* out_p,
                    ffi::AnyBuffer* out_m, ffi::AnyBuffer* out_v,
                    ffi::AnyBuffer* out_max, bool fma, bool maximize,
                    bool decoupled, bool single_tensor,
                    ffi::Span<const int64_t> sizes,
                    ffi::Span<const int64_t> spans) {
  return by_float_type<true>(param, "funcopt_adam", [&](auto zero) {
    using S = decltype(zero);
    return adam_typed<S>(plan, param, grad, exp_avg, exp_avg_sq, max_sq, step,
                         lr, betas, eps, wd, out_p, out_m, out_v, out_max, fma,
                         maximize, decoupled, single_tensor, sizes, spans);
  });
}

ffi::Error AdamImpl(ffi::ThreadPool pool, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                    ffi::AnyBuffer exp_avg, ffi::AnyBuffer exp_avg_sq,
                    ffi::AnyBuffer step, ffi::AnyBuffer lr,
                    ffi::AnyBuffer betas, ffi::AnyBuffer eps,
                    ffi::AnyBuffer wd, ffi::Result<ffi::AnyBuffer> out_p,
                    ffi::Result<ffi::AnyBuffer> out_m,
                    ffi::Result<ffi::AnyBuffer> out_v, bool fma, bool maximize,
                    bool decoupled, bool single_tensor,
                    ffi::Span<const int64_t> sizes,
                    ffi::Span<const int64_t> spans) {
  return planned(pool, [&](Plan& plan) {
    return adam_any(plan, param, grad, exp_avg, exp_avg_sq, nullptr, step, lr, betas,
                    eps, wd, &*out_p, &*out_m, &*out_v, nullptr, fma,
                    maximize, decoupled, single_tensor, sizes, spans);
  });
}

ffi::Error AdamAmsImpl(ffi::ThreadPool pool, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                       ffi::AnyBuffer exp_avg, ffi::AnyBuffer exp_avg_sq,
                       ffi::AnyBuffer max_sq, ffi::AnyBuffer step,
                       ffi::AnyBuffer lr, ffi::AnyBuffer betas,
                       ffi::AnyBuffer eps, ffi::AnyBuffer wd,
                       ffi::Result<ffi::AnyBuffer> out_p,
                       ffi::Result<ffi::AnyBuffer> out_m,
                       ffi::Result<ffi::AnyBuffer> out_v,
                       ffi::Result<ffi::AnyBuffer> out_max, bool fma,
                       bool maximize, bool decoupled, bool single_tensor,
                       ffi::Span<const int64_t> sizes,
                       ffi::Span<const int64_t> spans) {
  return planned(pool, [&](Plan& plan) {
    return adam_any(plan, param, grad, exp_avg, exp_avg_sq, &max_sq, step, lr, betas,
                    eps, wd, &*out_p, &*out_m, &*out_v, &*out_max,
                    fma, maximize, decoupled, single_tensor, sizes, spans);
  });
}

// ---------------------------------------------------------------------------
// SGD (sgd_math)
// ---------------------------------------------------------------------------

template <typename T>
struct SgdScalars {
  T sign, wd, mu, damp, neg_lr;
  bool nesterov;
  bool single_tensor;  // as AdamScalars::single_tensor
};

// MOM: 0 no momentum, 1 first step (the buffer is the gradient), 2 later;
// S the storage type (16-bit: the stored buffer rounded, the update reads
// it unrounded)
template <typename S, bool FMA, bool TAIL, bool WD, int MOM,
          typename T = compute_t<S>>
FUNCOPT_INLINE void sgd_loop(S* __restrict p, const S* __restrict g,
                             S* __restrict b, int64_t n,
                             const SgdScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    T param = widen(p[i]);
    T grad = widen(g[i]) * s.sign;
    if constexpr (WD) grad = madd<FMA>(param, s.wd, grad);
    if constexpr (MOM != 0) {
      T buf;
      if constexpr (MOM == 1) {
        buf = grad;
      } else {
        T bi = widen(b[i]);
        buf = TAIL ? madd<FMA>(bi, s.mu, grad * s.damp)
                   : madd<FMA>(s.damp, grad, bi * s.mu);
      }
      b[i] = narrow<S, kStore<FMA, TAIL>>(buf);
      grad = choose(s.nesterov, madd<FMA>(buf, s.mu, grad), buf);
    }
    p[i] = narrow<S, kStore<FMA, TAIL>>(madd<FMA>(grad, s.neg_lr, param));
  }
}

template <typename S, bool FMA, bool WD, int MOM>
FUNCOPT_INLINE void sgd_segment(void* pv, const void* gv, void* bv, int64_t n,
                                const void* sv) {
  S* p = static_cast<S*>(pv);
  const S* g = static_cast<const S*>(gv);
  S* b = static_cast<S*>(bv);
  const auto& s = *static_cast<const SgdScalars<compute_t<S>>*>(sv);
  // 16-bit: torch 2.13's vectorised loop never stores the param
  // (pytorch/pytorch#191763); every element takes its scalar loop
  int64_t body = kSixteenBit<S>  ? 0
                 : s.single_tensor ? n
                                   : n - n % kVectorWidth<S>;
  sgd_loop<S, FMA, false, WD, MOM>(p, g, b, body, s);
  sgd_loop<S, FMA, true, WD, MOM>(p + body, g + body,
                                  MOM ? b + body : b, n - body, s);
}

// MOMENTUM, FIRST: sgd_segment's MOM (FIRST without MOMENTUM is MOM 0)
struct SgdKernel {
  template <typename S, bool FMA, bool WD, bool MOMENTUM, bool FIRST>
  static FUNCOPT_INLINE void segment(void* p, const void* g, void* b, int64_t n,
                                     const void* s) {
    constexpr int MOM = MOMENTUM ? (FIRST ? 1 : 2) : 0;
    if constexpr (std::is_same_v<S, F16>) {
      auto staged = [s](float* pf, const float* gf, float* bf,
                        int64_t k) FUNCOPT_LAMBDA_INLINE {
        sgd_segment<StagedF16, FMA, WD, MOM>(pf, gf, bf, k, s);
      };
      // without momentum torch leaves the buffer as it is
      staged_f16<FMA>(staged, p, g, n, MOM ? b : static_cast<void*>(nullptr));
    } else {
      sgd_segment<S, FMA, WD, MOM>(p, g, b, n, s);
    }
  }
};

template <typename S, typename T = compute_t<S>>
ffi::Error sgd_typed(Plan& plan, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                     ffi::AnyBuffer* buffer, ffi::AnyBuffer step,
                     ffi::AnyBuffer lr_b, ffi::AnyBuffer momentum_b,
                     ffi::AnyBuffer dampening_b, ffi::AnyBuffer wd_b,
                     ffi::AnyBuffer* out_p, ffi::AnyBuffer* out_b, bool fma,
                     bool maximize, bool nesterov, bool single_tensor,
                     ffi::Span<const int64_t> sizes,
                     ffi::Span<const int64_t> spans) {
  ffi::Error refused = single_tensor_16bit<S>(single_tensor, "funcopt_sgd");
  if (refused.failure()) return refused;
  KeepSubnormals keep;  // the scalar math too
  const Param<S> p = param_result<S>(param, out_p);
  S* b = buffer ? in_place<S>(*buffer, out_b) : nullptr;
  const S* g = elements<S>(grad);
  std::vector<Segment> list;
  ffi::Error bad = segments(param.element_count(), sizes, spans, list);
  if (bad.failure()) return bad;
  const double lr = scalar_value(lr_b);
  const double momentum = scalar_value(momentum_b);
  const double dampening = scalar_value(dampening_b);
  const double wd = scalar_value(wd_b);
  SgdScalars<T> s;
  s.sign = maximize ? T(-1) : T(1);
  s.nesterov = nesterov;
  s.single_tensor = single_tensor;
  s.wd = static_cast<T>(wd);
  s.mu = static_cast<T>(momentum);
  s.damp = static_cast<T>(1 - dampening);
  s.neg_lr = static_cast<T>(-lr);
  for (size_t k = 0; k < list.size(); ++k) {
    const bool with_momentum = b != nullptr && momentum != 0;
    const bool first = step_value(step, static_cast<int64_t>(k)) == 1;
    const bool flags[4] = {fma, wd != 0, with_momentum, with_momentum && first};
    auto fn = select_flags<SgdKernel, S, 4>(flags);
    run_segment<S>(plan, list[k], fn, s, p, g, b);
  }
  return ffi::Error::Success();
}

ffi::Error sgd_any(Plan& plan, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                   ffi::AnyBuffer* buffer, ffi::AnyBuffer step,
                   ffi::AnyBuffer lr, ffi::AnyBuffer momentum,
                   ffi::AnyBuffer dampening, ffi::AnyBuffer wd,
                   ffi::AnyBuffer* out_p, ffi::AnyBuffer* out_b, bool fma,
                   bool maximize, bool nesterov, bool single_tensor,
                   ffi::Span<const int64_t> sizes,
                   ffi::Span<const int64_t> spans) {
  return by_float_type<true>(param, "funcopt_sgd", [&](auto zero) {
    using S = decltype(zero);
    return sgd_typed<S>(plan, param, grad, buffer, step, lr, momentum,
                        dampening, wd, out_p, out_b, fma, maximize, nesterov,
                        single_tensor, sizes, spans);
  });
}

ffi::Error SgdImpl(ffi::ThreadPool pool, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                   ffi::AnyBuffer step, ffi::AnyBuffer lr,
                   ffi::AnyBuffer momentum, ffi::AnyBuffer dampening,
                   ffi::AnyBuffer wd, ffi::Result<ffi::AnyBuffer> out_p,
                   bool fma, bool maximize, bool nesterov, bool single_tensor,
                   ffi::Span<const int64_t> sizes,
                   ffi::Span<const int64_t> spans) {
  return planned(pool, [&](Plan& plan) {
    return sgd_any(plan, param, grad, nullptr, step, lr, momentum, dampening, wd,
                   &*out_p, nullptr, fma, maximize, nesterov, single_tensor,
                   sizes, spans);
  });
}

ffi::Error SgdMomentumImpl(ffi::ThreadPool pool, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                           ffi::AnyBuffer buffer, ffi::AnyBuffer step,
                           ffi::AnyBuffer lr, ffi::AnyBuffer momentum,
                           ffi::AnyBuffer dampening, ffi::AnyBuffer wd,
                           ffi::Result<ffi::AnyBuffer> out_p,
                           ffi::Result<ffi::AnyBuffer> out_b, bool fma,
                           bool maximize, bool nesterov, bool single_tensor,
                           ffi::Span<const int64_t> sizes,
                           ffi::Span<const int64_t> spans) {
  return planned(pool, [&](Plan& plan) {
    return sgd_any(plan, param, grad, &buffer, step, lr, momentum, dampening, wd,
                   &*out_p, &*out_b, fma, maximize, nesterov, single_tensor, sizes,
                   spans);
  });
}

// ---------------------------------------------------------------------------
// Adagrad (adagrad_math): every float32/float64 element in the same order;
// 16-bit params' vectorised loop reads its scalars as `scalar_t(s)`,
// rounded to 16 bits, the scalar tail as float32 (`opmath_t(s)`)
// ---------------------------------------------------------------------------

template <typename T>
struct AdagradLoopScalars {
  T wd, eps, clr;
};

template <typename T>
struct AdagradScalars {
  T sign;
  // the vectorised loop's and the scalar tail's
  AdagradLoopScalars<T> body, tail;
};

template <typename S, bool FMA, bool TAIL, bool WD, typename T = compute_t<S>>
FUNCOPT_INLINE void adagrad_loop(S* __restrict p, const S* __restrict g,
                                 S* __restrict sum, int64_t n, T sign,
                                 const AdagradLoopScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    T param = widen(p[i]);
    T grad = widen(g[i]) * sign;
    if constexpr (WD) grad = madd<FMA>(param, s.wd, grad);
    T acc = madd<FMA>(grad, grad, widen(sum[i]));
    sum[i] = narrow<S, kStore<FMA, TAIL>>(acc);
    T std_ = std::sqrt(acc) + s.eps;
    p[i] = narrow<S, kStore<FMA, TAIL>>(param - (s.clr * grad) / std_);
  }
}

struct AdagradKernel {
  template <typename S, bool FMA, bool WD>
  static FUNCOPT_INLINE void segment(void* pv, const void* gv, void* sv_,
                                     int64_t n, const void* scal) {
    if constexpr (std::is_same_v<S, F16>) {
      auto staged = [scal](float* p, const float* g, float* sum,
                           int64_t k) FUNCOPT_LAMBDA_INLINE {
        segment<StagedF16, FMA, WD>(p, g, sum, k, scal);
      };
      staged_f16<FMA>(staged, pv, gv, n, sv_);
    } else {
      S* p = static_cast<S*>(pv);
      const S* g = static_cast<const S*>(gv);
      S* sum = static_cast<S*>(sv_);
      const auto& s = *static_cast<const AdagradScalars<compute_t<S>>*>(scal);
      const int64_t body = n - n % kVectorWidth<S>;
      adagrad_loop<S, FMA, false, WD>(p, g, sum, body, s.sign, s.body);
      adagrad_loop<S, FMA, true, WD>(p + body, g + body, sum + body, n - body,
                                     s.sign, s.tail);
    }
  }
};

// a C++ double as `scalar_t(s)` reads it in the vectorised loop (16-bit:
// rounded to float, then to 16 bits, then widened) and as `opmath_t(s)`
template <typename S, typename T = compute_t<S>>
T as_storage(double s) {
  return widen(narrow<element_t<S>>(static_cast<T>(s)));
}

template <typename S, typename T = compute_t<S>>
AdagradLoopScalars<T> adagrad_loop_scalars(double wd, double eps, double clr,
                                           bool body) {
  if (body) return {as_storage<S>(wd), as_storage<S>(eps), as_storage<S>(clr)};
  return {static_cast<T>(wd), static_cast<T>(eps), static_cast<T>(clr)};
}

template <typename S, typename T = compute_t<S>>
ffi::Error adagrad_typed(Plan& plan, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                         ffi::AnyBuffer sum, ffi::AnyBuffer step,
                         ffi::AnyBuffer lr_b, ffi::AnyBuffer lr_decay_b,
                         ffi::AnyBuffer wd_b, ffi::AnyBuffer eps_b,
                         ffi::AnyBuffer* out_p, ffi::AnyBuffer* out_s, bool fma,
                         bool maximize, bool single_tensor,
                         ffi::Span<const int64_t> sizes,
                         ffi::Span<const int64_t> spans) {
  ffi::Error refused = single_tensor_16bit<S>(single_tensor, "funcopt_adagrad");
  if (refused.failure()) return refused;
  KeepSubnormals keep;  // the scalar math too
  const Param<S> p = param_result<S>(param, out_p);
  S* acc = in_place<S>(sum, out_s);
  const S* g = elements<S>(grad);
  std::vector<Segment> list;
  ffi::Error bad = segments(param.element_count(), sizes, spans, list);
  if (bad.failure()) return bad;
  const double lr = scalar_value(lr_b);
  const double lr_decay = scalar_value(lr_decay_b);
  const double wd = scalar_value(wd_b);
  const double eps = scalar_value(eps_b);
  AdagradScalars<T> s;
  s.sign = maximize ? T(-1) : T(1);
  const bool flags[2] = {fma, wd != 0};
  auto fn = select_flags<AdagradKernel, S, 2>(flags);
  for (size_t k = 0; k < list.size(); ++k) {
    const double t = step_value(step, static_cast<int64_t>(k));
    // `1.0 + (step - 1.0) * lr_decay`: contracted where torch's build has FMA
    // (the fused kernel's C++), rounded twice in Python (the default path)
    const double decay = fma && !single_tensor ? std::fma(t - 1.0, lr_decay, 1.0)
                                               : 1.0 + (t - 1.0) * lr_decay;
    const double clr = lr / decay;
    s.body = adagrad_loop_scalars<S>(wd, eps, clr, kSixteenBit<S>);
    s.tail = adagrad_loop_scalars<S>(wd, eps, clr, false);
    run_segment<S>(plan, list[k], fn, s, p, g, acc);
  }
  return ffi::Error::Success();
}

ffi::Error adagrad_any(Plan& plan, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                       ffi::AnyBuffer sum, ffi::AnyBuffer step,
                       ffi::AnyBuffer lr, ffi::AnyBuffer lr_decay,
                       ffi::AnyBuffer wd, ffi::AnyBuffer eps,
                       ffi::AnyBuffer* out_p, ffi::AnyBuffer* out_s, bool fma,
                       bool maximize, bool single_tensor,
                       ffi::Span<const int64_t> sizes,
                       ffi::Span<const int64_t> spans) {
  return by_float_type<true>(param, "funcopt_adagrad", [&](auto zero) {
    using S = decltype(zero);
    return adagrad_typed<S>(plan, param, grad, sum, step, lr, lr_decay, wd, eps,
                            out_p, out_s, fma, maximize, single_tensor, sizes,
                            spans);
  });
}

ffi::Error AdagradImpl(ffi::ThreadPool pool, ffi::AnyBuffer param, ffi::AnyBuffer grad,
                       ffi::AnyBuffer sum, ffi::AnyBuffer step,
                       ffi::AnyBuffer lr, ffi::AnyBuffer lr_decay,
                       ffi::AnyBuffer wd, ffi::AnyBuffer eps,
                       ffi::Result<ffi::AnyBuffer> out_p,
                       ffi::Result<ffi::AnyBuffer> out_s, bool fma,
                       bool maximize, bool single_tensor,
                       ffi::Span<const int64_t> sizes,
                       ffi::Span<const int64_t> spans) {
  return planned(pool, [&](Plan& plan) {
    return adagrad_any(plan, param, grad, sum, step, lr, lr_decay, wd, eps,
                       &*out_p, &*out_s, fma, maximize, single_tensor, sizes,
                       spans);
  });
}

// ---------------------------------------------------------------------------
// RMSprop (torch has no fused kernel: `_single_tensor_rmsprop` only), every
// float32/float64 element in the same order, each op rounded as ATen's
// vectorised loop rounds it:
//   grad = grad.add(param, alpha=wd)                  fma(wd, param, grad)
//   square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
//                                  fma((1 - alpha) * grad, grad, sq * alpha)
//   grad_avg.lerp_(grad, 1 - alpha)                  (centered) as Adam's
//   avg = sqrt(square_avg.addcmul(grad_avg, grad_avg, value=-1)) + eps
//   buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
//   or param.addcdiv_(grad, avg, value=-lr)        param + (-lr * grad) / avg
// ---------------------------------------------------------------------------

template <typename T>
struct RmspropScalars {
  // coeff, small: the lerp's weight `1 - alpha` (or weight - 1) and which
  // base it takes, as AdamScalars
  T sign, wd, alpha, one_minus_alpha, coeff, eps, momentum, neg_lr;
  bool small;
};

// restrict-qualified parameters; SMALL: the lerp's branch (`s.small`) as a
// template parameter, as adam_loop's (centered with momentum ran scalar,
// 1.3-1.6x slower than the JAX rule)
template <typename T, bool FMA, bool WD, bool CENTERED, bool MOM, bool SMALL>
FUNCOPT_INLINE void rmsprop_loop(T* __restrict p, const T* __restrict g,
                                 T* __restrict sq, T* __restrict ga,
                                 T* __restrict b, int64_t n,
                                 const RmspropScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    T param = p[i];
    T grad = g[i] * s.sign;
    if constexpr (WD) grad = madd<FMA>(param, s.wd, grad);
    T square_avg = madd<FMA>(s.one_minus_alpha * grad, grad, sq[i] * s.alpha);
    sq[i] = square_avg;
    T avg;
    if constexpr (CENTERED) {
      T grad_avg = ga[i];
      grad_avg = lerp<FMA, SMALL>(grad_avg, grad, s.coeff);
      ga[i] = grad_avg;
      avg = std::sqrt(madd<FMA>(-grad_avg, grad_avg, square_avg));
    } else {
      avg = std::sqrt(square_avg);
    }
    avg = avg + s.eps;
    if constexpr (MOM) {
      T buf = b[i] * s.momentum + grad / avg;
      b[i] = buf;
      p[i] = madd<FMA>(s.neg_lr, buf, param);
    } else {
      p[i] = param + (s.neg_lr * grad) / avg;
    }
  }
}

struct RmspropKernel {
  template <typename T, bool FMA, bool WD, bool CENTERED, bool MOM>
  static FUNCOPT_INLINE void segment(void* p, const void* g, void* sq, void* ga,
                                      void* b, int64_t n, const void* s) {
    const auto& scalars = *static_cast<const RmspropScalars<T>*>(s);
    // direct calls (inlined into the caller's target), not a pointer
    if (CENTERED && scalars.small) {
      rmsprop_loop<T, FMA, WD, CENTERED, MOM, true>(
          static_cast<T*>(p), static_cast<const T*>(g), static_cast<T*>(sq),
          static_cast<T*>(ga), static_cast<T*>(b), n, scalars);
    } else {
      rmsprop_loop<T, FMA, WD, CENTERED, MOM, false>(
          static_cast<T*>(p), static_cast<const T*>(g), static_cast<T*>(sq),
          static_cast<T*>(ga), static_cast<T*>(b), n, scalars);
    }
  }
};

// the state buffers square_avg, grad_avg (centered) and momentum_buffer,
// each with its result; absent ones null
struct RmspropBuffers {
  ffi::AnyBuffer* in[3];
  ffi::AnyBuffer* out[3];
};

template <typename T>
ffi::Error rmsprop_typed(Plan& plan, ffi::AnyBuffer param,
                         ffi::AnyBuffer grad, RmspropBuffers bufs,
                         ffi::AnyBuffer lr_b, ffi::AnyBuffer alpha_b,
                         ffi::AnyBuffer eps_b, ffi::AnyBuffer wd_b,
                         ffi::AnyBuffer momentum_b, ffi::AnyBuffer* out_p,
                         bool fma, bool maximize,
                         ffi::Span<const int64_t> sizes,
                         ffi::Span<const int64_t> spans) {
  KeepSubnormals keep;  // the scalar math too
  const Param<T> p = param_result<T>(param, out_p);
  T* state[3];
  for (int k = 0; k < 3; ++k) {
    state[k] = bufs.in[k] ? in_place<T>(*bufs.in[k], bufs.out[k]) : nullptr;
  }
  const T* g = grad.typed_data<T>();
  std::vector<Segment> list;
  ffi::Error bad = segments(param.element_count(), sizes, spans, list);
  if (bad.failure()) return bad;
  const double lr = scalar_value(lr_b);
  const double alpha = scalar_value(alpha_b);
  const double wd = scalar_value(wd_b);
  const double momentum = scalar_value(momentum_b);
  RmspropScalars<T> s;
  s.sign = maximize ? T(-1) : T(1);
  s.wd = static_cast<T>(wd);
  s.alpha = static_cast<T>(alpha);
  s.one_minus_alpha = static_cast<T>(1 - alpha);
  s.small = lerp_coefficient(s.one_minus_alpha, &s.coeff);
  s.eps = static_cast<T>(scalar_value(eps_b));
  s.momentum = static_cast<T>(momentum);
  s.neg_lr = static_cast<T>(-lr);
  // torch reads the group's momentum at every step (`if momentum > 0`); a
  // buffer exists where it was positive when the state was created
  const bool centered = state[1] != nullptr;
  const bool with_momentum = state[2] != nullptr && momentum > 0;
  const bool flags[4] = {fma, wd != 0, centered, with_momentum};
  auto fn = select_flags<RmspropKernel, T, 4>(flags);
  // the momentum buffer untouched where momentum is 0
  T* buf = with_momentum ? state[2] : nullptr;
  for (const Segment& seg : list) {
    run_segment<T>(plan, seg, fn, s, p, g, state[0], state[1], buf);
  }
  return ffi::Error::Success();
}

ffi::Error rmsprop_any(Plan& plan, ffi::AnyBuffer param,
                       ffi::AnyBuffer grad, RmspropBuffers bufs,
                       ffi::AnyBuffer lr, ffi::AnyBuffer alpha,
                       ffi::AnyBuffer eps, ffi::AnyBuffer wd,
                       ffi::AnyBuffer momentum, ffi::AnyBuffer* out_p, bool fma,
                       bool maximize, bool single_tensor,
                       ffi::Span<const int64_t> sizes,
                       ffi::Span<const int64_t> spans) {
  if (!single_tensor) {
    return ffi::Error::InvalidArgument("funcopt_rmsprop: torch has no fused RMSprop");
  }
  return by_float_type(param, "funcopt_rmsprop", [&](auto zero) {
    using T = decltype(zero);
    return rmsprop_typed<T>(plan, param, grad, bufs, lr, alpha, eps, wd,
                            momentum, out_p, fma, maximize, sizes, spans);
  });
}

// the handlers' shared arguments after the state buffers, and attributes
#define FUNCOPT_RMSPROP_PARAMS                                              \
  ffi::AnyBuffer step, ffi::AnyBuffer lr, ffi::AnyBuffer alpha,             \
      ffi::AnyBuffer eps, ffi::AnyBuffer wd, ffi::AnyBuffer momentum
#define FUNCOPT_RMSPROP_ATTR_PARAMS                                         \
  bool fma, bool maximize, bool single_tensor,                              \
      ffi::Span<const int64_t> sizes, ffi::Span<const int64_t> spans
#define FUNCOPT_RMSPROP_CALL(BUFS)                                          \
  rmsprop_any(plan, param, grad, BUFS, lr, alpha, eps, wd, momentum,        \
              &*out_p, fma, maximize, single_tensor, sizes, spans)

ffi::Error RmspropImpl(ffi::ThreadPool pool, ffi::AnyBuffer param,
                       ffi::AnyBuffer grad, ffi::AnyBuffer sq,
                       FUNCOPT_RMSPROP_PARAMS, ffi::Result<ffi::AnyBuffer> out_p,
                       ffi::Result<ffi::AnyBuffer> out_sq,
                       FUNCOPT_RMSPROP_ATTR_PARAMS) {
  RmspropBuffers bufs{{&sq, nullptr, nullptr}, {&*out_sq, nullptr, nullptr}};
  return planned(pool, [&](Plan& plan) {
    return FUNCOPT_RMSPROP_CALL(bufs);
  });
}

ffi::Error RmspropCenteredImpl(ffi::ThreadPool pool, ffi::AnyBuffer param,
                               ffi::AnyBuffer grad, ffi::AnyBuffer sq,
                               ffi::AnyBuffer ga, FUNCOPT_RMSPROP_PARAMS,
                               ffi::Result<ffi::AnyBuffer> out_p,
                               ffi::Result<ffi::AnyBuffer> out_sq,
                               ffi::Result<ffi::AnyBuffer> out_ga,
                               FUNCOPT_RMSPROP_ATTR_PARAMS) {
  RmspropBuffers bufs{{&sq, &ga, nullptr}, {&*out_sq, &*out_ga, nullptr}};
  return planned(pool, [&](Plan& plan) {
    return FUNCOPT_RMSPROP_CALL(bufs);
  });
}

ffi::Error RmspropMomentumImpl(ffi::ThreadPool pool, ffi::AnyBuffer param,
                               ffi::AnyBuffer grad, ffi::AnyBuffer sq,
                               ffi::AnyBuffer buf, FUNCOPT_RMSPROP_PARAMS,
                               ffi::Result<ffi::AnyBuffer> out_p,
                               ffi::Result<ffi::AnyBuffer> out_sq,
                               ffi::Result<ffi::AnyBuffer> out_buf,
                               FUNCOPT_RMSPROP_ATTR_PARAMS) {
  RmspropBuffers bufs{{&sq, nullptr, &buf}, {&*out_sq, nullptr, &*out_buf}};
  return planned(pool, [&](Plan& plan) {
    return FUNCOPT_RMSPROP_CALL(bufs);
  });
}

ffi::Error RmspropCenteredMomentumImpl(
    ffi::ThreadPool pool, ffi::AnyBuffer param, ffi::AnyBuffer grad,
    ffi::AnyBuffer sq, ffi::AnyBuffer ga, ffi::AnyBuffer buf,
    FUNCOPT_RMSPROP_PARAMS, ffi::Result<ffi::AnyBuffer> out_p,
    ffi::Result<ffi::AnyBuffer> out_sq, ffi::Result<ffi::AnyBuffer> out_ga,
    ffi::Result<ffi::AnyBuffer> out_buf, FUNCOPT_RMSPROP_ATTR_PARAMS) {
  RmspropBuffers bufs{{&sq, &ga, &buf}, {&*out_sq, &*out_ga, &*out_buf}};
  return planned(pool, [&](Plan& plan) {
    return FUNCOPT_RMSPROP_CALL(bufs);
  });
}

// ---------------------------------------------------------------------------
// Adamax (torch has no fused Adamax: `_single_tensor_adamax` only)
//   grad = grad.add(param, alpha=wd)                  fma(wd, param, grad)
//   exp_avg.lerp_(grad, 1 - beta1)                    as Adam's
//   torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
//                                                     NaN if either is NaN
//   param.addcdiv_(exp_avg, exp_inf, value=-clr)  param + (-clr * m) / u,
//   clr = lr / (1 - beta1 ** step), Python floats (double)
// ---------------------------------------------------------------------------

template <typename T>
struct AdamaxScalars {
  // coeff: the lerp's (`lerp_coefficient`; its branch is SMALL)
  T sign, wd, coeff, b2, eps, neg_clr;
};

template <typename T, bool FMA, bool WD, bool SMALL>
FUNCOPT_INLINE void adamax_loop(T* __restrict p, const T* __restrict g,
                                T* __restrict m, T* __restrict u, int64_t n,
                                const AdamaxScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    T param = p[i];
    T grad = g[i] * s.sign;
    if constexpr (WD) grad = madd<FMA>(param, s.wd, grad);
    T mi = m[i];
    mi = lerp<FMA, SMALL>(mi, grad, s.coeff);
    T decayed = u[i] * s.b2;
    T bound = std::abs(grad) + s.eps;
    T ui = (decayed > bound || decayed != decayed) ? decayed : bound;
    m[i] = mi;
    u[i] = ui;
    p[i] = param + (s.neg_clr * mi) / ui;
  }
}

struct AdamaxKernel {
  template <typename T, bool FMA, bool WD, bool SMALL>
  static FUNCOPT_INLINE void segment(void* p, const void* g, void* m, void* u,
                                     int64_t n, const void* s) {
    adamax_loop<T, FMA, WD, SMALL>(static_cast<T*>(p), static_cast<const T*>(g),
                                   static_cast<T*>(m), static_cast<T*>(u), n,
                                   *static_cast<const AdamaxScalars<T>*>(s));
  }
};

template <typename T>
ffi::Error adamax_typed(Plan& plan, ffi::AnyBuffer param,
                        ffi::AnyBuffer grad, ffi::AnyBuffer exp_avg,
                        ffi::AnyBuffer exp_inf, ffi::AnyBuffer step,
                        ffi::AnyBuffer lr_b, ffi::AnyBuffer betas,
                        ffi::AnyBuffer eps_b, ffi::AnyBuffer wd_b,
                        ffi::AnyBuffer* out_p, ffi::AnyBuffer* out_m,
                        ffi::AnyBuffer* out_u, bool fma, bool maximize,
                        ffi::Span<const int64_t> sizes,
                        ffi::Span<const int64_t> spans) {
  KeepSubnormals keep;  // the scalar math too
  const Param<T> p = param_result<T>(param, out_p);
  T* m = in_place<T>(exp_avg, out_m);
  T* u = in_place<T>(exp_inf, out_u);
  const T* g = grad.typed_data<T>();
  std::vector<Segment> list;
  ffi::Error bad = segments(param.element_count(), sizes, spans, list);
  if (bad.failure()) return bad;
  const double lr = scalar_value(lr_b);
  const double beta1 = scalar_value(betas, 0);
  const double wd = scalar_value(wd_b);
  AdamaxScalars<T> s;
  s.sign = maximize ? T(-1) : T(1);
  s.wd = static_cast<T>(wd);
  const bool small = lerp_coefficient(static_cast<T>(1 - beta1), &s.coeff);
  s.b2 = static_cast<T>(scalar_value(betas, 1));
  s.eps = static_cast<T>(scalar_value(eps_b));
  const bool flags[3] = {fma, wd != 0, small};
  auto fn = select_flags<AdamaxKernel, T, 3>(flags);
  for (size_t k = 0; k < list.size(); ++k) {
    const double t = step_value(step, static_cast<int64_t>(k));
    s.neg_clr = static_cast<T>(-(lr / (1 - std::pow(beta1, t))));
    run_segment<T>(plan, list[k], fn, s, p, g, m, u);
  }
  return ffi::Error::Success();
}

ffi::Error AdamaxImpl(ffi::ThreadPool pool, ffi::AnyBuffer param,
                      ffi::AnyBuffer grad, ffi::AnyBuffer exp_avg,
                      ffi::AnyBuffer exp_inf, ffi::AnyBuffer step,
                      ffi::AnyBuffer lr, ffi::AnyBuffer betas,
                      ffi::AnyBuffer eps, ffi::AnyBuffer wd,
                      ffi::Result<ffi::AnyBuffer> out_p,
                      ffi::Result<ffi::AnyBuffer> out_m,
                      ffi::Result<ffi::AnyBuffer> out_u, bool fma,
                      bool maximize, bool single_tensor,
                      ffi::Span<const int64_t> sizes,
                      ffi::Span<const int64_t> spans) {
  if (!single_tensor) {
    return ffi::Error::InvalidArgument("funcopt_adamax: torch has no fused Adamax");
  }
  return by_float_type(param, "funcopt_adamax", [&](auto zero) {
    using T = decltype(zero);
    return planned(pool, [&](Plan& plan) {
      return adamax_typed<T>(plan, param, grad, exp_avg, exp_inf, step, lr, betas,
                               eps, wd, &*out_p, &*out_m, &*out_u, fma, maximize,
                               sizes, spans);
    });
  });
}

// ---------------------------------------------------------------------------
// Adadelta (torch has no fused Adadelta: `_single_tensor_adadelta` only)
//   grad = grad.add(param, alpha=wd)                  fma(wd, param, grad)
//   square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
//                                     fma((1 - rho) * grad, grad, sq * rho)
//   std = square_avg.add(eps).sqrt_()
//   delta = acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
//   acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
//   param.add_(delta, alpha=-lr)                      fma(-lr, delta, param)
// ---------------------------------------------------------------------------

template <typename T>
struct AdadeltaScalars {
  T sign, wd, rho, one_minus_rho, eps, neg_lr;
};

template <typename T, bool FMA, bool WD>
FUNCOPT_INLINE void adadelta_loop(T* __restrict p, const T* __restrict g,
                                  T* __restrict sq, T* __restrict acc,
                                  int64_t n, const AdadeltaScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    T param = p[i];
    T grad = g[i] * s.sign;
    if constexpr (WD) grad = madd<FMA>(param, s.wd, grad);
    T square_avg = madd<FMA>(s.one_minus_rho * grad, grad, sq[i] * s.rho);
    T std_ = std::sqrt(square_avg + s.eps);
    T ai = acc[i];
    T delta = (std::sqrt(ai + s.eps) / std_) * grad;
    sq[i] = square_avg;
    acc[i] = madd<FMA>(s.one_minus_rho * delta, delta, ai * s.rho);
    p[i] = madd<FMA>(s.neg_lr, delta, param);
  }
}

struct AdadeltaKernel {
  template <typename T, bool FMA, bool WD>
  static FUNCOPT_INLINE void segment(void* p, const void* g, void* sq,
                                       void* acc, int64_t n, const void* s) {
    adadelta_loop<T, FMA, WD>(static_cast<T*>(p), static_cast<const T*>(g),
                              static_cast<T*>(sq), static_cast<T*>(acc), n,
                              *static_cast<const AdadeltaScalars<T>*>(s));
  }
};

template <typename T>
ffi::Error adadelta_typed(Plan& plan, ffi::AnyBuffer param,
                          ffi::AnyBuffer grad, ffi::AnyBuffer square_avg,
                          ffi::AnyBuffer acc_delta, ffi::AnyBuffer lr_b,
                          ffi::AnyBuffer rho_b, ffi::AnyBuffer eps_b,
                          ffi::AnyBuffer wd_b, ffi::AnyBuffer* out_p,
                          ffi::AnyBuffer* out_sq, ffi::AnyBuffer* out_acc,
                          bool fma, bool maximize,
                          ffi::Span<const int64_t> sizes,
                          ffi::Span<const int64_t> spans) {
  KeepSubnormals keep;  // the scalar math too
  const Param<T> p = param_result<T>(param, out_p);
  T* sq = in_place<T>(square_avg, out_sq);
  T* acc = in_place<T>(acc_delta, out_acc);
  const T* g = grad.typed_data<T>();
  std::vector<Segment> list;
  ffi::Error bad = segments(param.element_count(), sizes, spans, list);
  if (bad.failure()) return bad;
  const double rho = scalar_value(rho_b);
  const double wd = scalar_value(wd_b);
  AdadeltaScalars<T> s;
  s.sign = maximize ? T(-1) : T(1);
  s.wd = static_cast<T>(wd);
  s.rho = static_cast<T>(rho);
  s.one_minus_rho = static_cast<T>(1 - rho);
  s.eps = static_cast<T>(scalar_value(eps_b));
  s.neg_lr = static_cast<T>(-scalar_value(lr_b));
  const bool flags[2] = {fma, wd != 0};
  auto fn = select_flags<AdadeltaKernel, T, 2>(flags);
  for (const Segment& seg : list) {
    run_segment<T>(plan, seg, fn, s, p, g, sq, acc);
  }
  return ffi::Error::Success();
}

ffi::Error AdadeltaImpl(ffi::ThreadPool pool, ffi::AnyBuffer param,
                        ffi::AnyBuffer grad, ffi::AnyBuffer square_avg,
                        ffi::AnyBuffer acc_delta, ffi::AnyBuffer step,
                        ffi::AnyBuffer lr, ffi::AnyBuffer rho,
                        ffi::AnyBuffer eps, ffi::AnyBuffer wd,
                        ffi::Result<ffi::AnyBuffer> out_p,
                        ffi::Result<ffi::AnyBuffer> out_sq,
                        ffi::Result<ffi::AnyBuffer> out_acc, bool fma,
                        bool maximize, bool single_tensor,
                        ffi::Span<const int64_t> sizes,
                        ffi::Span<const int64_t> spans) {
  if (!single_tensor) {
    return ffi::Error::InvalidArgument("funcopt_adadelta: torch has no fused Adadelta");
  }
  return by_float_type(param, "funcopt_adadelta", [&](auto zero) {
    using T = decltype(zero);
    return planned(pool, [&](Plan& plan) {
      return adadelta_typed<T>(plan, param, grad, square_avg, acc_delta, lr, rho,
                                 eps, wd, &*out_p, &*out_sq, &*out_acc, fma,
                                 maximize, sizes, spans);
    });
  });
}

// ---------------------------------------------------------------------------
// RAdam (torch has no fused RAdam: `_single_tensor_radam`, its default
// path with `foreach` unset on CPU)
//   param.mul_(1 - lr * wd) (decoupled) or grad = grad.add(param, alpha=wd)
//   exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq as Adam's
//   bias_corrected_exp_avg = exp_avg / bias_correction1
//   rho_t > 5:  param.add_(bias_corrected_exp_avg * lr
//                          * (bias_correction2**0.5 / (exp_avg_sq.sqrt() + eps))
//                          * rect, alpha=-1)
//   otherwise:  param.add_(bias_corrected_exp_avg * lr, alpha=-1)
// `scalar / tensor` is `tensor.reciprocal() * scalar` (Tensor.__rtruediv__);
// rho_t, rect and the bias corrections are Python floats (double) per leaf.
// ---------------------------------------------------------------------------

template <typename T>
struct RadamScalars {
  // coeff: the lerp's (`lerp_coefficient`; its branch is SMALL); decay: the
  // decoupled factor (1 otherwise); rectified: this leaf's rho_t > 5
  T sign, wd, decay, coeff, b2, one_minus_b2, eps, bc1, lr, bc2_sqrt, rect;
  bool rectified;
};

template <typename T, bool FMA, bool WD, bool SMALL, bool RECT>
FUNCOPT_INLINE void radam_loop(T* __restrict p, const T* __restrict g,
                               T* __restrict m, T* __restrict v, int64_t n,
                               const RadamScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    T param = p[i];
    T grad = g[i] * s.sign;
    if constexpr (WD) grad = madd<FMA>(param, s.wd, grad);
    param = param * s.decay;
    T mi = m[i];
    mi = lerp<FMA, SMALL>(mi, grad, s.coeff);
    T vi = v[i];
    vi = madd<FMA>(s.one_minus_b2 * grad, grad, vi * s.b2);
    m[i] = mi;
    v[i] = vi;
    T update = (mi / s.bc1) * s.lr;
    if constexpr (RECT) {
      T adaptive = (T(1) / (std::sqrt(vi) + s.eps)) * s.bc2_sqrt;
      update = (update * adaptive) * s.rect;
    }
    p[i] = param - update;
  }
}

struct RadamKernel {
  template <typename T, bool FMA, bool WD, bool SMALL>
  static FUNCOPT_INLINE void segment(void* pv, const void* gv, void* mv, void* vv,
                                    int64_t n, const void* sv) {
    const auto& s = *static_cast<const RadamScalars<T>*>(sv);
    T* p = static_cast<T*>(pv);
    const T* g = static_cast<const T*>(gv);
    T* m = static_cast<T*>(mv);
    T* v = static_cast<T*>(vv);
    if (s.rectified) {
      radam_loop<T, FMA, WD, SMALL, true>(p, g, m, v, n, s);
    } else {
      radam_loop<T, FMA, WD, SMALL, false>(p, g, m, v, n, s);
    }
  }
};

template <typename T>
ffi::Error radam_typed(Plan& plan, ffi::AnyBuffer param,
                       ffi::AnyBuffer grad, ffi::AnyBuffer exp_avg,
                       ffi::AnyBuffer exp_avg_sq, ffi::AnyBuffer step,
                       ffi::AnyBuffer lr_b, ffi::AnyBuffer betas,
                       ffi::AnyBuffer eps_b, ffi::AnyBuffer wd_b,
                       ffi::AnyBuffer* out_p, ffi::AnyBuffer* out_m,
                       ffi::AnyBuffer* out_v, bool fma, bool maximize,
                       bool decoupled, ffi::Span<const int64_t> sizes,
                       ffi::Span<const int64_t> spans) {
  KeepSubnormals keep;  // the scalar math too
  const Param<T> p = param_result<T>(param, out_p);
  T* m = in_place<T>(exp_avg, out_m);
  T* v = in_place<T>(exp_avg_sq, out_v);
  const T* g = grad.typed_data<T>();
  std::vector<Segment> list;
  ffi::Error bad = segments(param.element_count(), sizes, spans, list);
  if (bad.failure()) return bad;
  const double lr = scalar_value(lr_b);
  const double beta1 = scalar_value(betas, 0);
  const double beta2 = scalar_value(betas, 1);
  const double wd = scalar_value(wd_b);
  RadamScalars<T> s;
  s.sign = maximize ? T(-1) : T(1);
  s.wd = static_cast<T>(wd);
  // `1 - lr * weight_decay`, Python floats (unfused)
  s.decay = decoupled ? static_cast<T>(1.0 - lr * wd) : T(1);
  const bool small = lerp_coefficient(static_cast<T>(1 - beta1), &s.coeff);
  s.b2 = static_cast<T>(beta2);
  s.one_minus_b2 = static_cast<T>(1 - beta2);
  s.eps = static_cast<T>(scalar_value(eps_b));
  s.lr = static_cast<T>(lr);
  const double rho_inf = 2 / (1 - beta2) - 1;
  const bool flags[3] = {fma, !decoupled && wd != 0, small};
  auto fn = select_flags<RadamKernel, T, 3>(flags);
  for (size_t k = 0; k < list.size(); ++k) {
    const double t = step_value(step, static_cast<int64_t>(k));
    const double bias_correction1 = 1 - std::pow(beta1, t);
    const double bias_correction2 = 1 - std::pow(beta2, t);
    const double rho_t =
        rho_inf - 2 * t * std::pow(beta2, t) / bias_correction2;
    s.rectified = rho_t > 5.0;
    s.bc1 = static_cast<T>(bias_correction1);
    s.bc2_sqrt = static_cast<T>(std::pow(bias_correction2, 0.5));
    s.rect = static_cast<T>(std::pow((rho_t - 4) * (rho_t - 2) * rho_inf /
                                         ((rho_inf - 4) * (rho_inf - 2) * rho_t),
                                     0.5));
    run_segment<T>(plan, list[k], fn, s, p, g, m, v);
  }
  return ffi::Error::Success();
}

ffi::Error RadamImpl(ffi::ThreadPool pool, ffi::AnyBuffer param,
                     ffi::AnyBuffer grad, ffi::AnyBuffer exp_avg,
                     ffi::AnyBuffer exp_avg_sq, ffi::AnyBuffer step,
                     ffi::AnyBuffer lr, ffi::AnyBuffer betas,
                     ffi::AnyBuffer eps, ffi::AnyBuffer wd,
                     ffi::Result<ffi::AnyBuffer> out_p,
                     ffi::Result<ffi::AnyBuffer> out_m,
                     ffi::Result<ffi::AnyBuffer> out_v, bool fma,
                     bool maximize, bool decoupled, bool single_tensor,
                     ffi::Span<const int64_t> sizes,
                     ffi::Span<const int64_t> spans) {
  if (!single_tensor) {
    return ffi::Error::InvalidArgument("funcopt_radam: torch has no fused RAdam");
  }
  return by_float_type(param, "funcopt_radam", [&](auto zero) {
    using T = decltype(zero);
    return planned(pool, [&](Plan& plan) {
      return radam_typed<T>(plan, param, grad, exp_avg, exp_avg_sq, step, lr,
                              betas, eps, wd, &*out_p, &*out_m, &*out_v, fma,
                              maximize, decoupled, sizes, spans);
    });
  });
}

// ---------------------------------------------------------------------------
// Rprop (torch has no fused Rprop: `_single_tensor_rprop` only)
//   sign = grad.mul(prev).sign(); sign[> 0] = etaplus; sign[< 0] = etaminus;
//   sign[== 0] = 1 (NaN stays NaN)
//   step_size.mul_(sign).clamp_(step_size_min, step_size_max)
//   grad[sign == etaminus] = 0; param.addcmul_(grad.sign(), step_size,
//   value=-1); prev.copy_(grad)
// step_size starts as lr at a leaf's first step (torch creates it then).
// Only the two products and the update round.
// ---------------------------------------------------------------------------

template <typename T>
struct RpropScalars {
  T sign, etaminus, etaplus, step_size_min, step_size_max, lr;
};

struct RpropKernel {
  // FIRST: the leaf's first step (step_size is lr)
  template <typename T, bool FIRST>
  static FUNCOPT_INLINE void loop(T* __restrict p, const T* __restrict g,
                                  T* __restrict prev, T* __restrict step_size,
                                  int64_t n, const RpropScalars<T> s) {
    for (int64_t i = 0; i < n; ++i) {
      // one select per statement: GCC does not vectorise the nested form
      T grad = g[i] * s.sign;
      T product = grad * prev[i];
      T factor = product > T(0) ? s.etaplus : T(1);
      factor = product < T(0) ? s.etaminus : factor;
      factor = product != product ? product : factor;  // NaN stays NaN
      T size = (FIRST ? s.lr : step_size[i]) * factor;
      size = size < s.step_size_min ? s.step_size_min : size;
      size = size > s.step_size_max ? s.step_size_max : size;
      grad = factor == s.etaminus ? T(0) : grad;
      // grad.sign(): +-1, or the zero or NaN itself
      T direction = grad > T(0) ? T(1) : grad;
      direction = grad < T(0) ? T(-1) : direction;
      step_size[i] = size;
      prev[i] = grad;
      p[i] = p[i] - direction * size;
    }
  }

  template <typename T, bool FIRST>
  static FUNCOPT_INLINE void segment(void* p, const void* g, void* prev,
                                     void* step_size, int64_t n,
                                     const void* s) {
    loop<T, FIRST>(static_cast<T*>(p), static_cast<const T*>(g),
                   static_cast<T*>(prev), static_cast<T*>(step_size), n,
                   *static_cast<const RpropScalars<T>*>(s));
  }
};

template <typename T>
ffi::Error rprop_typed(Plan& plan, ffi::AnyBuffer param,
                       ffi::AnyBuffer grad, ffi::AnyBuffer prev_b,
                       ffi::AnyBuffer step_size_b, ffi::AnyBuffer step,
                       ffi::AnyBuffer lr_b, ffi::AnyBuffer etas,
                       ffi::AnyBuffer step_sizes, ffi::AnyBuffer* out_p,
                       ffi::AnyBuffer* out_prev, ffi::AnyBuffer* out_size,
                       bool maximize, ffi::Span<const int64_t> sizes,
                       ffi::Span<const int64_t> spans) {
  KeepSubnormals keep;  // the scalar math too
  const Param<T> p = param_result<T>(param, out_p);
  T* prev = in_place<T>(prev_b, out_prev);
  T* size = in_place<T>(step_size_b, out_size);
  const T* g = grad.typed_data<T>();
  std::vector<Segment> list;
  ffi::Error bad = segments(param.element_count(), sizes, spans, list);
  if (bad.failure()) return bad;
  RpropScalars<T> s;
  s.sign = maximize ? T(-1) : T(1);
  s.etaminus = static_cast<T>(scalar_value(etas, 0));
  s.etaplus = static_cast<T>(scalar_value(etas, 1));
  s.step_size_min = static_cast<T>(scalar_value(step_sizes, 0));
  s.step_size_max = static_cast<T>(scalar_value(step_sizes, 1));
  s.lr = static_cast<T>(scalar_value(lr_b));
  for (size_t k = 0; k < list.size(); ++k) {
    const bool first = step_value(step, static_cast<int64_t>(k)) == 1;
    auto fn = select_flags<RpropKernel, T, 1>(&first);
    run_segment<T>(plan, list[k], fn, s, p, g, prev, size);
  }
  return ffi::Error::Success();
}

ffi::Error RpropImpl(ffi::ThreadPool pool, ffi::AnyBuffer param,
                     ffi::AnyBuffer grad, ffi::AnyBuffer prev,
                     ffi::AnyBuffer step_size, ffi::AnyBuffer step,
                     ffi::AnyBuffer lr, ffi::AnyBuffer etas,
                     ffi::AnyBuffer step_sizes,
                     ffi::Result<ffi::AnyBuffer> out_p,
                     ffi::Result<ffi::AnyBuffer> out_prev,
                     ffi::Result<ffi::AnyBuffer> out_size, bool fma,
                     bool maximize, bool single_tensor,
                     ffi::Span<const int64_t> sizes,
                     ffi::Span<const int64_t> spans) {
  if (!single_tensor) {
    return ffi::Error::InvalidArgument("funcopt_rprop: torch has no fused Rprop");
  }
  return by_float_type(param, "funcopt_rprop", [&](auto zero) {
    using T = decltype(zero);
    return planned(pool, [&](Plan& plan) {
      return rprop_typed<T>(plan, param, grad, prev, step_size, step, lr, etas,
                              step_sizes, &*out_p, &*out_prev, &*out_size, maximize,
                              sizes, spans);
    });
  });
}

// ---------------------------------------------------------------------------
// A float32 0-d state tensor of each parameter (NAdam's `mu_product`, ASGD's
// `eta` and `mu`; float32 whatever the param's dtype: torch's default dtype),
// in place. Attribute `rows`: the rows each packed leaf occupies, every one
// holding its value (empty: one leaf, one value).
// ---------------------------------------------------------------------------

class PerLeaf {
 public:
  ffi::Error bind(ffi::AnyBuffer& in, ffi::AnyBuffer* out, size_t leaves,
                  ffi::Span<const int64_t> rows) {
    int64_t total = 0;
    for (size_t k = 0; k < rows.size(); ++k) {
      if (rows[k] < 1) {
        return ffi::Error::InvalidArgument("a packed leaf owns at least one row");
      }
      first_.push_back(total);
      count_.push_back(rows[k]);
      total += rows[k];
    }
    if (rows.size() == 0) {
      first_.push_back(0);
      count_.push_back(1);
      total = 1;
    }
    if (in.element_type() != ffi::DataType::F32 || first_.size() != leaves ||
        static_cast<int64_t>(in.element_count()) != total) {
      return ffi::Error::InvalidArgument(
          "a per-parameter scalar buffer holds one float32 value per row of "
          "each leaf");
    }
    data_ = in_place<float>(in, out);
    return ffi::Error::Success();
  }
  float get(size_t k) const { return data_[first_[k]]; }
  void set(size_t k, float value) {
    std::fill(data_ + first_[k], data_ + first_[k] + count_[k], value);
  }

 private:
  float* data_ = nullptr;
  std::vector<int64_t> first_, count_;
};

// ---------------------------------------------------------------------------
// NAdam (torch has no fused NAdam: `_single_tensor_nadam` only)
//   grad = grad.add(param, alpha=wd)                  fma(wd, param, grad)
//   or param.mul_(1 - lr * wd) (decoupled)
//   mu = beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay)), mu_next the same
//   at step + 1 (Python floats)
//   mu_product *= mu          float32: the 0-d tensor times float32(mu)
//   exp_avg.lerp_(grad, 1 - beta1)                    as Adam's
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//   denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
//   param.addcdiv_(grad, denom, value=-lr * (1 - mu) / (1 - mu_product))
//   param.addcdiv_(exp_avg, denom,
//                  value=(-lr * mu_next) / (1 - mu_product * mu_next))
// `addcdiv` is `param + (value * t1) / t2`; the step sizes are Python floats
// on mu_product's float32 value.
// ---------------------------------------------------------------------------

template <typename T>
struct NadamScalars {
  // coeff: the lerp's (`lerp_coefficient`; its branch is SMALL); decay: the
  // decoupled factor (1 otherwise)
  T sign, wd, decay, coeff, b2, one_minus_b2, bc2, eps, grad_step, avg_step;
};

template <typename T, bool FMA, bool WD, bool SMALL>
FUNCOPT_INLINE void nadam_loop(T* __restrict p, const T* __restrict g,
                               T* __restrict m, T* __restrict v, int64_t n,
                               const NadamScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    T param = p[i];
    T grad = g[i] * s.sign;
    if constexpr (WD) grad = madd<FMA>(param, s.wd, grad);
    param = param * s.decay;
    T mi = m[i];
    mi = lerp<FMA, SMALL>(mi, grad, s.coeff);
    T vi = v[i];
    vi = madd<FMA>(s.one_minus_b2 * grad, grad, vi * s.b2);
    m[i] = mi;
    v[i] = vi;
    T denom = std::sqrt(vi / s.bc2) + s.eps;
    param = param + (s.grad_step * grad) / denom;
    p[i] = param + (s.avg_step * mi) / denom;
  }
}

struct NadamKernel {
  template <typename T, bool FMA, bool WD, bool SMALL>
  static FUNCOPT_INLINE void segment(void* p, const void* g, void* m, void* v,
                                     int64_t n, const void* s) {
    nadam_loop<T, FMA, WD, SMALL>(static_cast<T*>(p), static_cast<const T*>(g),
                                  static_cast<T*>(m), static_cast<T*>(v), n,
                                  *static_cast<const NadamScalars<T>*>(s));
  }
};

template <typename T>
ffi::Error nadam_typed(Plan& plan, ffi::AnyBuffer param,
                       ffi::AnyBuffer grad, ffi::AnyBuffer exp_avg,
                       ffi::AnyBuffer exp_avg_sq, ffi::AnyBuffer mu_product,
                       ffi::AnyBuffer step, ffi::AnyBuffer lr_b,
                       ffi::AnyBuffer betas, ffi::AnyBuffer eps_b,
                       ffi::AnyBuffer wd_b, ffi::AnyBuffer momentum_decay_b,
                       ffi::AnyBuffer* out_p, ffi::AnyBuffer* out_m,
                       ffi::AnyBuffer* out_v, ffi::AnyBuffer* out_mu,
                       bool fma, bool maximize, bool decoupled,
                       ffi::Span<const int64_t> sizes,
                       ffi::Span<const int64_t> spans,
                       ffi::Span<const int64_t> rows) {
  KeepSubnormals keep;  // the scalar math too: mu_product turns subnormal
  const Param<T> p = param_result<T>(param, out_p);
  T* m = in_place<T>(exp_avg, out_m);
  T* v = in_place<T>(exp_avg_sq, out_v);
  const T* g = grad.typed_data<T>();
  std::vector<Segment> list;
  ffi::Error bad = segments(param.element_count(), sizes, spans, list);
  if (bad.failure()) return bad;
  PerLeaf mu_products;
  bad = mu_products.bind(mu_product, out_mu, list.size(), rows);
  if (bad.failure()) return bad;
  const double lr = scalar_value(lr_b);
  const double beta1 = scalar_value(betas, 0);
  const double beta2 = scalar_value(betas, 1);
  const double wd = scalar_value(wd_b);
  const double momentum_decay = scalar_value(momentum_decay_b);
  NadamScalars<T> s;
  s.sign = maximize ? T(-1) : T(1);
  s.wd = static_cast<T>(wd);
  // `1 - lr * weight_decay`, Python floats (unfused)
  s.decay = decoupled ? static_cast<T>(1.0 - lr * wd) : T(1);
  const bool small = lerp_coefficient(static_cast<T>(1 - beta1), &s.coeff);
  s.b2 = static_cast<T>(beta2);
  s.one_minus_b2 = static_cast<T>(1 - beta2);
  s.eps = static_cast<T>(scalar_value(eps_b));
  const bool flags[3] = {fma, !decoupled && wd != 0, small};
  auto fn = select_flags<NadamKernel, T, 3>(flags);
  for (size_t k = 0; k < list.size(); ++k) {
    const double t = step_value(step, static_cast<int64_t>(k));
    s.bc2 = static_cast<T>(1 - std::pow(beta2, t));
    const double mu = beta1 * (1.0 - 0.5 * std::pow(0.96, t * momentum_decay));
    const double mu_next =
        beta1 * (1.0 - 0.5 * std::pow(0.96, (t + 1) * momentum_decay));
    const float product = mu_products.get(k) * static_cast<float>(mu);
    mu_products.set(k, product);  // _get_value(mu_product) below: its value
    s.grad_step = static_cast<T>(-lr * (1.0 - mu) / (1.0 - product));
    s.avg_step = static_cast<T>((-lr * mu_next) / (1.0 - product * mu_next));
    run_segment<T>(plan, list[k], fn, s, p, g, m, v);
  }
  return ffi::Error::Success();
}

ffi::Error NadamImpl(ffi::ThreadPool pool, ffi::AnyBuffer param,
                     ffi::AnyBuffer grad, ffi::AnyBuffer exp_avg,
                     ffi::AnyBuffer exp_avg_sq, ffi::AnyBuffer mu_product,
                     ffi::AnyBuffer step, ffi::AnyBuffer lr,
                     ffi::AnyBuffer betas, ffi::AnyBuffer eps,
                     ffi::AnyBuffer wd, ffi::AnyBuffer momentum_decay,
                     ffi::Result<ffi::AnyBuffer> out_p,
                     ffi::Result<ffi::AnyBuffer> out_m,
                     ffi::Result<ffi::AnyBuffer> out_v,
                     ffi::Result<ffi::AnyBuffer> out_mu, bool fma,
                     bool maximize, bool decoupled, bool single_tensor,
                     ffi::Span<const int64_t> sizes,
                     ffi::Span<const int64_t> spans,
                     ffi::Span<const int64_t> rows) {
  if (!single_tensor) {
    return ffi::Error::InvalidArgument("funcopt_nadam: torch has no fused NAdam");
  }
  return by_float_type(param, "funcopt_nadam", [&](auto zero) {
    using T = decltype(zero);
    return planned(pool, [&](Plan& plan) {
      return nadam_typed<T>(plan, param, grad, exp_avg, exp_avg_sq, mu_product,
                              step, lr, betas, eps, wd, momentum_decay, &*out_p,
                              &*out_m, &*out_v, &*out_mu, fma, maximize, decoupled,
                              sizes, spans, rows);
    });
  });
}

// ---------------------------------------------------------------------------
// ASGD (torch has no fused ASGD: `_single_tensor_asgd` only)
//   grad = grad.add(param, alpha=wd)                  fma(wd, param, grad)
//   param.mul_(1 - lambd * eta); param.add_(grad, alpha=-eta)
//                                                     fma(-eta, grad, param)
//   mu != 1: ax.add_(param.sub(ax).mul_(mu)), each op rounded; else
//   ax.copy_(param)
//   eta = float32(lr / (1 + lambd * lr * step) ** alpha),
//   mu = float32(1 / max(1, step - t0))      Python floats, stored as float32
// `eta` and `mu` are the values of the step before (torch creates eta from
// the group's lr at a parameter's first step, and mu as 1).
// ---------------------------------------------------------------------------

template <typename T>
struct AsgdScalars {
  T sign, wd, decay, neg_eta, mu;
  bool average;
};

template <typename T, bool FMA, bool WD, bool AVERAGE>
FUNCOPT_INLINE void asgd_loop(T* __restrict p, const T* __restrict g,
                              T* __restrict ax, int64_t n,
                              const AsgdScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    T param = p[i];
    T grad = g[i] * s.sign;
    if constexpr (WD) grad = madd<FMA>(param, s.wd, grad);
    param = madd<FMA>(grad, s.neg_eta, param * s.decay);
    p[i] = param;
    if constexpr (AVERAGE) {
      T average = ax[i];
      ax[i] = average + (param - average) * s.mu;
    } else {
      ax[i] = param;
    }
  }
}

struct AsgdKernel {
  template <typename T, bool FMA, bool WD>
  static FUNCOPT_INLINE void segment(void* p, const void* g, void* ax,
                                     int64_t n, const void* sv) {
    const auto& s = *static_cast<const AsgdScalars<T>*>(sv);
    if (s.average) {
      asgd_loop<T, FMA, WD, true>(static_cast<T*>(p), static_cast<const T*>(g),
                                  static_cast<T*>(ax), n, s);
    } else {
      asgd_loop<T, FMA, WD, false>(static_cast<T*>(p), static_cast<const T*>(g),
                                   static_cast<T*>(ax), n, s);
    }
  }
};

template <typename T>
ffi::Error asgd_typed(Plan& plan, ffi::AnyBuffer param,
                      ffi::AnyBuffer grad, ffi::AnyBuffer ax_b,
                      ffi::AnyBuffer eta_b, ffi::AnyBuffer mu_b,
                      ffi::AnyBuffer step, ffi::AnyBuffer lr_b,
                      ffi::AnyBuffer lambd_b, ffi::AnyBuffer alpha_b,
                      ffi::AnyBuffer t0_b, ffi::AnyBuffer wd_b,
                      ffi::AnyBuffer* out_p, ffi::AnyBuffer* out_ax,
                      ffi::AnyBuffer* out_eta, ffi::AnyBuffer* out_mu,
                      bool fma, bool maximize, ffi::Span<const int64_t> sizes,
                      ffi::Span<const int64_t> spans,
                      ffi::Span<const int64_t> rows) {
  KeepSubnormals keep;  // the scalar math too
  const Param<T> p = param_result<T>(param, out_p);
  T* ax = in_place<T>(ax_b, out_ax);
  const T* g = grad.typed_data<T>();
  std::vector<Segment> list;
  ffi::Error bad = segments(param.element_count(), sizes, spans, list);
  if (bad.failure()) return bad;
  PerLeaf etas, mus;
  bad = etas.bind(eta_b, out_eta, list.size(), rows);
  if (bad.failure()) return bad;
  bad = mus.bind(mu_b, out_mu, list.size(), rows);
  if (bad.failure()) return bad;
  const double lr = scalar_value(lr_b);
  const double lambd = scalar_value(lambd_b);
  const double alpha = scalar_value(alpha_b);
  const double t0 = scalar_value(t0_b);
  const double wd = scalar_value(wd_b);
  AsgdScalars<T> s;
  s.sign = maximize ? T(-1) : T(1);
  s.wd = static_cast<T>(wd);
  const bool flags[2] = {fma, wd != 0};
  auto fn = select_flags<AsgdKernel, T, 2>(flags);
  for (size_t k = 0; k < list.size(); ++k) {
    const double t = step_value(step, static_cast<int64_t>(k));
    // _get_value(eta): at a first step, the group's lr as torch stored it
    const double eta = t == 1 ? static_cast<float>(lr) : etas.get(k);
    const float mu = mus.get(k);
    s.decay = static_cast<T>(1 - lambd * eta);
    s.neg_eta = static_cast<T>(-eta);
    s.mu = static_cast<T>(mu);
    s.average = mu != 1.0f;  // mu.item() != 1
    run_segment<T>(plan, list[k], fn, s, p, g, ax);
    etas.set(k, static_cast<float>(lr / std::pow(1 + lambd * lr * t, alpha)));
    mus.set(k, static_cast<float>(1 / std::max(1.0, t - t0)));
  }
  return ffi::Error::Success();
}

ffi::Error AsgdImpl(ffi::ThreadPool pool, ffi::AnyBuffer param,
                    ffi::AnyBuffer grad, ffi::AnyBuffer ax, ffi::AnyBuffer eta,
                    ffi::AnyBuffer mu, ffi::AnyBuffer step, ffi::AnyBuffer lr,
                    ffi::AnyBuffer lambd, ffi::AnyBuffer alpha,
                    ffi::AnyBuffer t0, ffi::AnyBuffer wd,
                    ffi::Result<ffi::AnyBuffer> out_p,
                    ffi::Result<ffi::AnyBuffer> out_ax,
                    ffi::Result<ffi::AnyBuffer> out_eta,
                    ffi::Result<ffi::AnyBuffer> out_mu, bool fma,
                    bool maximize, bool single_tensor,
                    ffi::Span<const int64_t> sizes,
                    ffi::Span<const int64_t> spans,
                    ffi::Span<const int64_t> rows) {
  if (!single_tensor) {
    return ffi::Error::InvalidArgument("funcopt_asgd: torch has no fused ASGD");
  }
  return by_float_type(param, "funcopt_asgd", [&](auto zero) {
    using T = decltype(zero);
    return planned(pool, [&](Plan& plan) {
      return asgd_typed<T>(plan, param, grad, ax, eta, mu, step, lr, lambd,
                             alpha, t0, wd, &*out_p, &*out_ax, &*out_eta, &*out_mu,
                             fma, maximize, sizes, spans, rows);
    });
  });
}

// ---- many leaves in one call -----------------------------------------------
// The `*_many` handlers: one call for many leaves, each param and gradient
// in its own buffer, every leaf's segment added to one `Plan`, so that the
// threads split all of them as one range. One call a leaf cost ~20 us a
// leaf beside the work (100 leaves of 100,000 float32, 2-core AMD EPYC):
// each split over the threads on its own while XLA ran other leaves' calls
// beside it. The state buffers: one per leaf, or (`offsets` not empty) one
// packed buffer each, leaf i's elements from `offsets[i]` (a packed state's
// bucket: the leaves' params and gradients read where they are, not packed
// and unpacked around the call). Operands: the params, the gradients (one
// per leaf each), the state buffers (`buffers` lists of one per leaf, or
// `buffers` packed ones), the step counts (one per leaf), which leaves to
// step (a bool per leaf: the others keep their values, as torch skips a
// param whose grad is None), then the hyperparameters; results: the
// params, then the state buffers, aliased to their operands as the
// one-leaf handlers' are.

// part of a buffer as a buffer of its own (a leaf's step count, its
// elements of a packed state buffer); not moved while the result is used
class View {
 public:
  ffi::AnyBuffer of(const ffi::AnyBuffer& whole, int64_t offset, int64_t count,
                    int64_t rank) {
    const size_t width = ffi::ByteWidth(whole.element_type());
    count_ = count;
    raw_ = {XLA_FFI_Buffer_STRUCT_SIZE,
            nullptr,
            static_cast<XLA_FFI_DataType>(whole.element_type()),
            static_cast<char*>(whole.untyped_data()) + offset * width,
            rank,
            rank ? &count_ : nullptr};
    return ffi::AnyBuffer(&raw_);
  }

 private:
  XLA_FFI_Buffer raw_;
  int64_t count_;
};

class Leaves {
 public:
  Leaves(ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t leaves,
         int64_t buffers, ffi::Span<const int64_t> offsets)
      : args_(args),
        rets_(rets),
        n_(leaves),
        buffers_(buffers),
        offsets_(offsets),
        per_buffer_(offsets.size() ? 1 : leaves) {}

  // an error unless the operands and results are as described, with
  // `scalars` hyperparameters
  ffi::Error check(int64_t scalars) const {
    const int64_t state = buffers_ * per_buffer_;
    const bool fits =
        n_ >= 1 &&
        static_cast<int64_t>(args_.size()) == 2 * n_ + state + 2 + scalars &&
        static_cast<int64_t>(rets_.size()) == n_ + state &&
        (offsets_.size() == 0 || static_cast<int64_t>(offsets_.size()) == n_);
    if (!fits) {
      return ffi::Error::InvalidArgument(
          "many leaves: the operands and results do not fit `leaves`");
    }
    const ffi::AnyBuffer steps = operand(2 * n_ + state);
    const bool counts = steps.element_count() == static_cast<size_t>(n_) &&
                        (steps.element_type() == ffi::DataType::F32 ||
                         steps.element_type() == ffi::DataType::F64);
    if (!counts) {
      return ffi::Error::InvalidArgument(
          "many leaves: one float step count per leaf expected");
    }
    const ffi::AnyBuffer flags = operand(2 * n_ + state + 1);
    if (flags.element_count() != static_cast<size_t>(n_) ||
        flags.element_type() != ffi::DataType::PRED) {
      return ffi::Error::InvalidArgument("many leaves: one bool per leaf expected");
    }
    for (int64_t i = 0; i < n_; ++i) {
      const ffi::AnyBuffer p = param(i);
      auto like_param = [&p](const ffi::AnyBuffer& b) {
        return b.element_type() == p.element_type() &&
               b.element_count() == p.element_count();
      };
      bool fits_param = like_param(grad(i));
      for (int64_t j = 0; !offsets_.size() && j < buffers_; ++j) {
        fits_param = fits_param && like_param(operand(2 * n_ + j * n_ + i));
      }
      if (!fits_param) {
        return ffi::Error::InvalidArgument(
            "many leaves: a gradient or state buffer unlike its param");
      }
    }
    for (int64_t j = 0; offsets_.size() && j < buffers_; ++j) {
      const ffi::AnyBuffer packed = operand(2 * n_ + j);
      for (int64_t i = 0; i < n_; ++i) {
        const ffi::AnyBuffer p = param(i);
        const bool inside =
            p.element_type() == packed.element_type() && offsets_[i] >= 0 &&
            offsets_[i] + static_cast<int64_t>(p.element_count()) <=
                static_cast<int64_t>(packed.element_count());
        if (!inside) {
          return ffi::Error::InvalidArgument(
              "many leaves: a leaf's state is not inside its packed buffer");
        }
      }
    }
    return ffi::Error::Success();
  }

  // where XLA gave a packed state buffer's result a buffer of its own:
  // the operand's values copied there (the padding, the leaves not in the
  // call), the leaves then updated there (`state`)
  void keep_packed() const {
    for (int64_t j = 0; offsets_.size() && j < buffers_; ++j) {
      const ffi::AnyBuffer in = operand(2 * n_ + j);
      ffi::AnyBuffer out = result(n_ + j);
      if (out.untyped_data() != in.untyped_data()) {
        std::memcpy(out.untyped_data(), in.untyped_data(), in.size_bytes());
      }
    }
  }

  // whether leaf i steps (its `live` flag); if not, it keeps its values:
  // its param (and per-leaf state) copied to its result where that is
  // another buffer, its packed state left as it is
  bool steps_or_keeps(int64_t i) const {
    const ffi::AnyBuffer flags = operand(2 * n_ + buffers_ * per_buffer_ + 1);
    if (static_cast<const bool*>(flags.untyped_data())[i]) return true;
    const ffi::AnyBuffer in = param(i);
    ffi::AnyBuffer out = param_result(i);
    if (out.untyped_data() != in.untyped_data()) {
      std::memcpy(out.untyped_data(), in.untyped_data(), in.size_bytes());
    }
    for (int64_t j = 0; !offsets_.size() && j < buffers_; ++j) {
      const ffi::AnyBuffer own = operand(2 * n_ + j * n_ + i);
      ffi::AnyBuffer own_out = result(n_ + j * n_ + i);
      if (own_out.untyped_data() != own.untyped_data()) {
        std::memcpy(own_out.untyped_data(), own.untyped_data(), own.size_bytes());
      }
    }
    return false;
  }

  ffi::AnyBuffer param(int64_t i) const { return operand(i); }
  ffi::AnyBuffer grad(int64_t i) const { return operand(n_ + i); }
  ffi::AnyBuffer param_result(int64_t i) const { return result(i); }

  // leaf i's state buffer j: its own operand, or its elements of the
  // packed buffer's result (`keep_packed`), described by `view`
  ffi::AnyBuffer state(int64_t j, int64_t i, View& view) const {
    if (!offsets_.size()) return operand(2 * n_ + j * n_ + i);
    return view.of(result(n_ + j), offsets_[i], param(i).element_count(), 1);
  }

  // the buffer leaf i's state buffer j is written to
  ffi::AnyBuffer state_result(int64_t j, int64_t i, View& view) const {
    if (!offsets_.size()) return result(n_ + j * n_ + i);
    return view.of(result(n_ + j), offsets_[i], param(i).element_count(), 1);
  }

  // leaf i's step count, a 0-d buffer described by `view`
  ffi::AnyBuffer step(int64_t i, View& view) const {
    return view.of(operand(2 * n_ + buffers_ * per_buffer_), i, 1, 0);
  }

  // hyperparameter `k`
  ffi::AnyBuffer scalar(int64_t k) const {
    return operand(2 * n_ + buffers_ * per_buffer_ + 2 + k);
  }

 private:
  ffi::AnyBuffer operand(int64_t k) const {
    return args_.get<ffi::AnyBuffer>(k).value();
  }
  ffi::AnyBuffer result(int64_t k) const {
    return *rets_.get<ffi::AnyBuffer>(k).value();
  }

  ffi::RemainingArgs args_;
  ffi::RemainingRets rets_;
  int64_t n_, buffers_;
  ffi::Span<const int64_t> offsets_;
  int64_t per_buffer_;
};

// `step_leaf(plan, i)` for each leaf of `in` that steps, every leaf added
// to one `Plan` (`Leaves`); an error where the operands do not fit `in`
// with `scalars` hyperparameters, or a leaf's step fails
template <typename F>
ffi::Error step_leaves(ffi::ThreadPool& pool, const Leaves& in, int64_t leaves,
                       int64_t scalars, F&& step_leaf) {
  ffi::Error bad = in.check(scalars);
  if (bad.failure()) return bad;
  in.keep_packed();
  return planned(pool, [&](Plan& plan) {
    for (int64_t i = 0; i < leaves; ++i) {
      if (!in.steps_or_keeps(i)) continue;
      ffi::Error e = step_leaf(plan, i);
      if (e.failure()) return e;
    }
    return ffi::Error::Success();
  });
}

// Adam/AdamW (`AdamImpl`, `AdamAmsImpl`) on many leaves
template <bool AMS>
ffi::Error AdamManyImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                        ffi::RemainingRets rets, int64_t leaves,
                        ffi::Span<const int64_t> offsets, bool fma,
                        bool maximize, bool decoupled, bool single_tensor) {
  const Leaves in(args, rets, leaves, AMS ? 3 : 2, offsets);
  // hyperparameters: lr, betas, eps, weight_decay
  return step_leaves(pool, in, leaves, 4, [&](Plan& plan, int64_t i) {
    View views[7];
    ffi::AnyBuffer m = in.state(0, i, views[0]);
    ffi::AnyBuffer v = in.state(1, i, views[1]);
    ffi::AnyBuffer max_sq = AMS ? in.state(2, i, views[2]) : m;
    ffi::AnyBuffer out_p = in.param_result(i);
    ffi::AnyBuffer out_m = in.state_result(0, i, views[3]);
    ffi::AnyBuffer out_v = in.state_result(1, i, views[4]);
    ffi::AnyBuffer out_max = AMS ? in.state_result(2, i, views[5]) : m;
    return adam_any(plan, in.param(i), in.grad(i), m, v,
                    AMS ? &max_sq : nullptr, in.step(i, views[6]),
                    in.scalar(0), in.scalar(1), in.scalar(2), in.scalar(3),
                    &out_p, &out_m, &out_v, AMS ? &out_max : nullptr, fma,
                    maximize, decoupled, single_tensor, {}, {});
  });
}

// SGD (`SgdImpl`, `SgdMomentumImpl`) on many leaves
template <bool MOMENTUM>
ffi::Error SgdManyImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                       ffi::RemainingRets rets, int64_t leaves,
                       ffi::Span<const int64_t> offsets, bool fma,
                       bool maximize, bool nesterov, bool single_tensor) {
  const Leaves in(args, rets, leaves, MOMENTUM ? 1 : 0, offsets);
  // hyperparameters: lr, momentum, dampening, weight_decay
  return step_leaves(pool, in, leaves, 4, [&](Plan& plan, int64_t i) {
    View views[3];
    ffi::AnyBuffer out_p = in.param_result(i);
    ffi::AnyBuffer buffer = out_p, out_b = out_p;
    if (MOMENTUM) {
      buffer = in.state(0, i, views[0]);
      out_b = in.state_result(0, i, views[1]);
    }
    return sgd_any(plan, in.param(i), in.grad(i), MOMENTUM ? &buffer : nullptr,
                   in.step(i, views[2]), in.scalar(0), in.scalar(1),
                   in.scalar(2), in.scalar(3), &out_p,
                   MOMENTUM ? &out_b : nullptr, fma, maximize, nesterov,
                   single_tensor, {}, {});
  });
}

// Adagrad (`AdagradImpl`) on many leaves
ffi::Error AdagradManyImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                           ffi::RemainingRets rets, int64_t leaves,
                           ffi::Span<const int64_t> offsets, bool fma,
                           bool maximize, bool single_tensor) {
  const Leaves in(args, rets, leaves, 1, offsets);
  // hyperparameters: lr, lr_decay, weight_decay, eps
  return step_leaves(pool, in, leaves, 4, [&](Plan& plan, int64_t i) {
    View views[3];
    ffi::AnyBuffer sum = in.state(0, i, views[0]);
    ffi::AnyBuffer out_p = in.param_result(i);
    ffi::AnyBuffer out_s = in.state_result(0, i, views[1]);
    return adagrad_any(plan, in.param(i), in.grad(i), sum, in.step(i, views[2]),
                       in.scalar(0), in.scalar(1), in.scalar(2), in.scalar(3),
                       &out_p, &out_s, fma, maximize, single_tensor, {}, {});
  });
}

// RMSprop (`RmspropImpl` and its centered and momentum variants) on many
// leaves; the state buffers: square_avg, then grad_avg (CENTERED) and
// momentum_buffer (MOMENTUM)
template <bool CENTERED, bool MOMENTUM>
ffi::Error RmspropManyImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                           ffi::RemainingRets rets, int64_t leaves,
                           ffi::Span<const int64_t> offsets, bool fma,
                           bool maximize, bool single_tensor) {
  constexpr bool kPresent[3] = {true, CENTERED, MOMENTUM};
  const Leaves in(args, rets, leaves, 1 + CENTERED + MOMENTUM, offsets);
  // hyperparameters: lr, alpha, eps, weight_decay, momentum
  return step_leaves(pool, in, leaves, 5, [&](Plan& plan, int64_t i) {
    View views[6];
    ffi::AnyBuffer out_p = in.param_result(i);
    // an absent buffer's slot holds the param's result, never read
    ffi::AnyBuffer own[3] = {out_p, out_p, out_p};
    ffi::AnyBuffer own_out[3] = {out_p, out_p, out_p};
    RmspropBuffers bufs{{nullptr, nullptr, nullptr}, {nullptr, nullptr, nullptr}};
    for (int k = 0, j = 0; k < 3; ++k) {
      if (!kPresent[k]) continue;
      own[k] = in.state(j, i, views[2 * j]);
      own_out[k] = in.state_result(j, i, views[2 * j + 1]);
      bufs.in[k] = &own[k];
      bufs.out[k] = &own_out[k];
      ++j;
    }
    return rmsprop_any(plan, in.param(i), in.grad(i), bufs, in.scalar(0),
                       in.scalar(1), in.scalar(2), in.scalar(3), in.scalar(4),
                       &out_p, fma, maximize, single_tensor, {}, {});
  });
}

// ---- packing leaves into one buffer (the multi-tensor step on a tree) ----
// `spans[i]` elements of the packed buffer belong to leaf i: its own elements,
// then zeros. Plain copies: no rounding, any dtype.

ffi::Error PackImpl(ffi::RemainingArgs leaves, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Span<const int64_t> spans) {
  if (leaves.size() != spans.size())
    return ffi::Error::InvalidArgument("funcopt_pack: one span per leaf");
  const size_t item = ffi::ByteWidth(out->element_type());
  char* dst = static_cast<char*>(out->untyped_data());
  for (size_t i = 0; i < leaves.size(); ++i) {
    auto leaf = leaves.get<ffi::AnyBuffer>(i);
    if (!leaf.has_value())
      return ffi::Error::InvalidArgument("funcopt_pack: bad leaf");
    const size_t own = leaf->size_bytes();
    const size_t span = static_cast<size_t>(spans[i]) * item;
    if (own > span)
      return ffi::Error::InvalidArgument("funcopt_pack: leaf larger than its span");
    if (own) std::memcpy(dst, leaf->untyped_data(), own);
    if (span > own) std::memset(dst + own, 0, span - own);
    dst += span;
  }
  return ffi::Error::Success();
}

ffi::Error UnpackImpl(ffi::AnyBuffer packed, ffi::RemainingRets leaves,
                      ffi::Span<const int64_t> spans) {
  if (leaves.size() != spans.size())
    return ffi::Error::InvalidArgument("funcopt_unpack: one span per leaf");
  const size_t item = ffi::ByteWidth(packed.element_type());
  const char* src = static_cast<const char*>(packed.untyped_data());
  for (size_t i = 0; i < leaves.size(); ++i) {
    auto leaf = leaves.get<ffi::AnyBuffer>(i);
    if (!leaf.has_value())
      return ffi::Error::InvalidArgument("funcopt_unpack: bad leaf");
    const size_t own = (*leaf)->size_bytes();
    const size_t span = static_cast<size_t>(spans[i]) * item;
    if (own > span)
      return ffi::Error::InvalidArgument("funcopt_unpack: leaf larger than its span");
    if (own) std::memcpy((*leaf)->untyped_data(), src, own);
    src += span;
  }
  return ffi::Error::Success();
}

}  // namespace

#define FUNCOPT_ATTRS                          \
  .Attr<bool>("fma")                           \
      .Attr<bool>("maximize")

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptAdam, AdamImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // exp_avg
                                  .Arg<ffi::AnyBuffer>()  // exp_avg_sq
                                  .Arg<ffi::AnyBuffer>()  // step
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // betas
                                  .Arg<ffi::AnyBuffer>()  // eps
                                  .Arg<ffi::AnyBuffer>()  // weight_decay
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("decoupled")
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptAdamAms, AdamAmsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // exp_avg
                                  .Arg<ffi::AnyBuffer>()  // exp_avg_sq
                                  .Arg<ffi::AnyBuffer>()  // max_exp_avg_sq
                                  .Arg<ffi::AnyBuffer>()  // step
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // betas
                                  .Arg<ffi::AnyBuffer>()  // eps
                                  .Arg<ffi::AnyBuffer>()  // weight_decay
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("decoupled")
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptSgd, SgdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // step
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // momentum
                                  .Arg<ffi::AnyBuffer>()  // dampening
                                  .Arg<ffi::AnyBuffer>()  // weight_decay
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("nesterov")
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptSgdMomentum, SgdMomentumImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // momentum_buffer
                                  .Arg<ffi::AnyBuffer>()  // step
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // momentum
                                  .Arg<ffi::AnyBuffer>()  // dampening
                                  .Arg<ffi::AnyBuffer>()  // weight_decay
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("nesterov")
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptAdagrad, AdagradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // sum
                                  .Arg<ffi::AnyBuffer>()  // step
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // lr_decay
                                  .Arg<ffi::AnyBuffer>()  // weight_decay
                                  .Arg<ffi::AnyBuffer>()  // eps
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans"));

// RMSprop: param, grad, the state buffers `STATE_ARGS` (square_avg, then
// grad_avg and/or momentum_buffer), the step and scalars; the results: the
// param and the state buffers (`STATE_RETS`)
#define FUNCOPT_RMSPROP_BIND(STATE_ARGS, STATE_RETS)                        \
  ffi::Ffi::Bind()                                                          \
      .Ctx<ffi::ThreadPool>()                                               \
      .Arg<ffi::AnyBuffer>()   /* param */                                  \
      .Arg<ffi::AnyBuffer>()   /* grad */                                   \
      STATE_ARGS                                                            \
      .Arg<ffi::AnyBuffer>()   /* step (unused: no bias correction) */      \
      .Arg<ffi::AnyBuffer>()   /* lr */                                     \
      .Arg<ffi::AnyBuffer>()   /* alpha */                                  \
      .Arg<ffi::AnyBuffer>()   /* eps */                                    \
      .Arg<ffi::AnyBuffer>()   /* weight_decay */                           \
      .Arg<ffi::AnyBuffer>()   /* momentum */                               \
      .Ret<ffi::AnyBuffer>()   /* param */                                  \
      STATE_RETS FUNCOPT_ATTRS                                              \
      .Attr<bool>("single_tensor")                                          \
      .Attr<ffi::Span<const int64_t>>("sizes")                              \
      .Attr<ffi::Span<const int64_t>>("spans")
#define FUNCOPT_ARG1 .Arg<ffi::AnyBuffer>()
#define FUNCOPT_RET1 .Ret<ffi::AnyBuffer>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptRmsprop, RmspropImpl,
                              FUNCOPT_RMSPROP_BIND(FUNCOPT_ARG1, FUNCOPT_RET1));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FuncoptRmspropCentered, RmspropCenteredImpl,
    FUNCOPT_RMSPROP_BIND(FUNCOPT_ARG1 FUNCOPT_ARG1, FUNCOPT_RET1 FUNCOPT_RET1));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FuncoptRmspropMomentum, RmspropMomentumImpl,
    FUNCOPT_RMSPROP_BIND(FUNCOPT_ARG1 FUNCOPT_ARG1, FUNCOPT_RET1 FUNCOPT_RET1));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FuncoptRmspropCenteredMomentum, RmspropCenteredMomentumImpl,
    FUNCOPT_RMSPROP_BIND(FUNCOPT_ARG1 FUNCOPT_ARG1 FUNCOPT_ARG1,
                         FUNCOPT_RET1 FUNCOPT_RET1 FUNCOPT_RET1));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptAdamax, AdamaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // exp_avg
                                  .Arg<ffi::AnyBuffer>()  // exp_inf
                                  .Arg<ffi::AnyBuffer>()  // step
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // betas
                                  .Arg<ffi::AnyBuffer>()  // eps
                                  .Arg<ffi::AnyBuffer>()  // weight_decay
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptAdadelta, AdadeltaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // square_avg
                                  .Arg<ffi::AnyBuffer>()  // acc_delta
                                  .Arg<ffi::AnyBuffer>()  // step (unused)
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // rho
                                  .Arg<ffi::AnyBuffer>()  // eps
                                  .Arg<ffi::AnyBuffer>()  // weight_decay
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptRadam, RadamImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // exp_avg
                                  .Arg<ffi::AnyBuffer>()  // exp_avg_sq
                                  .Arg<ffi::AnyBuffer>()  // step
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // betas
                                  .Arg<ffi::AnyBuffer>()  // eps
                                  .Arg<ffi::AnyBuffer>()  // weight_decay
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("decoupled")
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptRprop, RpropImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // prev
                                  .Arg<ffi::AnyBuffer>()  // step_size
                                  .Arg<ffi::AnyBuffer>()  // step
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // etas
                                  .Arg<ffi::AnyBuffer>()  // step_sizes
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptNadam, NadamImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // exp_avg
                                  .Arg<ffi::AnyBuffer>()  // exp_avg_sq
                                  .Arg<ffi::AnyBuffer>()  // mu_product
                                  .Arg<ffi::AnyBuffer>()  // step
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // betas
                                  .Arg<ffi::AnyBuffer>()  // eps
                                  .Arg<ffi::AnyBuffer>()  // weight_decay
                                  .Arg<ffi::AnyBuffer>()  // momentum_decay
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("decoupled")
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans")
                                  .Attr<ffi::Span<const int64_t>>("rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptAsgd, AsgdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // param
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // ax
                                  .Arg<ffi::AnyBuffer>()  // eta
                                  .Arg<ffi::AnyBuffer>()  // mu
                                  .Arg<ffi::AnyBuffer>()  // step
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .Arg<ffi::AnyBuffer>()  // lambd
                                  .Arg<ffi::AnyBuffer>()  // alpha
                                  .Arg<ffi::AnyBuffer>()  // t0
                                  .Arg<ffi::AnyBuffer>()  // weight_decay
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() FUNCOPT_ATTRS
                                  .Attr<bool>("single_tensor")
                                  .Attr<ffi::Span<const int64_t>>("sizes")
                                  .Attr<ffi::Span<const int64_t>>("spans")
                                  .Attr<ffi::Span<const int64_t>>("rows"));

// the `*_many` handlers' binding; FLAGS: the attributes of the flags a
// kernel takes beyond `FUNCOPT_ATTRS` (none for Adagrad and RMSprop)
#define FUNCOPT_MANY(NAME, IMPL, FLAGS)                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, IMPL,                \
                                ffi::Ffi::Bind()           \
                                    .Ctx<ffi::ThreadPool>() \
                                    .RemainingArgs()       \
                                    .RemainingRets()       \
                                    .Attr<int64_t>("leaves") \
                                    .Attr<ffi::Span<const int64_t>>("offsets") FUNCOPT_ATTRS \
                                    FLAGS                  \
                                    .Attr<bool>("single_tensor"));

FUNCOPT_MANY(FuncoptAdamMany, AdamManyImpl<false>, .Attr<bool>("decoupled"))
FUNCOPT_MANY(FuncoptAdamAmsMany, AdamManyImpl<true>, .Attr<bool>("decoupled"))
FUNCOPT_MANY(FuncoptSgdMany, SgdManyImpl<false>, .Attr<bool>("nesterov"))
FUNCOPT_MANY(FuncoptSgdMomentumMany, SgdManyImpl<true>, .Attr<bool>("nesterov"))
FUNCOPT_MANY(FuncoptAdagradMany, AdagradManyImpl, )
FUNCOPT_MANY(FuncoptRmspropMany, (RmspropManyImpl<false, false>), )
FUNCOPT_MANY(FuncoptRmspropCenteredMany, (RmspropManyImpl<true, false>), )
FUNCOPT_MANY(FuncoptRmspropMomentumMany, (RmspropManyImpl<false, true>), )
FUNCOPT_MANY(FuncoptRmspropCenteredMomentumMany, (RmspropManyImpl<true, true>), )

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptPack, PackImpl,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()  // the leaves
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("spans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FuncoptUnpack, UnpackImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // the packed buffer
                                  .RemainingRets()  // the leaves
                                  .Attr<ffi::Span<const int64_t>>("spans"));

// The 16-bit conversions the fused kernels use (`Storage`), for the tests
// (tests/test_native_fused.py compares them with ml_dtypes' over every
// float16 and millions of float32 bit patterns). `kind`: 0 float16 -> float,
// 1 float -> float16, 2 bfloat16 -> float, 3 float -> bfloat16.
extern "C" int funcopt_convert_16bit(int kind, const void* in, void* out,
                                     int64_t n) {
  KeepSubnormals keep;
  for (int64_t i = 0; i < n; ++i) {
    switch (kind) {
      case 0:
        static_cast<float*>(out)[i] = widen(static_cast<const F16*>(in)[i]);
        break;
      case 1:
        static_cast<F16*>(out)[i] = narrow<F16>(static_cast<const float*>(in)[i]);
        break;
      case 2:
        static_cast<float*>(out)[i] = widen(static_cast<const BF16*>(in)[i]);
        break;
      case 3:
        static_cast<BF16*>(out)[i] = narrow<BF16>(static_cast<const float*>(in)[i]);
        break;
      default:
        return 1;
    }
  }
  return 0;
}
