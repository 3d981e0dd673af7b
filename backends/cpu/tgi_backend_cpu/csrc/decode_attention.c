/* Attention straight from the paged KV pool, for bf16 models on a CPU.
 *
 * One query token per row (a decode row; or one token of a prompt chunk, whose row sees
 * the keys up to its own position): for each row (and each of its KV heads), the G query heads
 * sharing a KV head score every key of the row's table (read in place from the pool, no
 * dense copy), take a float32 softmax and sum the values. Work items (a row with all its
 * KV heads, or one KV head of a row when rows are fewer than threads) are spread over
 * OpenMP threads (torch's own runtime: this library links libgomp.so.1, which torch
 * already loaded).
 *
 * Layouts (row-major, as the runner keeps them):
 *   q             [R, H, D] bf16, rows q_row_stride values apart (a slice of the fused
 *                 QKV output needs no copy); head h reads KV head h / G
 *   out           [R, H, D] bf16, contiguous
 *   keys, values  [slots, KVH, D] bf16; position p of a row with table t lives at slot
 *                 t[p / block_size] * block_size + p % block_size
 *   tables        int64, row table_rows[r] of a [rows, table_stride] tensor
 *   seq_lens      int64 [R] keys of each row (its new token's included: already written)
 * A window w > 0 keeps the last w keys. Scores accumulate in float32 (AVX512-BF16 dot
 * products where the compiler targets them), softmax and the weighted sum too. Rounding
 * follows torch's CPU flash attention for bf16, so greedy output stays with the SDPA
 * path's (and transformers'): the softmax sum is taken over float32 exponentials, the
 * weights that multiply the values are those exponentials rounded to bf16, and the
 * output rounds to bf16 once, to nearest even.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "bf16.h"
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define TGI_DPBF16 1  /* bf16.h has included immintrin.h */
#endif

#define MAX_HEAD_DIM 256
#define MAX_GROUP 32
/* Keys ahead to prefetch: a row's keys are scattered over blocks and strided by the
 * other heads, so the hardware prefetcher alone leaves a cold read latency-bound. */
#define PREFETCH_AHEAD 8

/* Ask for the cache lines of one head's vector of `bytes` bytes. */
static inline void prefetch_row(const uint16_t* row, int bytes) {
    for (int offset = 0; offset < bytes; offset += 64)
        __builtin_prefetch((const char*)row + offset, 0, 1);
}

/* offsets[j] = where key j's heads start in the pool (its slot times slot_stride), for
 * j in [from, to): block by block, no division per key. */
static void key_offsets(int64_t* offsets, const int64_t* table, int from, int to, int block_size,
                        int64_t slot_stride) {
    int block = from / block_size;
    int within = from - block * block_size;
    for (int j = from; j < to; block++, within = 0) {
        const int64_t base = table[block] * block_size;
        const int stop = j + (block_size - within) < to ? j + (block_size - within) : to;
        for (int64_t slot = base + within; j < stop; j++, slot++) offsets[j] = slot * slot_stride;
    }
}

/* q . k over D bf16 values, accumulated in float32 */
static inline float dot_bf16(const uint16_t* q, const uint16_t* k, int dim) {
#ifdef TGI_DPBF16
    __m512 acc = _mm512_setzero_ps();
    int d = 0;
    for (; d + 32 <= dim; d += 32) {
        __m512bh a = (__m512bh)_mm512_loadu_si512((const void*)(q + d));
        __m512bh b = (__m512bh)_mm512_loadu_si512((const void*)(k + d));
        acc = _mm512_dpbf16_ps(acc, a, b);
    }
    float sum = _mm512_reduce_add_ps(acc);
    for (; d < dim; d++) sum += bf16_to_f32(q[d]) * bf16_to_f32(k[d]);
    return sum;
#else
    float sum = 0.f;
    for (int d = 0; d < dim; d++) sum += bf16_to_f32(q[d]) * bf16_to_f32(k[d]);
    return sum;
#endif
}

