// Fused greedy sampler for the CPU path: per row of float32 logits, in one sweep over the vocabulary
// tiles, the argmax token and its softmax probability (the "confidence" of the reference sampler),
// without materializing a probability tensor. Built against pybind11 only: tensors cross the boundary
// as raw addresses with explicit shapes and strides, checked by the Python wrapper
// (diffutron_engine/backends.py), so installing never compiles against or pulls a torch build.

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DIFFUTRON_AVX2 1
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kTile = 4096;  // a tile stays in L1/L2 between its max and its exp-sum pass
constexpr int64_t kChunk = 64;   // float partial sums per chunk, folded into a double per chunk

// exp(x) for x <= 0: Cody-Waite range reduction and a degree-6 polynomial (~2 ulp); 0 below -87.3
// and for -inf. The AVX2 version below computes the same thing on 8 lanes.
inline float exp_nonpos(float x) {
    const float lo = -87.33654f;
    const float xc = x < lo ? lo : x;
    const float n = std::nearbyint(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return x < lo ? 0.0f : p * scale;
}

#ifdef DIFFUTRON_AVX2
inline __m256 exp_nonpos8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline double hsum8(__m256 v) {
    alignas(32) float o[8];
    _mm256_store_ps(o, v);
    return (static_cast<double>(o[0]) + o[1]) + (static_cast<double>(o[2]) + o[3]) +
           (static_cast<double>(o[4]) + o[5]) + (static_cast<double>(o[6]) + o[7]);
}
#endif

// sum(exp(row[v] - shift)) over [0, n): float lanes within a chunk of 64, double across chunks,
// which keeps the error at torch's level (a plain float sum over 256k terms loses ~10 ulps).
double exp_sum(const float* row, int64_t n, float shift) {
    double total = 0.0;
    int64_t v = 0;
#ifdef DIFFUTRON_AVX2
    const __m256 sh = _mm256_set1_ps(shift);
    for (; v + kChunk <= n; v += kChunk) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = 0; k < kChunk; k += 8)
            acc = _mm256_add_ps(acc, exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(row + v + k), sh)));
        total += hsum8(acc);
    }
#endif
    for (; v < n; v += kChunk) {
        const int64_t end = v + kChunk < n ? v + kChunk : n;
        float s = 0.0f;
        for (int64_t k = v; k < end; ++k) s += exp_nonpos(row[k] - shift);
        total += s;
    }
    return total;
}

// Maximum of [0, n); NaN if any element is NaN.
float max_or_nan(const float* row, int64_t n) {
    float best = -std::numeric_limits<float>::infinity();
    bool nan_seen = false;
    int64_t v = 0;
#ifdef DIFFUTRON_AVX2
    __m256 m = _mm256_set1_ps(best);
    __m256 nan = _mm256_setzero_ps();
    for (; v + 8 <= n; v += 8) {
        const __m256 x = _mm256_loadu_ps(row + v);
        m = _mm256_max_ps(m, x);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    alignas(32) float o[8];
    _mm256_store_ps(o, m);
    for (float f : o) best = f > best ? f : best;
    nan_seen = _mm256_movemask_ps(nan) != 0;
#endif
    for (; v < n; ++v) {
        best = row[v] > best ? row[v] : best;
        nan_seen = nan_seen || row[v] != row[v];
    }
    return nan_seen ? std::numeric_limits<float>::quiet_NaN() : best;
}

// One row: first index of the maximum (torch.argmax's tie rule) and 1 / sum(exp(l - max)), with an
// online rescaling of the running sum when a later tile raises the maximum.
void argmax_confidence_row(const float* row, int64_t vocab, int64_t* out_id, float* out_conf) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    float best = neg_inf;
    int64_t best_id = 0;
    double sum = 0.0;
    for (int64_t t0 = 0; t0 < vocab; t0 += kTile) {
        const int64_t t1 = t0 + kTile < vocab ? t0 + kTile : vocab;
        const float tile_max = max_or_nan(row + t0, t1 - t0);
        if (tile_max != tile_max) {  // torch: NaN wins the argmax and poisons the softmax
            int64_t v = t0;
            while (row[v] == row[v]) ++v;
            *out_id = v;
            *out_conf = std::numeric_limits<float>::quiet_NaN();
            return;
        }
        if (tile_max > best) {
            int64_t v = t0;
            while (row[v] != tile_max) ++v;  // first index of the maximum
            if (best != neg_inf) sum *= std::exp(static_cast<double>(best) - tile_max);
            best = tile_max;
            best_id = v;
        }
        if (best != neg_inf) sum += exp_sum(row + t0, t1 - t0, best);
    }
    *out_id = best_id;
    // An all -inf row: torch's softmax gives NaN.
    *out_conf = best == neg_inf ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(1.0 / sum);
}

void argmax_confidence(std::uintptr_t logits, int64_t rows, int64_t vocab, int64_t row_stride,
                       std::uintptr_t out_ids, std::uintptr_t out_conf) {
    const float* l = reinterpret_cast<const float*>(logits);
    int64_t* ids = reinterpret_cast<int64_t*>(out_ids);
    float* conf = reinterpret_cast<float*>(out_conf);
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        argmax_confidence_row(l + r * row_stride, vocab, ids + r, conf + r);
    }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "diffutron-engine CPU kernels (pybind11 + OpenMP)";
    m.def("argmax_confidence", &argmax_confidence, py::arg("logits"), py::arg("rows"), py::arg("vocab"),
          py::arg("row_stride"), py::arg("out_ids"), py::arg("out_conf"),
          "Per row of float32 logits: argmax id and its softmax probability, in one sweep.");
}
