// gptjax's CPU matrix-vector product for decoding, an XLA FFI handler (compiled and called by matvec.py).
//
//   y[r, o] = sum_i x[r, i] * w[o, i]      x, y float32; w float32 or bfloat16, stored (out, in);
//                                          r < a few rows (batch)
//   y[r, o] = s[o] * sum_i x[r, i] * w[o, i]   w int8 with a float32 scale per out row (weight-only int8)
//
// Decoding one token reads every weight once, so this is a memory stream: each task takes blocks
// of 64 output rows and reads 4 weight rows at a time, each vector once for up to 4 x rows (the
// batch), the rest of the batch while those rows sit in L1. The blocks are shared out over XLA's intra-op thread pool; the calling thread
// works too and waits only for blocks another thread has started, so a pool that is busy (or
// absent) costs speed, never a deadlock. Vectors are GCC/Clang vector extensions: AVX-512, AVX2
// or NEON, whatever -march=native gives.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlockRows = 64;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// bfloat16 weights (stored as uint16): a bfloat16 is the top half of a float32. Read as 32-bit
// lanes, 32 weights give two float vectors with no shuffle: (lane << 16) holds the even weights,
// (lane & 0xffff0000) the odd ones; x is split the same way once per call (see EvenOdd).
typedef uint32_t vu __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline void load_pairs(const uint16_t* p, vf& even, vf& odd) {
  vu u;
  std::memcpy(&u, p, sizeof(u));
  const vu lo = u << 16, hi = u & 0xffff0000u;
  std::memcpy(&even, &lo, sizeof(even));
  std::memcpy(&odd, &hi, sizeof(odd));
}

inline float widen(uint16_t w) {
  const uint32_t u = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

// Sum of the lanes by halving (the lane-by-lane loop costs as much as the row's products).
inline float hsum(vf v) {
  vf8 h[2];
  std::memcpy(h, &v, sizeof(v));
  const vf8 a = h[0] + h[1];
  vf4 q[2];
  std::memcpy(q, &a, sizeof(a));
  const vf4 b = q[0] + q[1];
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// y[r0..r0+RB, o..o+4]: four weight rows times RB input rows, 4 x RB accumulators in registers
// (each weight vector loaded once serves RB rows).
template <int RB>
inline void tile(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t r0, int64_t o) {
  const int64_t Iv = I - I % kLanes;
  const float* wr[4] = {w + o * I, w + (o + 1) * I, w + (o + 2) * I, w + (o + 3) * I};
  const float* xr[RB];
  for (int r = 0; r < RB; ++r) xr[r] = x + (r0 + r) * I;
  vf acc[RB][4] = {};
  for (int64_t i = 0; i < Iv; i += kLanes) {
    const vf w0 = load(wr[0] + i), w1 = load(wr[1] + i), w2 = load(wr[2] + i), w3 = load(wr[3] + i);
    for (int r = 0; r < RB; ++r) {
      const vf xv = load(xr[r] + i);
      acc[r][0] += w0 * xv;
      acc[r][1] += w1 * xv;
      acc[r][2] += w2 * xv;
      acc[r][3] += w3 * xv;
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int k = 0; k < 4; ++k) {
      float s = hsum(acc[r][k]);
      for (int64_t i = Iv; i < I; ++i) s += wr[k][i] * xr[r][i];
      y[(r0 + r) * O + o + k] = s;
    }
  }
}

// Output rows [o0, o1) for all R input rows.
void rows(const float* x, const float* w, float* y, int64_t R, int64_t I, int64_t O, int64_t o0, int64_t o1) {
  const int64_t Iv = I - I % kLanes;
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) tile<4>(x, w, y, I, O, r, o);
    for (; r + 2 <= R; r += 2) tile<2>(x, w, y, I, O, r, o);
    for (; r < R; ++r) {  // one row (batch-1 decoding): tile<1> spelled out, 2-3% faster here
      const float* w0 = w + o * I;
      const float* w1 = w0 + I;
      const float* w2 = w1 + I;
      const float* w3 = w2 + I;
      const float* xr = x + r * I;
      vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t i = 0; i < Iv; i += kLanes) {
        const vf xv = load(xr + i);
        a0 += load(w0 + i) * xv;
        a1 += load(w1 + i) * xv;
        a2 += load(w2 + i) * xv;
        a3 += load(w3 + i) * xv;
      }
      float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
      for (int64_t i = Iv; i < I; ++i) {
        s0 += w0[i] * xr[i];
        s1 += w1[i] * xr[i];
        s2 += w2[i] * xr[i];
        s3 += w3[i] * xr[i];
      }
      float* yr = y + r * O + o;
      yr[0] = s0;
      yr[1] = s1;
      yr[2] = s2;
      yr[3] = s3;
    }
  }
  for (; o < o1; ++o) {
    const float* wo = w + o * I;
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * I;
      vf a = {};
      for (int64_t i = 0; i < Iv; i += kLanes) a += load(wo + i) * load(xr + i);
      float s = hsum(a);
      for (int64_t i = Iv; i < I; ++i) s += wo[i] * xr[i];
      y[r * O + o] = s;
    }
  }
}

