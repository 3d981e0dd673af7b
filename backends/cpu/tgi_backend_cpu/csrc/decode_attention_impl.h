/* The body of decode_attention.c, once per KV dtype: that file includes it after
 * defining
 *   KV_T                 the element type of q, keys, values and out
 *   KV_NAME(x)           x with the dtype's suffix (tgi_decode_attention -> ..._bf16)
 *   KV_FAST              1 where the AVX-512 paths below compile for this dtype
 *   KV_SCORE_STEP        elements of a head that one KV_SCORE_FMA takes
 *   KV_SCORE_FMA(a,q,k)  acc a (16 float32 partial sums) += q . k over KV_SCORE_STEP
 *   KV_LOAD16(p)         16 elements as float32
 *   KV_TO_F32, KV_FROM_F32   one element to and from float32
 *   KV_WEIGHT, KV_WEIGHT16   a softmax weight as it multiplies the values (bf16: rounded
 *                        to bf16, as torch's flash attention does; float32: unchanged)
 * It undefines them at its end, ready for the next dtype. */

/* q . k over D values, accumulated in float32 */
static inline float KV_NAME(dot)(const KV_T* q, const KV_T* k, int dim) {
    int d = 0;
    float sum = 0.f;
#if KV_FAST
    __m512 acc = _mm512_setzero_ps();
    for (; d + KV_SCORE_STEP <= dim; d += KV_SCORE_STEP) acc = KV_SCORE_FMA(acc, q + d, k + d);
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; d < dim; d++) sum += KV_TO_F32(q[d]) * KV_TO_F32(k[d]);
    return sum;
}

#if KV_FAST
/* Scores of up to 16 keys (`valid` of them; k_rows[k] + k_offset is key k's vector,
 * `head_dim` a multiple of KV_SCORE_STEP) for each of `heads` query heads
 * q + i * head_dim, written to scores + i * stride; top[i] keeps each head's running
 * maximum. */
static inline void KV_NAME(score_block16)(const KV_T* q, const KV_T* const* k_rows,
                                          int64_t k_offset, int heads, int head_dim, float scale,
                                          float* scores, int64_t stride, float* top,
                                          __mmask16 valid) {
    for (int i = 0; i < heads; i++) {
        const KV_T* qi = q + (int64_t)i * head_dim;
        __m512 acc[16];
        for (int k = 0; k < 16; k++) acc[k] = _mm512_setzero_ps();
        for (int d = 0; d < head_dim; d += KV_SCORE_STEP)
            for (int k = 0; k < 16; k++) acc[k] = KV_SCORE_FMA(acc[k], qi + d, k_rows[k] + k_offset + d);
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
#define TGI_VALUE_PASS(G)                                                                 \
    static void KV_NAME(value_pass_##G)(const float* p, int64_t p_stride, const KV_T* v_head, \
                                        const int64_t* offsets, int first, int len,          \
                                        int head_dim, float* acc) {                           \
        for (int c = 0; c < head_dim; c += 16) {                                          \
            __m512 a[G];                                                                  \
            for (int g = 0; g < G; g++) a[g] = _mm512_setzero_ps();                       \
            for (int j = first; j < len; j++) {                                           \
                const __m512 v = KV_LOAD16(v_head + offsets[j] + c);                      \
                for (int g = 0; g < G; g++)                                               \
                    a[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * p_stride + j]), v, a[g]);  \
            }                                                                             \
            for (int g = 0; g < G; g++) _mm512_storeu_ps(acc + g * head_dim + c, a[g]);   \
        }                                                                                 \
    }
