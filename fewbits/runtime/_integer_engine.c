/* fewbits' integer engine: convolution / linear layers on integer activations (int16 NHWC
 * codes k, value k * scale) and integer weights (int16, value k_w * scale_w), int32
 * accumulation, and an epilogue per output channel that folds the conv bias, a ReLU before
 * batch norm, batch norm and the output quantizer (clamp, divide, round half away from zero,
 * clamp of the code range and of a ReLU after the quantizer). A layer whose input is float
 * (the network's image, a global average pool, a float residual stream: see "float streams")
 * multiplies in float32 instead.
 *
 * CPU paths: ISA_GENERIC (portable C), ISA_AVX2 (AVX2 + FMA) and ISA_AVX512_VNNI (AVX2's code
 * with the u8 / int16 kernels on vpdpbusd / vpdpwssd and their epilogue 16 lanes wide:
 * AVX-512 F/BW/VL/VNNI), chosen per call; all paths
 * give the same integers (the float epilogue is the same IEEE operations, fmaf included; on
 * AVX2 a division by a scale is a reciprocal multiply with one exact correction, used only
 * where fbi_rcp_exact proved it gives the division's quotient for that scale). AVX2:
 * u8 x s8 (vpmaddubsw, int16 lane sums widened every `kchunk` quads, which pack_u8 proved
 * cannot wrap) where the weights allow, else int16 (vpmaddwd); stride-1 layers read their
 * taps as fixed offsets into a zero-padded image (no im2col); the epilogue runs a whole tile
 * stage by stage. See fewbits/runtime/integer.py. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define FBI_X86 1
#include <immintrin.h>
#else
#define FBI_X86 0
#endif

enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512_VNNI = 2 };
/* the AVX2 code serves every path above it too (an AVX-512 VNNI CPU has AVX2 + FMA): only the
 * kernels and the epilogue of the u8 / int16 layers differ */
#define USE_AVX2(isa) ((isa) >= ISA_AVX2)
enum { IN_INT = 0, IN_FLOAT_NCHW = 1, IN_FLOAT_NHWC = 2 };
enum { OUT_INT = 0, OUT_FLOAT = 1 };

#define NB 16 /* output channels per packed int16 block */
#define NBF 8 /* output channels per packed float block */

int fbi_isa_supported(int isa) {
    if (isa == ISA_GENERIC) return 1;
#if FBI_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX2) return avx2;
    if (isa == ISA_AVX512_VNNI)
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni"); /* every extension VNNI's code targets */
#endif
    return 0;
}

/* One convolution (or linear: h = w = kh = kw = 1). Layouts: int input NHWC int16; float
 * input NCHW float32; output NHWC (int16 codes or float32). Weights per group: int16 packed
 * [cout_g padded to NB / NB][kp / 2][NB][2] (kp = kh*kw*cin_g rounded up to even, taps in
 * (ky, kx, c) order), or float32 packed [cout_g padded to NBF / NBF][kf][NBF]. */
typedef struct {
    int32_t isa, in_kind, out_kind;
    int32_t n, h, w, cin, oh, ow, cout, kh, kw, sh, sw, ph, pw, dh, dw, groups, kp, kf;
    int32_t pre_relu, klo, khi, kofs;
    float clo, chi, sub, scale, inv; /* inv: exact 1 / scale (a power of two), else 0 */
    const void *x, *wpack;
    const int8_t *wpack8; /* AVX2 u8 x s8 weights [nb][kq4/4][16][4] or NULL */
    int32_t kq4;          /* taps rounded up to a multiple of 4 (wpack8) */
    int32_t ushift;       /* u8 path: byte = code - ushift (ushift <= 0: signed codes) */
    int32_t kchunk;       /* u8 path: quads whose int16 lane sums cannot wrap (>= 1) */
    const int32_t *corr;  /* u8 path: ushift * (sum of the channel's weights), or NULL */
    const float *sacc, *bias, *alpha, *beta; /* per output channel */
    void *y, *scratch;
    /* float input with a quantizer after it: its input is clamp(epilogue value, qlo, qhi) (the
     * ReLUs / clamps in front of it); NaN/inf there is reported (fbi_conv_run returns 1) */
    int32_t qcheck;
    float qlo, qhi;
    /* rcp_ok: the AVX2 epilogue may divide by scale as rcp_div (fbi_rcp_exact proved it
     * exact for this scale) */
    int32_t rcp_ok;
    /* fold (VNNI epilogue; integer output, inv != 0): every sacc a power of two, bias 0, so
     * fl(fl(acc * sacc + 0) * alpha + beta) = fl(acc * (alpha sacc) + beta), a ReLU before it
     * commutes with the positive sacc, and the multiply by inv (a power of two) scales the
     * batch norm, the clamps and sub exactly: alpha2 = alpha sacc inv, beta2 = beta inv
     * (integer_walk checked every product exact and normal; see _fold_args) */
    int32_t fold;
    const float *alpha2, *beta2;
    /* u8 maps between the VNNI layers (the output read only by one u8 direct-path layer):
     * out_u8 writes bytes code - u8shift (the reader's ushift) instead of int16 codes, and the
     * reader (in_u8) takes them as its byte image with no conversion. Only the VNNI epilogue
     * writes bytes; any other path refuses out_u8 (-2) */
    int32_t out_u8, u8shift, in_u8;
    /* nobias: every conv bias is 0 (the VNNI epilogue of an integer output skips adding it:
     * fl(x + 0) = x but for the sign of a zero, which no code sees) */
    int32_t nobias;
    /* cert (VNNI epilogue of an integer-input layer with an integer output; NULL: off): the
     * certified fast epilogue's per-channel constants, five arrays of cert_stride entries
     * (int32 lo, int32 hi, float A, float B, float thr), made and proven by
     * fewbits/runtime/integer_cert.py: code = floor(fma(float(clamp(acc, lo, hi)), A, B))
     * wherever t - floor(t) < thr; any other lane runs the exact epilogue (epi512_cert) */
    const float *cert;
    int32_t cert_stride;
} fbi_conv;

/* 1 where a layer runs the direct u8 path (conv_u8_avx2: stride 1, one group, whole taps of 4
 * channels read at fixed offsets of a zero-padded byte image), the only reader of u8 maps;
 * exported so that the engine links u8 maps by this one rule */
int fbi_u8_direct(const fbi_conv *a) {
    return a->wpack8 && a->in_kind == IN_INT && a->kq4 % 4 == 0 && a->groups == 1 &&
           a->sh == 1 && a->sw == 1 && a->dh == 1 && a->dw == 1 && a->cin % 4 == 0 &&
           a->kq4 == a->kh * a->kw * a->cin && a->kh * a->kw <= 64;
}

/* ----------------------------------------------------------------- epilogue */

static inline int32_t rha_code(float v, const fbi_conv *a) {
    /* the quantizer: clamp to [clo, chi], (v - sub) / scale, round half away, code offset */
    v = v < a->clo ? a->clo : v;
    v = v > a->chi ? a->chi : v;
    v = a->inv != 0.0f ? (v - a->sub) * a->inv : (v - a->sub) / a->scale;
    float av = fabsf(v), r = nearbyintf(av);
    r += (av - r == 0.5f) ? 1.0f : 0.0f;
    int32_t k = (int32_t)r;
    if (v < 0) k = -k;
    k += a->kofs;
    k = k < a->klo ? a->klo : k;
    return k > a->khi ? a->khi : k;
}

static inline float pre_value(float acc, int n, const fbi_conv *a) {
    float v = acc * a->sacc[n] + a->bias[n];
    if (a->pre_relu && v < 0.0f) v = 0.0f;
    return fmaf(v, a->alpha[n], a->beta[n]);
}

/* Whether the quantizer of a float-input layer sees NaN/inf for the epilogue value v: after
 * the clamps in front of it (NaN stays NaN, as in PyTorch's clamp). */
static inline int q_nonfinite(const fbi_conv *a, float v) {
    if (v != v) return 1;
    v = v < a->qlo ? a->qlo : v;
    v = v > a->qhi ? a->qhi : v;
    return !(fabsf(v) <= FLT_MAX);
}

/* q_nonfinite over `cnt` channels n.. of float sums acc (the rare exact look after a cheap
 * test on the sums flagged a non-finite value, or a sum that overflows). */
static int sums_nonfinite(const fbi_conv *a, const float *acc, int n, int cnt) {
    int nf = 0;
    for (int j = 0; j < cnt; j++) nf |= q_nonfinite(a, pre_value(acc[j], n + j, a));
    return nf;
}

static inline void store1(const fbi_conv *a, float v, int n, char *dst) {
    if (a->out_kind == OUT_FLOAT) {
        v = v < a->clo ? a->clo : v;
        ((float *)dst)[n] = v > a->chi ? a->chi : v;
    } else {
        ((int16_t *)dst)[n] = (int16_t)rha_code(v, a);
    }
}

/* quantize float values with the parameters of `a` (clo, chi, sub, scale, kofs, klo, khi) */
void fbi_quantize(const fbi_conv *a, int64_t n, const float *x, int16_t *y) {
    for (int64_t i = 0; i < n; i++) y[i] = (int16_t)rha_code(x[i], a);
}

/* ----------------------------------------------------------------- im2col */

/* rows [OH*OW][kp] int16 of image `img`, group g, from NHWC int16 (zeros: padding, tail) */
static void im2col_i16(const fbi_conv *a, const int16_t *x, int g, int16_t *col) {
    int cg = a->cin / a->groups, kp = a->kp;
    for (int oy = 0; oy < a->oh; oy++)
        for (int ox = 0; ox < a->ow; ox++) {
            int16_t *row = col + ((int64_t)oy * a->ow + ox) * kp;
            int t = 0;
            for (int ky = 0; ky < a->kh; ky++) {
                int iy = oy * a->sh - a->ph + ky * a->dh;
                for (int kx = 0; kx < a->kw; kx++, t += cg) {
                    int ix = ox * a->sw - a->pw + kx * a->dw;
                    if (iy < 0 || iy >= a->h || ix < 0 || ix >= a->w)
                        memset(row + t, 0, sizeof(int16_t) * cg);
                    else
                        memcpy(row + t, x + ((int64_t)iy * a->w + ix) * a->cin + g * cg,
                               sizeof(int16_t) * cg);
                }
            }
            for (; t < kp; t++) row[t] = 0;
        }
}

/* rows [OH*OW][kf] float of image `img`, group g, from NCHW float */
static void im2col_f32(const fbi_conv *a, const float *x, int g, float *col) {
    int cg = a->cin / a->groups, kf = a->kf;
    int64_t plane = (int64_t)a->h * a->w;
    for (int oy = 0; oy < a->oh; oy++)
        for (int ox = 0; ox < a->ow; ox++) {
            float *row = col + ((int64_t)oy * a->ow + ox) * kf;
            int iy0 = oy * a->sh - a->ph, ix0 = ox * a->sw - a->pw;
            if (iy0 >= 0 && iy0 + (a->kh - 1) * a->dh < a->h && ix0 >= 0 &&
                ix0 + (a->kw - 1) * a->dw < a->w) { /* interior: no bounds to check */
                const float *base = x + (int64_t)g * cg * plane + (int64_t)iy0 * a->w + ix0;
                int t = 0;
                for (int c = 0; c < cg; c++)
                    for (int ky = 0; ky < a->kh; ky++)
                        for (int kx = 0; kx < a->kw; kx++, t++)
                            row[t] = base[c * plane + (int64_t)ky * a->dh * a->w + kx * a->dw];
                for (; t < kf; t++) row[t] = 0.0f;
                continue;
            }
            int t = 0; /* taps (c, ky, kx): the NCHW weight order */
            for (int c = 0; c < cg; c++)
                for (int ky = 0; ky < a->kh; ky++) {
                    int iy = oy * a->sh - a->ph + ky * a->dh;
                    for (int kx = 0; kx < a->kw; kx++, t++) {
                        int ix = ox * a->sw - a->pw + kx * a->dw;
                        int in = iy >= 0 && iy < a->h && ix >= 0 && ix < a->w;
                        row[t] = in ? x[(g * cg + c) * plane + (int64_t)iy * a->w + ix] : 0.0f;
                    }
                }
            for (; t < kf; t++) row[t] = 0.0f;
        }
}

/* ----------------------------------------------------------------- generic GEMMs */

/* C[m][n0 + j] for rows of A (int16, stride lda), packed block B (kp/2 x NB x 2) */
static void gemm_i16_generic(const fbi_conv *a, const int16_t *A, int64_t lda, int64_t m,
                             const int16_t *B, int nblocks, int n_off, int cout_g,
                             char *Y, int64_t ldy, int esize) {
    int kp2 = a->kp / 2;
    for (int64_t r = 0; r < m; r++) {
        const int16_t *ar = A + r * lda;
        for (int b = 0; b < nblocks; b++) {
            int32_t acc[NB] = {0};
            const int16_t *bb = B + (int64_t)b * kp2 * NB * 2;
            for (int p = 0; p < kp2; p++) {
                int32_t a0 = ar[2 * p], a1 = ar[2 * p + 1];
                const int16_t *bp = bb + p * NB * 2;
                for (int j = 0; j < NB; j++) acc[j] += a0 * bp[2 * j] + a1 * bp[2 * j + 1];
            }
            int n0 = b * NB, cnt = cout_g - n0 < NB ? cout_g - n0 : NB;
            char *dst = Y + r * ldy * esize;
            for (int j = 0; j < cnt; j++) {
                float v = pre_value((float)acc[j], n_off + n0 + j, a);
                store1(a, v, n_off + n0 + j, dst);
            }
        }
    }
}

static int gemm_f32_generic(const fbi_conv *a, const float *A, int64_t lda, int64_t m,
                            const float *B, int nblocks, int n_off, int cout_g, char *Y,
                            int64_t ldy, int esize) {
    int kf = a->kf, bad = 0;
    for (int64_t r = 0; r < m; r++) {
        const float *ar = A + r * lda;
        for (int b = 0; b < nblocks; b++) {
            float acc[NBF] = {0};
            const float *bb = B + (int64_t)b * kf * NBF;
            for (int k = 0; k < kf; k++)
                for (int j = 0; j < NBF; j++) acc[j] = fmaf(ar[k], bb[k * NBF + j], acc[j]);
            int n0 = b * NBF, cnt = cout_g - n0 < NBF ? cout_g - n0 : NBF;
            char *dst = Y + r * ldy * esize;
            for (int j = 0; j < cnt; j++) {
                float v = pre_value(acc[j], n_off + n0 + j, a);
                if (a->qcheck) bad |= q_nonfinite(a, v);
                store1(a, v, n_off + n0 + j, dst);
            }
        }
    }
    return bad;
}

/* ----------------------------------------------------------------- AVX2 GEMMs */
#if FBI_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* The epilogue's constants, made once per layer call (vectors, so that the stores cannot make
 * the compiler reload and broadcast them). */
typedef struct {
    __m256 clo, chi, sub, inv, scale;
    __m256i kofs, klo, khi;
    const float *sacc, *bias, *alpha, *beta;
    const int32_t *corr;
    int pre_relu, out_float, use_sub, use_div, int_clamp, use_kofs, nonneg;
    int kind; /* the EK_ flags of an integer output (see epi_kind) */
    int use_rcp; /* use_div by rcp_div (exact: see fbi_rcp_exact) */
    __m256 rcp;
    int fold; /* fbi_conv.fold: alpha2 / beta2, and clo, chi, sub times inv */
    const float *alpha2, *beta2;
    int out_u8; /* fbi_conv.out_u8: bytes k - u8shift */
    int nobias; /* fbi_conv.nobias, integer outputs only */
    __m256i u8shift;
    const float *cert; /* fbi_conv.cert where the VNNI epilogue takes it (ep_fold), else NULL */
    int64_t cstride;
    int cclamp; /* the certified codes need the clamp to [cklo, ckhi] (see integer_cert.py) */
    int cnocheck; /* every sum's fast code was verified exact: no check (integer_cert.py) */
    __m256i cklo, ckhi;
} fbi_ep;

/* v / s correctly rounded, as vdivps gives it, in three FMA-pipe operations where a division
 * takes the divider for ~3.5 cycles per vector (Markstein's correction: q0 = v r, the exact
 * remainder v - q0 s by an fma, one correction q0 + rem r). Not exact for every s: used only
 * where fbi_rcp_exact checked every significand of v for this s. */
AVX2 static inline __attribute__((always_inline)) __m256 rcp_div(__m256 v, __m256 s, __m256 r) {
    __m256 q0 = _mm256_mul_ps(v, r);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, s, v), r, q0);
}

/* 1 where rcp_div(v, s, RN(1 / s)) equals v / s for every float v in [1, 2) (then for every
 * v = m 2^e whose quotient and remainder stay normal: scaling by 2^e commutes with each
 * rounding, and the sign too), else 0. 2^23 values, ~3 ms. */
AVX2 void fbi_rcp_div_avx2(float s, int64_t n, const float *x, float *y) {
    const __m256 vs = _mm256_set1_ps(s), vr = _mm256_set1_ps(1.0f / s);
    for (int64_t i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, rcp_div(_mm256_loadu_ps(x + i), vs, vr));
    for (int64_t i = n - n % 8; i < n; i++) {
        float t[8] = {x[i]};
        _mm256_storeu_ps(t, rcp_div(_mm256_loadu_ps(t), vs, vr));
        y[i] = t[0];
    }
}

AVX2 int fbi_rcp_exact_avx2(float s) {
    if (!(s >= 0x1p-60f && s <= 0x1p60f)) return 0;
    const __m256 vs = _mm256_set1_ps(s), vr = _mm256_set1_ps(1.0f / s);
    const __m256i step = _mm256_set1_epi32(8);
    __m256i bits = _mm256_add_epi32(_mm256_set1_epi32(0x3f800000),
                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i bad = _mm256_setzero_si256();
    for (int i = 0; i < (1 << 23) / 8; i++, bits = _mm256_add_epi32(bits, step)) {
        __m256 v = _mm256_castsi256_ps(bits);
        __m256i a = _mm256_castps_si256(rcp_div(v, vs, vr));
        __m256i b = _mm256_castps_si256(_mm256_div_ps(v, vs));
        bad = _mm256_or_si256(bad, _mm256_xor_si256(a, b));
    }
    return _mm256_testz_si256(bad, bad);
}

/* The epilogue's flags as one small number, for the kernels' copies of the epilogue compiled
 * with them known (no flag tests, the tile's vectors kept in registers through every stage).
 * Some flags are merged, and a merged flag is set when either part is: each added operation
 * is exact where it is not needed (v - 0 = v, also for -0; k + 0 = k; the sign handling is
 * the identity on quotients >= 0, -0 included; the clamp of the code range is a no-op where
 * int_clamp is 0). */
enum { EK_RELU = 1, EK_DIV = 2, EK_CORR = 4, EK_OFS = 8 /* sub, kofs */,
       EK_SC = 16 /* sign handling, clamp of the code range */, EK_N = 32 };
/* every kind, for the per-kind copies of each epilogue: X(K) once per K < EK_N */
#define EK_KINDS(X)                                                                         \
    X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)     \
    X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23) X(24) X(25) X(26) X(27) X(28) X(29)       \
    X(30) X(31)

/* the code of `v` without the final clamp of the code range (for the check below) */
static int32_t raw_code(float v, const fbi_conv *a) {
    v = a->inv != 0.0f ? (v - a->sub) * a->inv : (v - a->sub) / a->scale;
    float av = fabsf(v), r = nearbyintf(av);
    r += (av - r == 0.5f) ? 1.0f : 0.0f;
    return (v < 0 ? -(int32_t)r : (int32_t)r) + a->kofs;
}

