// Softmax attention on the CPU, forward and backward, one (image, head) pair at a time.
//
// softmax(q k^T * scale) v with q, k, v in the [B, N, H, D] layout the qkv products leave them in
// (no transposes), and the probabilities kept for the backward as [B, H, N, N], the reference's
// `attn`. Each pair's N x N logits stay in a per-thread scratch that fits in the core's L2, where
// XLA:CPU writes and reads them back through memory between its batched products.
//
// The five products are one register-tiled kernel, C[r, :] = sum_k A(r, k) B[k, :], with A read
// row- or column-wise, in GCC's vector extensions: vectors of 16 floats on AVX-512 and 8
// elsewhere, which the compiler maps onto the registers of the CPU it is compiled on.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector register: 16 floats where the compiler targets AVX-512 (-march=native on a CPU that
// has it), else 8 (AVX2, or two SSE/NEON registers). Head sizes need only be a multiple of 8:
// the products take a last 8-column strip in a half vector.
#ifdef __AVX512F__
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
constexpr int64_t kHalf = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef float HalfVec __attribute__((vector_size(kHalf * sizeof(float))));

// Accumulator tiles of kRows x kCols vectors, plus kCols vectors of B and one broadcast of A,
// fill most of the registers: AVX-512's 32 or AVX2's 16.
#ifdef __AVX512F__
constexpr int kRows = 6, kCols = 4;
#else
constexpr int kRows = 6, kCols = 2;
#endif

template <typename V = Vec>
inline V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void Store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

inline Vec Splat(float x) {
  Vec v;
  for (int l = 0; l < kLanes; ++l) v[l] = x;
  return v;
}

inline int64_t RoundUp(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// The lanes of a vector starting at column `start` that lie before column `end`.
inline IVec Valid(int64_t start, int64_t end) {
  IVec lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  return lane < static_cast<int32_t>(end - start);
}

// exp for x <= 0, Cephes' expf: x = n ln 2 + r with n the nearest integer (|r| <= ln 2 / 2), a
// degree-6 polynomial in r, times 2^n; within 2 ulp. Below -87.3 the result is 0: there e^x is
// under float32's smallest normal number and adds nothing to a softmax's sum of at least 1.
inline Vec Exp(Vec x) {
  const IVec underflow = x < -87.3f;
  x = underflow ? Splat(-87.3f) : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec shifted = x * 1.44269504088896341f + kRound;
  const Vec n = shifted - kRound;
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  IVec bits;
  std::memcpy(&bits, &shifted, sizeof bits);  // n in the low mantissa bits
  bits = (bits - 0x4B400000 + 127) << 23;      // 0x4B400000: the bits of kRound
  Vec two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return underflow ? Splat(0.0f) : p * two_n;
}

// C[r, 0:W V] = sum_k A(r, k) B[k, 0:W V] for R rows, A(r, k) = a[r * a_row + k * a_col], in
// vectors T of W floats.
template <typename T, int R, int V>
inline void Tile(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                 int64_t depth, float* c, int64_t ldc) {
  constexpr int64_t W = sizeof(T) / sizeof(float);
  T acc[R][V] = {};
  for (int64_t k = 0; k < depth; ++k) {
    T bk[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) bk[v] = Load<T>(b + k * ldb + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float ar = a[r * a_row + k * a_col];  // broadcast by the product, from memory
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] += ar * bk[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) Store(c + r * ldc + v * W, acc[r][v]);
  }
}

// Rows [0, R) of C: columns in blocks of kCols vectors, then one vector at a time, then a last
// half vector where cols is an odd multiple of 8 on 16 lanes.
template <int R>
inline void RowBlock(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                     int64_t depth, float* c, int64_t ldc, int64_t cols) {
  int64_t j = 0;
  for (; j + kCols * kLanes <= cols; j += kCols * kLanes) {
    Tile<Vec, R, kCols>(a, a_row, a_col, b + j, ldb, depth, c + j, ldc);
  }
  for (; j + kLanes <= cols; j += kLanes) {
    Tile<Vec, R, 1>(a, a_row, a_col, b + j, ldb, depth, c + j, ldc);
  }
  if (j < cols) Tile<HalfVec, R, 1>(a, a_row, a_col, b + j, ldb, depth, c + j, ldc);
}

// The last `tail` (< R) rows of C, as one RowBlock of exactly that many rows.
template <int R>
inline void RowTail(int64_t tail, const float* a, int64_t a_row, int64_t a_col, const float* b,
                    int64_t ldb, int64_t depth, float* c, int64_t ldc, int64_t cols) {
  if constexpr (R > 0) {
    if (tail == R) return RowBlock<R>(a, a_row, a_col, b, ldb, depth, c, ldc, cols);
    RowTail<R - 1>(tail, a, a_row, a_col, b, ldb, depth, c, ldc, cols);
  }
}

// C[m, 0:cols] = sum_k A(m, k) B[k, 0:cols] for m < rows; cols is a multiple of 8.
void MatMul(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_row,
            int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t m = 0;
  for (; m + kRows <= rows; m += kRows) {
    RowBlock<kRows>(a + m * a_row, a_row, a_col, b, ldb, depth, c + m * ldc, ldc, cols);
  }
  RowTail<kRows - 1>(rows - m, a + m * a_row, a_row, a_col, b, ldb, depth, c + m * ldc, ldc,
                     cols);
}

// dst[d, j] = src[j, d] for j < n (rows `stride` apart), 0 for n <= j < ld; src is read row by
// row, each row once.
void PackTransposed(const float* src, int64_t stride, int64_t n, int64_t dim, float* dst,
                    int64_t ld) {
  for (int64_t j = 0; j < n; ++j) {
    const float* row = src + j * stride;
    for (int64_t d = 0; d < dim; ++d) dst[d * ld + j] = row[d];
  }
  for (int64_t d = 0; d < dim; ++d) {
    for (int64_t j = n; j < ld; ++j) dst[d * ld + j] = 0.0f;
  }
}

// Horizontal reductions of a vector.
inline float Max(Vec x) {
  float m = x[0];
  for (int l = 1; l < kLanes; ++l) m = x[l] > m ? x[l] : m;
  return m;
}

inline float Sum(Vec x) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += x[l];
  return s;
}

