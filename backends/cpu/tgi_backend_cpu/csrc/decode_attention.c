/* Decode attention straight from the paged KV pool, for bf16 models on a CPU.
 *
 * One query token per row: for each (row, KV head), the G query heads sharing that KV
 * head score every key of the row's table (read in place from the pool, no dense copy),
 * take a float32 softmax and sum the values. Work items are spread over OpenMP threads
 * (torch's own runtime: this library links libgomp.so.1, which torch already loaded).
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
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define TGI_DPBF16 1
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

static inline int64_t slot_of(const int64_t* table, int position, int block_size) {
    return table[position / block_size] * block_size + position % block_size;
}

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
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
    int failed = 0;
    #pragma omp parallel num_threads(num_threads) reduction(|:failed)
    {
        float* scores = (float*)malloc(sizeof(float) * (size_t)group * (size_t)max_len);
        if (scores == NULL) failed = 1;
        #pragma omp for collapse(2) schedule(static)
        for (int r = 0; r < num_rows; r++) {
            for (int h = 0; h < num_kv_heads; h++) {
                if (scores == NULL) continue;
                const int len = (int)seq_lens[r];
                const int first = (window > 0 && len > window) ? len - window : 0;
                const int64_t* table = tables + table_rows[r] * table_stride;
                float acc[MAX_GROUP][MAX_HEAD_DIM];
                float top[MAX_GROUP], total[MAX_GROUP];
                for (int g = 0; g < group; g++) {
                    top[g] = -3.0e38f;
                    total[g] = 0.f;
                    for (int d = 0; d < head_dim; d++) acc[g][d] = 0.f;
                }
                const int row_bytes = head_dim * (int)sizeof(uint16_t);
                const uint16_t* k_head = keys + (int64_t)h * head_dim;
                const uint16_t* v_head = values + (int64_t)h * head_dim;
                for (int j = first; j < first + PREFETCH_AHEAD && j < len; j++)
                    prefetch_row(k_head + slot_of(table, j, block_size) * slot_stride, row_bytes);
                for (int j = first; j < len; j++) {
                    if (j + PREFETCH_AHEAD < len) {
                        const int64_t ahead = slot_of(table, j + PREFETCH_AHEAD, block_size);
                        prefetch_row(k_head + ahead * slot_stride, row_bytes);
                    }
                    const int64_t slot = slot_of(table, j, block_size);
                    const uint16_t* k = k_head + slot * slot_stride;
                    for (int g = 0; g < group; g++) {
                        const uint16_t* qg =
                            q + (int64_t)r * q_row_stride + (int64_t)(h * group + g) * head_dim;
                        const float s = dot_bf16(qg, k, head_dim) * scale;
                        scores[g * max_len + j] = s;
                        if (s > top[g]) top[g] = s;
                    }
                }
                for (int g = 0; g < group; g++) {
                    float* row = scores + g * max_len;
                    float sum = 0.f;
                    for (int j = first; j < len; j++) {
                        const float e = expf(row[j] - top[g]);
                        row[j] = e;
                        sum += e;
                    }
                    total[g] = sum;
                }
                for (int j = first; j < first + PREFETCH_AHEAD && j < len; j++)
                    prefetch_row(v_head + slot_of(table, j, block_size) * slot_stride, row_bytes);
                for (int j = first; j < len; j++) {
                    if (j + PREFETCH_AHEAD < len) {
                        const int64_t ahead = slot_of(table, j + PREFETCH_AHEAD, block_size);
                        prefetch_row(v_head + ahead * slot_stride, row_bytes);
                    }
                    const int64_t slot = slot_of(table, j, block_size);
                    const uint16_t* v = v_head + slot * slot_stride;
                    float vf[MAX_HEAD_DIM];
                    for (int d = 0; d < head_dim; d++) vf[d] = bf16_to_f32(v[d]);
                    for (int g = 0; g < group; g++) {
                        const float p = bf16_to_f32(f32_to_bf16(scores[g * max_len + j]));
                        for (int d = 0; d < head_dim; d++) acc[g][d] += p * vf[d];
                    }
                }
                for (int g = 0; g < group; g++) {
                    uint16_t* o = out + ((int64_t)r * num_heads + h * group + g) * head_dim;
                    const float inv = total[g] > 0.f ? 1.f / total[g] : 0.f;
                    for (int d = 0; d < head_dim; d++) o[d] = f32_to_bf16(acc[g][d] * inv);
                }
            }
        }
        free(scores);
    }
    return failed;
}