AVX2 static void ep_init(const fbi_conv *a, fbi_ep *e) {
    e->clo = _mm256_set1_ps(a->clo), e->chi = _mm256_set1_ps(a->chi);
    e->sub = _mm256_set1_ps(a->sub), e->scale = _mm256_set1_ps(a->scale);
    e->use_div = a->inv == 0.0f;
    e->inv = _mm256_set1_ps(a->inv);
    e->kofs = _mm256_set1_epi32(a->kofs);
    e->klo = _mm256_set1_epi32(a->klo), e->khi = _mm256_set1_epi32(a->khi);
    e->sacc = a->sacc, e->bias = a->bias, e->alpha = a->alpha, e->beta = a->beta;
    e->corr = a->corr;
    e->pre_relu = a->pre_relu, e->out_float = a->out_kind == OUT_FLOAT;
    e->use_sub = a->sub != 0.0f;
    e->use_kofs = a->kofs != 0;
    /* clo >= sub: the quotient is >= 0 (or -0), its sign needs no handling */
    e->nonneg = !e->out_float && a->clo >= a->sub;
    /* the clamp of the code range is a no-op where the codes of clo and chi lie in it (the
     * code is monotone in v, and v is clamped to [clo, chi] first); |codes| < 2^30 keeps the
     * float -> int conversion exact (and, below, no quotient overflows) */
    const int bounded = !e->out_float && a->scale > 0.0f && isfinite(a->clo) &&
                        isfinite(a->chi) && fabsf((a->clo - a->sub) / a->scale) < 0x1p30f &&
                        fabsf((a->chi - a->sub) / a->scale) < 0x1p30f;
    e->int_clamp = 1;
    if (bounded) {
        /* else fold the clamp of the code range into the clamp of v: a bound lo in [clo, chi]
         * whose code is klo gives code(clamp(v, lo, chi)) = max(code(clamp(v, clo, chi)),
         * klo) for every v (NaN included: both give klo), the code being monotone in v; the
         * same above with khi. E.g. a ReLU after the quantizer: lo = 0, and the quotient is
         * then >= 0 (no sign handling) */
        float lo = a->clo, hi = a->chi;
        int ok = 1;
        if (raw_code(lo, a) < a->klo) {
            float c = a->sub + (float)(a->klo - a->kofs) * a->scale;
            ok &= c >= lo && c <= hi && raw_code(c, a) == a->klo;
            lo = c;
        }
        if (ok && raw_code(hi, a) > a->khi) {
            float c = a->sub + (float)(a->khi - a->kofs) * a->scale;
            ok &= c >= lo && c <= hi && raw_code(c, a) == a->khi;
            hi = c;
        }
        if (ok) {
            e->int_clamp = 0;
            e->clo = _mm256_set1_ps(lo), e->chi = _mm256_set1_ps(hi);
            e->nonneg = lo >= a->sub;
        }
    }
    /* v is clamped to [clo, chi] before the division: with |(v - sub) / scale| < 2^30 no
     * quotient overflows; a v whose remainder would be subnormal (|v| < ~2^-100) has a
     * quotient under 2^-40 (scale >= 2^-60), code 0 both ways */
    e->use_rcp = e->use_div && a->rcp_ok && bounded;
    e->fold = 0;
    e->out_u8 = a->out_u8 && !e->out_float;
    e->nobias = a->nobias && !e->out_float;
    e->u8shift = _mm256_set1_epi32(a->u8shift);
    e->rcp = _mm256_set1_ps(1.0f / a->scale);
    e->cert = NULL, e->cstride = a->cert_stride, e->cclamp = e->cnocheck = 0;
    e->kind = (e->pre_relu ? EK_RELU : 0) | (e->use_div ? EK_DIV : 0) | (e->corr ? EK_CORR : 0) |
              (e->use_sub || e->use_kofs ? EK_OFS : 0) |
              (!e->nonneg || e->int_clamp ? EK_SC : 0);
}

/* fbi_conv.fold applied to an initialised epilogue: only for the VNNI epilogue (epi512_v_k),
 * the one that reads alpha2 / beta2; the AVX2 and generic epilogues never see it */
AVX2 static void ep_fold(const fbi_conv *a, fbi_ep *e) {
    if (a->fold && a->isa == ISA_AVX512_VNNI && !e->out_float && !e->use_div) {
        /* after the clamp folding above: its bounds, and sub, scaled by inv (exact: a power
         * of two in [2^-60, 2^60], bounds finite and far from float's range) */
        float lo = _mm256_cvtss_f32(e->clo) * a->inv, hi = _mm256_cvtss_f32(e->chi) * a->inv;
        float sub = a->sub * a->inv;
        if (fabsf(lo) < 0x1p100f && fabsf(hi) < 0x1p100f && fabsf(sub) < 0x1p100f) {
            e->fold = 1, e->alpha2 = a->alpha2, e->beta2 = a->beta2;
            e->clo = _mm256_set1_ps(lo), e->chi = _mm256_set1_ps(hi), e->sub = _mm256_set1_ps(sub);
        }
    }
    /* the certified epilogue: its constants were proven for the unfolded epilogue of an
     * integer output (the fold is one FMA already); a path that adds the zero-point
     * correction in the epilogue (corr) keeps the exact one (store512_for) */
    if (a->cert && a->isa == ISA_AVX512_VNNI && !e->fold && !e->out_float && a->in_kind == IN_INT) {
        const int32_t *tail = (const int32_t *)(a->cert + 5 * (int64_t)a->cert_stride);
        e->cert = a->cert;
        e->cklo = _mm256_set1_epi32(tail[0]), e->ckhi = _mm256_set1_epi32(tail[1]);
        e->cclamp = tail[2] != 0, e->cnocheck = tail[3] != 0;
    }
}

/* t >= 0 rounded half away from zero, as int32 (t finite, t < 2^31): trunc(t + h), h the
 * float just below 0.5. The sum rounds to nearest even; for every float t in [0, 2^31) this
 * equals rint(t) plus one on exact ties (checked over all 1.3e9 of them: below a tie t + h
 * stays under the next integer, at a tie it rounds up to it; tests check the boundary
 * cases). Two operations instead of five. */
AVX2 static inline __attribute__((always_inline)) __m256i rha_abs(__m256 at) {
    return _mm256_cvttps_epi32(_mm256_add_ps(at, _mm256_set1_ps(0x1.fffffep-2f)));
}

/* the epilogue of 8 channels n .. n+7 from 8 int32 / float sums, vectorised; `cnt` < 8 stores
 * only the first cnt. The same IEEE operations as rha_code / pre_value, in the same order. */
AVX2 static inline __attribute__((always_inline)) void store8_avx2(const fbi_ep *e, __m256 v, int n, int cnt, char *dst) {
    v = _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(e->sacc + n)),
                      _mm256_loadu_ps(e->bias + n));
    if (e->pre_relu) v = _mm256_max_ps(v, _mm256_setzero_ps());
    v = _mm256_fmadd_ps(v, _mm256_loadu_ps(e->alpha + n), _mm256_loadu_ps(e->beta + n));
    if (e->out_float) { /* a ReLU / clamp after batch norm, unquantized */
        v = _mm256_min_ps(_mm256_max_ps(v, e->clo), e->chi);
        if (cnt == 8) _mm256_storeu_ps((float *)dst + n, v);
        else {
            float t[8];
            _mm256_storeu_ps(t, v);
            memcpy((float *)dst + n, t, sizeof(float) * cnt);
        }
        return;
    }
    /* min/max order as rha_code: v < clo ? clo : v (NaN never reaches here: inputs checked) */
    v = _mm256_min_ps(_mm256_max_ps(v, e->clo), e->chi);
    if (e->use_sub) v = _mm256_sub_ps(v, e->sub);
    /* a power-of-two scale multiplies by its exact inverse; others divide, as PyTorch does
     * (a multiply with a check for near-ties measured slower than vdivps here) */
    __m256 t = !e->use_div ? _mm256_mul_ps(v, e->inv)
               : e->use_rcp ? rcp_div(v, e->scale, e->rcp) : _mm256_div_ps(v, e->scale);
    __m256 at = e->nonneg ? t : _mm256_and_ps(t, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
    __m256i k = rha_abs(at); /* at = t where nonneg (t = -0 gives 0 either way) */
    if (!e->nonneg) k = _mm256_sign_epi32(k, _mm256_castps_si256(t));
    if (e->use_kofs) k = _mm256_add_epi32(k, e->kofs);
    if (e->int_clamp) k = _mm256_min_epi32(_mm256_max_epi32(k, e->klo), e->khi);
    __m128i k16 = _mm_packs_epi32(_mm256_castsi256_si128(k), _mm256_extracti128_si256(k, 1));
    if (cnt == 8) _mm_storeu_si128((__m128i *)((int16_t *)dst + n), k16);
    else {
        int16_t tmp[8];
        _mm_storeu_si128((__m128i *)tmp, k16);
        memcpy((int16_t *)dst + n, tmp, sizeof(int16_t) * cnt);
    }
}

/* The epilogue of R rows x 16 channels, stage by stage over all 2R vectors (independent
 * chains for the out-of-order core; each flag tested once per stage, not per vector): v[2r],
 * v[2r + 1] are channels n .. n+7 and n+8 .. n+15 of row r, which goes to dst[r] (NULL: a row
 * outside the output); cnt < 16 stores only the first cnt channels. The same IEEE operations
 * as store8_avx2 / rha_code. The per-channel arrays are padded to whole blocks of 16. */
#define EPI(body) _Pragma("GCC unroll 16") for (int i = 0; i < 2 * R; i++) { body; }
/* K: the EK_ flags known at compile time (K < 0: the flags of e, tested at run time) */
#define EF(known, field) (K < 0 ? (e->field) : (K & (known)) != 0)
AVX2 static inline __attribute__((always_inline)) void epi_tile_k(const fbi_ep *e, __m256 *v,
                                                                  int R, int n, int cnt,
                                                                  char **dst, int K) {
    const __m256 s[2] = {_mm256_loadu_ps(e->sacc + n), _mm256_loadu_ps(e->sacc + n + 8)};
    const __m256 b[2] = {_mm256_loadu_ps(e->bias + n), _mm256_loadu_ps(e->bias + n + 8)};
    EPI(v[i] = _mm256_add_ps(_mm256_mul_ps(v[i], s[i & 1]), b[i & 1]))
    if (EF(EK_RELU, pre_relu)) EPI(v[i] = _mm256_max_ps(v[i], _mm256_setzero_ps()))
    const __m256 al[2] = {_mm256_loadu_ps(e->alpha + n), _mm256_loadu_ps(e->alpha + n + 8)};
    const __m256 be[2] = {_mm256_loadu_ps(e->beta + n), _mm256_loadu_ps(e->beta + n + 8)};
    EPI(v[i] = _mm256_fmadd_ps(v[i], al[i & 1], be[i & 1]))
    EPI(v[i] = _mm256_min_ps(_mm256_max_ps(v[i], e->clo), e->chi))
    if (K < 0 && e->out_float) {
        for (int r = 0; r < R; r++) {
            if (!dst[r]) continue;
            float *d = (float *)dst[r] + n;
            if (cnt == 16) {
                _mm256_storeu_ps(d, v[2 * r]);
                _mm256_storeu_ps(d + 8, v[2 * r + 1]);
            } else {
                float t[16];
                _mm256_storeu_ps(t, v[2 * r]);
                _mm256_storeu_ps(t + 8, v[2 * r + 1]);
                memcpy(d, t, sizeof(float) * (size_t)cnt);
            }
        }
        return;
    }
    if (EF(EK_OFS, use_sub)) EPI(v[i] = _mm256_sub_ps(v[i], e->sub))
    if (EF(EK_DIV, use_div)) {
        if (e->use_rcp) EPI(v[i] = rcp_div(v[i], e->scale, e->rcp))
        else EPI(v[i] = _mm256_div_ps(v[i], e->scale))
    } else EPI(v[i] = _mm256_mul_ps(v[i], e->inv))
    __m256i k[2 * R];
    if (K < 0 ? e->nonneg : !(K & EK_SC)) EPI(k[i] = rha_abs(v[i]))
    else EPI(k[i] = _mm256_sign_epi32(rha_abs(_mm256_and_ps(
                 v[i], _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)))),
                 _mm256_castps_si256(v[i])))
    if (EF(EK_OFS, use_kofs)) EPI(k[i] = _mm256_add_epi32(k[i], e->kofs))
    if (EF(EK_SC, int_clamp)) EPI(k[i] = _mm256_min_epi32(_mm256_max_epi32(k[i], e->klo), e->khi))
    for (int r = 0; r < R; r++) {
        if (!dst[r]) continue;
        /* packs works within 128-bit lanes: the permute puts channels back in order */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(k[2 * r], k[2 * r + 1]), 0xD8);
        int16_t *d = (int16_t *)dst[r] + n;
        if (cnt == 16) {
            _mm256_storeu_si256((__m256i *)d, p);
        } else {
            int16_t t[16];
            _mm256_storeu_si256((__m256i *)t, p);
            memcpy(d, t, sizeof(int16_t) * (size_t)cnt);
        }
    }
}

AVX2 static inline __attribute__((always_inline)) void epi_tile(const fbi_ep *e, __m256 *v,
                                                                int R, int n, int cnt,
                                                                char **dst) {
    epi_tile_k(e, v, R, n, cnt, dst, -1);
}

/* int32 sums (plus the u8 path's zero-point correction) into epi_tile */
AVX2 static inline __attribute__((always_inline)) void epi_tile_i32_k(
    const fbi_ep *e, const __m256i *c0, const __m256i *c1, int R, int n, int cnt, char **dst,
    int K) {
    __m256 v[2 * R];
    if (K < 0 ? e->corr != NULL : (K & EK_CORR) != 0) {
        __m256i k0 = _mm256_loadu_si256((const __m256i *)(e->corr + n));
        __m256i k1 = _mm256_loadu_si256((const __m256i *)(e->corr + n + 8));
        for (int r = 0; r < R; r++) {
            v[2 * r] = _mm256_cvtepi32_ps(_mm256_add_epi32(c0[r], k0));
            v[2 * r + 1] = _mm256_cvtepi32_ps(_mm256_add_epi32(c1[r], k1));
        }
    } else { /* no zero-point correction: no add of zeros */
        for (int r = 0; r < R; r++) {
            v[2 * r] = _mm256_cvtepi32_ps(c0[r]);
            v[2 * r + 1] = _mm256_cvtepi32_ps(c1[r]);
        }
    }
    epi_tile_k(e, v, R, n, cnt, dst, K);
}
#undef EF

AVX2 static inline __attribute__((always_inline)) void epi_tile_i32(
    const fbi_ep *e, const __m256i *c0, const __m256i *c1, int R, int n, int cnt, char **dst) {
    epi_tile_i32_k(e, c0, c1, R, n, cnt, dst, -1);
}

#ifndef UR1
#define UR1 5
#endif
typedef void (*store_fn)(const fbi_ep *, const __m256i *, const __m256i *, int, int, char **);
/* the epilogue of UR1 rows, one copy per kind of epilogue (K: its EK_ flags) */
#define STORE_P1(K)                                                                         \
    AVX2 static __attribute__((noinline)) void store_rows_p1_##K(                           \
        const fbi_ep *a, const __m256i *c0, const __m256i *c1, int n, int cnt, char **dst) { \
        epi_tile_i32_k(a, c0, c1, UR1, n, cnt, dst, K);                                     \
    }
EK_KINDS(STORE_P1)
#undef STORE_P1
AVX2 static __attribute__((noinline)) void store_rows_p1_g(
    const fbi_ep *a, const __m256i *c0, const __m256i *c1, int n, int cnt, char **dst) {
    epi_tile_i32(a, c0, c1, UR1, n, cnt, dst); /* the flags tested at run time */
}
#define ENTRY(K) store_rows_p1_##K,
static const store_fn store_p1[EK_N] = {EK_KINDS(ENTRY)};
#undef ENTRY

/* epilogue of one row of two 8-channel accumulators */
AVX2 static __attribute__((noinline)) void store_rows(
    const fbi_ep *a, const __m256i *c0, const __m256i *c1, int n, int cnt, char *Y) {
    char *dst[1] = {Y};
    epi_tile_i32(a, c0, c1, 1, n, cnt, dst);
}

/* UR1 rows x 16 channels, the 10 accumulators in registers; the epilogue st (per kind) */
AVX2 static void kern5_i16(const fbi_ep *a, store_fn st, const int16_t *A, int64_t lda,
                           const int16_t *bb, int kp2, int n, int cnt, char *Y, int64_t ldy,
                           int esize) {
    __m256i a0 = _mm256_setzero_si256(), b0_ = a0, a1 = a0, b1_ = a0, a2 = a0, b2_ = a0,
            a3 = a0, b3_ = a0, a4 = a0, b4_ = a0;
    const int32_t *r0 = (const int32_t *)A, *r1 = (const int32_t *)(A + lda),
                  *r2 = (const int32_t *)(A + 2 * lda), *r3 = (const int32_t *)(A + 3 * lda),
                  *r4 = (const int32_t *)(A + 4 * lda);
    for (int p = 0; p < kp2; p++) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(bb + p * NB * 2));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(bb + p * NB * 2 + 16));
        __m256i v;
#define ROW(r, x, y)                                                   \
        v = _mm256_set1_epi32(r[p]);                                   \
        x = _mm256_add_epi32(x, _mm256_madd_epi16(v, w0));             \
        y = _mm256_add_epi32(y, _mm256_madd_epi16(v, w1));
        ROW(r0, a0, b0_) ROW(r1, a1, b1_) ROW(r2, a2, b2_)
        ROW(r3, a3, b3_) ROW(r4, a4, b4_)
#undef ROW
    }
    __m256i c0[UR1] = {a0, a1, a2, a3, a4}, c1[UR1] = {b0_, b1_, b2_, b3_, b4_};
    char *dst[UR1];
    for (int r = 0; r < UR1; r++) dst[r] = Y + (int64_t)r * ldy * esize;
    st(a, c0, c1, n, cnt, dst);
}

AVX2 static void kern1_i16(const fbi_ep *a, const int16_t *A, const int16_t *bb, int kp2,
                           int n, int cnt, char *Y) {
    __m256i x = _mm256_setzero_si256(), y = x;
    const int32_t *r0 = (const int32_t *)A;
    for (int p = 0; p < kp2; p++) {
        __m256i v = _mm256_set1_epi32(r0[p]);
        x = _mm256_add_epi32(x, _mm256_madd_epi16(v, _mm256_loadu_si256(
                                    (const __m256i *)(bb + p * NB * 2))));
        y = _mm256_add_epi32(y, _mm256_madd_epi16(v, _mm256_loadu_si256(
                                    (const __m256i *)(bb + p * NB * 2 + 16))));
    }
    store_rows(a, &x, &y, n, cnt, Y);
}

AVX2 static void gemm_i16_avx2(const fbi_conv *ac, const int16_t *A, int64_t lda, int64_t m,
                               const int16_t *B, int nblocks, int n_off, int cout_g, char *Y,
                               int64_t ldy, int esize) {
    int kp2 = ac->kp / 2;
    fbi_ep e;
    ep_init(ac, &e);
    const fbi_ep *a = &e;
    store_fn st = e.out_float ? store_rows_p1_g : store_p1[e.kind];
    for (int64_t r = 0; r < m; r += UR1) {
        int rows = m - r < UR1 ? (int)(m - r) : UR1;
        for (int b = 0; b < nblocks; b++) {
            int n0 = b * NB, cnt = cout_g - n0 < NB ? cout_g - n0 : NB;
            const int16_t *bb = B + (int64_t)b * kp2 * NB * 2;
            if (rows == UR1)
                kern5_i16(a, st, A + r * lda, lda, bb, kp2, n_off + n0, cnt,
                          Y + r * ldy * esize, ldy, esize);
            else
                for (int q = 0; q < rows; q++)
                    kern1_i16(a, A + (r + q) * lda, bb, kp2, n_off + n0, cnt,
                              Y + (r + q) * ldy * esize);
        }
    }
}

/* A cheap test of n sum vectors: 0 where all are finite and their sum does not overflow (a
 * NaN/inf anywhere makes the sum times 0 NaN); else the caller looks exactly. */
AVX2 static inline int maybe_nonfinite(const __m256 *v, int n) {
    __m256 t = v[0];
    for (int i = 1; i < n; i++) t = _mm256_add_ps(t, v[i]);
    t = _mm256_mul_ps(t, _mm256_setzero_ps());
    return _mm256_movemask_ps(_mm256_cmp_ps(t, t, _CMP_UNORD_Q));
}

AVX2 static int gemm_f32_avx2(const fbi_conv *ac, const float *A, int64_t lda, int64_t m,
                              const float *B, int nblocks, int n_off, int cout_g, char *Y,
                              int64_t ldy, int esize) {
    /* 4 rows x 2 blocks of 8 channels: each broadcast of A feeds two FMAs */
    int kf = ac->kf, bad = 0;
    fbi_ep e;
    ep_init(ac, &e);
    const fbi_ep *a = &e;
    for (int64_t r = 0; r < m; r += 4) {
        int rows = m - r < 4 ? (int)(m - r) : 4;
        for (int b = 0; b < nblocks; b += 2) {
            int two = b + 1 < nblocks;
            __m256 c[4][2];
            for (int q = 0; q < 4; q++) c[q][0] = c[q][1] = _mm256_setzero_ps();
            const float *b0 = B + (int64_t)b * kf * NBF, *b1 = two ? b0 + (int64_t)kf * NBF : b0;
            for (int k = 0; k < kf; k++) {
                __m256 v0 = _mm256_loadu_ps(b0 + k * NBF), v1 = _mm256_loadu_ps(b1 + k * NBF);
                for (int q = 0; q < 4; q++) {
                    __m256 x = _mm256_set1_ps(A[(r + (q < rows ? q : 0)) * lda + k]);
                    c[q][0] = _mm256_fmadd_ps(x, v0, c[q][0]);
                    c[q][1] = _mm256_fmadd_ps(x, v1, c[q][1]);
                }
            }
            if (ac->qcheck && !bad && maybe_nonfinite(&c[0][0], 8))
                for (int h = 0; h < 1 + two; h++) {
                    int n0 = (b + h) * NBF, cnt = cout_g - n0 < NBF ? cout_g - n0 : NBF;
                    for (int q = 0; q < rows; q++) {
                        float t[8];
                        _mm256_storeu_ps(t, c[q][h]);
                        bad |= sums_nonfinite(ac, t, n_off + n0, cnt);
                    }
                }
            for (int h = 0; h < 1 + two; h++) {
                int n0 = (b + h) * NBF, cnt = cout_g - n0 < NBF ? cout_g - n0 : NBF;
                for (int q = 0; q < rows; q++)
                    store8_avx2(a, c[q][h], n_off + n0, cnt, Y + (r + q) * ldy * esize);
            }
        }
    }
    return bad;
}
#endif

