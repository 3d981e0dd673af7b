/* Attention straight from the paged KV pool, for bf16 and float32 models on a CPU.
 *
 * One query token per row (a decode row; or one token of a prompt chunk, whose row sees
 * the keys up to its own position): for each row (and each of its KV heads), the G query heads
 * sharing a KV head score every key of the row's table (read in place from the pool, no
 * dense copy), take a float32 softmax and sum the values. Work items (a row with all its
 * KV heads, or one KV head of a row when rows are fewer than threads) are spread over
 * OpenMP threads (torch's own runtime: this library links libgomp.so.1, which torch
 * already loaded).
 *
 * Layouts (row-major, as the runner keeps them), all in one dtype T (bf16 for
 * tgi_decode_attention_bf16, float32 for tgi_decode_attention_f32):
 *   q             [R, H, D] T, rows q_row_stride values apart (a slice of the fused
 *                 QKV output needs no copy); head h reads KV head h / G
 *   out           [R, H, D] T, contiguous
 *   keys, values  [slots, KVH, D] T; position p of a row with table t lives at slot
 *                 t[p / block_size] * block_size + p % block_size
 *   tables        int64, row table_rows[r] of a [rows, table_stride] tensor
 *   seq_lens      int64 [R] keys of each row (its new token's included: already written)
 * A window w > 0 keeps the last w keys. Scores accumulate in float32 (AVX512-BF16 dot
 * products where the compiler targets them), softmax and the weighted sum too. In bf16,
 * rounding follows torch's CPU flash attention, so greedy output stays with the SDPA
 * path's (and transformers'): the softmax sum is taken over float32 exponentials, the
 * weights that multiply the values are those exponentials rounded to bf16, and the
 * output rounds to bf16 once, to nearest even. In float32 nothing is rounded but the
 * sums' order differs from SDPA's (~1e-7 of the values).
 *
 * The body is written once (decode_attention_impl.h) and included per dtype below.
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
static inline void prefetch_row(const void* row, int bytes) {
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

#ifdef __AVX512F__
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

#endif

#define TGI_CAT_(a, b) a##_##b
#define TGI_CAT(a, b) TGI_CAT_(a, b)

/* bf16: AVX512-BF16 dot products of 32 values; softmax weights rounded to bf16 */
#define KV_T uint16_t
#define KV_NAME(x) TGI_CAT(x, bf16)
#ifdef TGI_DPBF16
#define KV_FAST 1
#else
#define KV_FAST 0
#endif
#define KV_SCORE_STEP 32
#define KV_SCORE_FMA(a, q, k)                                                  \
    _mm512_dpbf16_ps((a), (__m512bh)_mm512_loadu_si512((const void*)(q)), \
                     (__m512bh)_mm512_loadu_si512((const void*)(k)))
#define KV_LOAD16(p) load_bf16x16(p)
#define KV_TO_F32(x) bf16_to_f32(x)
#define KV_FROM_F32(f) f32_to_bf16(f)
#define KV_WEIGHT(f) round_bf16(f)
#define KV_WEIGHT16(v) round_bf16x16(v)
#include "decode_attention_impl.h"

/* float32: fused multiply-adds of 16 values; nothing rounded */
#define KV_T float
#define KV_NAME(x) TGI_CAT(x, f32)
#ifdef __AVX512F__
#define KV_FAST 1
#else
#define KV_FAST 0
#endif
#define KV_SCORE_STEP 16
#define KV_SCORE_FMA(a, q, k) _mm512_fmadd_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k), (a))
#define KV_LOAD16(p) _mm512_loadu_ps(p)
#define KV_TO_F32(x) (x)
#define KV_FROM_F32(f) (f)
#define KV_WEIGHT(f) (f)
#define KV_WEIGHT16(v) (v)
#include "decode_attention_impl.h"
