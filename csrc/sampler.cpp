// Fused sampler for the CPU path (the contract of kernels/sampling.py): per row of float32 logits,
// repetition penalty, suppression, argmax or Gumbel-max with counter-based (Philox) draws, and the
// chosen token's softmax probability (the "confidence" of the reference sampler), without
// materializing a probability tensor. Every row has its own temperature, penalty and bitmaps, so rows
// of many requests with different settings share one call. Built against pybind11 only: tensors
// cross the boundary as raw addresses with explicit shapes and strides, checked by the Python wrapper
// (diffutron_engine/backends.py), so installing never compiles against or pulls a torch build.

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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

// ------------------------------------------------------------------------------------------------
// Philox-4x32-10, first output word: the counter-based generator of the Triton kernels
// (kernels/sampling.py), so the CPU and GPU paths draw the same numbers for the same
// (seed, vocabulary id, position, step, stream).
inline uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
        const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
        const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
        const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c0;
}

// Standard Gumbel draw from 32 bits, the same float32 formula as the kernels: w in (0, 1),
// E = -log(1 - w) (its series below 0.01, where 1 - w would drop w's low bits), g = -log(E).
inline float gumbel_from_bits(uint32_t bits) {
    float w = (static_cast<float>(bits) + 0.5f) * 2.3283064365386963e-10f;
    w = w < 0.99999994f ? w : 0.99999994f;
    const float e = w < 0.01f ? w * (1.0f + w * (0.5f + w * 0.333333333333333f)) : -std::log(1.0f - w);
    return -std::log(e);
}

// Largest value gumbel_from_bits can return (bits = 0), plus a margin: an id whose logit is more than
// temperature * (this - its own draw) below the running best cannot win, so its draw is skipped.
const float kGumbelMax = gumbel_from_bits(0u) + 1e-3f;

struct SampleArgs {
    const float* logits;
    int64_t vocab, row_stride, col_stride;
    const float *temperature, *penalty;  // per row
    const int8_t* valid;                 // per row, or null: every row
    const int64_t *seeds, *positions, *steps, *streams, *maps;
    const int32_t *seen_bits, *suppress_bits, *begin_bits;  // bitmaps [R, W]; row maps[r], or null
    int64_t seen_stride, suppress_stride, begin_stride;     // words between bitmap rows (0: one for all)
};

// Calls f(id) for every id whose bit is set in the bitmap of `words` int32 words.
template <class F>
inline void for_each_id(const int32_t* bits, int64_t words, int64_t vocab, F f) {
    for (int64_t w = 0; w < words; ++w) {
        uint32_t word = static_cast<uint32_t>(bits[w]);
        while (word) {
            const int b = __builtin_ctz(word);
            const int64_t id = w * 32 + b;
            if (id < vocab) f(id);
            word &= word - 1;
        }
    }
}

// First index of the maximum (torch.argmax's tie rule): a vectorized max, then a scan for it.
inline int64_t first_max(const float* x, int64_t n) {
    const float m = max_or_nan(x, n);
    for (int64_t v = 0; v < n; ++v)
        if (x[v] == m || x[v] != x[v]) return v;  // NaN wins, as in torch
    return 0;  // all -inf
}