/* ----------------------------------------------------------------- the layer */

#if FBI_X86
/* codes minus ushift as bytes, rows [OH*OW][kq4] (padding: the byte of code 0; tail: 0) */
AVX2 static void im2col_u8(const fbi_conv *a, const int16_t *x, int g, uint8_t *col) {
    int cg = a->cin / a->groups, kq = a->kq4;
    uint8_t zero = (uint8_t)(-a->ushift);
    for (int oy = 0; oy < a->oh; oy++)
        for (int ox = 0; ox < a->ow; ox++) {
            uint8_t *row = col + ((int64_t)oy * a->ow + ox) * kq;
            int t = 0;
            for (int ky = 0; ky < a->kh; ky++) {
                int iy = oy * a->sh - a->ph + ky * a->dh;
                for (int kx = 0; kx < a->kw; kx++, t += cg) {
                    int ix = ox * a->sw - a->pw + kx * a->dw;
                    if (iy < 0 || iy >= a->h || ix < 0 || ix >= a->w) {
                        memset(row + t, zero, (size_t)cg);
                    } else {
                        const int16_t *p = x + ((int64_t)iy * a->w + ix) * a->cin + g * cg;
                        for (int c = 0; c < cg; c++) row[t + c] = (uint8_t)(p[c] - a->ushift);
                    }
                }
            }
            for (; t < kq; t++) row[t] = 0;
        }
}

/* n int16 codes minus `shift` to bytes (the codes are known to lie in [shift, shift + 255]) */
AVX2 static void to_u8(const int16_t *x, int64_t n, int32_t shift, uint8_t *y) {
    const __m256i s = _mm256_set1_epi16((int16_t)shift);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i lo = _mm256_sub_epi16(_mm256_loadu_si256((const __m256i *)(x + i)), s);
        __m256i hi = _mm256_sub_epi16(_mm256_loadu_si256((const __m256i *)(x + i + 16)), s);
        /* values in [0, 255] as int16 (the sub wraps only above 255, never here) */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi16(lo, hi), 0xD8);
        _mm256_storeu_si256((__m256i *)(y + i), p);
    }
    for (; i < n; i++) y[i] = (uint8_t)(x[i] - shift);
}

/* The u8 kernel's body; `one` (a literal at each call, so each kernel is compiled without
 * the other's code): every quad in one int16 chunk (no int32 sums in the loop, one widening
 * at the end), else the int16 sums widened into int32 every `chunk` quads (aligned, as
 * pack_u8 checked them). */
AVX2 static inline __attribute__((always_inline)) void kern_u8_body(
    const fbi_ep *a, store_fn st, const uint8_t *const *src, const int64_t *toff, int ntaps,
    int qpt, int chunk, const int8_t *bb, int n, int cnt, char **dst, const int one) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c0[UR1], c1[UR1], s0[UR1], s1[UR1];
    int64_t d[UR1];
#pragma GCC unroll 8
    for (int r = 0; r < UR1; r++) {
        d[r] = src[r] - src[0];
        s0[r] = s1[r] = _mm256_setzero_si256();
        if (!one) c0[r] = c1[r] = _mm256_setzero_si256();
    }
    const uint8_t *A = src[0];
    int left = chunk;
    for (int t = 0; t < ntaps; t++) {
        const uint8_t *p = A + toff[t];
        for (int q = 0; q < qpt; q++, bb += NB * 4, p += 4) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)bb);
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(bb + 32));
#pragma GCC unroll 8
            for (int r = 0; r < UR1; r++) {
                int32_t quad;
                memcpy(&quad, p + d[r], 4);
                __m256i v = _mm256_set1_epi32(quad);
                s0[r] = _mm256_add_epi16(s0[r], _mm256_maddubs_epi16(v, w0));
                s1[r] = _mm256_add_epi16(s1[r], _mm256_maddubs_epi16(v, w1));
            }
            if (!one && --left == 0) {
#pragma GCC unroll 8
                for (int r = 0; r < UR1; r++) {
                    c0[r] = _mm256_add_epi32(c0[r], _mm256_madd_epi16(s0[r], ones));
                    c1[r] = _mm256_add_epi32(c1[r], _mm256_madd_epi16(s1[r], ones));
                    s0[r] = s1[r] = _mm256_setzero_si256();
                }
                left = chunk;
            }
        }
    }
    if (one) {
#pragma GCC unroll 8
        for (int r = 0; r < UR1; r++) {
            c0[r] = _mm256_madd_epi16(s0[r], ones);
            c1[r] = _mm256_madd_epi16(s1[r], ones);
        }
    } else if (left != chunk) {
#pragma GCC unroll 8
        for (int r = 0; r < UR1; r++) {
            c0[r] = _mm256_add_epi32(c0[r], _mm256_madd_epi16(s0[r], ones));
            c1[r] = _mm256_add_epi32(c1[r], _mm256_madd_epi16(s1[r], ones));
        }
    }
    st(a, c0, c1, n, cnt, dst);
}

AVX2 static void kern_u8_1c(const fbi_ep *a, store_fn st, const uint8_t *const *src,
                            const int64_t *toff, int ntaps, int qpt, const int8_t *bb,
                            int n, int cnt, char **dst) {
    kern_u8_body(a, st, src, toff, ntaps, qpt, 0, bb, n, cnt, dst, 1);
}

AVX2 static void kern_u8_c(const fbi_ep *a, store_fn st, const uint8_t *const *src,
                           const int64_t *toff, int ntaps, int qpt, int chunk,
                           const int8_t *bb, int n, int cnt, char **dst) {
    kern_u8_body(a, st, src, toff, ntaps, qpt, chunk, bb, n, cnt, dst, 0);
}

/* ----------------------------------------------------------------- AVX-512 VNNI */
/* The u8 and int16 layers on AVX-512 VNNI: UR1 rows x one or two blocks of 16 channels, one
 * vpdpbusd (4 u8 x s8 products) or vpdpwssd (2 int16 products) per row, block and quad / pair,
 * summed straight into int32 lanes (no int16 lane sums, so no chunks: exact wherever the int32
 * sums are, which compile time checked); a block's 16 sums are one zmm, and its epilogue runs
 * 16 lanes wide: the same IEEE operations in the same order as epi_tile_k (so the same codes
 * on every path), the sign by a mask, int32 -> int16 by vpmovsdw (saturating, as packs). */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))

VNNI static inline __attribute__((always_inline)) __m512 bcast512(__m256 v) {
    return _mm512_broadcastss_ps(_mm256_castps256_ps128(v));
}

VNNI static inline __attribute__((always_inline)) __m512i bcast512i(__m256i v) {
    return _mm512_broadcastd_epi32(_mm256_castsi256_si128(v));
}

/* the epilogue of R rows x 16 channels n.. from int32 sums c[r] (row r to dst[r]; NULL: no
 * row); cnt < 16 stores the first cnt channels (masked). K: the EK_ flags (K < 0: run time) */
#define EF(known, field) (K < 0 ? (e->field) : (K & (known)) != 0)
#define EPR(body) _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) { body; }
VNNI static inline __attribute__((always_inline)) void epi512_v_k(const fbi_ep *e, __m512 *v,
                                                                 int R, int n, int cnt,
                                                                 char **dst, int K) {
    if (e->fold) { /* exact: see fbi_conv.fold */
        if (EF(EK_RELU, pre_relu)) EPR(v[r] = _mm512_max_ps(v[r], _mm512_setzero_ps()))
        const __m512 al = _mm512_loadu_ps(e->alpha2 + n), be = _mm512_loadu_ps(e->beta2 + n);
        EPR(v[r] = _mm512_fmadd_ps(v[r], al, be))
    } else {
        const __m512 s = _mm512_loadu_ps(e->sacc + n), b = _mm512_loadu_ps(e->bias + n);
        if (e->nobias) EPR(v[r] = _mm512_mul_ps(v[r], s))
        else EPR(v[r] = _mm512_add_ps(_mm512_mul_ps(v[r], s), b))
        if (EF(EK_RELU, pre_relu)) EPR(v[r] = _mm512_max_ps(v[r], _mm512_setzero_ps()))
        const __m512 al = _mm512_loadu_ps(e->alpha + n), be = _mm512_loadu_ps(e->beta + n);
        EPR(v[r] = _mm512_fmadd_ps(v[r], al, be))
    }
    const __m512 clo = bcast512(e->clo), chi = bcast512(e->chi);
    EPR(v[r] = _mm512_min_ps(_mm512_max_ps(v[r], clo), chi))
    const __mmask16 m = cnt >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt) - 1);
    if (K < 0 && e->out_float) {
        for (int r = 0; r < R; r++) {
            if (!dst[r]) continue;
            if (cnt >= 16) _mm512_storeu_ps((float *)dst[r] + n, v[r]);
            else _mm512_mask_storeu_ps((float *)dst[r] + n, m, v[r]);
        }
        return;
    }
    if (EF(EK_OFS, use_sub)) {
        const __m512 sub = bcast512(e->sub);
        EPR(v[r] = _mm512_sub_ps(v[r], sub))
    }
    if (EF(EK_DIV, use_div)) {
        const __m512 sc = bcast512(e->scale);
        if (e->use_rcp) {
            const __m512 rc = bcast512(e->rcp);
            EPR(__m512 q0 = _mm512_mul_ps(v[r], rc);
                v[r] = _mm512_fmadd_ps(_mm512_fnmadd_ps(q0, sc, v[r]), rc, q0))
        } else {
            EPR(v[r] = _mm512_div_ps(v[r], sc))
        }
    } else if (!e->fold) {
        const __m512 inv = bcast512(e->inv);
        EPR(v[r] = _mm512_mul_ps(v[r], inv))
    }
    const __m512 h = _mm512_set1_ps(0x1.fffffep-2f); /* rha_abs */
    __m512i k[UR1 + 1]; /* R <= UR1 + 1 */
    if (K < 0 ? e->nonneg : !(K & EK_SC)) {
        EPR(k[r] = _mm512_cvttps_epi32(_mm512_add_ps(v[r], h)))
    } else {
        /* trunc(t + copysign(h, t)): below zero t - h = -(|t| + h) exactly (rounding is
         * symmetric) and truncation too, so this is -rha_abs(|t|); -0 gives 0, NaN and
         * |t| >= 2^31 the indefinite integer, as and/abs + sign did. The copysign is one
         * ternary-logic op: (t & sign) | h = imm 0xEA */
        const __m512i sg = _mm512_set1_epi32((int)0x80000000u), hb = _mm512_castps_si512(h);
        EPR(k[r] = _mm512_cvttps_epi32(_mm512_add_ps(v[r], _mm512_castsi512_ps(
                _mm512_ternarylogic_epi32(_mm512_castps_si512(v[r]), sg, hb, 0xEA)))))
    }
    if (EF(EK_OFS, use_kofs)) {
        const __m512i ko = bcast512i(e->kofs);
        EPR(k[r] = _mm512_add_epi32(k[r], ko))
    }
    if (EF(EK_SC, int_clamp)) {
        const __m512i lo = bcast512i(e->klo), hi = bcast512i(e->khi);
        EPR(k[r] = _mm512_min_epi32(_mm512_max_epi32(k[r], lo), hi))
    }
    if (e->out_u8) { /* the codes lie in [u8shift, u8shift + 255] (compile time checked) */
        const __m512i sh = bcast512i(e->u8shift);
        for (int r = 0; r < R; r++) {
            if (!dst[r]) continue;
            __m128i p = _mm512_cvtepi32_epi8(_mm512_sub_epi32(k[r], sh));
            if (cnt >= 16) _mm_storeu_si128((__m128i *)((uint8_t *)dst[r] + n), p);
            else _mm_mask_storeu_epi8((uint8_t *)dst[r] + n, m, p);
        }
        return;
    }
    for (int r = 0; r < R; r++) {
        if (!dst[r]) continue;
        __m256i p = _mm512_cvtsepi32_epi16(k[r]);
        if (cnt >= 16) _mm256_storeu_si256((__m256i *)((int16_t *)dst[r] + n), p);
        else _mm256_mask_storeu_epi16((int16_t *)dst[r] + n, m, p);
    }
}

/* from int32 sums (plus the u8 path's zero-point correction) */
VNNI static inline __attribute__((always_inline)) void epi512_k(const fbi_ep *e, const __m512i *c,
                                                               int R, int n, int cnt,
                                                               char **dst, int K) {
    __m512 v[UR1 + 1];
    if (K < 0 ? e->corr != NULL : (K & EK_CORR) != 0) {
        const __m512i k0 = _mm512_loadu_si512((const void *)(e->corr + n));
        EPR(v[r] = _mm512_cvtepi32_ps(_mm512_add_epi32(c[r], k0)))
    } else {
        EPR(v[r] = _mm512_cvtepi32_ps(c[r]))
    }
    epi512_v_k(e, v, R, n, cnt, dst, K);
}
#undef EPR
#undef EF

/* the float-input layers' epilogue on VNNI (conv_f32_direct_avx2: 4 rows, the float NHWC
 * 6 x 16 kernel: 6 rows): R <= UR1 + 1 rows of float sums, two ymm of 8 channels each, per
 * kind */
typedef void (*store512f_fn)(const fbi_ep *, const __m256 *, int, int, int, char **);
#define STORE512F(K)                                                                    \
    VNNI static __attribute__((noinline)) void store512f_##K(                           \
        const fbi_ep *a, const __m256 *c, int R, int n, int cnt, char **dst) {          \
        __m512 v[UR1 + 1];                                                              \
        for (int r = 0; r < R; r++)                                                     \
            v[r] = _mm512_insertf32x8(_mm512_castps256_ps512(c[2 * r]), c[2 * r + 1], 1); \
        if (R == 4) epi512_v_k(a, v, 4, n, cnt, dst, K);                                \
        else epi512_v_k(a, v, UR1 + 1, n, cnt, dst, K);                                 \
    }
EK_KINDS(STORE512F)
#undef STORE512F
#define ENTRY(K) store512f_##K,
static const store512f_fn store512f[EK_N] = {EK_KINDS(ENTRY)};
#undef ENTRY

typedef void (*store512_fn)(const fbi_ep *, const __m512i *, int, int, char **);
#define STORE512(K)                                                                     \
    VNNI static __attribute__((noinline)) void store512_##K(                            \
        const fbi_ep *a, const __m512i *c, int n, int cnt, char **dst) {                \
        epi512_k(a, c, UR1, n, cnt, dst, K);                                            \
    }
EK_KINDS(STORE512)
#undef STORE512
VNNI static __attribute__((noinline)) void store512_g(const fbi_ep *a, const __m512i *c, int n,
                                                      int cnt, char **dst) {
    epi512_k(a, c, UR1, n, cnt, dst, -1); /* the flags tested at run time */
}
#define ENTRY(K) store512_##K,
static const store512_fn store512[EK_N] = {EK_KINDS(ENTRY)};
#undef ENTRY

/* The certified epilogue (fbi_conv.cert; its proof: fewbits/runtime/integer_cert.py). The
 * code is a monotone function of the channel's integer sum; per channel the sum is clamped to
 * [lo, hi] (a ReLU before the batch norm is the lower bound; beyond the bounds the code is
 * the code range's end, and clamping the sums stands in for the clamps of the value and of
 * the code), then t = fma(float(sum), A, B) (exact conversion: |sum| < 2^24 there) is within
 * a proven bound of the exact epilogue's value before rounding plus 0.5 minus that bound's
 * margin, so where frac(t) = t - floor(t) < thr the code is floor(t), whatever the exact
 * epilogue's rounding of ties (it has none there). The fraction is one vreduceps (its
 * rounding is monotone and thr a float: frac < thr proves the exact fraction < thr). A tile
 * with any other lane runs the exact epilogue, store512[kind], on the same sums. ~9
 * operations a vector instead of ~15; 7 with no check (CHECK 0: where integer_cert ran
 * every sum near a rounding boundary through both epilogues, cnocheck). Returns 1 where
 * CHECK found such a lane (nothing stored) */
#define CERT_FLOOR (_MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
/* the certified value of 16 sums: fma(float(clamp(sum, lo, hi)), A, B), whose floor is the code
 * (before the code clamp, cert_clamp) */
VNNI static inline __attribute__((always_inline)) __m512 cert_t(__m512i c, __m512i lo, __m512i hi,
                                                               __m512 A, __m512 B) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_min_epi32(_mm512_max_epi32(c, lo), hi)), A, B);
}
/* the certified epilogue's constants of channels n .. n + 15 (fbi_conv.cert's arrays) */
typedef struct {
    __m512i lo, hi;
    __m512 A, B, th;
} cert_c;
VNNI static inline __attribute__((always_inline)) cert_c cert_load(const fbi_ep *e, int n) {
    const float *p = e->cert + n;
    const int64_t S = e->cstride;
    return (cert_c){_mm512_loadu_si512((const void *)p), _mm512_loadu_si512((const void *)(p + S)),
                    _mm512_loadu_ps(p + 2 * S), _mm512_loadu_ps(p + 3 * S),
                    _mm512_loadu_ps(p + 4 * S)};
}
/* a code step wider than a sum step: the ends' sums leave the code range (cclamp) */
VNNI static inline __attribute__((always_inline)) __m512i cert_clamp(const fbi_ep *e, __m512i k) {
    return _mm512_min_epi32(_mm512_max_epi32(k, bcast512i(e->cklo)), bcast512i(e->ckhi));
}
/* 16 codes (cnt < 16: the first cnt, mask m) to dst + n: bytes (U8: B holds - u8shift, the
 * bytes code - u8shift in [0, 255]) or int16 */
VNNI static inline __attribute__((always_inline)) void cert_store(__m512i k, char *dst, int n,
                                                                 int cnt, __mmask16 m, int U8) {
    if (U8) {
        const __m128i b = _mm512_cvtepi32_epi8(k);
        if (cnt >= 16) _mm_storeu_si128((__m128i *)((uint8_t *)dst + n), b);
        else _mm_mask_storeu_epi8((uint8_t *)dst + n, m, b);
    } else {
        const __m256i h = _mm512_cvtsepi32_epi16(k);
        if (cnt >= 16) _mm256_storeu_si256((__m256i *)((int16_t *)dst + n), h);
        else _mm256_mask_storeu_epi16((int16_t *)dst + n, m, h);
    }
}
#define EPR(body) _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) { body; }
VNNI static inline __attribute__((always_inline)) int epi512_cert(const fbi_ep *e,
                                                                 const __m512i *c, int R,
                                                                 int n, int cnt, char **dst,
                                                                 int U8, int CL, int CHECK) {
    const cert_c C = cert_load(e, n);
    __m512i k[UR1 + 1];
    __mmask16 ok[UR1 + 1];
    EPR(const __m512 t = cert_t(c[r], C.lo, C.hi, C.A, C.B);
        ok[r] = _mm512_cmp_ps_mask(_mm512_reduce_ps(t, CERT_FLOOR), C.th, _CMP_LT_OQ);
        k[r] = _mm512_cvt_roundps_epi32(t, CERT_FLOOR))
    if (CHECK) {
        __mmask16 all = ok[0];
        for (int r = 1; r < R; r++) all &= ok[r];
        if (all != (__mmask16)0xFFFF) return 1;
    }
    if (CL) EPR(k[r] = cert_clamp(e, k[r]))
    const __mmask16 m = cnt >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt) - 1);
    for (int r = 0; r < R; r++)
        if (dst[r]) cert_store(k[r], dst[r], n, cnt, m, U8);
    return 0;
}
#undef EPR

/* tiles that ran the exact epilogue, and (FBI_CERT_STATS builds only) all certified tiles */
static __thread int64_t cert_falls, cert_tiles; /* per thread: engines may run in several */
#ifdef FBI_CERT_STATS
#define CERT_TILE() (cert_tiles++)
#else
#define CERT_TILE() ((void)0)
#endif
void fbi_cert_stats(int64_t *out, int32_t reset) {
    out[0] = cert_falls, out[1] = cert_tiles;
    if (reset) cert_falls = cert_tiles = 0;
}