// x rows with each block of 2 * kLanes values reordered as (even ones, odd ones), as load_pairs
// splits the weights; the tail past the last whole block stays in place.
std::unique_ptr<float[]> EvenOdd(const float* x, int64_t R, int64_t I) {
  std::unique_ptr<float[]> out(new float[R * I]);
  const int64_t blocks = I / (2 * kLanes);
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * I;
    float* o = out.get() + r * I;
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t k = 0; k < kLanes; ++k) {
        o[b * 2 * kLanes + k] = xr[b * 2 * kLanes + 2 * k];
        o[b * 2 * kLanes + kLanes + k] = xr[b * 2 * kLanes + 2 * k + 1];
      }
    for (int64_t i = blocks * 2 * kLanes; i < I; ++i) o[i] = xr[i];
  }
  return out;
}

// As tile, from bfloat16 weights and an EvenOdd x.
template <int RB>
inline void tile_bf16(const float* x, const uint16_t* w, float* y, int64_t I, int64_t O, int64_t r0, int64_t o) {
  const int64_t Iv = I - I % (2 * kLanes);
  const uint16_t* wr[4] = {w + o * I, w + (o + 1) * I, w + (o + 2) * I, w + (o + 3) * I};
  const float* xr[RB];
  for (int r = 0; r < RB; ++r) xr[r] = x + (r0 + r) * I;
  vf acc[RB][4] = {};
  for (int64_t i = 0; i < Iv; i += 2 * kLanes) {
    vf we[4], wo[4];
    for (int k = 0; k < 4; ++k) {
      // the next tile's rows: a bfloat16 row (1.5 KB for gpt2-small) ends before the hardware
      // prefetcher ramps up; this took the 50,257 x 768 head from 3.8 to 1.7 ms (float32 rows: no change)
      __builtin_prefetch(wr[k] + 4 * I + i);
      load_pairs(wr[k] + i, we[k], wo[k]);
    }
    for (int r = 0; r < RB; ++r) {
      const vf xe = load(xr[r] + i), xo = load(xr[r] + i + kLanes);
      for (int k = 0; k < 4; ++k) acc[r][k] += we[k] * xe + wo[k] * xo;
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int k = 0; k < 4; ++k) {
      float s = hsum(acc[r][k]);
      for (int64_t i = Iv; i < I; ++i) s += widen(wr[k][i]) * xr[r][i];
      y[(r0 + r) * O + o + k] = s;
    }
  }
}

// As rows, from bfloat16 weights and an EvenOdd x.
void rows(const float* x, const uint16_t* w, float* y, int64_t R, int64_t I, int64_t O, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) tile_bf16<4>(x, w, y, I, O, r, o);
    for (; r + 2 <= R; r += 2) tile_bf16<2>(x, w, y, I, O, r, o);
    for (; r < R; ++r) tile_bf16<1>(x, w, y, I, O, r, o);
  }
  for (; o < o1; ++o) {  // the last rows, one at a time (x is EvenOdd: pair it the same way)
    const uint16_t* wo = w + o * I;
    const int64_t Iv = I - I % (2 * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * I;
      vf a = {};
      for (int64_t i = 0; i < Iv; i += 2 * kLanes) {
        vf we, wd;
        load_pairs(wo + i, we, wd);
        a += we * load(xr + i) + wd * load(xr + i + kLanes);
      }
      float s = hsum(a);
      for (int64_t i = Iv; i < I; ++i) s += widen(wo[i]) * xr[i];
      y[r * O + o] = s;
    }
  }
}

// int8 weights (a quarter of float32's bytes) with one float32 scale per out row: each 16 weights
// widen to a float vector (sign-extend, convert), the products and sums are float32 and the row's
// sum is scaled once at the end.
// GCC 12 compiles __builtin_convertvector from int8 lanes into scalar code (a vcvtsi2ss per weight), so the
// widening is spelled out per instruction set; other CPUs get the generic conversion.
inline vf load_i8(const int8_t* p) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  vf v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 f[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                       _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)))};
  vf v;
  std::memcpy(&v, f, sizeof(v));
  return v;
#elif defined(__ARM_NEON)
  const int8x16_t b = vld1q_s8(p);
  const int16x8_t h[2] = {vmovl_s8(vget_low_s8(b)), vmovl_s8(vget_high_s8(b))};
  const float32x4_t f[4] = {vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[0]))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(h[0]))),
                            vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[1]))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(h[1])))};
  vf v;
  std::memcpy(&v, f, sizeof(v));
  return v;
#else
  typedef int8_t vi8 __attribute__((vector_size(kLanes)));
  vi8 b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, vf);
#endif
}