TGI_VALUE_PASS(1)
TGI_VALUE_PASS(2)
TGI_VALUE_PASS(3)
TGI_VALUE_PASS(4)
TGI_VALUE_PASS(5)
TGI_VALUE_PASS(6)
TGI_VALUE_PASS(7)
TGI_VALUE_PASS(8)
#undef TGI_VALUE_PASS
static void (*const KV_NAME(VALUE_PASSES)[9])(const float*, int64_t, const KV_T*, const int64_t*,
                                              int, int, int, float*) = {
    NULL,
    KV_NAME(value_pass_1), KV_NAME(value_pass_2), KV_NAME(value_pass_3), KV_NAME(value_pass_4),
    KV_NAME(value_pass_5), KV_NAME(value_pass_6), KV_NAME(value_pass_7), KV_NAME(value_pass_8),
};

/* The same sums for a head dimension of 64 with all four 16-wide slices at once (G x 4
 * accumulators in registers): one pass over the keys, each key's values read once as
 * whole cache lines. Per accumulator the same fused multiply-adds in the same order as
 * above, so the same bits. */
#define TGI_VALUE_PASS64(G)                                                                 \
    static void KV_NAME(value_pass64_##G)(const float* p, int64_t p_stride, const KV_T* v_head, \
                                          const int64_t* offsets, int first, int len,          \
                                          float* acc) {                                        \
        __m512 a[G][4];                                                                     \
        for (int g = 0; g < G; g++)                                                         \
            for (int c = 0; c < 4; c++) a[g][c] = _mm512_setzero_ps();                      \
        for (int j = first; j < len; j++) {                                                 \
            const KV_T* v_row = v_head + offsets[j];                                        \
            __m512 v[4];                                                                    \
            for (int c = 0; c < 4; c++) v[c] = KV_LOAD16(v_row + 16 * c);                   \
            for (int g = 0; g < G; g++) {                                                   \
                const __m512 w = _mm512_set1_ps(p[g * p_stride + j]);                       \
                for (int c = 0; c < 4; c++) a[g][c] = _mm512_fmadd_ps(w, v[c], a[g][c]);   \
            }                                                                               \
        }                                                                                   \
        for (int g = 0; g < G; g++)                                                         \
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + g * 64 + 16 * c, a[g][c]);   \
    }
TGI_VALUE_PASS64(1)
TGI_VALUE_PASS64(2)
TGI_VALUE_PASS64(3)
TGI_VALUE_PASS64(4)
TGI_VALUE_PASS64(5)
TGI_VALUE_PASS64(6)
#undef TGI_VALUE_PASS64
static void (*const KV_NAME(VALUE_PASSES64)[7])(const float*, int64_t, const KV_T*,
                                                const int64_t*, int, int, float*) = {
    NULL,
    KV_NAME(value_pass64_1), KV_NAME(value_pass64_2), KV_NAME(value_pass64_3),
    KV_NAME(value_pass64_4), KV_NAME(value_pass64_5), KV_NAME(value_pass64_6),
};
#endif

int KV_NAME(tgi_decode_attention)(
    const KV_T* q, int64_t q_row_stride, const KV_T* keys, const KV_T* values, KV_T* out,
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
            const KV_T* q_row = q + (int64_t)r * q_row_stride + (int64_t)h0 * group * head_dim;
            for (int i = 0; i < heads; i++) {
                top[i] = -3.0e38f;
                total[i] = 0.f;
            }
            memset(acc, 0, sizeof(float) * (size_t)heads * (size_t)head_dim);
            const int item_bytes = span * head_dim * (int)sizeof(KV_T);
            const KV_T* k_base = keys + (int64_t)h0 * head_dim;
            const KV_T* v_base = values + (int64_t)h0 * head_dim;
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
#if KV_FAST
            if (head_dim % KV_SCORE_STEP == 0) {
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
                    const KV_T* rows16[16];
                    for (int k = 0; k < 16; k++) rows16[k] = k_base + offsets[j0 + (k < n ? k : n - 1)];
                    const __mmask16 valid = (__mmask16)((1u << n) - 1u);
                    for (int hh = 0; hh < span; hh++)
                        KV_NAME(score_block16)(q_row + (int64_t)hh * group * head_dim, rows16,
                                               (int64_t)hh * head_dim, group, head_dim, scale,
                                               scores + (int64_t)hh * group * max_len + j0,
                                               max_len, top + hh * group, valid);
                }
            } else