/* one copy per output (U8: bytes), code clamp (CL) and check (CH: 0 where every sum's code
 * was verified, cnocheck) */
#define STORE512C(CH, U8, CL)                                                           \
    VNNI static __attribute__((noinline)) void store512c_##CH##U8##CL(                  \
        const fbi_ep *a, const __m512i *c, int n, int cnt, char **dst) {                \
        CERT_TILE();                                                                    \
        if (__builtin_expect(epi512_cert(a, c, UR1, n, cnt, dst, U8, CL, CH), 0)) {     \
            cert_falls++;                                                               \
            store512[a->kind](a, c, n, cnt, dst);                                       \
        }                                                                               \
    }
STORE512C(0, 0, 0) STORE512C(0, 0, 1) STORE512C(0, 1, 0) STORE512C(0, 1, 1)
STORE512C(1, 0, 0) STORE512C(1, 0, 1) STORE512C(1, 1, 0) STORE512C(1, 1, 1)
#undef STORE512C
static const store512_fn store512c[8] = {store512c_000, store512c_001, store512c_010,
                                         store512c_011, store512c_100, store512c_101,
                                         store512c_110, store512c_111};

static store512_fn store512_for(const fbi_ep *e) {
    if (e->out_float) return store512_g;
    if (e->cert && !e->corr)
        return store512c[4 * !e->cnocheck + 2 * !!e->out_u8 + !!e->cclamp];
    return store512[e->kind];
}

/* Short sums (up to 16 quads a pixel: 1x1 layers of up to 64 input channels, a first layer's
 * 3 x 3 on 4): the weights of one block of 16 output channels stay in registers (KQ quads,
 * one vector each) while WS_R pixels at a time run through them, and the certified epilogue
 * is inlined (CHECK 0 only: store512c's operations, the same codes). kern_vnni_body's tiles
 * of up to 4 blocks x 5 rows reload the weights per tile and call the epilogue per block;
 * with 8-16 quads a tile its fixed costs outweigh its sums (1.8-2.7 cycles a vpdpbusd
 * against 1.2 here, ResNet-23's 1x1 layers). 1x1: P pixels of cin = 4 KQ bytes each at x
 * (contiguous: no padding, stride 1); outputs n .. n + cnt - 1 of pixel j at Y + j ldy. With
 * taps (ws_taps) the padded byte image at x, each output row's pixels in tiles of their own.
 * Tests only: fbi_ws_off 1 turns it off, fbi_ws_fault 1 adds 1 to its codes before their
 * clamp (a planted error the tests must see). */
int fbi_ws_off = 0, fbi_ws_fault = 0;
#define WS_R 6
#define WS_KQ_MAX 16
/* a layer with taps (kh x kw > 1, padded): quad q of the pixel whose window starts at p lies
 * at p + off[q]; output pixels of a row rs bytes apart, rows `row` bytes apart */
typedef struct {
    int64_t off[WS_KQ_MAX], rs, row;
    int oh, ow;
} ws_taps;
VNNI static inline __attribute__((always_inline)) void ws_rows(
    const fbi_ep *e, const __m512i *w, const uint8_t *x, int64_t rs, const int64_t *off,
    int rows, const __m512i c0, __m512i lo, __m512i hi, __m512 A, __m512 B, int n,
    __mmask16 m, char *Y, int64_t ldy, const int KQ, const int R) {
    __m512i c[WS_R];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) c[r] = c0;
#pragma GCC unroll 16
    for (int q = 0; q < KQ; q++)
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            if (r >= rows) break;
            int32_t quad;
            memcpy(&quad, off ? x + r * rs + off[q] : x + (int64_t)r * 4 * KQ + 4 * q, 4);
            c[r] = _mm512_dpbusd_epi32(c[r], _mm512_set1_epi32(quad), w[q]);
        }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        if (r >= rows) break;
        __m512i k = _mm512_cvt_roundps_epi32(cert_t(c[r], lo, hi, A, B), CERT_FLOOR);
        if (e->cclamp) k = cert_clamp(e, k);
        /* cnt 0: every store masked by m (whole blocks too: measured ~1 % faster here) */
        cert_store(k, Y + (int64_t)r * ldy, n, 0, m, e->out_u8);
    }
}

VNNI static inline __attribute__((always_inline)) void ws_body(
    const fbi_ep *e, const uint8_t *x, int64_t P, const ws_taps *tp, const int8_t *wb,
    const int32_t *corr, int n, int cnt, char *Y, int64_t ldy, const int KQ, const int TAPS) {
    __m512i w[WS_KQ_MAX];
#pragma GCC unroll 16
    for (int q = 0; q < KQ; q++) w[q] = _mm512_loadu_si512((const void *)(wb + q * NB * 4));
    const cert_c C = cert_load(e, n);
    const __m512 B = fbi_ws_fault ? _mm512_add_ps(C.B, _mm512_set1_ps(1.0f)) : C.B;
    const __m512i c0 = corr ? _mm512_loadu_si512((const void *)(corr + n)) : _mm512_setzero_si512();
    const __mmask16 m = cnt >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt) - 1);
    /* 1x1: all P pixels as one line, rs bytes apart (known: 4 KQ); taps: line by output row */
    const int64_t rs = TAPS ? tp->rs : 4 * KQ;
    const int64_t *off = TAPS ? tp->off : NULL;
    const int lines = TAPS ? tp->oh : 1;
    const int64_t len = TAPS ? tp->ow : P;
    for (int l = 0; l < lines; l++) {
        const uint8_t *xl = x + (TAPS ? (int64_t)l * tp->row : 0);
        char *Yl = Y + (int64_t)l * len * ldy;
        for (int64_t j = 0; j < len; j += WS_R) { /* whole tiles: rows known, no tests */
            const int rows = len - j < WS_R ? (int)(len - j) : WS_R;
            if (rows == WS_R)
                ws_rows(e, w, xl + j * rs, rs, off, WS_R, c0, C.lo, C.hi, C.A, B, n, m,
                        Yl + j * ldy, ldy, KQ, WS_R);
            else
                ws_rows(e, w, xl + j * rs, rs, off, rows, c0, C.lo, C.hi, C.A, B, n, m,
                        Yl + j * ldy, ldy, KQ, WS_R);
        }
    }
}

typedef void (*ws_fn)(const fbi_ep *, const uint8_t *, int64_t, const ws_taps *,
                      const int8_t *, const int32_t *, int, int, char *, int64_t);
#define WS_KERN(KQ)                                                                      \
    VNNI static void ws_kern_##KQ(const fbi_ep *e, const uint8_t *x, int64_t P,         \
                                  const ws_taps *tp, const int8_t *wb,                   \
                                  const int32_t *corr, int n, int cnt, char *Y,          \
                                  int64_t ldy) {                                         \
        if (tp) ws_body(e, x, P, tp, wb, corr, n, cnt, Y, ldy, KQ, 1);                    \
        else ws_body(e, x, P, NULL, wb, corr, n, cnt, Y, ldy, KQ, 0);                     \
    }
WS_KERN(1) WS_KERN(2) WS_KERN(3) WS_KERN(4) WS_KERN(5) WS_KERN(6) WS_KERN(7) WS_KERN(8)
WS_KERN(9) WS_KERN(10) WS_KERN(11) WS_KERN(12) WS_KERN(13) WS_KERN(14) WS_KERN(15)
WS_KERN(16)
#undef WS_KERN
static const ws_fn ws_kern[WS_KQ_MAX + 1] = {
    NULL, ws_kern_1, ws_kern_2, ws_kern_3, ws_kern_4, ws_kern_5, ws_kern_6, ws_kern_7, ws_kern_8,
    ws_kern_9, ws_kern_10, ws_kern_11, ws_kern_12, ws_kern_13, ws_kern_14, ws_kern_15,
    ws_kern_16};

/* u8: `ntaps` taps of `qpt` quads at offsets toff from each row's source; weights bb (block
 * 2 at bb + bstride) */
VNNI static inline __attribute__((always_inline)) void kern_vnni_body(
    const fbi_ep *a, store512_fn st, const uint8_t *const *src, const int64_t *toff, int ntaps,
    int qpt, const int8_t *bb, int64_t bstride, int n, int og, char **dst, const int nblk,
    const int32_t *corr) {
    __m512i c[4][UR1], c0[4];
    int64_t d[UR1];
    /* the zero-point correction (ushift * the channel's weight sum) is where the sums start,
     * not an add in the epilogue (integers: the same sums) */
#pragma GCC unroll 4
    for (int b = 0; b < nblk; b++)
        c0[b] = corr ? _mm512_loadu_si512((const void *)(corr + n + b * NB)) : _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int r = 0; r < UR1; r++) {
        d[r] = src[r] - src[0];
#pragma GCC unroll 4
        for (int b = 0; b < nblk; b++) c[b][r] = c0[b];
    }
    const uint8_t *A = src[0];
    for (int t = 0; t < ntaps; t++) {
        const uint8_t *p = A + toff[t];
        for (int q = 0; q < qpt; q++, bb += NB * 4, p += 4) {
            __m512i w[4];
#pragma GCC unroll 4
            for (int b = 0; b < nblk; b++) w[b] = _mm512_loadu_si512((const void *)(bb + b * bstride));
#pragma GCC unroll 8
            for (int r = 0; r < UR1; r++) {
                int32_t quad;
                memcpy(&quad, p + d[r], 4);
                __m512i v = _mm512_set1_epi32(quad);
#pragma GCC unroll 4
                for (int b = 0; b < nblk; b++) c[b][r] = _mm512_dpbusd_epi32(c[b][r], v, w[b]);
            }
        }
    }
#pragma GCC unroll 4
    for (int b = 0; b < nblk; b++) {
        __m512i out[UR1]; /* a copy: c's address never taken, so c stays in registers */
#pragma GCC unroll 8
        for (int r = 0; r < UR1; r++) out[r] = c[b][r];
        int n0 = n + b * NB;
        st(a, out, n0, og - n0 < NB ? og - n0 : NB, dst);
    }
}

typedef void (*kern_vnni_fn)(const fbi_ep *, store512_fn, const uint8_t *const *,
                             const int64_t *, int, int, const int8_t *, int64_t, int, int,
                             char **, const int32_t *);
#define KERN_VNNI(B)                                                                          \
    VNNI static void kern_vnni_##B(const fbi_ep *a, store512_fn st, const uint8_t *const *src, \
                                   const int64_t *toff, int ntaps, int qpt, const int8_t *bb,  \
                                   int64_t bstride, int n, int og, char **dst,                 \
                                   const int32_t *corr) {                                      \
        kern_vnni_body(a, st, src, toff, ntaps, qpt, bb, bstride, n, og, dst, B, corr);       \
    }
KERN_VNNI(1) KERN_VNNI(2) KERN_VNNI(3) KERN_VNNI(4)
#undef KERN_VNNI
static const kern_vnni_fn kern_vnni[5] = {NULL, kern_vnni_1, kern_vnni_2, kern_vnni_3,
                                          kern_vnni_4};

/* int16: UR1 rows of `kp2` int16 pairs (row r at A + r * lda) x one or two blocks */
VNNI static inline __attribute__((always_inline)) void kern_w16_body(
    const fbi_ep *a, store512_fn st, const int16_t *A, int64_t lda, const int16_t *bb,
    int64_t bstride, int kp2, int n, int og, char **dst, const int nblk) {
    __m512i c[4][UR1];
#pragma GCC unroll 8
    for (int r = 0; r < UR1; r++)
#pragma GCC unroll 4
        for (int b = 0; b < nblk; b++) c[b][r] = _mm512_setzero_si512();
    for (int p = 0; p < kp2; p++) {
        __m512i w[4];
#pragma GCC unroll 4
        for (int b = 0; b < nblk; b++)
            w[b] = _mm512_loadu_si512((const void *)(bb + b * bstride + p * NB * 2));
#pragma GCC unroll 8
        for (int r = 0; r < UR1; r++) {
            int32_t pair;
            memcpy(&pair, A + r * lda + 2 * p, 4);
            __m512i v = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
            for (int b = 0; b < nblk; b++) c[b][r] = _mm512_dpwssd_epi32(c[b][r], v, w[b]);
        }
    }
#pragma GCC unroll 4
    for (int b = 0; b < nblk; b++) {
        __m512i out[UR1];
#pragma GCC unroll 8
        for (int r = 0; r < UR1; r++) out[r] = c[b][r];
        int n0 = n + b * NB;
        st(a, out, n0, og - n0 < NB ? og - n0 : NB, dst);
    }
}

typedef void (*kern_w16_fn)(const fbi_ep *, store512_fn, const int16_t *, int64_t,
                            const int16_t *, int64_t, int, int, int, char **);
#define KERN_W16(B)                                                                           \
    VNNI static void kern_w16_##B(const fbi_ep *a, store512_fn st, const int16_t *A,          \
                                  int64_t lda, const int16_t *bb, int64_t bstride, int kp2,   \
                                  int n, int og, char **dst) {                                \
        kern_w16_body(a, st, A, lda, bb, bstride, kp2, n, og, dst, B);                        \
    }
KERN_W16(1) KERN_W16(2) KERN_W16(3) KERN_W16(4)
#undef KERN_W16
static const kern_w16_fn kern_w16[5] = {NULL, kern_w16_1, kern_w16_2, kern_w16_3, kern_w16_4};

/* gemm_i16_avx2 on VNNI: m rows of A (lda int16 apart; the last partial tile is copied to a
 * zeroed one, so no read goes past A). 0, or -4 where that copy cannot be allocated (nothing
 * of the last tile is written: the caller fails the step) */
VNNI static int gemm_i16_vnni(const fbi_conv *ac, const int16_t *A, int64_t lda, int64_t m,
                               const int16_t *B, int nblocks, int n_off, int cout_g, char *Y,
                               int64_t ldy, int esize) {
    int kp2 = ac->kp / 2;
    int64_t bstride = (int64_t)kp2 * NB * 2;
    fbi_ep e;
    ep_init(ac, &e);
    ep_fold(ac, &e);
    store512_fn st = store512_for(&e);
    int16_t *tail = NULL;
    for (int64_t r = 0; r < m; r += UR1) {
        int rows = m - r < UR1 ? (int)(m - r) : UR1;
        char *dst[UR1];
        const int16_t *Ar = A + r * lda;
        int64_t la = lda;
        if (rows < UR1) { /* the last rows: copied to a zeroed tile, so no read goes past A */
            tail = (int16_t *)calloc((size_t)UR1 * (size_t)ac->kp, sizeof(int16_t));
            if (!tail) return -4;
            for (int q = 0; q < rows; q++)
                memcpy(tail + (int64_t)q * ac->kp, Ar + q * lda, sizeof(int16_t) * (size_t)ac->kp);
            Ar = tail, la = ac->kp;
        }
        for (int q = 0; q < UR1; q++) dst[q] = q < rows ? Y + (r + q) * ldy * esize : NULL;
        for (int b = 0; b < nblocks; b += 4) { /* up to 4 blocks (64 channels) per call */
            int k = nblocks - b < 4 ? nblocks - b : 4;
            kern_w16[k](&e, st, Ar, la, B + (int64_t)b * bstride, bstride, kp2, n_off + b * NB,
                        n_off + cout_g, dst);
        }
    }
    free(tail);
    return 0;
}

/* the output-channel blocks of one tile of rows: AVX-512 VNNI up to four blocks at a time, else the
 * AVX2 kernel (one chunk, or int16 lane sums widened every `chunk` quads) */
static inline void tile_blocks(const fbi_conv *a, const fbi_ep *ep, store_fn st,
                               store512_fn st512, const uint8_t *const *src,
                               const int64_t *toff, int ntaps, int qpt, int chunk, int one,
                               const int8_t *B, int nblocks, int nofs, int og, char **dst) {
    int64_t bstride = (int64_t)a->kq4 * NB;
    for (int b = 0; b < nblocks; b++) {
        const int8_t *bb = B + b * bstride;
        int n0 = b * NB, cnt = og - n0 < NB ? og - n0 : NB;
        if (a->isa == ISA_AVX512_VNNI) { /* up to 4 blocks (64 channels) per call */
            int k = nblocks - b < 4 ? nblocks - b : 4;
            kern_vnni[k](ep, st512, src, toff, ntaps, qpt, bb, bstride, nofs + n0, nofs + og,
                         dst, a->corr);
            b += k - 1;
        } else if (one) {
            kern_u8_1c(ep, st, src, toff, ntaps, qpt, bb, nofs + n0, cnt, dst);
        } else {
            kern_u8_c(ep, st, src, toff, ntaps, qpt, chunk, bb, nofs + n0, cnt, dst);
        }
    }
}

/* rows j0 .. j0+rows-1 of a virtual grid `vw` pixels wide, of which the first ow are output
 * pixels (the rest: the padding columns of the direct path) */
static inline void row_dst(char *Yi, int64_t j0, int64_t nrows, int vw, int ow, int64_t ldy,
                           char **dst, int rows) {
    int64_t oy = j0 / vw, ox = j0 - oy * vw; /* one division per group of rows */
    for (int r = 0; r < rows; r++) {
        dst[r] = j0 + r < nrows && ox < ow ? Yi + (oy * ow + ox) * ldy : NULL;
        if (++ox == vw) ox = 0, oy++;
    }
}

AVX2 static void conv_u8_avx2(const fbi_conv *a) {
    int og = a->cout / a->groups, esize = a->out_kind == OUT_FLOAT ? 4 : a->out_u8 ? 1 : 2;
    int nblocks = (og + NB - 1) / NB, kq = a->kq4 / 4;
    int64_t opix = (int64_t)a->oh * a->ow, in_img = (int64_t)a->h * a->w * a->cin;
    int64_t wstride = (int64_t)nblocks * a->kq4 * NB, ldy = (int64_t)a->cout * esize;
    uint8_t *buf = (uint8_t *)a->scratch;
    char *dst[UR1];
    fbi_ep ep;
    ep_init(a, &ep);
    int chunk = a->kchunk < 1 ? 1 : a->kchunk, one = kq <= chunk; /* one chunk: kern_u8_1c */
    store_fn st = ep.out_float ? store_rows_p1_g : store_p1[ep.kind];
    store512_fn st512 = NULL;
    fbi_ep ep512; /* VNNI: the kernels start the sums at the correction (kern_vnni_body) */
    if (a->isa == ISA_AVX512_VNNI) {
        ep512 = ep;
        ep_fold(a, &ep512);
        ep512.corr = NULL;
        ep512.kind &= ~EK_CORR;
        st512 = store512_for(&ep512);
    }
    /* direct: stride 1, one group, whole taps of 4 channels: the taps of a pixel are fixed
     * offsets into the zero-padded byte image (no im2col) */
    if (fbi_u8_direct(a)) {
        int hp = a->h + 2 * a->ph, wp = a->w + 2 * a->pw, cin = a->cin;
        /* a 1x1 layer with the verified certified epilogue: weights-stationary (ws_body) */
        const int ws = st512 && ep512.cert && ep512.cnocheck && !ep512.out_float && !fbi_ws_off &&
                       a->kq4 / 4 <= WS_KQ_MAX;
        const int ws1 = a->kh == 1 && a->kw == 1 && !a->ph && !a->pw; /* contiguous */
        int64_t toff[64];
        for (int ky = 0; ky < a->kh; ky++)
            for (int kx = 0; kx < a->kw; kx++)
                toff[ky * a->kw + kx] = ((int64_t)ky * wp + kx) * cin;
        for (int i = 0; i < a->n; i++) {
            const int16_t *x = (const int16_t *)a->x + i * in_img;
            char *Yi = (char *)a->y + (int64_t)i * opix * ldy;
            const uint8_t *img = buf; /* the byte image the taps read */
            if (a->in_u8 && !(a->ph || a->pw)) {
                img = (const uint8_t *)a->x + i * in_img; /* bytes already */
            } else if (a->ph || a->pw) { /* the border holds the byte of code 0 */
                const uint8_t zb = (uint8_t)(-a->ushift);
                const int64_t row = (int64_t)wp * cin, side = (int64_t)a->pw * cin;
                memset(buf, zb, (size_t)(a->ph * row));
                memset(buf + (int64_t)(a->h + a->ph) * row, zb, (size_t)((hp - a->h - a->ph) * row));
                for (int y = 0; y < a->h; y++) {
                    uint8_t *r = buf + ((int64_t)y + a->ph) * row;
                    memset(r, zb, (size_t)side);
                    memset(r + side + (int64_t)a->w * cin, zb, (size_t)(row - side - (int64_t)a->w * cin));
                    if (a->in_u8)
                        memcpy(r + side, (const uint8_t *)a->x + i * in_img + (int64_t)y * a->w * cin,
                               (size_t)a->w * cin);
                    else
                        to_u8(x + (int64_t)y * a->w * cin, (int64_t)a->w * cin, a->ushift,
                              r + side);
                }
            } else {
                to_u8(x, in_img, a->ushift, buf);
            }
            if (ws) {
                ws_taps tp;
                if (!ws1) {
                    for (int q = 0; q < a->kq4 / 4; q++)
                        tp.off[q] = toff[q / (cin / 4)] + 4 * (q % (cin / 4));
                    tp.rs = cin, tp.row = (int64_t)wp * cin, tp.oh = a->oh, tp.ow = a->ow;
                }
                for (int b = 0; b < nblocks; b++)
                    ws_kern[a->kq4 / 4](&ep512, img, opix, ws1 ? NULL : &tp,
                                        a->wpack8 + (int64_t)b * a->kq4 * NB, a->corr, b * NB,
                                        og - b * NB < NB ? og - b * NB : NB, Yi, ldy);
                continue;
            }
            for (int64_t j0 = 0; j0 < opix; j0 += UR1) { /* output pixels only */
                const uint8_t *src[UR1];
                int64_t oy = j0 / a->ow, ox = j0 - oy * a->ow;
                for (int r = 0; r < UR1; r++) {
                    int in = j0 + r < opix;
                    src[r] = in ? img + (oy * wp + ox) * cin : img;
                    dst[r] = in ? Yi + (j0 + r) * ldy : NULL;
                    if (++ox == a->ow) ox = 0, oy++;
                }
                tile_blocks(a, st512 ? &ep512 : &ep, st, st512, src, toff, a->kh * a->kw, cin / 4, chunk, one,
                            a->wpack8, nblocks, 0, og, dst);
            }
        }
        return;
    }
    int64_t zero = 0;
    memset(buf + opix * a->kq4, 0, (size_t)8 * a->kq4); /* rows read past the last one */
    for (int i = 0; i < a->n; i++)
        for (int g = 0; g < a->groups; g++) {
            char *Yi = (char *)a->y + (int64_t)i * opix * ldy;
            im2col_u8(a, (const int16_t *)a->x + i * in_img, g, buf);
            const int8_t *B = a->wpack8 + g * wstride;
            for (int64_t r = 0; r < opix; r += UR1) {
                row_dst(Yi, r, opix, a->ow, a->ow, ldy, dst, UR1);
                const uint8_t *src[UR1];
                for (int q = 0; q < UR1; q++) src[q] = buf + (r + q) * a->kq4; /* slack */
                tile_blocks(a, st512 ? &ep512 : &ep, st, st512, src, &zero, 1, kq, chunk, one, B, nblocks, g * og,
                            og, dst);
            }
        }
}

