/* A decoder layer's small ops in bf16 and float32, each one pass over memory instead of
 * several torch ops (and their dispatch), for the paged engine on a CPU.
 *
 * At 32 decode rows these ops move a few tens of KB per call, so what torch spends on
 * them is mostly per-op overhead: RMSNorm as four ops, rotary as five, SiLU-and-multiply
 * as two, the KV write as two. Each function here is one call. They round as the torch
 * ops they replace (float32 inside, bf16 out, to nearest even), so greedy output stays
 * with the torch path's up to last-bit differences in exp and in sum order. The body is
 * written once (layer_ops_impl.h) and included per dtype below.
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

#define TGI_CAT_(a, b) a##_##b
#define TGI_CAT(a, b) TGI_CAT_(a, b)

#define LO_T uint16_t
#define LO_NAME(x) TGI_CAT(x, bf16)
#define LO_TO_F32(x) bf16_to_f32(x)
#define LO_FROM_F32(f) f32_to_bf16(f)
#define LO_ROUND(f) round_bf16(f)
#define LO_LOAD16(p) load_bf16x16(p)
#define LO_STORE16(p, v) store_bf16x16((p), (v))
#define LO_ROUND16(v) round_bf16x16(v)
#include "layer_ops_impl.h"

#define LO_T float
#define LO_NAME(x) TGI_CAT(x, f32)
#define LO_TO_F32(x) (x)
#define LO_FROM_F32(f) (f)
#define LO_ROUND(f) (f)
#define LO_LOAD16(p) _mm512_loadu_ps(p)
#define LO_STORE16(p, v) _mm512_storeu_ps((p), (v))
#define LO_ROUND16(v) (v)
#include "layer_ops_impl.h"
