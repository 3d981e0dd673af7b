/* The body of layer_ops.c, once per dtype: that file includes it after defining
 *   LO_T                    the element type
 *   LO_NAME(x)              x with the dtype's suffix (tgi_rotary -> tgi_rotary_bf16)
 *   LO_TO_F32, LO_FROM_F32  one element to float32, and back rounded to LO_T
 *   LO_ROUND                a float32 rounded to LO_T's precision (float32: itself)
 *   LO_LOAD16, LO_STORE16, LO_ROUND16   the same, 16 at a time (AVX-512)
 * It undefines them at its end, ready for the next dtype. */

/* summed = hidden + delta (rounded to LO_T; skipped when delta is NULL), then
 * normed = RMSNorm(summed) * weight: the mean of squares in float32, the weight applied
 * before the one rounding, as the torch path's RMSNorm. `size` <= MAX_SIZE. */
int LO_NAME(tgi_add_rms_norm)(const LO_T* hidden, const LO_T* delta, const LO_T* weight,
                              LO_T* summed, LO_T* normed, int rows, int size, float eps,
                              int num_threads) {
    if (size > MAX_SIZE) return 1;
    #pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * size >= PARALLEL_MIN_VALUES)
    for (int r = 0; r < rows; r++) {
        float x[size];
        const LO_T* h = hidden + (int64_t)r * size;
        float squares = 0.f;
        if (delta != NULL) {
            const LO_T* e = delta + (int64_t)r * size;
            LO_T* s = summed + (int64_t)r * size;
            for (int d = 0; d < size; d++) {
                const LO_T b = LO_FROM_F32(LO_TO_F32(h[d]) + LO_TO_F32(e[d]));
                s[d] = b;
                x[d] = LO_TO_F32(b);
                squares += x[d] * x[d];
            }
        } else {
            for (int d = 0; d < size; d++) {
                x[d] = LO_TO_F32(h[d]);
                squares += x[d] * x[d];
            }
        }
        const float rstd = 1.f / sqrtf(squares / (float)size + eps);
        LO_T* o = normed + (int64_t)r * size;
        for (int d = 0; d < size; d++) o[d] = LO_FROM_F32(x[d] * rstd * LO_TO_F32(weight[d]));
    }
    return 0;
}

/* Rotate `heads` heads of each row in place (x: row r's head h at
 * x + r * row_stride + h * head_dim) by tables cos, sin [rows, rotary_dim] laid out as
 * `tgi.models.rope.Rotary.cos_sin` makes them (sin carries rotate_half's sign):
 * x[d] <- round(round(x[d] * cos[d]) + x[d +- half] * sin[d]), as torch's
 * addcmul(x * cos, swapped, sin) in LO_T. Dimensions past rotary_dim are left alone. */
int LO_NAME(tgi_rotary)(LO_T* x, int64_t row_stride, int rows, int heads, int head_dim,
                        int rotary_dim, const LO_T* cos, const LO_T* sin, int num_threads) {
    if (rotary_dim > 1024 || rotary_dim % 2 != 0 || rotary_dim > head_dim) return 1;
    const int half = rotary_dim / 2;
    #pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * heads * rotary_dim >= PARALLEL_MIN_VALUES)
    for (int r = 0; r < rows; r++) {
        const LO_T* c = cos + (int64_t)r * rotary_dim;
        const LO_T* s = sin + (int64_t)r * rotary_dim;
        for (int h = 0; h < heads; h++) {
            LO_T* v = x + (int64_t)r * row_stride + (int64_t)h * head_dim;
            float in[1024];
            for (int d = 0; d < rotary_dim; d++) in[d] = LO_TO_F32(v[d]);
            for (int d = 0; d < half; d++) {
                const float a = LO_ROUND(in[d] * LO_TO_F32(c[d]));
                v[d] = LO_FROM_F32(a + in[d + half] * LO_TO_F32(s[d]));
            }
            for (int d = half; d < rotary_dim; d++) {
                const float a = LO_ROUND(in[d] * LO_TO_F32(c[d]));
                v[d] = LO_FROM_F32(a + in[d - half] * LO_TO_F32(s[d]));
            }
        }
    }
    return 0;
}

/* out[r] = round(round(silu(gate)) * up) for gate_up [rows, 2 * size] = [gate | up], as
 * torch's silu then multiply in LO_T. */
int LO_NAME(tgi_silu_mul)(const LO_T* gate_up, LO_T* out, int rows, int size,
                          int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * size >= PARALLEL_MIN_VALUES)
    for (int r = 0; r < rows; r++) {
        const LO_T* restrict g = gate_up + (int64_t)r * 2 * size;
        const LO_T* restrict u = g + size;
        LO_T* restrict o = out + (int64_t)r * size;
        int d = 0;
#ifdef __AVX512F__
        for (; d + 16 <= size; d += 16) {
            const __m512 x = LO_LOAD16(g + d);
            const __m512 e = exp_x16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            const __m512 silu = LO_ROUND16(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
            LO_STORE16(o + d, _mm512_mul_ps(silu, LO_LOAD16(u + d)));
        }
#endif
        for (; d < size; d++) {
            const float x = LO_TO_F32(g[d]);
            const float silu = LO_ROUND(x / (1.f + expf(-x)));
            o[d] = LO_FROM_F32(silu * LO_TO_F32(u[d]));
        }
    }
    return 0;
}

/* The step's new keys and values into the pool: row r of k and v (`width` values, rows
 * k_stride and v_stride apart, e.g. slices of the fused QKV output) to pool slot
 * slots[r]; 1 (nothing written) when a slot is outside the pool's num_slots. */
int LO_NAME(tgi_write_kv)(const LO_T* k, int64_t k_stride, const LO_T* v, int64_t v_stride,
                          LO_T* pool_k, LO_T* pool_v, const int64_t* slots, int rows, int width,
                          int64_t num_slots) {
    for (int r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= num_slots) return 1;
    const size_t bytes = (size_t)width * sizeof(LO_T);
    for (int r = 0; r < rows; r++) {
        memcpy(pool_k + slots[r] * width, k + (int64_t)r * k_stride, bytes);
        memcpy(pool_v + slots[r] * width, v + (int64_t)r * v_stride, bytes);
    }
    return 0;
}

#undef LO_T
#undef LO_NAME
#undef LO_TO_F32
#undef LO_FROM_F32
#undef LO_ROUND
#undef LO_LOAD16
#undef LO_STORE16
#undef LO_ROUND16