/* The float-input layers' epilogue on this path: on VNNI the 16-lane copy compiled per kind
 * (codes only; float outputs keep the AVX2 one), with the exact fold where it applies; NULL
 * elsewhere */
AVX2 static store512f_fn f32_store512(const fbi_conv *a, fbi_ep *e) {
    if (a->isa != ISA_AVX512_VNNI || e->out_float) return NULL;
    ep_fold(a, e);
    return store512f[e->kind];
}

/* The end of a float kernel's tile, R rows x 16 channels of sums v (rows whose dst is NULL lie
 * outside the output): where the quantizer after the layer sees NaN/inf, bad is set (a cheap
 * test of the sums first); then the epilogue. Returns bad. */
AVX2 static inline __attribute__((always_inline)) int f32_tile_out(
    const fbi_conv *a, const fbi_ep *e, store512f_fn st, __m256 *v, int R, int n0, int cnt,
    char **dst, int bad) {
    if (a->qcheck && !bad && maybe_nonfinite(v, 2 * R))
        for (int r = 0; r < R; r++) {
            if (!dst[r]) continue;
            float t[16];
            _mm256_storeu_ps(t, v[2 * r]);
            _mm256_storeu_ps(t + 8, v[2 * r + 1]);
            bad |= sums_nonfinite(a, t, n0, cnt);
        }
    if (st)
        st(e, v, R, n0, cnt, dst);
    else
        epi_tile(e, v, R, n0, cnt, dst);
    return bad;
}

/* A float-input layer (the network's images) at stride 1, one group: the taps (c, ky, kx), in
 * the packed weights' order, are fixed offsets into zero-padded NCHW planes, 4 output
 * pixels (rows) at a time, 16 channels (two packed blocks of 8). The same fmas
 * in the same order as gemm_f32_generic on im2col rows. */
AVX2 static int conv_f32_direct_avx2(const fbi_conv *a) {
    int bad = 0;
    fbi_ep ep;
    ep_init(a, &ep);
    int og = a->cout, esize = a->out_kind == OUT_FLOAT ? 4 : 2, kf = a->kf;
    int nblocks = (og + NBF - 1) / NBF, hp = a->h + 2 * a->ph, wp = a->w + 2 * a->pw;
    store512f_fn st512f = f32_store512(a, &ep);
    int64_t plane = (int64_t)hp * wp, opix = (int64_t)a->oh * a->ow;
    int64_t in_img = (int64_t)a->h * a->w * a->cin, ldy = (int64_t)a->cout * esize;
    int64_t toff[64];
    for (int c = 0, t = 0; c < a->cin; c++)
        for (int ky = 0; ky < a->kh; ky++)
            for (int kx = 0; kx < a->kw; kx++, t++) toff[t] = c * plane + (int64_t)ky * wp + kx;
    float *buf = (float *)a->scratch;
    memset(buf, 0, sizeof(float) * (size_t)(a->cin * plane + 8)); /* padding, slack */
    char *dst[4];
    for (int i = 0; i < a->n; i++) {
        const float *x = (const float *)a->x + i * in_img;
        char *Yi = (char *)a->y + (int64_t)i * opix * ldy;
        for (int c = 0; c < a->cin; c++)
            for (int y = 0; y < a->h; y++)
                memcpy(buf + c * plane + (int64_t)(y + a->ph) * wp + a->pw,
                       x + ((int64_t)c * a->h + y) * a->w, sizeof(float) * (size_t)a->w);
        for (int64_t j0 = 0; j0 < opix; j0 += 4) { /* 4 output pixels (rows) */
            int64_t off[4], oy = j0 / a->ow, ox = j0 - oy * a->ow;
            for (int r = 0; r < 4; r++) {
                int in = j0 + r < opix;
                off[r] = in ? oy * wp + ox : 0;
                dst[r] = in ? Yi + (j0 + r) * ldy : NULL;
                if (++ox == a->ow) ox = 0, oy++;
            }
            const float *A = buf + off[0];
            int64_t d1 = off[1] - off[0], d2 = off[2] - off[0], d3 = off[3] - off[0];
            for (int b = 0; b < nblocks; b += 2) {
                const float *b0 = (const float *)a->wpack + (int64_t)b * kf * NBF;
                const float *b1 = b + 1 < nblocks ? b0 + (int64_t)kf * NBF : b0;
                __m256 x0 = _mm256_setzero_ps(), y0 = x0, x1 = x0, y1 = x0, x2 = x0, y2 = x0,
                       x3 = x0, y3 = x0;
                for (int t = 0; t < kf; t++) {
                    __m256 w0 = _mm256_loadu_ps(b0 + t * NBF), w1 = _mm256_loadu_ps(b1 + t * NBF);
                    const float *p = A + toff[t];
                    __m256 v;
#define ROWF(r, xx, yy)                                                       \
                    v = _mm256_broadcast_ss(p + r);                           \
                    xx = _mm256_fmadd_ps(v, w0, xx);                          \
                    yy = _mm256_fmadd_ps(v, w1, yy);
                    ROWF(0, x0, y0) ROWF(d1, x1, y1) ROWF(d2, x2, y2) ROWF(d3, x3, y3)
#undef ROWF
                }
                __m256 v[8] = {x0, y0, x1, y1, x2, y2, x3, y3};
                int n0 = b * NBF, cnt = og - n0 < 2 * NBF ? og - n0 : 2 * NBF;
                bad = f32_tile_out(a, &ep, st512f, v, 4, n0, cnt, dst, bad);
            }
        }
    }
    return bad;
}
#endif

/* Returns 0, 1 (qcheck and the quantizer after this float-input layer sees NaN/inf: its sums
 * overflowed; the outputs are written all the same), or -1 (ISA not supported here), -2 (bad
 * arguments), -4 (out of memory). */
static int conv_f32_nhwc(const fbi_conv *a);

int fbi_conv_run(const fbi_conv *a) {
    if (!fbi_isa_supported(a->isa)) return -1;
    /* u8 maps: written by the VNNI epilogue of an integer-input layer only, read by the
     * direct u8 path only (anything else would read or write them as int16) */
    if ((a->out_u8 && (a->isa != ISA_AVX512_VNNI || a->in_kind != IN_INT ||
                       a->out_kind != OUT_INT)) ||
        (a->in_u8 && (a->isa != ISA_AVX512_VNNI || !fbi_u8_direct(a))))
        return -2;
    if (a->in_kind == IN_FLOAT_NHWC) return conv_f32_nhwc(a);
#if FBI_X86
    /* u8 weights: AVX-512 VNNI sums in int32 (any weights pack_u8 took); AVX2's vpmaddubsw
     * only where no int16 pair sum can saturate (kchunk >= 1) */
    if (USE_AVX2(a->isa) && a->wpack8 && a->in_kind == IN_INT && a->kq4 % 4 == 0 &&
        (a->isa == ISA_AVX512_VNNI || a->kchunk >= 1)) {
        conv_u8_avx2(a);
        return 0;
    }
    if (USE_AVX2(a->isa) && a->in_kind == IN_FLOAT_NCHW && a->groups == 1 && a->sh == 1 &&
        a->sw == 1 && a->dh == 1 && a->dw == 1 && a->kf == a->cin * a->kh * a->kw &&
        a->kf <= 64)
        return conv_f32_direct_avx2(a);
#endif
    if (a->groups < 1 || a->cin % a->groups || a->cout % a->groups || a->kp % 2) return -2;
    int cg = a->cin / a->groups, og = a->cout / a->groups;
    int esize = a->out_kind == OUT_FLOAT ? 4 : a->out_u8 ? 1 : 2;
    int64_t opix = (int64_t)a->oh * a->ow;
    int direct = a->in_kind == IN_INT && a->groups == 1 && a->kh == 1 && a->kw == 1 &&
                 a->sh == 1 && a->sw == 1 && a->ph == 0 && a->pw == 0 && a->cin == a->kp;
    int fl = a->in_kind == IN_FLOAT_NCHW;
    int nblocks = fl ? (og + NBF - 1) / NBF : (og + NB - 1) / NB;
    int64_t wstride = fl ? (int64_t)nblocks * a->kf * NBF : (int64_t)nblocks * a->kp * NB;
    char *Y = (char *)a->y;
    int bad = 0;
    if (direct) { /* 1x1 stride 1 on NHWC: the input is already the GEMM's left matrix */
        int64_t m = (int64_t)a->n * opix;
#if FBI_X86
        if (a->isa == ISA_AVX512_VNNI)
            return gemm_i16_vnni(a, (const int16_t *)a->x, a->cin, m, (const int16_t *)a->wpack,
                                 nblocks, 0, og, Y, a->cout, esize);
        if (USE_AVX2(a->isa)) {
            gemm_i16_avx2(a, (const int16_t *)a->x, a->cin, m, (const int16_t *)a->wpack,
                          nblocks, 0, og, Y, a->cout, esize);
            return 0;
        }
#endif
        gemm_i16_generic(a, (const int16_t *)a->x, a->cin, m, (const int16_t *)a->wpack,
                         nblocks, 0, og, Y, a->cout, esize);
        return 0;
    }
    int64_t in_img = (int64_t)a->h * a->w * a->cin;
    for (int i = 0; i < a->n; i++)
        for (int g = 0; g < a->groups; g++) {
            char *Yi = Y + (int64_t)i * opix * a->cout * esize;
            if (fl) {
                float *col = (float *)a->scratch;
                im2col_f32(a, (const float *)a->x + i * in_img, g, col);
                const float *B = (const float *)a->wpack + g * wstride;
#if FBI_X86
                if (USE_AVX2(a->isa)) {
                    bad |= gemm_f32_avx2(a, col, a->kf, opix, B, nblocks, g * og, og, Yi,
                                         a->cout, esize);
                    continue;
                }
#endif
                bad |= gemm_f32_generic(a, col, a->kf, opix, B, nblocks, g * og, og, Yi,
                                        a->cout, esize);
            } else {
                int16_t *col = (int16_t *)a->scratch;
                im2col_i16(a, (const int16_t *)a->x + i * in_img, g, col);
                const int16_t *B = (const int16_t *)a->wpack + g * wstride;
#if FBI_X86
                if (a->isa == ISA_AVX512_VNNI) {
                    if (gemm_i16_vnni(a, col, a->kp, opix, B, nblocks, g * og, og, Yi, a->cout,
                                      esize))
                        return -4;
                    continue;
                }
                if (USE_AVX2(a->isa)) {
                    gemm_i16_avx2(a, col, a->kp, opix, B, nblocks, g * og, og, Yi, a->cout,
                                  esize);
                    continue;
                }
#endif
                gemm_i16_generic(a, col, a->kp, opix, B, nblocks, g * og, og, Yi, a->cout,
                                 esize);
            }
        }
    (void)cg;
    return bad;
}

/* ----------------------------------------------------------------- elementwise */

/* Elementwise steps, compiled twice (portable, and AVX2 where the compiler vectorises them);
 * the same IEEE operations in both. */
#define ADD_BODY                                                                        \
    for (int64_t i = 0; i < n; i++) {                                                   \
        float v = (float)x0[i] * f0 + (float)x1[i] * f1;                                \
        float av = fabsf(v), r = __builtin_roundevenf(av);                              \
        r += (av - r == 0.5f) ? 1.0f : 0.0f;                                            \
        r = v < 0 ? -r : r;                                                             \
        r = r < (float)lo ? (float)lo : r;                                              \
        r = r > (float)hi ? (float)hi : r;                                              \
        y[i] = (int16_t)(int32_t)r;                                                     \
    }
#define ADD_ARGS int64_t n, const int16_t *x0, const int16_t *x1, float f0, float f1, \
                 int32_t lo, int32_t hi, int16_t *y
static void add_generic(ADD_ARGS) { ADD_BODY }
#if FBI_X86
__attribute__((target("avx2,fma"))) static void add_avx2(ADD_ARGS) {
    /* clamping v to [lo, hi] (integers) before rounding equals clamping the rounded value,
     * and keeps the conversion to int32 exact; 16 codes per step */
    int64_t i0 = n - n % 16;
    const __m256 flo = _mm256_set1_ps((float)lo), fhi = _mm256_set1_ps((float)hi),
                 vf0 = _mm256_set1_ps(f0), vf1 = _mm256_set1_ps(f1),
                 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < i0; i += 16) {
        __m256i k[2];
        for (int h = 0; h < 2; h++) {
            __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(
                _mm_loadu_si128((const __m128i *)(x0 + i + 8 * h))));
            __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(
                _mm_loadu_si128((const __m128i *)(x1 + i + 8 * h))));
            __m256 v = _mm256_add_ps(_mm256_mul_ps(a, vf0), _mm256_mul_ps(b, vf1));
            v = _mm256_min_ps(_mm256_max_ps(v, flo), fhi);
            k[h] = _mm256_sign_epi32(rha_abs(_mm256_and_ps(v, absmask)),
                                     _mm256_castps_si256(v));
        }
        _mm256_storeu_si256((__m256i *)(y + i), _mm256_permute4x64_epi64(
                                _mm256_packs_epi32(k[0], k[1]), 0xD8));
    }
    add_generic(n - i0, x0 + i0, x1 + i0, f0, f1, lo, hi, y + i0);
}

/* the same sum where f0, f1 are integers with |f0| + |f1| <= 511: then every float above is
 * an exact integer (|x| <= 2^15, so |x0 f0 + x1 f1| < 2^24) and rounding is the identity, so
 * vpmaddwd on interleaved (x0, x1) x (f0, f1) gives the same codes, 16 per step */
__attribute__((target("avx2,fma"))) static void add_int_avx2(ADD_ARGS) {
    int64_t i0 = n - n % 16;
    const __m256i f = _mm256_set1_epi32((int32_t)(((uint32_t)(uint16_t)(int16_t)f1 << 16) |
                                                  (uint16_t)(int16_t)f0));
    const __m256i vlo = _mm256_set1_epi16((int16_t)lo), vhi = _mm256_set1_epi16((int16_t)hi);
    for (int64_t i = 0; i < i0; i += 16) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(x0 + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(x1 + i));
        __m256i s0 = _mm256_madd_epi16(_mm256_unpacklo_epi16(a, b), f);
        __m256i s1 = _mm256_madd_epi16(_mm256_unpackhi_epi16(a, b), f);
        __m256i k = _mm256_packs_epi32(s0, s1); /* in-lane, the order unpack took */
        k = _mm256_min_epi16(_mm256_max_epi16(k, vlo), vhi);
        _mm256_storeu_si256((__m256i *)(y + i), k);
    }
    add_generic(n - i0, x0 + i0, x1 + i0, f0, f1, lo, hi, y + i0);
}
#endif

/* y = clamp(round_half_away(a * fa + b * fb), lo, hi): a residual sum on a common grid (fa, fb
 * integers: exact) or on a finer grid (then rounded) */
void fbi_add(int32_t isa, ADD_ARGS) {
#if FBI_X86
    if (USE_AVX2(isa)) {
        if (f0 == (float)(int32_t)f0 && f1 == (float)(int32_t)f1 &&
            fabsf(f0) + fabsf(f1) <= 511.0f && lo >= -32768 && hi <= 32767 && lo <= hi)
            add_int_avx2(n, x0, x1, f0, f1, lo, hi, y);
        else
            add_avx2(n, x0, x1, f0, f1, lo, hi, y);
        return;
    }
#endif
    (void)isa;
    add_generic(n, x0, x1, f0, f1, lo, hi, y);
}

#define POOL_BODY                                                                       \
    for (int i = 0; i < n; i++)                                                         \
        for (int oy = 0; oy < oh; oy++)                                                 \
            for (int ox = 0; ox < ow; ox++) {                                           \
                int16_t *q = y + (((int64_t)i * oh + oy) * ow + ox) * c;                \
                int32_t *acc = (int32_t *)work;                                         \
                for (int j = 0; j < c; j++) acc[j] = op == 0 ? -32768 : 0;              \
                for (int ky = 0; ky < kh; ky++) {                                       \
                    int iy = oy * sh - ph + ky * dh;                                    \
                    if (iy < 0 || iy >= h) continue;                                    \
                    for (int kx = 0; kx < kw; kx++) {                                   \
                        int ix = ox * sw - pw + kx * dw;                                \
                        if (ix < 0 || ix >= w) continue;                                \
                        const int16_t *p = x + (((int64_t)i * h + iy) * w + ix) * c;    \
                        if (op == 0)                                                    \
                            for (int j = 0; j < c; j++) acc[j] = p[j] > acc[j] ? p[j] : acc[j]; \
                        else                                                            \
                            for (int j = 0; j < c; j++) acc[j] += p[j];                 \
                    }                                                                   \
                }                                                                       \
                for (int j = 0; j < c; j++) q[j] = (int16_t)acc[j];                     \
            }
#define POOL_ARGS int32_t op, int32_t n, int32_t h, int32_t w, int32_t c, int32_t oh,   \
                  int32_t ow, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph, \
                  int32_t pw, int32_t dh, int32_t dw, const int16_t *x, int16_t *y, void *work
static void pool_generic(POOL_ARGS) { POOL_BODY }
#if FBI_X86
__attribute__((target("avx2,fma"))) static void pool_avx2(POOL_ARGS) {
    if (op != 0 || c % 16) { POOL_BODY return; }
    /* max pooling, 16 channels per vector: the same maximum over the same taps */
    for (int i = 0; i < n; i++)
        for (int oy = 0; oy < oh; oy++)
            for (int ox = 0; ox < ow; ox++) {
                int16_t *q = y + (((int64_t)i * oh + oy) * ow + ox) * c;
                for (int j = 0; j < c; j += 16) {
                    __m256i m = _mm256_set1_epi16(-32768);
                    for (int ky = 0; ky < kh; ky++) {
                        int iy = oy * sh - ph + ky * dh;
                        if (iy < 0 || iy >= h) continue;
                        for (int kx = 0; kx < kw; kx++) {
                            int ix = ox * sw - pw + kx * dw;
                            if (ix < 0 || ix >= w) continue;
                            m = _mm256_max_epi16(m, _mm256_loadu_si256((const __m256i *)(
                                    x + (((int64_t)i * h + iy) * w + ix) * c + j)));
                        }
                    }
                    _mm256_storeu_si256((__m256i *)(q + j), m);
                }
            }
}
#endif

/* NHWC max (op 0) or sum (op 1, zero padding counted) pooling of int16 codes; `work`: c
 * int32 */