// One row of the sampler contract (see kernels/sampling.py): penalty, suppression, argmax or Gumbel-max,
// confidence under begin-suppression. Edits a private copy of the row; the ids of the penalty and the
// suppression lists are visited through their bitmaps (a few hundred ids, not 256k tests).
void fused_sample_row(const SampleArgs& a, int64_t r, std::vector<float>& buf, int64_t* out_id, float* out_conf) {
    const int64_t V = a.vocab, words = (V + 31) / 32;
    const float* src = a.logits + r * a.row_stride;
    const float neg_inf = -std::numeric_limits<float>::infinity();
    const int64_t m = a.maps[r];
    const float temperature = a.temperature[r], penalty = a.penalty[r];
    const int32_t* seen = penalty != 1.0f && a.seen_bits ? a.seen_bits + m * a.seen_stride : nullptr;
    const int32_t* suppress = a.suppress_bits ? a.suppress_bits + m * a.suppress_stride : nullptr;
    const int32_t* begin = a.begin_bits ? a.begin_bits + m * a.begin_stride : nullptr;
    const bool edits = seen || suppress;
    if (!edits && temperature == 0.0f && !begin && a.col_stride == 1) {
        argmax_confidence_row(src, V, out_id, out_conf);
        return;
    }
    float* x = buf.data();
    if (a.col_stride == 1) {
        std::memcpy(x, src, V * sizeof(float));
    } else {  // a transposed view ([V, N] storage, as the CPU LM head returns it): gather the row
        for (int64_t v = 0; v < V; ++v) x[v] = src[v * a.col_stride];
    }
    if (!edits && temperature == 0.0f && !begin) {
        argmax_confidence_row(x, V, out_id, out_conf);
        return;
    }
    if (seen) {
        const float p = penalty;
        for_each_id(seen, words, V, [&](int64_t id) { x[id] = x[id] > 0 ? x[id] / p : x[id] * p; });
    }
    if (suppress) for_each_id(suppress, words, V, [&](int64_t id) { x[id] = neg_inf; });

    if (temperature == 0.0f && !begin) {  // the edited row through the vectorized greedy sweep
        argmax_confidence_row(x, V, out_id, out_conf);
        return;
    }
    int64_t choice;
    if (temperature == 0.0f) {
        choice = first_max(x, V);
    } else {
        const uint32_t k0 = static_cast<uint32_t>(a.seeds[r]), k1 = static_cast<uint32_t>(a.seeds[r] >> 32);
        const uint32_t c1 = static_cast<uint32_t>(a.positions[r]), c2 = static_cast<uint32_t>(a.steps[r]);
        const uint32_t c3 = static_cast<uint32_t>(a.streams[r]);
        const float t = temperature;
        auto score = [&](int64_t v) {
            return x[v] + t * gumbel_from_bits(philox_first_word(static_cast<uint32_t>(v), c1, c2, c3, k0, k1));
        };
        // A lower bound of the winning score from the largest logit's own draw; ids that cannot reach
        // it even with the largest possible draw are skipped (exact: they could not win or tie).
        const int64_t top = first_max(x, V);
        const float cut = score(top) - t * kGumbelMax;
        float best = neg_inf;
        choice = 0;
        for (int64_t v = 0; v < V; ++v) {
            if (x[v] < cut) continue;
            const float s = score(v);
            if (s > best) best = s, choice = v;
        }
    }
    if (begin) for_each_id(begin, words, V, [&](int64_t id) { x[id] = neg_inf; });
    const float mx = max_or_nan(x, V);
    *out_id = choice;
    if (mx == neg_inf || mx != mx) {
        *out_conf = std::numeric_limits<float>::quiet_NaN();
        return;
    }
    double sum = 0.0;
    for (int64_t t0 = 0; t0 < V; t0 += kTile) sum += exp_sum(x + t0, (t0 + kTile < V ? t0 + kTile : V) - t0, mx);
    *out_conf = static_cast<float>(std::exp(static_cast<double>(x[choice]) - mx) / sum);
}

void fused_sample(std::uintptr_t logits, int64_t rows, int64_t vocab, int64_t row_stride, int64_t col_stride,
                  std::uintptr_t temperature, std::uintptr_t penalty, std::uintptr_t valid, std::uintptr_t seeds,
                  std::uintptr_t positions, std::uintptr_t steps, std::uintptr_t streams, std::uintptr_t maps,
                  std::uintptr_t seen_bits, int64_t seen_stride, std::uintptr_t suppress_bits,
                  int64_t suppress_stride, std::uintptr_t begin_bits, int64_t begin_stride,
                  std::uintptr_t out_ids, std::uintptr_t out_conf) {
    SampleArgs a{reinterpret_cast<const float*>(logits), vocab, row_stride, col_stride,
                 reinterpret_cast<const float*>(temperature), reinterpret_cast<const float*>(penalty),
                 reinterpret_cast<const int8_t*>(valid),
                 reinterpret_cast<const int64_t*>(seeds), reinterpret_cast<const int64_t*>(positions),
                 reinterpret_cast<const int64_t*>(steps), reinterpret_cast<const int64_t*>(streams),
                 reinterpret_cast<const int64_t*>(maps), reinterpret_cast<const int32_t*>(seen_bits),
                 reinterpret_cast<const int32_t*>(suppress_bits), reinterpret_cast<const int32_t*>(begin_bits),
                 seen_stride, suppress_stride, begin_stride};
    int64_t* ids = reinterpret_cast<int64_t*>(out_ids);
    float* conf = reinterpret_cast<float*>(out_conf);
    py::gil_scoped_release release;
#pragma omp parallel
    {
        std::vector<float> buf(static_cast<size_t>(vocab));  // one private row copy per thread
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; ++r) {
            if (a.valid && !a.valid[r]) {  // padding the caller ignores: no work
                ids[r] = 0;
                conf[r] = -std::numeric_limits<float>::infinity();
                continue;
            }
            fused_sample_row(a, r, buf, ids + r, conf + r);
        }
    }
}

uint32_t philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed) {
    return philox_first_word(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "diffutron-engine CPU kernels (pybind11 + OpenMP)";
    m.def("fused_sample", &fused_sample, py::arg("logits"), py::arg("rows"), py::arg("vocab"), py::arg("row_stride"),
          py::arg("col_stride"), py::arg("temperature"), py::arg("penalty"), py::arg("valid"), py::arg("seeds"),
          py::arg("positions"), py::arg("steps"), py::arg("streams"), py::arg("maps"), py::arg("seen_bits"),
          py::arg("seen_stride"), py::arg("suppress_bits"), py::arg("suppress_stride"), py::arg("begin_bits"),
          py::arg("begin_stride"), py::arg("out_ids"), py::arg("out_conf"),
          "The sampler contract of kernels/sampling.py on float32 rows, per-row parameters (addresses; 0 = absent).");
    m.def("philox", &philox, "First word of Philox-4x32-10 (the kernels' generator), for tests.");
}
