/* A decoder layer's small bf16 ops, each one pass over memory instead of several torch
 * ops (and their dispatch), for the paged engine on a CPU.
 *
 * At 32 decode rows these ops move a few tens of KB per call, so what torch spends on
 * them is mostly per-op overhead: RMSNorm as four ops, rotary as five, SiLU-and-multiply
 * as two, the KV write as two. Each function here is one call. They round as the torch
 * ops they replace (float32 inside, bf16 out, to nearest even), so greedy output stays
 * with the torch path's up to last-bit differences in exp and in sum order.
 *
 * Plain C loops written so the compiler vectorizes them (-O3 -march=native); rows are
 * spread over OpenMP threads (torch's own runtime) when there are enough of them.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include "bf16.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Calls over fewer values run on the calling thread: waking threads costs more. */
#define PARALLEL_MIN_VALUES 32768
/* Widest row RMSNorm takes: a row's float32 copy lives on the (OpenMP thread's) stack. */
#define MAX_SIZE 16384

/* summed = hidden + delta (rounded to bf16; skipped when delta is NULL), then
 * normed = RMSNorm(summed) * weight: the mean of squares in float32, the weight applied
 * before the one rounding, as the torch path's bf16 RMSNorm. `size` <= MAX_SIZE. */
int tgi_add_rms_norm_bf16(const uint16_t* hidden, const uint16_t* delta, const uint16_t* weight,
                          uint16_t* summed, uint16_t* normed, int rows, int size, float eps,
                          int num_threads) {
    if (size > MAX_SIZE) return 1;
    #pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * size >= PARALLEL_MIN_VALUES)
    for (int r = 0; r < rows; r++) {
        float x[size];
        const uint16_t* h = hidden + (int64_t)r * size;
        float squares = 0.f;
        if (delta != NULL) {
            const uint16_t* e = delta + (int64_t)r * size;
            uint16_t* s = summed + (int64_t)r * size;
            for (int d = 0; d < size; d++) {
                const uint16_t b = f32_to_bf16(bf16_to_f32(h[d]) + bf16_to_f32(e[d]));
                s[d] = b;
                x[d] = bf16_to_f32(b);
                squares += x[d] * x[d];
            }
        } else {
            for (int d = 0; d < size; d++) {
                x[d] = bf16_to_f32(h[d]);
                squares += x[d] * x[d];
            }
        }
        const float rstd = 1.f / sqrtf(squares / (float)size + eps);
        uint16_t* o = normed + (int64_t)r * size;
        for (int d = 0; d < size; d++) o[d] = f32_to_bf16(x[d] * rstd * bf16_to_f32(weight[d]));
    }
    return 0;
}

/* Rotate `heads` heads of each row in place (x: row r's head h at
 * x + r * row_stride + h * head_dim) by tables cos, sin [rows, rotary_dim] laid out as
 * `tgi.models.rope.Rotary.cos_sin` makes them (sin carries rotate_half's sign):
 * x[d] <- round(round(x[d] * cos[d]) + x[d +- half] * sin[d]), as torch's
 * addcmul(x * cos, swapped, sin) in bf16. Dimensions past rotary_dim are left alone. */
int tgi_rotary_bf16(uint16_t* x, int64_t row_stride, int rows, int heads, int head_dim,
                    int rotary_dim, const uint16_t* cos, const uint16_t* sin, int num_threads) {
    if (rotary_dim > 1024 || rotary_dim % 2 != 0 || rotary_dim > head_dim) return 1;
    const int half = rotary_dim / 2;
    #pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * heads * rotary_dim >= PARALLEL_MIN_VALUES)
    for (int r = 0; r < rows; r++) {
        const uint16_t* c = cos + (int64_t)r * rotary_dim;
        const uint16_t* s = sin + (int64_t)r * rotary_dim;
        for (int h = 0; h < heads; h++) {
            uint16_t* v = x + (int64_t)r * row_stride + (int64_t)h * head_dim;
            float in[1024];
            for (int d = 0; d < rotary_dim; d++) in[d] = bf16_to_f32(v[d]);
            for (int d = 0; d < half; d++) {
                const float a = round_bf16(in[d] * bf16_to_f32(c[d]));
                v[d] = f32_to_bf16(a + in[d + half] * bf16_to_f32(s[d]));
            }
            for (int d = half; d < rotary_dim; d++) {
                const float a = round_bf16(in[d] * bf16_to_f32(c[d]));
                v[d] = f32_to_bf16(a + in[d - half] * bf16_to_f32(s[d]));
            }
        }
    }
    return 0;
}

/* out[r] = round(round(silu(gate)) * up) for gate_up [rows, 2 * size] = [gate | up], as
 * torch's silu then multiply in bf16. */
int tgi_silu_mul_bf16(const uint16_t* gate_up, uint16_t* out, int rows, int size,
                      int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * size >= PARALLEL_MIN_VALUES)
    for (int r = 0; r < rows; r++) {
        const uint16_t* restrict g = gate_up + (int64_t)r * 2 * size;
        const uint16_t* restrict u = g + size;
        uint16_t* restrict o = out + (int64_t)r * size;
        int d = 0;
#ifdef __AVX512F__
        for (; d + 16 <= size; d += 16) {
            const __m512 x = load_bf16x16(g + d);
            const __m512 e = exp_x16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            const __m512 silu = round_bf16x16(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
            store_bf16x16(o + d, _mm512_mul_ps(silu, load_bf16x16(u + d)));
        }
#endif
        for (; d < size; d++) {
            const float x = bf16_to_f32(g[d]);
            const float silu = round_bf16(x / (1.f + expf(-x)));
            o[d] = f32_to_bf16(silu * bf16_to_f32(u[d]));
        }
    }
    return 0;
}

/* The step's new keys and values into the pool: row r of k and v (`width` values, rows
 * k_stride and v_stride apart, e.g. slices of the fused QKV output) to pool slot
 * slots[r]; 1 (nothing written) when a slot is outside the pool's num_slots. */
int tgi_write_kv_bf16(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride,
                      uint16_t* pool_k, uint16_t* pool_v, const int64_t* slots, int rows,
                      int width, int64_t num_slots) {
    for (int r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= num_slots) return 1;
    const size_t bytes = (size_t)width * sizeof(uint16_t);
    for (int r = 0; r < rows; r++) {
        memcpy(pool_k + slots[r] * width, k + (int64_t)r * k_stride, bytes);
        memcpy(pool_v + slots[r] * width, v + (int64_t)r * v_stride, bytes);
    }
    return 0;
}