void fbi_pool(int32_t isa, POOL_ARGS) {
#if FBI_X86
    if (USE_AVX2(isa)) {
        pool_avx2(op, n, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, x, y, work);
        return;
    }
#endif
    (void)isa;
    pool_generic(op, n, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, x, y, work);
}

/* global average pool: y[i][j] = (sum over pixels of x) * scale / (h * w), float */
void fbi_global_avg(int32_t n, int32_t hw, int32_t c, const int16_t *x, float scale, float *y) {
    for (int i = 0; i < n; i++) {
        float *q = y + (int64_t)i * c;
        for (int j = 0; j < c; j++) {
            int64_t s = 0;
            for (int p = 0; p < hw; p++) s += x[((int64_t)i * hw + p) * c + j];
            q[j] = ((float)s * scale) / (float)hw;
        }
    }
}

/* ----------------------------------------------------------------- float streams
 * A residual stream whose operands have no common integer grid (min-max's learned scales) is
 * kept as float32 NHWC holding PyTorch's own values: an int operand's value is its
 * quantizer's output fl(fl((k - kofs) * scale) + sub) (min-max: r * scale + lo, two
 * roundings), the sum is one float add, then the clamps of a ReLU. What reads such a map: a
 * layer with float NHWC input (its float sums in its own order, as the first layer's), max
 * pooling, global average; all exact but those sums. Both paths run the same IEEE operations
 * in the same order (the FMA kernel below sums each channel over k in order, as
 * gemm_f32_generic). */

/* rows [OH*OW][kf] float of one NHWC image, group g, taps (ky, kx, c) (zeros: padding) */
static void im2col_f32_nhwc(const fbi_conv *a, const float *x, int g, float *col) {
    int cg = a->cin / a->groups, kf = a->kf;
    for (int oy = 0; oy < a->oh; oy++)
        for (int ox = 0; ox < a->ow; ox++) {
            float *row = col + ((int64_t)oy * a->ow + ox) * kf;
            int t = 0;
            for (int ky = 0; ky < a->kh; ky++) {
                int iy = oy * a->sh - a->ph + ky * a->dh;
                for (int kx = 0; kx < a->kw; kx++) {
                    int ix = ox * a->sw - a->pw + kx * a->dw;
                    int in = iy >= 0 && iy < a->h && ix >= 0 && ix < a->w;
                    const float *p = x + ((int64_t)iy * a->w + ix) * a->cin + g * cg;
                    for (int c = 0; c < cg; c++, t++) row[t] = in ? p[c] : 0.0f;
                }
            }
            for (; t < kf; t++) row[t] = 0.0f;
        }
}

#if FBI_X86
/* 6 rows x 16 channels (two packed blocks of 8), the 12 accumulators in registers: each
 * weight pair feeds 12 independent FMA chains (latency 4, two FMA pipes) */
AVX2 static int gemm_f32_6x16_avx2(const fbi_conv *ac, const float *A, int64_t lda, int64_t m,
                                   const float *B, int nblocks, int n_off, int cout_g, char *Y,
                                   int64_t ldy, int esize) {
    int kf = ac->kf, bad = 0;
    fbi_ep e;
    ep_init(ac, &e);
    store512f_fn st512f = f32_store512(ac, &e);
    for (int64_t r = 0; r < m; r += 6) {
        int rows = m - r < 6 ? (int)(m - r) : 6;
        const float *p0, *p1, *p2, *p3, *p4, *p5;
        char *dst[6];
        for (int q = 0; q < 6; q++)
            dst[q] = q < rows ? Y + (r + q) * ldy * esize : NULL;
        p0 = A + r * lda; /* rows past m read row r again (dropped) */
        p1 = rows > 1 ? p0 + lda : p0, p2 = rows > 2 ? p0 + 2 * lda : p0;
        p3 = rows > 3 ? p0 + 3 * lda : p0, p4 = rows > 4 ? p0 + 4 * lda : p0;
        p5 = rows > 5 ? p0 + 5 * lda : p0;
        for (int b = 0; b < nblocks; b += 2) {
            const float *b0 = B + (int64_t)b * kf * NBF;
            const float *b1 = b + 1 < nblocks ? b0 + (int64_t)kf * NBF : b0;
            __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
                   c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
            for (int k = 0; k < kf; k++) {
                __m256 w0 = _mm256_loadu_ps(b0 + k * NBF), w1 = _mm256_loadu_ps(b1 + k * NBF);
                __m256 x;
#define ROW6(p, u, v)                                                             \
                x = _mm256_broadcast_ss(p + k);                                   \
                u = _mm256_fmadd_ps(x, w0, u);                                    \
                v = _mm256_fmadd_ps(x, w1, v);
                ROW6(p0, c00, c01) ROW6(p1, c10, c11) ROW6(p2, c20, c21)
                ROW6(p3, c30, c31) ROW6(p4, c40, c41) ROW6(p5, c50, c51)
#undef ROW6
            }
            __m256 v[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
            int n0 = n_off + b * NBF, cnt = cout_g - b * NBF < 2 * NBF ? cout_g - b * NBF
                                                                      : 2 * NBF;
            bad = f32_tile_out(ac, &e, st512f, v, 6, n0, cnt, dst, bad); /* dst: rows < m */
        }
    }
    return bad;
}
#endif

static int gemm_f32_rows(const fbi_conv *a, const float *A, int64_t lda, int64_t m,
                         const float *B, int nblocks, int n_off, int og, char *Y, int esize) {
#if FBI_X86
    if (USE_AVX2(a->isa))
        return gemm_f32_6x16_avx2(a, A, lda, m, B, nblocks, n_off, og, Y, a->cout, esize);
#endif
    return gemm_f32_generic(a, A, lda, m, B, nblocks, n_off, og, Y, a->cout, esize);
}

/* A layer reading a float NHWC map: 1x1 stride 1 as one GEMM on the map itself, else im2col
 * rows (taps (ky, kx, c)); weights packed float [nb][kf][NBF] per group. */
static int conv_f32_nhwc(const fbi_conv *a) {
    if (a->groups < 1 || a->cin % a->groups || a->cout % a->groups) return -2;
    int cg = a->cin / a->groups, og = a->cout / a->groups;
    int esize = a->out_kind == OUT_FLOAT ? 4 : 2, nblocks = (og + NBF - 1) / NBF;
    int64_t opix = (int64_t)a->oh * a->ow, in_img = (int64_t)a->h * a->w * a->cin;
    int64_t wstride = (int64_t)nblocks * a->kf * NBF;
    char *Y = (char *)a->y;
    if (a->groups == 1 && a->kh == 1 && a->kw == 1 && a->sh == 1 && a->sw == 1 &&
        a->ph == 0 && a->pw == 0 && a->kf == cg)
        return gemm_f32_rows(a, (const float *)a->x, a->cin, (int64_t)a->n * opix,
                             (const float *)a->wpack, nblocks, 0, og, Y, esize);
    int bad = 0;
    for (int i = 0; i < a->n; i++)
        for (int g = 0; g < a->groups; g++) {
            float *col = (float *)a->scratch;
            im2col_f32_nhwc(a, (const float *)a->x + i * in_img, g, col);
            bad |= gemm_f32_rows(a, col, a->kf, opix, (const float *)a->wpack + g * wstride,
                                 nblocks, g * og, og, Y + i * opix * a->cout * esize, esize);
        }
    return bad;
}

/* y = clamp(va + vb, lo, hi), float32; an operand is int16 codes (kind 0: value
 * fl(fl((k - kofs) * scale) + sub)) or float32 (kind 1). p = {scale_a, sub_a, scale_b,
 * sub_b, lo, hi}. */
/* a sum loop LOOP(VA, VB) picked by the operands' kinds: codes (I) or floats (F) */
#define BY_KINDS(LOOP, I, F)                                                            \
    if (!fa && !fb) LOOP(I, I)                                                          \
    else if (!fa) LOOP(I, F)                                                            \
    else if (!fb) LOOP(F, I)                                                            \
    else LOOP(F, F)
#define FV_I(x, o, s, u) ((float)((int32_t)((const int16_t *)(x))[i] - (o)) * (s) + (u))
#define FV_F(x, o, s, u) (((const float *)(x))[i])
#define FADD_LOOP(VA, VB)                                                               \
    for (int64_t i = 0; i < n; i++) {                                                   \
        float v = VA(x0, ka, sa, ua) + VB(x1, kb, sb, ub);                              \
        v = v < lo ? lo : v;                                                            \
        y[i] = v > hi ? hi : v;                                                         \
    }
#define FADD_BODY                                                                       \
    const float sa = p[0], ua = p[1], sb = p[2], ub = p[3], lo = p[4], hi = p[5];       \
    BY_KINDS(FADD_LOOP, FV_I, FV_F)
#define FADD_ARGS int64_t n, int32_t fa, const void *x0, int32_t ka, int32_t fb,         \
                  const void *x1, int32_t kb, const float *p, float *y
static void fadd_generic(FADD_ARGS) { FADD_BODY }
#if FBI_X86
AVX2 static void fadd_avx2(FADD_ARGS) { FADD_BODY }
#endif
#if FBI_X86
/* fadd_avx2 16 lanes wide (its auto-vectorised loop runs 8): the same operations per lane,
 * max_ps(lo, v) = v < lo ? lo : v and min_ps(hi, v) = v > hi ? hi : v (NaN and zero signs
 * too); the tail masked */
#define FZV_I(x, vo, vs, vu, m)                                                         \
    _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepi16_epi32( \
        _mm256_maskz_loadu_epi16(m, (const int16_t *)(x) + i)), vo)), vs), vu)
#define FZV_F(x, vo, vs, vu, m) _mm512_maskz_loadu_ps(m, (const float *)(x) + i)
/* p's scales, subs and bounds and the codes' offsets as 16-lane constants */
#define SUM512_CONSTS                                                                   \
    const __m512 vsa = _mm512_set1_ps(p[0]), vua = _mm512_set1_ps(p[1]);                \
    const __m512 vsb = _mm512_set1_ps(p[2]), vub = _mm512_set1_ps(p[3]);                \
    const __m512 vlo = _mm512_set1_ps(p[4]), vhi = _mm512_set1_ps(p[5]);                \
    const __m512i oa = _mm512_set1_epi32(ka), ob = _mm512_set1_epi32(kb);
#define FADD512_LOOP(VA, VB)                                                            \
    for (int64_t i = 0; i < n; i += 16) {                                               \
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1); \
        __m512 v = _mm512_add_ps(VA(x0, oa, vsa, vua, m), VB(x1, ob, vsb, vub, m));     \
        _mm512_mask_storeu_ps(y + i, m, _mm512_min_ps(vhi, _mm512_max_ps(vlo, v)));     \
    }
VNNI static void fadd_512(FADD_ARGS) {
    SUM512_CONSTS
    BY_KINDS(FADD512_LOOP, FZV_I, FZV_F)
}
#endif
void fbi_fadd(int32_t isa, FADD_ARGS) {
#if FBI_X86
    if (isa == ISA_AVX512_VNNI) {
        fadd_512(n, fa, x0, ka, fb, x1, kb, p, y);
        return;
    }
    if (USE_AVX2(isa)) {
        fadd_avx2(n, fa, x0, ka, fb, x1, kb, p, y);
        return;
    }
#endif
    (void)isa;
    fadd_generic(n, fa, x0, ka, fb, x1, kb, p, y);
}

/* max pooling (dilation 1) of clamp(va + vb, lo, hi) over each window, the sums never
 * stored: a float residual sum read only by a max pooling. The same sums, clamps and maxima as
 * fbi_fadd then the float max pooling; g = {n, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw}. */
#define FADDP_LOOP(VA, VB)                                                              \
    for (int i = 0; i < g[0]; i++)                                                      \
        for (int oy = 0; oy < g[4]; oy++)                                               \
            for (int ox = 0; ox < g[5]; ox++) {                                         \
                float *restrict q = y + (((int64_t)i * g[4] + oy) * g[5] + ox) * c;     \
                for (int j = 0; j < c; j++) q[j] = -INFINITY;                           \
                for (int ky = 0; ky < g[6]; ky++) {                                     \
                    int iy = oy * g[8] - g[10] + ky;                                    \
                    if (iy < 0 || iy >= g[1]) continue;                                 \
                    for (int kx = 0; kx < g[7]; kx++) {                                 \
                        int ix = ox * g[9] - g[11] + kx;                                \
                        if (ix < 0 || ix >= g[2]) continue;                             \
                        int64_t o = (((int64_t)i * g[1] + iy) * g[2] + ix) * c;         \
                        for (int j = 0; j < c; j++) {                                   \
                            int64_t e = o + j;                                          \
                            float v = VA(x0, ka, sa, ua, e) + VB(x1, kb, sb, ub, e);    \
                            v = v < lo ? lo : v;                                        \
                            v = v > hi ? hi : v;                                        \
                            q[j] = v > q[j] ? v : q[j];                                 \
                        }                                                               \
                    }                                                                   \
                }                                                                       \
            }
#define FP_I(x, o, s, u, e) ((float)((int32_t)((const int16_t *)(x))[e] - (o)) * (s) + (u))
#define FP_F(x, o, s, u, e) (((const float *)(x))[e])
#define FADDP_BODY                                                                      \
    const float sa = p[0], ua = p[1], sb = p[2], ub = p[3], lo = p[4], hi = p[5];       \
    const int c = g[3];                                                                 \
    BY_KINDS(FADDP_LOOP, FP_I, FP_F)
#define FADDP_ARGS const int32_t *g, int32_t fa, const void *x0, int32_t ka, int32_t fb,  \
                   const void *x1, int32_t kb, const float *p, float *restrict y
static void faddp_generic(FADDP_ARGS) { FADDP_BODY }
#if FBI_X86
/* 8 values of an operand as floats: codes (k - kofs) * scale + sub, two roundings, or floats */
#define FPV_I(x, vo, vs, vu, e)                                                         \
    _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepi16_epi32( \
        _mm_loadu_si128((const __m128i *)((const int16_t *)(x) + (e)))), vo)), vs), vu)
#define FPV_F(x, vo, vs, vu, e) _mm256_loadu_ps((const float *)(x) + (e))
/* 8 channels per vector; the window's taps outside, the channels inside (the maxima in the
 * output row, in L1). min/max operand order as the scalar code's: max_ps(lo, v) is
 * lo > v ? lo : v, min_ps(hi, v) is hi < v ? hi : v, max_ps(v, m) is v > m ? v : m (the same
 * zero signs too) */
#define FADDP_VLOOP(VA, VB)                                                             \
    for (int i = 0; i < g[0]; i++)                                                      \
        for (int oy = 0; oy < g[4]; oy++)                                               \
            for (int ox = 0; ox < g[5]; ox++) {                                         \
                float *q = y + (((int64_t)i * g[4] + oy) * g[5] + ox) * c;              \
                for (int j = 0; j < c; j += 8) _mm256_storeu_ps(q + j, ninf);           \
                for (int ky = 0; ky < kh; ky++) {                                       \
                    int iy = oy * sh - ph + ky;                                         \
                    if (iy < 0 || iy >= h) continue;                                    \
                    for (int kx = 0; kx < kw; kx++) {                                   \
                        int ix = ox * sw - pw + kx;                                     \
                        if (ix < 0 || ix >= w) continue;                                \
                        int64_t e = (((int64_t)i * h + iy) * w + ix) * c;               \
                        for (int j = 0; j < c; j += 8, e += 8) {                        \
                            __m256 v = _mm256_add_ps(VA(x0, oa, vsa, vua, e),           \
                                                     VB(x1, ob, vsb, vub, e));          \
                            v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, v));              \
                            _mm256_storeu_ps(q + j, _mm256_max_ps(v, _mm256_loadu_ps(q + j))); \
                        }                                                               \
                    }                                                                   \
                }                                                                       \
            }
AVX2 static void faddp_avx2(FADDP_ARGS) {
    if (g[3] % 8) { FADDP_BODY return; }
    const int c = g[3];
    const __m256 vsa = _mm256_set1_ps(p[0]), vua = _mm256_set1_ps(p[1]);
    const __m256 vsb = _mm256_set1_ps(p[2]), vub = _mm256_set1_ps(p[3]);
    const __m256 vlo = _mm256_set1_ps(p[4]), vhi = _mm256_set1_ps(p[5]);
    const __m256i oa = _mm256_set1_epi32(ka), ob = _mm256_set1_epi32(kb);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    const int h = g[1], w = g[2], kh = g[6], kw = g[7], sh = g[8], sw = g[9], ph = g[10],
              pw = g[11];
    BY_KINDS(FADDP_VLOOP, FPV_I, FPV_F)
}

/* faddp_avx2 for the common 2 x 2 window at stride 2 without padding, 16 channels per vector:
 * a window's four sums are maxed in registers (faddp_avx2 stores and reloads the running
 * maximum in the output row at every tap). The same operations per lane in the same order:
 * each operand's value, the sum, max_ps(lo, v), min_ps(hi, v), then max_ps(v, m) from m = -inf
 * over the taps (0,0), (0,1), (1,0), (1,1): bit for bit faddp_avx2's results. */
#define FPZ_I(x, vo, vs, vu, e)                                                         \
    _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepi16_epi32( \
        _mm256_loadu_si256((const __m256i *)((const int16_t *)(x) + (e)))), vo)), vs), vu)
#define FPZ_F(x, vo, vs, vu, e) _mm512_loadu_ps((const float *)(x) + (e))
#define FADDP2_LOOP(VA, VB)                                                             \
    for (int i = 0; i < g[0]; i++)                                                      \
        for (int oy = 0; oy < oh; oy++)                                                 \
            for (int ox = 0; ox < ow; ox++) {                                           \
                float *q = y + (((int64_t)i * oh + oy) * ow + ox) * c;                  \
                int64_t e0 = (((int64_t)i * h + 2 * oy) * w + 2 * ox) * c;              \
                const int64_t t[4] = {0, c, (int64_t)w * c, (int64_t)w * c + c};        \
                for (int j = 0; j < c; j += 16) {                                       \
                    __m512 m = ninf;                                                    \
                    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {               \
                        int64_t e = e0 + t[k] + j;                                      \
                        __m512 v = _mm512_add_ps(VA(x0, oa, vsa, vua, e),               \
                                                 VB(x1, ob, vsb, vub, e));              \
                        v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v));                  \
                        m = _mm512_max_ps(v, m);                                        \
                    }                                                                   \
                    _mm512_storeu_ps(q + j, m);                                         \
                }                                                                       \
            }
VNNI static void faddp2_512(FADDP_ARGS) {
    const int c = g[3], h = g[1], w = g[2], oh = g[4], ow = g[5];
    SUM512_CONSTS
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    BY_KINDS(FADDP2_LOOP, FPZ_I, FPZ_F)
}

/* faddp2_512's geometry: 2 x 2 windows, stride 2, no padding, whole vectors of channels, every
 * window inside the map */
static int faddp2_fits(const int32_t *g) {
    return g[6] == 2 && g[7] == 2 && g[8] == 2 && g[9] == 2 && g[10] == 0 && g[11] == 0 &&
           g[3] % 16 == 0 && g[4] >= 1 && g[5] >= 1 && 2 * g[4] <= g[1] && 2 * g[5] <= g[2];
}
#endif

/* NHWC max pooling of float maps (padding never wins: -inf) */
#define FPOOL_BODY                                                                      \
    for (int i = 0; i < n; i++)                                                         \
        for (int oy = 0; oy < oh; oy++)                                                 \
            for (int ox = 0; ox < ow; ox++) {                                           \
                float *q = y + (((int64_t)i * oh + oy) * ow + ox) * c;                  \
                for (int j = 0; j < c; j++) q[j] = -INFINITY;                           \
                for (int ky = 0; ky < kh; ky++) {                                       \
                    int iy = oy * sh - ph + ky * dh;                                    \
                    if (iy < 0 || iy >= h) continue;                                    \
                    for (int kx = 0; kx < kw; kx++) {                                   \
                        int ix = ox * sw - pw + kx * dw;                                \
                        if (ix < 0 || ix >= w) continue;                                \
                        const float *p = x + (((int64_t)i * h + iy) * w + ix) * c;      \
                        for (int j = 0; j < c; j++) q[j] = p[j] > q[j] ? p[j] : q[j];   \
                    }                                                                   \
                }                                                                       \
            }
#define FPOOL_ARGS int32_t n, int32_t h, int32_t w, int32_t c, int32_t oh, int32_t ow,   \
                   int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph, int32_t pw, \
                   int32_t dh, int32_t dw, const float *restrict x, float *restrict y