// As tile, from int8 weights: 4 weight rows times RB input rows.
template <int RB>
inline void tile_i8(const float* x, const int8_t* w, const float* scale, float* y, int64_t I, int64_t O,
                    int64_t r0, int64_t o) {
  const int64_t Iv = I - I % kLanes;
  const int8_t* wr[4] = {w + o * I, w + (o + 1) * I, w + (o + 2) * I, w + (o + 3) * I};
  const float* xr[RB];
  for (int r = 0; r < RB; ++r) xr[r] = x + (r0 + r) * I;
  vf acc[RB][4] = {};
  for (int64_t i = 0; i < Iv; i += kLanes) {
    vf wv[4];
    for (int k = 0; k < 4; ++k) {
      // the next tile's rows, a cache line at a time: an int8 row (768 B for gpt2-small) is over
      // before the hardware prefetcher ramps up (as for bfloat16 rows, more so)
      if ((i & 63) == 0) __builtin_prefetch(wr[k] + 4 * I + i);
      wv[k] = load_i8(wr[k] + i);
    }
    for (int r = 0; r < RB; ++r) {
      const vf xv = load(xr[r] + i);
      for (int k = 0; k < 4; ++k) acc[r][k] += wv[k] * xv;
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int k = 0; k < 4; ++k) {
      float s = hsum(acc[r][k]);
      for (int64_t i = Iv; i < I; ++i) s += static_cast<float>(wr[k][i]) * xr[r][i];
      y[(r0 + r) * O + o + k] = scale[o + k] * s;
    }
  }
}

// As rows, from int8 weights and their per-row scales.
void rows(const float* x, const int8_t* w, const float* scale, float* y, int64_t R, int64_t I, int64_t O,
          int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) tile_i8<4>(x, w, scale, y, I, O, r, o);
    for (; r + 2 <= R; r += 2) tile_i8<2>(x, w, scale, y, I, O, r, o);
    for (; r < R; ++r) tile_i8<1>(x, w, scale, y, I, O, r, o);
  }
  for (; o < o1; ++o) {
    const int8_t* wo = w + o * I;
    const int64_t Iv = I - I % kLanes;
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * I;
      vf a = {};
      for (int64_t i = 0; i < Iv; i += kLanes) a += load_i8(wo + i) * load(xr + i);
      float s = hsum(a);
      for (int64_t i = Iv; i < I; ++i) s += static_cast<float>(wo[i]) * xr[i];
      y[r * O + o] = scale[o] * s;
    }
  }
}

template <typename W>
struct Job {
  const float* x;
  const W* w;
  const float* scale = nullptr;  // int8 weights only
  float* y;
  int64_t R, I, O, n_blocks;
  std::shared_ptr<float[]> x_owned;  // the EvenOdd copy of x, alive as long as any task
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < n_blocks;) {
      const int64_t o0 = b * kBlockRows;
      const int64_t o1 = o0 + kBlockRows < O ? o0 + kBlockRows : O;
      if constexpr (std::is_same_v<W, int8_t>)
        rows(x, w, scale, y, R, I, O, o0, o1);
      else
        rows(x, w, y, R, I, O, o0, o1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename W, typename WBuffer>
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, WBuffer& w, ffi::ResultBuffer<ffi::F32>& y,
               const ffi::Buffer<ffi::F32>* scale = nullptr) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("gptjax_matvec: w must be 2-D (out, in)");
  const int64_t O = wd[0], I = wd[1];
  if (I == 0 || x.element_count() % I != 0)
    return ffi::Error::InvalidArgument("gptjax_matvec: x's last axis must equal w's in axis");
  if (scale && scale->element_count() != O)
    return ffi::Error::InvalidArgument("gptjax_matvec_int8: scale must hold one value per out row of w");
  auto job = std::make_shared<Job<W>>();
  if (scale) job->scale = scale->typed_data();
  if constexpr (std::is_same_v<W, uint16_t>) job->x_owned = EvenOdd(x.typed_data(), x.element_count() / I, I);
  job->x = job->x_owned ? job->x_owned.get() : x.typed_data();
  job->w = reinterpret_cast<const W*>(w.untyped_data());
  job->y = y->typed_data();
  job->R = x.element_count() / I;
  job->I = I;
  job->O = O;
  job->n_blocks = (O + kBlockRows - 1) / kBlockRows;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), job->n_blocks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->n_blocks) std::this_thread::yield();
  return ffi::Error::Success();
}

ffi::Error MatVec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  return Run<float>(pool, x, w, y);
}

ffi::Error MatVecBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  return Run<uint16_t>(pool, x, w, y);
}

ffi::Error MatVecInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  return Run<int8_t>(pool, x, w, y, &scale);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxMatVec, MatVec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// the same product from bfloat16 weights (half the bytes to stream), float32 x and y
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxMatVecBf16, MatVecBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// the same product from int8 weights with a float32 scale per out row (weight-only int8)
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxMatVecInt8, MatVecInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