#ifdef TGI_DPBF16
/* Sixteen dot products' sums at once: v[k] holds key k's 16 partial sums; the result's
 * element k is their total. Pairs are added while they are transposed (4 levels of
 * shuffles), instead of one horizontal reduction per key. */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 s8[8], s4[4], s2[2];
    for (int i = 0; i < 8; i++)
        s8[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                              _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(s8[2 * i]), b = _mm512_castps_pd(s8[2 * i + 1]);
        s4[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
        s2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88),
                         _mm512_shuffle_f32x4(s2[0], s2[1], 0xDD));
}

/* Scores of up to 16 keys (`valid` of them; k_rows[k] + k_offset is key k's vector,
 * `head_dim` a multiple of 32) for each of `heads` query heads q + i * head_dim, written
 * to scores + i * stride; top[i] keeps each head's running maximum. */
static inline void score_block16(const uint16_t* q, const uint16_t* const* k_rows,
                                 int64_t k_offset, int heads, int head_dim, float scale,
                                 float* scores, int64_t stride, float* top, __mmask16 valid) {
    for (int i = 0; i < heads; i++) {
        const uint16_t* qi = q + (int64_t)i * head_dim;
        __m512 acc[16];
        for (int k = 0; k < 16; k++) acc[k] = _mm512_setzero_ps();
        for (int d = 0; d < head_dim; d += 32) {
            const __m512bh qd = (__m512bh)_mm512_loadu_si512((const void*)(qi + d));
            for (int k = 0; k < 16; k++)
                acc[k] = _mm512_dpbf16_ps(
                    acc[k], qd,
                    (__m512bh)_mm512_loadu_si512((const void*)(k_rows[k] + k_offset + d)));
        }
        const __m512 s = _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(scores + (int64_t)i * stride, valid, s);
        const float m = _mm512_mask_reduce_max_ps(valid, s);
        if (m > top[i]) top[i] = m;
    }
}

/* Sum of p[g][j] * v_j over the keys j for G query heads sharing one KV head: each
 * 16-wide slice of the head dimension keeps its G accumulators in registers for the
 * whole pass over the keys (the slice of a row's values stays in L1 between slices).
 * The same fused multiply-adds in the same order as the plain loop, so the same bits. */
#define TGI_VALUE_PASS(G)                                                                \
    static void value_pass_##G(const float* p, int64_t p_stride, const uint16_t* v_head, \
                               const int64_t* offsets, int first, int len, int head_dim, \
                               float* acc) {                                             \
        for (int c = 0; c < head_dim; c += 16) {                                         \
            __m512 a[G];                                                                 \
            for (int g = 0; g < G; g++) a[g] = _mm512_setzero_ps();                      \
            for (int j = first; j < len; j++) {                                          \
                const __m512 v = load_bf16x16(v_head + offsets[j] + c);                  \
                for (int g = 0; g < G; g++)                                              \
                    a[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * p_stride + j]), v, a[g]); \
            }                                                                            \
            for (int g = 0; g < G; g++) _mm512_storeu_ps(acc + g * head_dim + c, a[g]);  \
        }                                                                                \
    }
TGI_VALUE_PASS(1)
TGI_VALUE_PASS(2)
TGI_VALUE_PASS(3)
TGI_VALUE_PASS(4)
TGI_VALUE_PASS(5)
TGI_VALUE_PASS(6)
TGI_VALUE_PASS(7)
TGI_VALUE_PASS(8)
typedef void (*value_pass_fn)(const float*, int64_t, const uint16_t*, const int64_t*, int, int,
                              int, float*);
static const value_pass_fn VALUE_PASSES[9] = {
    NULL, value_pass_1, value_pass_2, value_pass_3, value_pass_4,
    value_pass_5, value_pass_6, value_pass_7, value_pass_8,
};