static void fpool_generic(FPOOL_ARGS) { FPOOL_BODY }
#if FBI_X86
AVX2 static void fpool_avx2(FPOOL_ARGS) {
    if (c % 8) { FPOOL_BODY return; }
    /* 8 channels per vector, the maximum kept in a register: max_ps(p, m) is p > m ? p : m,
     * the same maximum over the same taps in the same order */
    for (int i = 0; i < n; i++)
        for (int oy = 0; oy < oh; oy++)
            for (int ox = 0; ox < ow; ox++) {
                float *q = y + (((int64_t)i * oh + oy) * ow + ox) * c;
                for (int j = 0; j < c; j += 8) {
                    __m256 m = _mm256_set1_ps(-INFINITY);
                    for (int ky = 0; ky < kh; ky++) {
                        int iy = oy * sh - ph + ky * dh;
                        if (iy < 0 || iy >= h) continue;
                        for (int kx = 0; kx < kw; kx++) {
                            int ix = ox * sw - pw + kx * dw;
                            if (ix < 0 || ix >= w) continue;
                            m = _mm256_max_ps(_mm256_loadu_ps(
                                    x + (((int64_t)i * h + iy) * w + ix) * c + j), m);
                        }
                    }
                    _mm256_storeu_ps(q + j, m);
                }
            }
}
#endif

/* global average of a float NHWC map: y[i][j] = (sum over pixels, in order) / hw */
void fbi_global_avg_f32(int32_t n, int32_t hw, int32_t c, const float *x, float *y) {
    for (int i = 0; i < n; i++) {
        float *q = y + (int64_t)i * c;
        for (int j = 0; j < c; j++) q[j] = 0.0f;
        for (int p = 0; p < hw; p++) {
            const float *r = x + ((int64_t)i * hw + p) * c;
            for (int j = 0; j < c; j++) q[j] += r[j];
        }
        for (int j = 0; j < c; j++) q[j] /= (float)hw;
    }
}

/* ----------------------------------------------------------------- images of 8-bit pixels */

/* 1 where every value of the n images (NCHW, c planes of hw floats) is k / 255 rounded to
 * float32 (uint8 / 255, bit for bit; -0 passes as code 0) for an integer k in [0, 255], the
 * codes k written NHWC to y with cy channels per pixel (cy >= c; the others are left as they
 * are: zeros), as bytes where `bytes`, else int16; else 0 (y partly written). See
 * integer_grid.py. */
static inline int grid_px(float v, void *y, int64_t at, int bytes) {
    if (!(v >= 0.0f && v <= 1.0f)) return 0;
    int k = (int)nearbyintf(v * 255.0f);
    if (bytes) ((uint8_t *)y)[at] = (uint8_t)k;
    else ((int16_t *)y)[at] = (int16_t)k;
    return (float)k / 255.0f == v;
}

static int grid_generic(int64_t n, int c, int64_t hw, int cy, int bytes, const float *x,
                        void *y) {
    for (int64_t i = 0; i < n; i++)
        for (int ch = 0; ch < c; ch++) {
            const float *p = x + (i * c + ch) * hw;
            for (int64_t j = 0; j < hw; j++)
                if (!grid_px(p[j], y, (i * hw + j) * cy + ch, bytes)) return 0;
        }
    return 1;
}

#if FBI_X86
AVX2 static int grid_avx2(int64_t n, int c, int64_t hw, int cy, int bytes, const float *x,
                          void *y) {
    const __m256 s = _mm256_set1_ps(255.0f);
    const __m256i hi = _mm256_set1_epi32(255);
    int32_t k[8];
    for (int64_t i = 0; i < n; i++)
        for (int ch = 0; ch < c; ch++) {
            const float *p = x + (i * c + ch) * hw;
            int64_t at = i * hw * cy + ch, j = 0;
            for (; j + 8 <= hw; j += 8) {
                __m256 v = _mm256_loadu_ps(p + j);
                __m256i kk = _mm256_cvtps_epi32(_mm256_mul_ps(v, s)); /* nearest (MXCSR) */
                __m256 back = _mm256_div_ps(_mm256_cvtepi32_ps(kk), s);
                /* k in [0, 255] (unsigned: min(k, 255) == k; NaN and overflow give
                 * 0x80000000) and its quotient == v */
                __m256i in = _mm256_cmpeq_epi32(_mm256_min_epu32(kk, hi), kk);
                __m256i eq = _mm256_castps_si256(_mm256_cmp_ps(back, v, _CMP_EQ_OQ));
                if (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_and_si256(in, eq))) != 0xFF)
                    return 0;
                _mm256_storeu_si256((__m256i *)k, kk);
                if (bytes)
                    for (int t = 0; t < 8; t++) ((uint8_t *)y)[at + (j + t) * cy] = (uint8_t)k[t];
                else
                    for (int t = 0; t < 8; t++) ((int16_t *)y)[at + (j + t) * cy] = (int16_t)k[t];
            }
            for (; j < hw; j++)
                if (!grid_px(p[j], y, at + j * cy, bytes)) return 0;
        }
    return 1;
}
#endif

/* ----------------------------------------------------------------- float streams as planes
 * A 1x1 layer (stride 1, no padding, one group) reading a float NHWC map proven >= 0, with
 * integer weights k (W = sw k per output channel; integer_planes.py). Per layer a power of
 * two delta = 2^e with every value of the map below 2^24 delta (e from a bound proven at
 * compile time); each value x becomes m = RNE(x 2^-e) (ties to even; the product is exact,
 * and where it would be subnormal m = 0 either way), so |x - m delta| <= delta / 2. The sums
 * S = sum k m are exact integers, S_f = RN(S) rounds them to float32 once, and the layer's own
 * epilogue runs on S_f with sacc = sw delta (integer_planes made it, exactly), the IEEE
 * operations the float layer runs on its float sums (with sacc = 1). Each path gets S its own
 * way, exactly:
 *   VNNI: byte planes m = b2 2^16 + b1 2^8 + b0, three u8 x s8 sums acc_j = sum k b_j
 *     (vpdpbusd), lo = acc1 256 + acc0 (int32: |lo| <= 65535 sum|k| < 2^31 for the
 *     sum|k| <= 32768 integer_planes checks), S = acc2 65536 + lo;
 *   AVX2: int16 planes of 12 bits m = h 4096 + l, A = sum k h, B = sum k l (vpmaddwd),
 *     S = 4096 A + B;
 *   generic: S = sum k m in int64;
 * and RN(S) is one float whatever the split, so every path gives the same outputs. RN(S)
 * without int64: S = 65536 H + L with L in [0, 65535] and |H| <= 256 sum|k| + 1 < 2^24, both
 * floats exactly, and fma(H, 65536, L) rounds S once (plane_round, plane_sum512 / _avx2).
 * The map is converted a tile of pixels at a time, into a buffer on the stack (it stays in L1,
 * read by the tile's sums right after), and every m is checked to lie in [0, 2^24): NaN, inf,
 * a value < -delta / 2 or one beyond the bound (only a bug could make them) fail the check,
 * and the image then runs the float layer (its outputs all rewritten). So does an image whose
 * largest m is below 2^16 (byte plane 2 all zero: the map's max below 2^-8 of the bound's
 * power of two): delta / 2 is then not small against the image's own values (a bound far
 * above the values, e.g. a quantizer range never reached, made every m 0 and the outputs the
 * bias alone); with the top byte plane in use each value moves by at most 2^-17 of the
 * image's largest, the float layer's own worst case for 128 inputs. */
#define PLANE_CIN_MAX 1024 /* the tiles' plane buffers live on the stack (16 KB) */

/* 1 where the OR of an image's m is in [2^16, 2^24): every m fits, the largest >= 2^16 */
static inline int plane_fits(uint32_t seen) {
    return !(seen & 0xFF000000u) && (seen & 0x00FF0000u);
}

/* tests only: nonzero swaps bytes 0 and 1 of every m (a planted wrong byte order, which the
 * accuracy tests must catch) */
int fbi_plane_fault = 0;

static inline float pow2f(int e) { /* 2^e, e in [-126, 127] */
    uint32_t b = (uint32_t)(e + 127) << 23;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline int32_t plane_fault(int32_t m) {
    return fbi_plane_fault ? (m & ~0xFFFF) | ((m & 0xFF) << 8) | ((m >> 8) & 0xFF) : m;
}

/* RN(S) for S = 65536 h + l, l in [0, 65535], |h| < 2^24 (see above) */
static inline float plane_round(int64_t s) {
    int64_t l = s & 0xFFFF;
    return fmaf((float)((s - l) / 65536), 65536.0f, (float)l);
}

/* generic: the m of one pixel's cin values; 0 where one lies outside [0, 2^24) */
static int plane_px_generic(const float *x, int cin, float s, int32_t *m) {
    uint32_t bad = 0;
    for (int c = 0; c < cin; c++) {
        /* NaN, inf and |v| >= 2^31 convert to INT32_MIN on x86; elsewhere the range test
         * comes first */
        const float v = __builtin_roundevenf(x[c] * s);
        m[c] = v >= 0.0f && v < 16777216.0f ? plane_fault((int32_t)v) : INT32_MIN;
        bad |= (uint32_t)m[c];
    }
    return !(bad & 0xFF000000u);
}

static int plane_image_generic(const fbi_conv *t, int e, const float *x, char *Y) {
    const int cin = t->cin, kp = t->kp, esize = t->out_kind == OUT_FLOAT ? 4 : 2;
    const int16_t *B = (const int16_t *)t->wpack;
    const int64_t rows = (int64_t)t->h * t->w;
    int32_t m[PLANE_CIN_MAX];
    uint32_t seen = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (!plane_px_generic(x + r * cin, cin, pow2f(-e), m)) return 0;
        for (int c = 0; c < cin; c++) seen |= (uint32_t)m[c];
        for (int o = 0; o < t->cout; o++) {
            const int16_t *bb = B + (int64_t)(o / NB) * kp * NB + (o % NB) * 2;
            int64_t s = 0;
            for (int c = 0; c < cin; c++) s += (int64_t)bb[(c / 2) * NB * 2 + c % 2] * m[c];
            store1(t, pre_value(plane_round(s), o, t), o, Y + r * t->cout * esize);
        }
    }
    return plane_fits(seen);
}

#if FBI_X86
/* AVX2: one pixel's two int16 planes of kp values (m >> 12, then m & 4095; channels past cin
 * 0); 0 where an m lies outside [0, 2^24); the OR of its m into *seen */
AVX2 static int plane_px_avx2(const float *x, int cin, int kp, float sf, int16_t *h,
                              uint32_t *seen) {
    const __m256 s = _mm256_set1_ps(sf);
    int16_t *l = h + kp;
    __m256i bad = _mm256_setzero_si256();
    const __m256i low = _mm256_set1_epi32(0xFFF);
    int c = 0;
    for (; c + 8 <= cin; c += 8) {
        __m256i m = _mm256_cvttps_epi32(_mm256_round_ps(
            _mm256_mul_ps(_mm256_loadu_ps(x + c), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        if (fbi_plane_fault)
            m = _mm256_or_si256(
                _mm256_and_si256(m, _mm256_set1_epi32(~0xFFFF)),
                _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(m, _mm256_set1_epi32(0xFF)), 8),
                                _mm256_and_si256(_mm256_srli_epi32(m, 8), _mm256_set1_epi32(0xFF))));
        bad = _mm256_or_si256(bad, m);
        const __m256i hi = _mm256_srli_epi32(m, 12), lo = _mm256_and_si256(m, low);
        _mm_storeu_si128((__m128i *)(h + c), _mm_packs_epi32(_mm256_castsi256_si128(hi),
                                                             _mm256_extracti128_si256(hi, 1)));
        _mm_storeu_si128((__m128i *)(l + c), _mm_packs_epi32(_mm256_castsi256_si128(lo),
                                                             _mm256_extracti128_si256(lo, 1)));
    }
    int32_t t[8];
    _mm256_storeu_si256((__m256i *)t, bad);
    uint32_t b = 0;
    for (int j = 0; j < 8; j++) b |= (uint32_t)t[j];
    for (; c < cin; c++) {
        int32_t m;
        b |= (uint32_t)!plane_px_generic(x + c, 1, sf, &m) << 24 | (uint32_t)m;
        h[c] = (int16_t)((m >> 12) & 0xFFF), l[c] = (int16_t)(m & 0xFFF);
    }
    for (; c < kp; c++) h[c] = l[c] = 0;
    *seen |= b;
    return !(b & 0xFF000000u);
}

/* RN(4096 A + B) (see above) */
AVX2 static inline __attribute__((always_inline)) __m256 plane_sum_avx2(__m256i a, __m256i b) {
    const __m256i t = _mm256_add_epi32(
        _mm256_slli_epi32(_mm256_and_si256(a, _mm256_set1_epi32(15)), 12), b);
    const __m256i h = _mm256_add_epi32(_mm256_srai_epi32(a, 4), _mm256_srai_epi32(t, 16));
    const __m256i l = _mm256_and_si256(t, _mm256_set1_epi32(0xFFFF));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_set1_ps(65536.0f), _mm256_cvtepi32_ps(l));
}

/* 2 pixels (planes at px[r], px[r] + kp) x 16 channels (block bb of the int16 packing
 * [kp/2][16][2]), both planes (8 accumulators: with 3 pixels they did not fit the 16
 * registers and went through memory, 1.4x slower), then the epilogue */
AVX2 static void plane_tile_avx2(const fbi_ep *e, const int16_t *const *px, int kp,
                                 const int16_t *bb, int n, int cnt, char **dst) {
    enum { R = 2 };
    __m256i a0[2][R], a1[2][R]; /* plane h, plane l */
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
        a0[0][r] = a0[1][r] = a1[0][r] = a1[1][r] = _mm256_setzero_si256();
    for (int p = 0; p < kp / 2; p++) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(bb + p * NB * 2));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(bb + p * NB * 2 + 16));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            int32_t dh, dl;
            memcpy(&dh, px[r] + 2 * p, 4), memcpy(&dl, px[r] + kp + 2 * p, 4);
            const __m256i vh = _mm256_set1_epi32(dh), vl = _mm256_set1_epi32(dl);
            a0[0][r] = _mm256_add_epi32(a0[0][r], _mm256_madd_epi16(vh, w0));
            a0[1][r] = _mm256_add_epi32(a0[1][r], _mm256_madd_epi16(vh, w1));
            a1[0][r] = _mm256_add_epi32(a1[0][r], _mm256_madd_epi16(vl, w0));
            a1[1][r] = _mm256_add_epi32(a1[1][r], _mm256_madd_epi16(vl, w1));
        }
    }
    __m256 v[2 * R];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        v[2 * r] = plane_sum_avx2(a0[0][r], a1[0][r]);
        v[2 * r + 1] = plane_sum_avx2(a0[1][r], a1[1][r]);
    }
    epi_tile(e, v, R, n, cnt, dst);
}

AVX2 static int plane_image_avx2(const fbi_conv *t, int e, const float *x, char *Y) {
    fbi_ep ep;
    ep_init(t, &ep);
    const int kp = t->kp, cin = t->cin, esize = ep.out_float ? 4 : 2, nb = (t->cout + NB - 1) / NB;
    const int64_t ldy = (int64_t)t->cout * esize, rows = (int64_t)t->h * t->w;
    const float s = pow2f(-e);
    int16_t tb[2 * 2 * PLANE_CIN_MAX];
    uint32_t seen = 0;
    for (int64_t r0 = 0; r0 < rows; r0 += 2) {
        const int16_t *px[2];
        char *dst[2];
        for (int q = 0; q < 2; q++) { /* rows past the map: the tile's first again, not stored */
            const int in = r0 + q < rows;
            if (in && !plane_px_avx2(x + (r0 + q) * cin, cin, kp, s, tb + q * 2 * kp, &seen))
                return 0;
            px[q] = tb + (in ? q : 0) * 2 * kp;
            dst[q] = in ? Y + (r0 + q) * ldy : NULL;
        }
        for (int b = 0; b < nb; b++) {
            const int cnt = t->cout - b * NB < NB ? t->cout - b * NB : NB;
            plane_tile_avx2(&ep, px, kp, (const int16_t *)t->wpack + (int64_t)b * kp * NB, b * NB,
                            cnt, dst);
        }
    }
    return plane_fits(seen);
}

/* VNNI: one pixel's kq4 / 4 quads of 16 bytes: bytes 0, 1, 2 (then 3: always 0 here) of the m
 * of its 4 channels (channels past cin 0), a 4 x 4 byte transpose within each 128-bit lane;
 * returns the OR of its m (bits 24.. set: an m outside [0, 2^24)) */
VNNI static inline __attribute__((always_inline)) __m512i plane_px_512(const float *x, int cin,
                                                                       int kq4, __m512 s,
                                                                       __m512i tr, uint8_t *p) {
    __m512i bad = _mm512_setzero_si512();
    for (int c = 0; c < kq4; c += 16) {
        __m512 v;
        if (cin - c >= 16) v = _mm512_loadu_ps(x + c);
        else v = _mm512_maskz_loadu_ps((__mmask16)((1u << (cin - c)) - 1), x + c);
        const __m512i m = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, s),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        bad = _mm512_or_si512(bad, m);
        const __m512i b = _mm512_shuffle_epi8(m, tr);
        if (kq4 - c >= 16) _mm512_storeu_si512((void *)(p + 4 * c), b);
        else _mm512_mask_storeu_epi32(p + 4 * c, (__mmask16)((1u << (kq4 - c)) - 1), b);
    }
    return bad;
}

VNNI static inline __attribute__((always_inline)) __m512i plane_tr512(void) {
    return fbi_plane_fault /* bytes 1, 0 swapped */
        ? _mm512_broadcast_i32x4(_mm_setr_epi8(1, 5, 9, 13, 0, 4, 8, 12, 2, 6, 10, 14, 3, 7, 11, 15))
        : _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
}

/* RN(65536 acc2 + 256 acc1 + acc0) (see above) */
VNNI static inline __attribute__((always_inline)) __m512 plane_sum512(__m512i c2, __m512i c1,
                                                                     __m512i c0) {
    const __m512i lo = _mm512_add_epi32(_mm512_slli_epi32(c1, 8), c0);
    const __m512i h = _mm512_add_epi32(c2, _mm512_srai_epi32(lo, 16));
    const __m512i l = _mm512_and_si512(lo, _mm512_set1_epi32(0xFFFF));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_set1_ps(65536.0f), _mm512_cvtepi32_ps(l));
}

/* the epilogue of 4 pixels x nblk blocks of 16 channels n.. from the planes' sums o[b][j][r]
 * (acc_j of pixel r, block b): RN(S), then the float layers' 16-lane epilogue; one copy per
 * kind of epilogue (K < 0: flags at run time, float outputs included) */
typedef void (*plane_store_fn)(const fbi_ep *, const __m512i (*)[3][4], int, int, int, char **);
VNNI static inline __attribute__((always_inline)) void plane_store_k(
    const fbi_ep *e, const __m512i (*o)[3][4], int nblk, int n, int og, char **dst, int K) {
    for (int b = 0; b < nblk; b++) {
        __m512 v[UR1 + 1];
        for (int r = 0; r < 4; r++) v[r] = plane_sum512(o[b][2][r], o[b][1][r], o[b][0][r]);
        const int n0 = n + b * NB;
        epi512_v_k(e, v, 4, n0, og - n0 < NB ? og - n0 : NB, dst, K);
    }
}
#define PLANE_STORE(K)                                                                  \
    VNNI static __attribute__((noinline)) void plane_store_##K(                         \
        const fbi_ep *e, const __m512i (*o)[3][4], int nblk, int n, int og, char **dst) { \
        plane_store_k(e, o, nblk, n, og, dst, K);                                       \
    }
EK_KINDS(PLANE_STORE)
#undef PLANE_STORE
VNNI static __attribute__((noinline)) void plane_store_g(
    const fbi_ep *e, const __m512i (*o)[3][4], int nblk, int n, int og, char **dst) {
    plane_store_k(e, o, nblk, n, og, dst, -1); /* the flags tested at run time */
}
#define ENTRY(K) plane_store_##K,
static const plane_store_fn plane_store[EK_N] = {EK_KINDS(ENTRY)};
#undef ENTRY

/* 4 pixels (planes at px[r]) x nblk blocks of 16 channels x 3 planes: 12 nblk accumulators,
 * each weight quad feeds 12 nblk vpdpbusd (at vpdpbusd's peak); then the tile's epilogue */