// Row-wise softmax(s * scale) of s [n, ld] over its first n columns, in place (the columns from
// n on set to 0) and into probs [n, n]. Like torch, the exponentials are scaled by 1 / their sum.
// The products read the aligned rows of s; probs, whose rows start anywhere, is only written.
void Softmax(float* s, int64_t n, int64_t ld, float scale, float* probs) {
  const int64_t full = n / kLanes * kLanes, rest = n - full;
  const IVec tail = Valid(full, n);
  for (int64_t i = 0; i < n; ++i) {
    float* row = s + i * ld;
    float* out = probs + i * n;
    Vec max = Splat(-__builtin_inff());
    for (int64_t j = 0; j < full; j += kLanes) {
      const Vec x = Load(row + j) * scale;
      max = x > max ? x : max;
    }
    if (rest) {
      const Vec x = Load(row + full) * scale;
      max = tail && x > max ? x : max;
    }
    const float m = Max(max);
    Vec sum = {};
    for (int64_t j = 0; j < ld; j += kLanes) {
      Vec e = Exp(Load(row + j) * scale - m);
      if (j == full) e = tail ? e : Splat(0.0f);
      Store(row + j, e);
      sum += e;
    }
    const float inverse = 1.0f / Sum(sum);
    for (int64_t j = 0; j < full; j += kLanes) {
      const Vec p = Load(row + j) * inverse;
      Store(row + j, p);
      Store(out + j, p);
    }
    if (rest) {
      const Vec p = Load(row + full) * inverse;
      Store(row + full, p);
      for (int64_t l = 0; l < rest; ++l) out[full + l] = p[l];
    }
  }
}

// ds[i, j] = p[i, j] (dp[i, j] - sum_j dp[i, j] p[i, j]) * scale, in place over dp [n, ld], whose
// columns from n on are left as they are (no product reads them).
void SoftmaxGrad(const float* probs, float* dp, int64_t n, int64_t ld, float scale) {
  const int64_t full = n / kLanes * kLanes;
  for (int64_t i = 0; i < n; ++i) {
    const float* p = probs + i * n;
    float* g = dp + i * ld;
    Vec dots = {};
    for (int64_t j = 0; j < full; j += kLanes) dots += Load(g + j) * Load(p + j);
    float dot = Sum(dots);
    for (int64_t j = full; j < n; ++j) dot += g[j] * p[j];
    for (int64_t j = 0; j < full; j += kLanes) {
      const Vec pj = Load(p + j);
      Store(g + j, pj * (Load(g + j) - dot) * scale);
    }
    for (int64_t j = full; j < n; ++j) g[j] = p[j] * (g[j] - dot) * scale;
  }
}