/* The same sums for a head dimension of 64 with all four 16-wide slices at once (G x 4
 * accumulators in registers): one pass over the keys, each key's values read once as
 * two whole cache lines. Per accumulator the same fused multiply-adds in the same
 * order as above, so the same bits. */
#define TGI_VALUE_PASS64(G)                                                               \
    static void value_pass64_##G(const float* p, int64_t p_stride, const uint16_t* v_head, \
                                 const int64_t* offsets, int first, int len, float* acc) { \
        __m512 a[G][4];                                                                   \
        for (int g = 0; g < G; g++)                                                       \
            for (int c = 0; c < 4; c++) a[g][c] = _mm512_setzero_ps();                    \
        for (int j = first; j < len; j++) {                                               \
            const uint16_t* v_row = v_head + offsets[j];                                  \
            __m512 v[4];                                                                  \
            for (int c = 0; c < 4; c++) v[c] = load_bf16x16(v_row + 16 * c);             \
            for (int g = 0; g < G; g++) {                                                 \
                const __m512 w = _mm512_set1_ps(p[g * p_stride + j]);                     \
                for (int c = 0; c < 4; c++) a[g][c] = _mm512_fmadd_ps(w, v[c], a[g][c]); \
            }                                                                             \
        }                                                                                 \
        for (int g = 0; g < G; g++)                                                       \
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + g * 64 + 16 * c, a[g][c]); \
    }
TGI_VALUE_PASS64(1)
TGI_VALUE_PASS64(2)
TGI_VALUE_PASS64(3)
TGI_VALUE_PASS64(4)
TGI_VALUE_PASS64(5)
TGI_VALUE_PASS64(6)
typedef void (*value_pass64_fn)(const float*, int64_t, const uint16_t*, const int64_t*, int, int,
                                float*);
static const value_pass64_fn VALUE_PASSES64[7] = {
    NULL, value_pass64_1, value_pass64_2, value_pass64_3, value_pass64_4, value_pass64_5,
    value_pass64_6,
};
#endif