VNNI static inline __attribute__((always_inline)) void plane_tile_body(
    const fbi_ep *e, plane_store_fn st, const uint8_t *const *px, int nq, const int8_t *bb,
    int64_t bstride, int n, int og, char **dst, const int nblk) {
    /* one array per plane (a single [3][2][4] array was kept in memory, not in registers) */
    __m512i a0[2][4], a1[2][4], a2[2][4];
    const int64_t d1 = px[1] - px[0], d2 = px[2] - px[0], d3 = px[3] - px[0];
#pragma GCC unroll 2
    for (int b = 0; b < nblk; b++)
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) a0[b][r] = a1[b][r] = a2[b][r] = _mm512_setzero_si512();
    const uint8_t *p = px[0];
    for (int q = 0; q < nq; q++, p += 16, bb += NB * 4) {
        __m512i w[2];
#pragma GCC unroll 2
        for (int b = 0; b < nblk; b++) w[b] = _mm512_loadu_si512((const void *)(bb + b * bstride));
#define PLANE_ROW(r, o)                                                                   \
        {                                                                                 \
            int32_t q0, q1, q2;                                                           \
            memcpy(&q0, p + (o), 4), memcpy(&q1, p + (o) + 4, 4), memcpy(&q2, p + (o) + 8, 4); \
            const __m512i v0 = _mm512_set1_epi32(q0), v1 = _mm512_set1_epi32(q1),         \
                          v2 = _mm512_set1_epi32(q2);                                     \
            for (int b = 0; b < nblk; b++) {                                              \
                a0[b][r] = _mm512_dpbusd_epi32(a0[b][r], v0, w[b]);                      \
                a1[b][r] = _mm512_dpbusd_epi32(a1[b][r], v1, w[b]);                      \
                a2[b][r] = _mm512_dpbusd_epi32(a2[b][r], v2, w[b]);                      \
            }                                                                             \
        }
        PLANE_ROW(0, 0) PLANE_ROW(1, d1) PLANE_ROW(2, d2) PLANE_ROW(3, d3)
#undef PLANE_ROW
    }
    /* copies for the epilogue, so that the accumulators' addresses are never taken: they stay
     * in registers (summed and rounded here, they went through memory in the loop too) */
    __m512i o[2][3][4];
#pragma GCC unroll 2
    for (int b = 0; b < nblk; b++)
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) o[b][0][r] = a0[b][r], o[b][1][r] = a1[b][r], o[b][2][r] = a2[b][r];
    st(e, (const __m512i (*)[3][4])o, nblk, n, og, dst);
}

VNNI static __attribute__((noinline)) void plane_tile2(const fbi_ep *e, plane_store_fn st,
                                                       const uint8_t *const *px, int nq,
                                                       const int8_t *bb, int64_t bstride, int n,
                                                       int og, char **dst) {
    plane_tile_body(e, st, px, nq, bb, bstride, n, og, dst, 2);
}

VNNI static __attribute__((noinline)) void plane_tile1(const fbi_ep *e, plane_store_fn st,
                                                       const uint8_t *const *px, int nq,
                                                       const int8_t *bb, int64_t bstride, int n,
                                                       int og, char **dst) {
    plane_tile_body(e, st, px, nq, bb, bstride, n, og, dst, 1);
}

VNNI static int plane_image_512(const fbi_conv *t, int e, const float *x, char *Y) {
    fbi_ep ep;
    ep_init(t, &ep); /* no ep_fold: the exact fold is left to the float layers */
    const plane_store_fn st = ep.out_float ? plane_store_g : plane_store[ep.kind];
    const int cin = t->cin, kq4 = t->kq4, nq = kq4 / 4, nb = (t->cout + NB - 1) / NB;
    const int64_t ldy = (int64_t)t->cout * (ep.out_float ? 4 : 2), bstride = (int64_t)kq4 * NB;
    const int64_t rows = (int64_t)t->h * t->w, tile = 4 * (int64_t)kq4;
    const __m512 s = _mm512_set1_ps(pow2f(-e));
    const __m512i tr = plane_tr512();
    __m512i bad = _mm512_setzero_si512();
    /* a tile's planes on the stack: written, then read by its sums from L1 (a whole image's
     * planes through L2 cost ~2 us more at 32 x 32; converting the next tile first, no gain) */
    uint8_t tb[4 * 4 * PLANE_CIN_MAX] __attribute__((aligned(64)));
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        const uint8_t *px[4];
        char *dst[4];
        for (int q = 0; q < 4; q++) { /* rows past the map: the tile's first again, not stored */
            const int in = r0 + q < rows;
            if (in)
                bad = _mm512_or_si512(bad, plane_px_512(x + (r0 + q) * cin, cin, kq4, s, tr,
                                                        tb + q * tile));
            px[q] = tb + (in ? q : 0) * tile;
            dst[q] = in ? Y + (r0 + q) * ldy : NULL;
        }
        for (int b = 0; b < nb; b += 2) {
            const int8_t *bb = t->wpack8 + b * bstride;
            if (nb - b >= 2) plane_tile2(&ep, st, px, nq, bb, bstride, b * NB, t->cout, dst);
            else plane_tile1(&ep, st, px, nq, bb, bstride, b * NB, t->cout, dst);
        }
    }
    /* an m outside [0, 2^24) anywhere, or none >= 2^16: the caller reruns the image on the
     * float layer */
    return !_mm512_test_epi32_mask(bad, _mm512_set1_epi32((int)0xFF000000u)) &&
           _mm512_test_epi32_mask(bad, _mm512_set1_epi32(0x00FF0000));
}

/* tests: one pixel's planes (plane_px_512): 1 where an m falls outside [0, 2^24) */
VNNI static int plane_px_512_out(const float *x, int cin, int kq4, int e, uint8_t *p) {
    const __m512i bad = plane_px_512(x, cin, kq4, _mm512_set1_ps(pow2f(-e)), plane_tr512(), p);
    return _mm512_test_epi32_mask(bad, _mm512_set1_epi32((int)0xFF000000u)) != 0;
}

VNNI static float plane_sum1_512(int32_t a, int32_t b, int32_t c) {
    return _mm512_cvtss_f32(plane_sum512(_mm512_set1_epi32(a), _mm512_set1_epi32(b),
                                         _mm512_set1_epi32(c)));
}

AVX2 static float plane_sum1_avx2(int32_t a, int32_t b) {
    return _mm256_cvtss_f32(plane_sum_avx2(_mm256_set1_epi32(a), _mm256_set1_epi32(b)));
}
#endif

/* one image of the layer on its planes; 0 where an m fell outside [0, 2^24) (the caller runs
 * the float layer on the image) */
static int plane_image(int isa, const fbi_conv *t, int e, const float *x, char *Y) {
#if FBI_X86
    if (isa == ISA_AVX512_VNNI && t->wpack8) return plane_image_512(t, e, x, Y);
    if (USE_AVX2(isa)) return plane_image_avx2(t, e, x, Y);
#endif
    (void)isa;
    return plane_image_generic(t, e, x, Y);
}

/* fbi_run's kind 9: tw the layer on planes (i[0] its exponent e, x1 two int64 counters: images
 * on planes, images on the float layer), fa the float layer (the next step, whose map and
 * output are read and written), image by image */
static int plane_run(const fbi_conv *tw, int e, int64_t *count, const fbi_conv *fa, int32_t isa) {
    if (!fbi_isa_supported(isa)) return -1;
    if (tw->in_kind != IN_INT || fa->in_kind != IN_FLOAT_NHWC || tw->cout != fa->cout ||
        tw->cin != fa->cin || tw->h != fa->h || tw->w != fa->w || fa->kh != 1 || fa->kw != 1 ||
        fa->sh != 1 || fa->sw != 1 || fa->ph || fa->pw || fa->groups != 1 || fa->oh != fa->h ||
        fa->ow != fa->w || tw->out_kind != fa->out_kind || tw->out_u8 || fa->out_u8 ||
        tw->cin > PLANE_CIN_MAX || tw->kp < tw->cin || tw->kp % 2 || tw->corr ||
        (tw->wpack8 && (tw->kq4 < tw->cin || tw->kq4 % 4 || tw->kq4 > PLANE_CIN_MAX)) ||
        e < -126 || e > 126)
        return -2;
    const int64_t in_img = (int64_t)fa->h * fa->w * fa->cin;
    const int64_t out_img = (int64_t)fa->oh * fa->ow * fa->cout * (fa->out_kind == OUT_FLOAT ? 4 : 2);
    int bad = 0;
    for (int i = 0; i < fa->n; i++) {
        const float *x = (const float *)fa->x + i * in_img;
        char *Y = (char *)fa->y + i * out_img;
        if (plane_image(isa, tw, e, x, Y)) {
            count[0]++;
            continue;
        }
        fbi_conv one = *fa;
        one.n = 1, one.x = x, one.y = Y;
        const int rc = fbi_conv_run(&one);
        if (rc < 0) return rc;
        bad |= rc;
        count[1]++;
    }
    return bad;
}

/* tests: the planes path isa writes for `rows` pixels of cin floats with exponent e (width:
 * kq4 on VNNI, kp on AVX2, cin for the generic int32 m; NHWC); 1, 0 where an m falls outside
 * [0, 2^24), -1 where isa cannot run here */
int fbi_plane_codes(int32_t isa, const float *x, int64_t rows, int32_t cin, int32_t width,
                    int32_t e, void *out) {
    if (!fbi_isa_supported(isa) || cin > PLANE_CIN_MAX || width < cin) return -1;
    int ok = 1;
    for (int64_t r = 0; r < rows; r++) {
#if FBI_X86
        if (isa == ISA_AVX512_VNNI) {
            ok &= !plane_px_512_out(x + r * cin, cin, width, e, (uint8_t *)out + r * 4 * width);
            continue;
        }
        if (USE_AVX2(isa)) {
            uint32_t seen = 0;
            ok &= plane_px_avx2(x + r * cin, cin, width, pow2f(-e),
                                (int16_t *)out + r * 2 * width, &seen);
            continue;
        }
#endif
        ok &= plane_px_generic(x + r * cin, cin, pow2f(-e), (int32_t *)out + r * cin);
    }
    return ok;
}

/* tests: the rounding of the sums, n of them, on path isa: VNNI RN(65536 a + 256 b + c), AVX2
 * RN(4096 a + b), generic RN(65536 a + 256 b + c) of the int64 sum */
int fbi_plane_sum(int32_t isa, int64_t n, const int32_t *a, const int32_t *b, const int32_t *c,
                  float *out) {
    if (!fbi_isa_supported(isa)) return -1;
    for (int64_t i = 0; i < n; i++) {
#if FBI_X86
        if (isa == ISA_AVX512_VNNI) {
            out[i] = plane_sum1_512(a[i], b[i], c[i]);
            continue;
        }
        if (USE_AVX2(isa)) {
            out[i] = plane_sum1_avx2(a[i], b[i]);
            continue;
        }
#endif
        out[i] = plane_round((int64_t)a[i] * 65536 + (int64_t)b[i] * 256 + c[i]);
    }
    return 0;
}

/* ----------------------------------------------------------------- the program */

/* One step of a batch's program, all pointers fixed (the engine's buffers for that batch
 * size): kind 0 conv (`conv`), 1 residual sum, 2 pooling (i[0..14] = fbi_pool's integer
 * arguments), 3 global average of int codes (i[0..2] = n, hw, c; f[0] = scale), 4 float sum
 * (i[0..3] = kind a, kofs a, kind b, kofs b; work: fbi_fadd's p), 5 global average of a float
 * map (i[0..2] = n, hw, c), 6 float max pooling (i[1..14] as kind 2), 7 a float sum max
 * pooled (the sums never stored), 8 the images' 8-bit codes (i[0..4] = n, c, hw, channels
 * of a code pixel, bytes or int16; x0 the images, y the codes): the next step (the first layer on the codes) runs where every image
 * is on the grid, else the one after it (the first layer on the float images), 9 the
 * next step's 1x1 layer on a float stream, each image on its planes where every value fits
 * them (conv: the layer on planes, i[0] its exponent, x1 two int64 counters: plane_run) */
typedef struct {
    int32_t kind;
    int32_t i[16];
    float f[2];
    int64_t count;
    fbi_conv *conv;
    const void *x0, *x1;
    void *y, *work;
} fbi_step;

/* Run `ns` steps; returns 0, 1 (a quantizer after a float-input layer saw NaN/inf; every
 * step ran) or the failing conv's code (< 0). */
int fbi_run(const fbi_step *s, int32_t ns, int32_t isa) {
    int bad = 0;
    for (int k = 0; k < ns; k++, s++) {
        int rc = 0;
        switch (s->kind) {
        case 0: rc = fbi_conv_run(s->conv); break;
        case 1:
            fbi_add(isa, s->count, (const int16_t *)s->x0, (const int16_t *)s->x1, s->f[0],
                    s->f[1], s->i[0], s->i[1], (int16_t *)s->y);
            break;
        case 2:
            fbi_pool(isa, s->i[0], s->i[1], s->i[2], s->i[3], s->i[4], s->i[5], s->i[6],
                     s->i[7], s->i[8], s->i[9], s->i[10], s->i[11], s->i[12], s->i[13],
                     s->i[14], (const int16_t *)s->x0, (int16_t *)s->y, s->work);
            break;
        case 3:
            fbi_global_avg(s->i[0], s->i[1], s->i[2], (const int16_t *)s->x0, s->f[0],
                           (float *)s->y);
            break;
        case 4:
            fbi_fadd(isa, s->count, s->i[0], s->x0, s->i[1], s->i[2], s->x1, s->i[3],
                     (const float *)s->work, (float *)s->y);
            break;
        case 7: /* i[0..3] as kind 4, i[4..15] the pooling (faddp's g) */
#if FBI_X86
            if (isa == ISA_AVX512_VNNI && faddp2_fits(s->i + 4)) {
                faddp2_512(s->i + 4, s->i[0], s->x0, s->i[1], s->i[2], s->x1, s->i[3],
                           (const float *)s->work, (float *)s->y);
                break;
            }
            if (USE_AVX2(isa)) {
                faddp_avx2(s->i + 4, s->i[0], s->x0, s->i[1], s->i[2], s->x1, s->i[3],
                           (const float *)s->work, (float *)s->y);
                break;
            }
#endif
            faddp_generic(s->i + 4, s->i[0], s->x0, s->i[1], s->i[2], s->x1, s->i[3],
                          (const float *)s->work, (float *)s->y);
            break;
        case 5:
            fbi_global_avg_f32(s->i[0], s->i[1], s->i[2], (const float *)s->x0, (float *)s->y);
            break;
        case 6:
#if FBI_X86
            if (USE_AVX2(isa)) {
                fpool_avx2(s->i[1], s->i[2], s->i[3], s->i[4], s->i[5], s->i[6], s->i[7],
                           s->i[8], s->i[9], s->i[10], s->i[11], s->i[12], s->i[13], s->i[14],
                           (const float *)s->x0, (float *)s->y);
                break;
            }
#endif
            fpool_generic(s->i[1], s->i[2], s->i[3], s->i[4], s->i[5], s->i[6], s->i[7],
                          s->i[8], s->i[9], s->i[10], s->i[11], s->i[12], s->i[13], s->i[14],
                          (const float *)s->x0, (float *)s->y);
            break;
        case 8:
            if (k + 2 >= ns || s[1].kind != 0 || s[2].kind != 0) return -2;
            {
                int on;
#if FBI_X86
                if (USE_AVX2(isa))
                    on = grid_avx2(s->i[0], s->i[1], s->i[2], s->i[3], s->i[4],
                                   (const float *)s->x0, s->y);
                else
#endif
                    on = grid_generic(s->i[0], s->i[1], s->i[2], s->i[3], s->i[4],
                                      (const float *)s->x0, s->y);
                rc = fbi_conv_run(on ? s[1].conv : s[2].conv);
            }
            k += 2, s += 2;
            break;
        case 9: /* a 1x1 layer on a float stream, per image on its planes or as float */
            if (k + 1 >= ns || s[1].kind != 0) return -2;
            rc = plane_run(s->conv, s->i[0], (int64_t *)s->x1, s[1].conv, isa);
            k += 1, s += 1;
            break;
        default: return -2;
        }
        if (rc < 0) return rc;
        bad |= rc;
    }
    return bad;
}

/* The program of one image run image by image over a batch (the maps of one image stay in
 * the caches): each image is copied into `in_buf` (in_size floats), the steps run, and
 * `out_bytes` bytes of `out_buf` are copied to image i of `out`. */
/* -3 where an image holds NaN or inf (nothing runs; the caller raises), else as fbi_run */
int fbi_run_images(const fbi_step *s, int32_t ns, int32_t isa, int64_t n, const float *x,
                   int64_t in_size, float *in_buf, const void *out_buf, int64_t out_bytes,
                   void *out) {
    uint32_t nonfinite = 0;
    for (int64_t i = 0; i < n * in_size; i++) { /* exponent all ones: inf or NaN */
        uint32_t b;
        memcpy(&b, x + i, 4);
        nonfinite |= (b & 0x7f800000u) == 0x7f800000u;
    }
    if (nonfinite) return -3;
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        memcpy(in_buf, x + i * in_size, sizeof(float) * (size_t)in_size);
        int rc = fbi_run(s, ns, isa);
        if (rc < 0) return rc;
        bad |= rc;
        memcpy((char *)out + i * out_bytes, out_buf, (size_t)out_bytes);
    }
    return bad;
}

/* y[i] = rcp_div(x[i], s, RN(1 / s)) on AVX2, for tests against v / s (returns 0; -1 where
 * AVX2 is missing) */
int fbi_rcp_div(float s, int64_t n, const float *x, float *y) {
#if FBI_X86
    if (fbi_isa_supported(ISA_AVX2)) {
        fbi_rcp_div_avx2(s, n, x, y);
        return 0;
    }
#endif
    (void)s, (void)n, (void)x, (void)y;
    return -1;
}

/* 1 where the AVX2 epilogue may divide by `s` as rcp_div (see fbi_rcp_exact_avx2); 0 where it
 * divides (or cannot run here) */
int fbi_rcp_exact(float s) {
#if FBI_X86
    if (fbi_isa_supported(ISA_AVX2)) return fbi_rcp_exact_avx2(s);
#endif
    (void)s;
    return 0;
}

/* ----------------------------------------------------------------- epilogue tests */
#if FBI_X86
VNNI static int64_t epi_sums_vnni(const fbi_conv *a, int64_t m, const int32_t *acc, char *y,
                                  int mode) {
    fbi_ep e;
    ep_init(a, &e);
    ep_fold(a, &e);
    e.corr = NULL, e.kind &= ~EK_CORR; /* the sums hold the correction (as kern_vnni_body's) */
    if (mode && !e.cert) return -1;
    const int esize = e.out_u8 ? 1 : 2;
    int64_t falls = 0;
    for (int64_t r0 = 0; r0 < m; r0 += UR1) {
        char *dst[UR1];
        for (int q = 0; q < UR1; q++)
            dst[q] = r0 + q < m ? y + (r0 + q) * a->cout * esize : NULL;
        for (int n = 0; n < a->cout; n += NB) {
            int cnt = a->cout - n < NB ? a->cout - n : NB;
            __m512i c[UR1];
            for (int q = 0; q < UR1; q++)
                c[q] = r0 + q < m ? _mm512_maskz_loadu_epi32((__mmask16)((1u << cnt) - 1),
                                                              acc + (r0 + q) * a->cout + n)
                                  : _mm512_setzero_si512();
            if (mode == 0) {
                store512[e.kind](&e, c, n, cnt, dst);
            } else if (mode == 1) {
                if (epi512_cert(&e, c, UR1, n, cnt, dst, e.out_u8, e.cclamp, !e.cnocheck)) {
                    falls++;
                    store512[e.kind](&e, c, n, cnt, dst);
                }
            } else {
                epi512_cert(&e, c, UR1, n, cnt, dst, e.out_u8, e.cclamp, 0);
            }
        }
    }
    return falls;
}
#endif

/* Tests of the VNNI epilogue of `a` (an integer output) on m rows of int32 sums acc[m][cout]
 * (sums of code * weight: any zero-point correction included), written to rows of y as the
 * layer writes them (bytes code - u8shift where out_u8). mode 0: the exact epilogue; 1: the
 * certified one as the kernels run it (returns how many tiles of UR1 rows x 16 channels fell
 * back to the exact one); 2: the certified one with no check (each lane its fast code: what
 * integer_cert verifies sum by sum, and shows that the check matters); 3: the generic path's
 * scalar epilogue. -1 where VNNI is
 * missing (modes 0-2) or a certified mode finds no certificate. */
int64_t fbi_epi_sums(const fbi_conv *a, int64_t m, const int32_t *acc, void *y, int32_t mode) {
    if (a->out_kind != OUT_INT) return -1;
    if (mode == 3) {
        for (int64_t r = 0; r < m; r++)
            for (int n = 0; n < a->cout; n++) {
                int32_t k = rha_code(pre_value((float)acc[r * a->cout + n], n, a), a);
                if (a->out_u8) ((uint8_t *)y)[r * a->cout + n] = (uint8_t)(k - a->u8shift);
                else ((int16_t *)y)[r * a->cout + n] = (int16_t)k;
            }
        return 0;
    }
#if FBI_X86
    if (fbi_isa_supported(ISA_AVX512_VNNI) && a->isa == ISA_AVX512_VNNI)
        return epi_sums_vnni(a, m, acc, (char *)y, mode);
#endif
    return -1;
}