struct Shape {
  int64_t batch, tokens, heads, dim;
  int64_t stride() const { return heads * dim; }  // between tokens in [B, N, H, D]
  int64_t offset(int64_t pair) const {  // of (image, head) = divmod(pair, H)'s first element
    return (pair / heads) * tokens * stride() + (pair % heads) * dim;
  }
  int64_t probs_offset(int64_t pair) const { return pair * tokens * tokens; }
};

Shape ShapeOf(const ffi::Buffer<ffi::F32>& x) {
  auto d = x.dimensions();
  return {d[0], d[1], d[2], d[3]};
}

// Runs body(pair) for pair < count on the calling thread and XLA's intra-op pool. The caller
// takes tasks too and waits only for tasks, never for a helper to start, so a busy pool cannot
// stall it; a late helper finds no task left and touches nothing but the shared counters.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, const Body& body) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, count, &body]() {
    for (int64_t i; (i = counters->next.fetch_add(1)) < count;) {
      body(i);
      if (counters->done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(counters->mutex);
        counters->finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(counters->mutex);
  counters->finished.wait(lock, [&] { return counters->done.load() == count; });
}

std::vector<float>& Scratch(int64_t size) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, float scale, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> probs) {
  const Shape shape = ShapeOf(q);
  const int64_t n = shape.tokens, dim = shape.dim, ld = RoundUp(n), stride = shape.stride();
  if (dim % kHalf) return ffi::Error::InvalidArgument("head size must be a multiple of 8");
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  float *od = out->typed_data(), *pd = probs->typed_data();
  ParallelFor(pool, shape.batch * shape.heads, [&](int64_t pair) {
    const int64_t at = shape.offset(pair);
    float* scratch = Scratch(n * ld + dim * ld).data();
    float *logits = scratch, *kt = scratch + n * ld;
    float* p = pd + shape.probs_offset(pair);
    PackTransposed(kd + at, stride, n, dim, kt, ld);
    MatMul(n, ld, dim, qd + at, stride, 1, kt, ld, logits, ld);          // q k^T
    Softmax(logits, n, ld, scale, p);
    MatMul(n, dim, n, logits, ld, 1, vd + at, stride, od + at, stride);  // p v
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> probs,
                    ffi::Buffer<ffi::F32> grad_out, float scale,
                    ffi::ResultBuffer<ffi::F32> grad_q, ffi::ResultBuffer<ffi::F32> grad_k,
                    ffi::ResultBuffer<ffi::F32> grad_v) {
  const Shape shape = ShapeOf(q);
  const int64_t n = shape.tokens, dim = shape.dim, ld = RoundUp(n), stride = shape.stride();
  if (dim % kHalf) return ffi::Error::InvalidArgument("head size must be a multiple of 8");
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  const float *pd = probs.typed_data(), *god = grad_out.typed_data();
  float *gq = grad_q->typed_data(), *gk = grad_k->typed_data(), *gv = grad_v->typed_data();
  ParallelFor(pool, shape.batch * shape.heads, [&](int64_t pair) {
    const int64_t at = shape.offset(pair);
    float* scratch = Scratch(n * ld + dim * ld).data();
    float *ds = scratch, *vt = scratch + n * ld;
    const float* p = pd + shape.probs_offset(pair);
    MatMul(n, dim, n, p, 1, n, god + at, stride, gv + at, stride);     // p^T do
    PackTransposed(vd + at, stride, n, dim, vt, ld);
    MatMul(n, ld, dim, god + at, stride, 1, vt, ld, ds, ld);             // do v^T
    SoftmaxGrad(p, ds, n, ld, scale);
    MatMul(n, dim, n, ds, ld, 1, kd + at, stride, gq + at, stride);    // ds k
    MatMul(n, dim, n, ds, 1, ld, qd + at, stride, gk + at, stride);    // ds^T q
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DinoAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DinoAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