int tgi_decode_attention_bf16(
    const uint16_t* q, int64_t q_row_stride, const uint16_t* keys, const uint16_t* values,
    uint16_t* out,
    const int64_t* tables, int64_t table_stride, const int64_t* table_rows,
    const int64_t* seq_lens, int num_rows, int num_heads, int num_kv_heads, int head_dim,
    int block_size, float scale, int window, int max_len, int num_threads)
{
    if (head_dim > MAX_HEAD_DIM || num_kv_heads <= 0 || num_heads % num_kv_heads != 0)
        return 1;
    const int group = num_heads / num_kv_heads;
    if (group > MAX_GROUP) return 1;
    const int64_t slot_stride = (int64_t)num_kv_heads * head_dim;
    /* A work item is one row with all its KV heads when there are rows enough to keep
     * every thread busy: a key's heads sit side by side in the pool, so one pass reads
     * whole cache lines (a head alone uses a third of SmolLM2's). With fewer rows than
     * threads, each KV head of a row is an item, so one-row decode still runs in
     * parallel. Per query head and key the arithmetic is the same either way. */
    const int span = num_rows >= num_threads ? num_kv_heads : 1;  /* KV heads per item */
    const int chunks = num_kv_heads / span;
    const int heads = span * group;  /* query heads per item */
    int failed = 0;
    #pragma omp parallel num_threads(num_threads) reduction(|:failed)
    {
        float* scores = (float*)malloc(sizeof(float) * (size_t)heads * (size_t)max_len);
        float* acc = (float*)malloc(sizeof(float) * (size_t)heads * (size_t)head_dim);
        float* top = (float*)malloc(sizeof(float) * (size_t)heads);
        float* total = (float*)malloc(sizeof(float) * (size_t)heads);
        int64_t* offsets = (int64_t*)malloc(sizeof(int64_t) * (size_t)max_len);
        /* offsets[known_from, known_to) hold known_table's keys: a prompt chunk's rows
         * share one table, and this thread's next row of it needs only its new keys */
        const int64_t* known_table = NULL;
        int known_from = 0, known_to = 0;
        const int ready =
            scores != NULL && acc != NULL && top != NULL && total != NULL && offsets != NULL;
        if (!ready) failed = 1;
        /* items dealt round-robin: a chunk's rows grow longer one by one, and halves
         * of them would leave one thread three times the other's work */
        #pragma omp for schedule(static, 1)
        for (int item = 0; item < num_rows * chunks; item++) {
            if (!ready) continue;
            const int r = item / chunks;
            const int h0 = (item % chunks) * span;  /* first KV head of this item */
            const int len = (int)seq_lens[r];
            const int first = (window > 0 && len > window) ? len - window : 0;
            const int64_t* table = tables + table_rows[r] * table_stride;
            const uint16_t* q_row = q + (int64_t)r * q_row_stride + (int64_t)h0 * group * head_dim;
            for (int i = 0; i < heads; i++) {
                top[i] = -3.0e38f;
                total[i] = 0.f;
            }
            memset(acc, 0, sizeof(float) * (size_t)heads * (size_t)head_dim);
            const int item_bytes = span * head_dim * (int)sizeof(uint16_t);
            const uint16_t* k_base = keys + (int64_t)h0 * head_dim;
            const uint16_t* v_base = values + (int64_t)h0 * head_dim;
            if (table == known_table && first >= known_from && first <= known_to) {
                if (len > known_to) {
                    key_offsets(offsets, table, known_to, len, block_size, slot_stride);
                    known_to = len;
                }
            } else {
                key_offsets(offsets, table, first, len, block_size, slot_stride);
                known_table = table;
                known_from = first;
                known_to = len;
            }
            for (int j = first; j < first + PREFETCH_AHEAD && j < len; j++)
                prefetch_row(k_base + offsets[j], item_bytes);
#ifdef TGI_DPBF16
            if (head_dim % 32 == 0) {
                /* 16 keys at a time (see sum16). Prefetched while a block is scored: the
                 * keys of the next two blocks and the values of this one and the next.
                 * Each key is asked for twice: at 32 rows out of cache that measured
                 * ~8% faster than once (presumably prefetches dropped while the miss
                 * buffers are full), and asking for the values a block early ~12% more */
                for (int j = first + PREFETCH_AHEAD; j < first + 32 && j < len; j++)
                    prefetch_row(k_base + offsets[j], item_bytes);
                for (int j0 = first; j0 < len; j0 += 16) {
                    const int n = len - j0 < 16 ? len - j0 : 16;
                    for (int j = j0 + 16; j < j0 + 48 && j < len; j++)
                        prefetch_row(k_base + offsets[j], item_bytes);
                    for (int j = j0; j < j0 + 32 && j < len; j++)
                        prefetch_row(v_base + offsets[j], item_bytes);
                    const uint16_t* rows16[16];
                    for (int k = 0; k < 16; k++) rows16[k] = k_base + offsets[j0 + (k < n ? k : n - 1)];
                    const __mmask16 valid = (__mmask16)((1u << n) - 1u);
                    for (int hh = 0; hh < span; hh++)
                        score_block16(q_row + (int64_t)hh * group * head_dim, rows16,
                                      (int64_t)hh * head_dim, group, head_dim, scale,
                                      scores + (int64_t)hh * group * max_len + j0, max_len,
                                      top + hh * group, valid);
                }
            } else
#endif
            for (int j = first; j < len; j++) {
                if (j + PREFETCH_AHEAD < len) prefetch_row(k_base + offsets[j + PREFETCH_AHEAD], item_bytes);
                const uint16_t* k_slot = k_base + offsets[j];
                for (int hh = 0; hh < span; hh++) {
                    const uint16_t* k = k_slot + (int64_t)hh * head_dim;
                    for (int g = 0; g < group; g++) {
                        const int i = hh * group + g;
                        const float s = dot_bf16(q_row + (int64_t)i * head_dim, k, head_dim) * scale;
                        scores[(int64_t)i * max_len + j] = s;
                        if (s > top[i]) top[i] = s;
                    }
                }
            }
#ifdef TGI_DPBF16
            const int rounded = head_dim % 32 == 0;
            if (rounded) {
                /* exponentials summed in float32; stored rounded to bf16, the weights that
                 * multiply the values */
                for (int i = 0; i < heads; i++) {
                    float* row = scores + (int64_t)i * max_len;
                    const __m512 shift = _mm512_set1_ps(top[i]);
                    __m512 sum = _mm512_setzero_ps();
                    for (int j = first; j < len; j += 16) {
                        const __mmask16 valid =
                            len - j < 16 ? (__mmask16)((1u << (len - j)) - 1u) : (__mmask16)0xFFFF;
                        const __m512 e = exp_x16(
                            _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, row + j), shift));
                        sum = _mm512_mask_add_ps(sum, valid, sum, e);
                        _mm512_mask_storeu_ps(row + j, valid, round_bf16x16(e));
                    }
                    total[i] = _mm512_reduce_add_ps(sum);
                }
            } else
#endif
            for (int i = 0; i < heads; i++) {
                float* row = scores + (int64_t)i * max_len;
                float sum = 0.f;
                for (int j = first; j < len; j++) {
                    const float e = expf(row[j] - top[i]);
                    row[j] = e;
                    sum += e;
                }
                total[i] = sum;
            }
            for (int j = first; j < first + PREFETCH_AHEAD && j < len; j++)
                prefetch_row(v_base + offsets[j], item_bytes);
#ifdef TGI_DPBF16
            if (head_dim % 16 == 0 && group <= 8) {
                /* the weights that multiply the values: the exponentials rounded to bf16
                 * (the vectorised exponentials above were stored rounded already) */
                if (!rounded)
                    for (int i = 0; i < heads; i++) {
                        float* row = scores + (int64_t)i * max_len;
                        for (int j = first; j < len; j++) row[j] = round_bf16(row[j]);
                    }
                for (int hh = 0; hh < span; hh++) {
                    const float* p = scores + (int64_t)hh * group * max_len;
                    const uint16_t* v_head = v_base + (int64_t)hh * head_dim;
                    float* a = acc + (int64_t)hh * group * head_dim;
                    if (head_dim == 64 && group <= 6)
                        VALUE_PASSES64[group](p, max_len, v_head, offsets, first, len, a);
                    else
                        VALUE_PASSES[group](p, max_len, v_head, offsets, first, len, head_dim, a);
                }
            } else
#endif
            for (int j = first; j < len; j++) {
                if (j + PREFETCH_AHEAD < len) prefetch_row(v_base + offsets[j + PREFETCH_AHEAD], item_bytes);
                const uint16_t* v_slot = v_base + offsets[j];
                for (int hh = 0; hh < span; hh++) {
                    const uint16_t* v = v_slot + (int64_t)hh * head_dim;
                    float vf[MAX_HEAD_DIM];
                    for (int d = 0; d < head_dim; d++) vf[d] = bf16_to_f32(v[d]);
                    for (int g = 0; g < group; g++) {
                        const int i = hh * group + g;
                        const float p = round_bf16(scores[(int64_t)i * max_len + j]);
                        float* a = acc + (int64_t)i * head_dim;
                        for (int d = 0; d < head_dim; d++) a[d] += p * vf[d];
                    }
                }
            }
            for (int i = 0; i < heads; i++) {
                uint16_t* o = out + ((int64_t)r * num_heads + (int64_t)h0 * group + i) * head_dim;
                const float inv = total[i] > 0.f ? 1.f / total[i] : 0.f;
                const float* a = acc + (int64_t)i * head_dim;
                for (int d = 0; d < head_dim; d++) o[d] = f32_to_bf16(a[d] * inv);
            }
        }
        free(scores);
        free(acc);
        free(top);
        free(total);
        free(offsets);
    }
    return failed;
}