#endif
            for (int j = first; j < len; j++) {
                if (j + PREFETCH_AHEAD < len) prefetch_row(k_base + offsets[j + PREFETCH_AHEAD], item_bytes);
                const KV_T* k_slot = k_base + offsets[j];
                for (int hh = 0; hh < span; hh++) {
                    const KV_T* k = k_slot + (int64_t)hh * head_dim;
                    for (int g = 0; g < group; g++) {
                        const int i = hh * group + g;
                        const float s = KV_NAME(dot)(q_row + (int64_t)i * head_dim, k, head_dim) * scale;
                        scores[(int64_t)i * max_len + j] = s;
                        if (s > top[i]) top[i] = s;
                    }
                }
            }
#if KV_FAST
            const int weighted = head_dim % KV_SCORE_STEP == 0;
            if (weighted) {
                /* exponentials summed in float32; stored as the weights that multiply the
                 * values (KV_WEIGHT16) */
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
                        _mm512_mask_storeu_ps(row + j, valid, KV_WEIGHT16(e));
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
#if KV_FAST
            if (head_dim % 16 == 0 && group <= 8) {
                /* the weights that multiply the values (the vectorised exponentials above
                 * were stored as such already) */
                if (!weighted)
                    for (int i = 0; i < heads; i++) {
                        float* row = scores + (int64_t)i * max_len;
                        for (int j = first; j < len; j++) row[j] = KV_WEIGHT(row[j]);
                    }
                for (int hh = 0; hh < span; hh++) {
                    const float* p = scores + (int64_t)hh * group * max_len;
                    const KV_T* v_head = v_base + (int64_t)hh * head_dim;
                    float* a = acc + (int64_t)hh * group * head_dim;
                    if (head_dim == 64 && group <= 6)
                        KV_NAME(VALUE_PASSES64)[group](p, max_len, v_head, offsets, first, len, a);
                    else
                        KV_NAME(VALUE_PASSES)[group](p, max_len, v_head, offsets, first, len,
                                                     head_dim, a);
                }
            } else
#endif
            for (int j = first; j < len; j++) {
                if (j + PREFETCH_AHEAD < len) prefetch_row(v_base + offsets[j + PREFETCH_AHEAD], item_bytes);
                const KV_T* v_slot = v_base + offsets[j];
                for (int hh = 0; hh < span; hh++) {
                    const KV_T* v = v_slot + (int64_t)hh * head_dim;
                    float vf[MAX_HEAD_DIM];
                    for (int d = 0; d < head_dim; d++) vf[d] = KV_TO_F32(v[d]);
                    for (int g = 0; g < group; g++) {
                        const int i = hh * group + g;
                        const float p = KV_WEIGHT(scores[(int64_t)i * max_len + j]);
                        float* a = acc + (int64_t)i * head_dim;
                        for (int d = 0; d < head_dim; d++) a[d] += p * vf[d];
                    }
                }
            }
            for (int i = 0; i < heads; i++) {
                KV_T* o = out + ((int64_t)r * num_heads + (int64_t)h0 * group + i) * head_dim;
                const float inv = total[i] > 0.f ? 1.f / total[i] : 0.f;
                const float* a = acc + (int64_t)i * head_dim;
                for (int d = 0; d < head_dim; d++) o[d] = KV_FROM_F32(a[d] * inv);
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

#undef KV_T
#undef KV_NAME
#undef KV_FAST
#undef KV_SCORE_STEP
#undef KV_SCORE_FMA
#undef KV_LOAD16
#undef KV_TO_F32
#undef KV_FROM_F32
#undef KV_WEIGHT
#undef KV_WEIGHT16
