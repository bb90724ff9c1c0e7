/* One generation step of largewave's WaveNet for B streams, fused: every layer's dilated conv,
 * gate, residual and skip, then the output stack and (optionally) Gumbel-max sampling.
 *
 * The caller (largewave/models/fast_step.py) owns every buffer (torch tensors) and passes their
 * addresses once, in a `lw_ctx`; a call runs `n` consecutive steps without returning to Python.
 * Weights are the folded matrices of `IncrementalState` (the sigmoid half of each gate and the
 * residual/skip weights pre-scaled so that one tanh serves both halves of the gate:
 * z' = tanh(a_f) * (1 + tanh(a_g / 2)) = 2 * tanh(a_f) * sigmoid(a_g)), stored row-major as
 * [inputs x outputs], in fp32 or in bf16 (the upper 16 bits of an fp32; accumulation stays fp32).
 *
 * Plain C: the compiler vectorises the inner loops for the machine it runs on (-O3 -march=native).
 * No libm call sits on the hot path: tanh comes from an exp built of a Cody-Waite range
 * reduction and a degree-6 polynomial (relative error ~2e-7 on the clamped range), so the
 * loops vectorise without -ffast-math.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdint.h>
#include <string.h>
#include <time.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef struct {
    int64_t L, R, G, S, V, B, k, N, hop, P, wbf16;
    const int64_t *dil;          /* [L] */
    const float *embed;          /* [V x R] */
    const void *w_past;          /* [L x (k-1)R x G] */
    const void *w_cur;           /* [L x R x G] */
    const void *w_res;           /* [(L-1) x H x R] */
    const void *w_skip;          /* [L*H x S] */
    const void *w_out1;          /* [S x S] */
    const void *w_out2;          /* [S x V] */
    const float *b_skip, *b_out1, *b_out2;
    const float *const_bias;     /* [L x B x G], or NULL when conditioned */
    const float *frame_bias;     /* [P x L x B x G] (refreshed by the caller once per frame) */
    float *hist;                 /* [L x N x B x R] ring of layer inputs */
    float *x;                    /* [L x B x R] this step's layer inputs */
    float *pre;                  /* [B x G] */
    float *z;                    /* [B x L*H] */
    float *h1, *h2;              /* [B x S] */
    float *logits;               /* [B x V] */
    double *prof;                /* NULL, or [PROF_PHASES] seconds accumulated per phase */
} lw_ctx;

/* Phases of a step timed when ctx->prof is set (largewave/models/fast_step.py names them). */
enum { P_INPUT, P_CONV, P_GATE, P_RES, P_SKIP, P_OUT, P_SAMPLE, PROF_PHASES };

static inline double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

#define TICK(phase)                                      \
    if (c->prof) {                                       \
        double now_ = wall();                            \
        c->prof[phase] += now_ - c->prof[PROF_PHASES];   \
        c->prof[PROF_PHASES] = now_;                     \
    }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* exp(x) for x in [-18, 0]: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2 (branch-free: vectorises) */
static inline float exp_neg(float x) {
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666667e-2f + r * (8.3333333e-3f + r * 1.3888889e-3f)))));
    union { int32_t i; float f; } s;
    s.i = ((int32_t)n + 127) << 23;
    return p * s.f;
}

/* tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|); |x| clamped at 9 (tanh(9) = 1 - 3e-8) */
static inline float fast_tanh(float x) {
    float a = __builtin_fabsf(x);
    a = a < 9.0f ? a : 9.0f;
    float e = exp_neg(-2.0f * a);
    return __builtin_copysignf((1.0f - e) / (1.0f + e), x);
}

/* 8-float vectors (GCC/Clang vector extensions: AVX on x86, pairs of NEON registers on ARM);
 * the unaligned variants load and store at any float address. */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));
typedef uint16_t v8h_u __attribute__((vector_size(16), aligned(2)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static inline v8f ld_f32(const float *p) { return *(const v8f_u *)p; }
static inline v8f ld_bf16(const uint16_t *p) {
#ifdef __AVX2__  /* one widening load and one shift (the generic form compiles to two 128-bit halves) */
    return (v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    v8u u = __builtin_convertvector(*(const v8h_u *)p, v8u) << 16;
    return (v8f)u;
#endif
}
static inline void st_f32(float *p, v8f v) { *(v8f_u *)p = v; }

/* Register-blocked micro-kernels: y[NB rows x 8·NV cols] += x[NB rows x n_in] @ w[n_in x 8·NV],
 * the NB·NV accumulators held in registers for the whole pass over n_in. x rows are xs apart,
 * w rows ws apart, y rows ys apart. */
#define DEF_MICRO(NAME, NB, NV, WT, LD)                                                            \
    static inline void NAME(int64_t n_in, const float *x, int64_t xs, const WT *w, int64_t ws,       \
                            float *y, int64_t ys) {                                                \
        v8f acc[NB][NV];                                                                           \
        for (int r = 0; r < NB; r++)                                                               \
            for (int c = 0; c < NV; c++) acc[r][c] = ld_f32(y + r * ys + 8 * c);                   \
        for (int64_t i = 0; i < n_in; i++) {                                                       \
            v8f wv[NV];                                                                            \
            for (int c = 0; c < NV; c++) wv[c] = LD(w + i * ws + 8 * c);                           \
            for (int r = 0; r < NB; r++) {                                                         \
                const float v = x[r * xs + i];                                                     \
                for (int c = 0; c < NV; c++) acc[r][c] += v * wv[c];                               \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < NB; r++)                                                               \
            for (int c = 0; c < NV; c++) st_f32(y + r * ys + 8 * c, acc[r][c]);                    \
    }

/* one output column (the remainder of n_out that is not a multiple of 8) */
#define DEF_COLUMN(NAME, WT, LOADW)                                                                \
    static inline void NAME(int64_t n_in, const float *x, const WT *w, int64_t ws, float *y) {    \
        float s = *y;                                                                              \
        for (int64_t i = 0; i < n_in; i++) s += x[i] * LOADW(w[i * ws]);                           \
        *y = s;                                                                                    \
    }

#define F32(v) (v)
#define BF16(v) (bf16_to_f32(v))

#define KC_BYTES (192 * 1024)  /* a weight panel that stays in a 256 KiB+ L2 cache */

/* y[b, :] += x[b, :] @ W for b < B: rows in blocks of 6, 4, 2, 1. A single row streams the
 * weights 64 columns at a time (8 independent accumulators hide the FMA latency); several rows
 * reuse every loaded weight vector 16 columns at a time (6 x 2 accumulators + 2 weight vectors +
 * a broadcast fit x86's 16 vector registers). */
#define DEF_GEMM(NAME, WT, LD, LOADW)                                                              \
    DEF_MICRO(NAME##_6x2, 6, 2, WT, LD)                                                            \
    DEF_MICRO(NAME##_4x2, 4, 2, WT, LD)                                                            \
    DEF_MICRO(NAME##_2x2, 2, 2, WT, LD)                                                            \
    DEF_MICRO(NAME##_1x8, 1, 8, WT, LD)                                                            \
    DEF_MICRO(NAME##_1x2, 1, 2, WT, LD)                                                            \
    DEF_MICRO(NAME##_1x1, 1, 1, WT, LD)                                                            \
    DEF_COLUMN(NAME##_col, WT, LOADW)                                                              \
    static void NAME##_panel(int64_t B, int64_t n_in, int64_t n_out, const float *x, int64_t xs,   \
                             const WT *w, float *y, int64_t ys) {                                  \
        int64_t b = 0;                                                                             \
        while (b < B) {                                                                            \
            const int64_t nb = B - b >= 6 ? 6 : B - b >= 4 ? 4 : B - b >= 2 ? 2 : 1;               \
            const float *xb = x + b * xs;                                                          \
            float *yb = y + b * ys;                                                                \
            int64_t j = 0;                                                                         \
            if (nb == 1)                                                                           \
                for (; j + 64 <= n_out; j += 64) NAME##_1x8(n_in, xb, xs, w + j, n_out, yb + j, ys); \
            for (; j + 16 <= n_out; j += 16) {                                                     \
                if (nb == 6) NAME##_6x2(n_in, xb, xs, w + j, n_out, yb + j, ys);                   \
                else if (nb == 4) NAME##_4x2(n_in, xb, xs, w + j, n_out, yb + j, ys);              \
                else if (nb == 2) NAME##_2x2(n_in, xb, xs, w + j, n_out, yb + j, ys);              \
                else NAME##_1x2(n_in, xb, xs, w + j, n_out, yb + j, ys);                           \
            }                                                                                      \
            for (; j + 8 <= n_out; j += 8)                                                         \
                for (int64_t r = 0; r < nb; r++) NAME##_1x1(n_in, xb + r * xs, xs, w + j, n_out, yb + r * ys + j, ys); \
            for (; j < n_out; j++)                                                                 \
                for (int64_t r = 0; r < nb; r++) NAME##_col(n_in, xb + r * xs, w + j, n_out, yb + r * ys + j); \
            b += nb;                                                                               \
        }                                                                                          \
    }                                                                                              \
    /* in panels of KC input rows, so that several row blocks reuse a panel from cache */          \
    static void NAME(int64_t B, int64_t n_in, int64_t n_out, const float *x, int64_t xs,           \
                     const WT *w, float *y, int64_t ys) {                                          \
        const int64_t kc = B == 1 ? n_in : KC_BYTES / (n_out * (int64_t)sizeof(WT)) / 8 * 8 + 8;   \
        for (int64_t i0 = 0; i0 < n_in; i0 += kc)                                                  \
            NAME##_panel(B, n_in - i0 < kc ? n_in - i0 : kc, n_out, x + i0, xs, w + i0 * n_out, y, ys); \
    }

DEF_GEMM(gemm_f32, float, ld_f32, F32)
DEF_GEMM(gemm_bf16, uint16_t, ld_bf16, BF16)

static inline void gemm(const lw_ctx *c, int64_t n_in, int64_t n_out, const float *x, int64_t xs,
                        const void *w, int64_t w_offset, float *y, int64_t ys) {
    if (c->wbf16)
        gemm_bf16(c->B, n_in, n_out, x, xs, (const uint16_t *)w + w_offset, y, ys);
    else
        gemm_f32(c->B, n_in, n_out, x, xs, (const float *)w + w_offset, y, ys);
}

/* y[b, :] = bias for each of B rows */
static void bias_rows(int64_t B, int64_t n, float *y, const float *bias) {
    for (int64_t b = 0; b < B; b++) memcpy(y + b * n, bias, n * sizeof(float));
}

static void relu(float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = y[i] > 0 ? y[i] : 0;
}

/* One step at time t: consume token[b] (the token at t-1; NULL or < 0 = nothing before), write logits. */
static void step(const lw_ctx *c, int64_t t, const int64_t *token) {
    const int64_t L = c->L, R = c->R, G = c->G, H = G / 2, S = c->S, V = c->V, B = c->B, k = c->k, N = c->N;
    const int64_t BR = B * R, BG = B * G, LH = L * H;
    float *x0 = c->x;
    for (int64_t b = 0; b < B; b++) {
        if (!token || token[b] < 0) memset(x0 + b * R, 0, R * sizeof(float));
        else memcpy(x0 + b * R, c->embed + token[b] * R, R * sizeof(float));
    }
    TICK(P_INPUT)
    const float *bias = c->const_bias ? c->const_bias
                                      : c->frame_bias + (c->P > 1 ? (t % c->hop) : 0) * L * BG;
    for (int64_t l = 0; l < L; l++) {
        float *xl = c->x + l * BR;
        memcpy(c->pre, bias + l * BG, BG * sizeof(float));
        for (int64_t j = 0; j < k - 1; j++) {  /* tap j sees t - (k-1-j)*d */
            int64_t pos = (t - (k - 1 - j) * c->dil[l]) % N;
            if (pos < 0) pos += N;
            gemm(c, R, G, c->hist + (l * N + pos) * BR, R, c->w_past, (l * (k - 1) + j) * R * G, c->pre, G);
        }
        gemm(c, R, G, xl, R, c->w_cur, l * R * G, c->pre, G);
        TICK(P_CONV)
        for (int64_t b = 0; b < B; b++) {
            float *a = c->pre + b * G, *z = c->z + b * LH + l * H;
            for (int64_t h = 0; h < H; h++) z[h] = fast_tanh(a[h]) * (1.0f + fast_tanh(a[H + h]));
        }
        TICK(P_GATE)
        if (l < L - 1) {
            float *xn = xl + BR;
            memcpy(xn, xl, BR * sizeof(float));
            gemm(c, H, R, c->z + l * H, LH, c->w_res, l * H * R, xn, R);
        }
        TICK(P_RES)
    }
    for (int64_t l = 0; l < L; l++) memcpy(c->hist + (l * N + t % N) * BR, c->x + l * BR, BR * sizeof(float));
    TICK(P_INPUT)
    bias_rows(B, S, c->h1, c->b_skip);
    gemm(c, LH, S, c->z, LH, c->w_skip, 0, c->h1, S);
    relu(c->h1, B * S);
    TICK(P_SKIP)
    bias_rows(B, S, c->h2, c->b_out1);
    gemm(c, S, S, c->h1, S, c->w_out1, 0, c->h2, S);
    relu(c->h2, B * S);
    bias_rows(B, V, c->logits, c->b_out2);
    gemm(c, S, V, c->h2, S, c->w_out2, 0, c->logits, V);
    TICK(P_OUT)
}

/* Run steps t0 .. t0+n-1. tokens: time-major [T x B] int64; the token of step t-1 is read from
 * row t-1 (none at t = 0). Rows t < n_forced are kept (a prompt); the others are written:
 * argmax(logits * inv_t + noise) with noise rows [n x B x V] (Gumbel) or, when noise is NULL,
 * argmax(logits) (greedy). Returns 0. */
int lw_run(const lw_ctx *c, int64_t t0, int64_t n, int64_t *tokens, int64_t n_forced,
           const float *noise, float inv_t) {
    const int64_t B = c->B, V = c->V;
    if (c->prof) c->prof[PROF_PHASES] = wall();
    for (int64_t s = 0; s < n; s++) {
        int64_t t = t0 + s;
        step(c, t, t == 0 ? NULL : tokens + (t - 1) * B);
        if (t < n_forced) continue;
        for (int64_t b = 0; b < B; b++) {
            const float *lg = c->logits + b * V;
            int64_t best = 0;
            float bv;
            if (noise) {
                const float *g = noise + (s * B + b) * V;
                bv = lg[0] * inv_t + g[0];
                for (int64_t v = 1; v < V; v++) {
                    float y = lg[v] * inv_t + g[v];
                    if (y > bv) { bv = y; best = v; }
                }
            } else {
                bv = lg[0];
                for (int64_t v = 1; v < V; v++) if (lg[v] > bv) { bv = lg[v]; best = v; }
            }
            tokens[t * B + b] = best;
        }
        TICK(P_SAMPLE)
    }
    return 0;
}

/* One step's logits only (into c->logits), for callers that sample themselves (nucleus). */
int lw_logits(const lw_ctx *c, int64_t t, const int64_t *prev) {
    step(c, t, prev);
    return 0;
}

/* ---- the gates of training (largewave/models/residual_stack.py), one pass each way ----------
 * a: [B x G x T] gate pre-activations, contiguous; z: B blocks of [H x T] rows, z_bs floats apart.
 * Forward: a_f <- tanh(a_f), a_g <- sigmoid(a_g), z <- tanh * sigmoid (sigmoid(x) = (1 + tanh(x/2))/2).
 * Backward: with a holding (t, s) and dz like z: a_f <- dz s (1 - t^2), a_g <- dz t s (1 - s). */
int lw_gate_forward(float *a, float *z, int64_t B, int64_t H, int64_t T, int64_t z_bs) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            float *f = a + (b * 2 * H + h) * T, *g = f + H * T, *o = z + b * z_bs + h * T;
            for (int64_t i = 0; i < T; i++) {
                const float t = fast_tanh(f[i]);
                const float s = 0.5f + 0.5f * fast_tanh(0.5f * g[i]);
                f[i] = t;
                g[i] = s;
                o[i] = t * s;
            }
        }
    return 0;
}

int lw_gate_backward(float *a, const float *dz, int64_t B, int64_t H, int64_t T, int64_t dz_bs) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            float *f = a + (b * 2 * H + h) * T, *g = f + H * T;
            const float *d = dz + b * dz_bs + h * T;
            for (int64_t i = 0; i < T; i++) {
                const float t = f[i], s = g[i], gz = d[i];
                f[i] = gz * s * (1.0f - t * t);
                g[i] = gz * t * s * (1.0f - s);
            }
        }
    return 0;
}
