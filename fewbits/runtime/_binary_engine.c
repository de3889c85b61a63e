/* Whole-network BinaryNet inference in one call: float stem, XNOR-popcount convolutions on
 * bit-packed activations, integer thresholds in place of batch norm + binary tanh, float head.
 *
 * Layout (as larq compute-engine's canonical bitpacking): activations are NHWC with the
 * channels of a pixel packed into 32-bit words, channel c in bit c % 32 of word c / 32, bit 1
 * meaning +1 and bit 0 meaning -1; bits past the last channel are 0 in both activations and
 * weights, so their XOR is 0 and they count nothing. A binary convolution computes, per output
 * pixel and channel, D = popcount(a XOR w) over the im2col row of the pixel (taps outside the
 * image read zero words of a zero-padded copy), subtracts the popcount of the weight words of
 * those taps (zero-padding correction, from 2-D prefix sums over the taps), and gets the exact integer sum = n_valid - 2 D of +-1 products. The output bit
 * is (sum >= T) XOR flip (T, flip from fewbits.runtime.binary_fold); with a residual input the
 * threshold is T1 where the residual bit is +1 and T0 where it is -1.
 *
 * The stem (float input, +-1 weights) accumulates the taps of each output channel in the
 * same order on every ISA (vectorized over output channels; x * +-1 is exact, so FMA or not
 * gives the same sums): all ISA paths give bit-identical results with +-1 stem weights. Other
 * float stem weights (a fixed-point or float first conv): the AVX2 / AVX-512 stems fuse each
 * multiply-add, the portable one rounds the product first, so sums can differ by rounding.
 * Images of 8-bit pixels (every value k / 255 rounded, checked per image) with +-1 stem
 * weights and thresholds: on AVX-512 with VNNI the stem sums the codes, S = sum of +-k exactly
 * (vpdpbusd), and compares S with ceil(255 T): the exact decision of S / 255 >= T, where the
 * float sums decide within rounding of T (the same bits but where a float sum lies within
 * rounding of its threshold: an untrained net's thresholds are 0, where such ties occur).
 *
 * ISA paths: AVX-512 (F + VPOPCNTDQ), AVX2 (+FMA, nibble-table popcount as Mula et al.), and
 * portable C, each compiled with a target attribute in this one file and chosen at run time.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FBB_X86 1
#else
#define FBB_X86 0
#endif

/* HEADF: float weights; POOLF: max pool of a float map; HEADM: average of a float map +
 * float affine */
enum { OP_STEM = 0, OP_BCONV = 1, OP_HEAD = 2, OP_HEADF = 3, OP_POOLF = 4, OP_HEADM = 5 };
enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

typedef struct {
    int32_t op, cin, cout, h, w, k, pad, pool; /* input map h x w; pool: 2x2 max after */
    int32_t src, dst, res;                     /* buffer indices (-1: none / network input) */
    int32_t cout_pad;                          /* multiple of 32 */
    const float *wf;      /* STEM: [taps][cout_pad] +-1; HEAD: [cout][cin] +-1 */
    const uint32_t *wb;   /* BCONV: [k*k*wd_in][cout_pad] weight words, transposed */
    const int32_t *wpop;  /* BCONV: [k+1][k+1][cout_pad] 2-D prefix sums of the taps' weight
                          * popcounts: [a][b] sums taps ky < a, kx < b; NULL when pad = 0 */
    const int32_t *t0, *t1; /* BCONV thresholds [cout_pad]; t1 where the residual bit is +1 */
    const float *tf;      /* STEM thresholds [cout_pad] */
    const uint32_t *flip; /* [cout_pad / 32] */
    const uint32_t *ninf, *pinf; /* STEM: decision at -inf / +inf [cout_pad / 32] */
    const float *bias;    /* HEAD [cout] */
    int32_t stride;       /* STEM, BCONV, POOLF */
    int32_t fsrc, fdst, fres; /* float map buffers (-1: none): POOLF / HEADM input, output,
                           * residual map added before the ReLU */
    int32_t relu;         /* float epilogue: max(y, 0) after the residual */
    const float *alpha, *beta; /* float epilogue (STEM, BCONV): y = fma(s, alpha, beta) [+ res]
                           * [ReLU] -> float map fdst and bits (y > 0) dst; NULL: thresholds */
    /* Optional (AVX2 path, BCONV 1x1 without padding, cin <= 127, thresholds; NULL: the
     * general kernel): the weights as bytes, wbb[t][o] = byte t % 4 of weight word t / 4 of
     * channel o ([4 * wd_in][cout_pad]), and thresholds on the mismatch count D, the output
     * bit being (D <= dt) ^ flip: dt = clamp(floor((cin - T) / 2), -1, cin) [cout_pad]
     * (dt1 where the residual bit is +1). Derived from wb, t0, t1 at compile time. */
    const uint8_t *wbb;
    const int8_t *dt0, *dt1;
    /* Optional (AVX2 path, BCONV with thresholds): the same thresholds on D for the pixels whose
     * k x k taps are all inside the input (n = cin k k), int32, clamped to [-1, n] [cout_pad]. */
    const int32_t *di0, *di1;
    /* Optional (STEM with thresholds and +-1 weights, AVX-512 VNNI; NULL: none): the stem on
     * images of 8-bit pixels (every value k / 255 rounded, checked per image), as exact
     * integer sums S of +-k: w8 the weights as bytes [k*k taps (ky, kx)][nq quads of input
     * channels][cout_pad][4] (0 past cin), the output bit (S >= ti) ^ flip with
     * ti = ceil(255 tf) (S / 255 >= tf exactly) [cout_pad]. */
    const int8_t *w8;
    const int32_t *ti;
    int32_t nq;
} fbb_layer;

static int wd_of(int c) { return (c + 31) / 32; }
static int out_size(const fbb_layer *L, int n) { return (n + 2 * L->pad - L->k) / L->stride + 1; }

static inline int popcount32(uint32_t v) { /* SWAR: no popcnt instruction on baseline x86-64 */
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    return (int)((((v + (v >> 4)) & 0x0f0f0f0fu) * 0x01010101u) >> 24);
}

/* Decision word of 32 stem outputs from their float sums s (NaN -> -1 as BN(NaN) is NaN).
 * A NaN or infinite sum sets *bad: binary_tanh(BN(s)) sees NaN/inf there, which PyTorch's
 * quantizer refuses under its finite checks (fbb_run reports it). */
static inline uint32_t stem_bits(const float *s, const fbb_layer *L, int ob, int *bad) {
    uint32_t f = L->flip[ob / 32], w = 0;
    for (int j = 0; j < 32; j++) {
        float v = s[j], t = L->tf[ob + j];
        int bit;
        if (!(fabsf(v) <= FLT_MAX)) { /* NaN or inf */
            *bad = 1;
            bit = isinf(v) ? (int)(((v > 0 ? L->pinf : L->ninf)[ob / 32] >> j) & 1u) : 0;
        } else bit = ((f >> j) & 1u) ? (v < t) : (v >= t);
        w |= (uint32_t)bit << j;
    }
    return w;
}

/* A row of output pixels of a layer. `in` is the (zero-padded) input: the output pixel
 * (oy, ox) reads input rows oy*s .. oy*s+k-1 and columns ox*s .. ox*s+k-1 of it (`oy` below
 * holds oy*s); `wp` is its width. */
typedef struct {
    const fbb_layer *L;
    const void *in;
    int wp, hp, oy, ow, ky0, ky1; /* valid tap rows [ky0, ky1) of this output row */
    const uint32_t *res;          /* residual bits of this row, or NULL */
    uint32_t *out;
    int s;                        /* stride */
    const float *fres;            /* float epilogue: residual map row, or NULL */
    float *fout;                  /* float epilogue: output map row, or NULL */
    int *bad;                     /* stem: set where a value binary_tanh sees is NaN/inf */
} fbb_row;

/* The float epilogue of 32 channels ob.. of output pixel ox from their pre-activations
 * (float stem sums, or exact integer sums): y = fma(pre, alpha, beta) (PyTorch's eval batch
 * norm, its FMA contraction included), + the residual map, ReLU; returns the bits y > 0 (NaN:
 * -1) and writes y to the output map. */
static uint32_t float_epi(const fbb_row *r, int ox, int ob, const float *pre) {
    const fbb_layer *L = r->L;
    size_t at = (size_t)ox * L->cout_pad + ob;
    uint32_t w = 0;
    int nf = 0;
    for (int j = 0; j < 32; j++) {
        float y = fmaf(pre[j], L->alpha[ob + j], L->beta[ob + j]);
        if (r->fres) y = y + r->fres[at + j];
        if (L->relu && y < 0.0f) y = 0.0f;
        if (r->fout) r->fout[at + j] = y;
        nf |= !(fabsf(y) <= FLT_MAX);
        w |= (uint32_t)(y > 0.0f) << j;
    }
    if (nf && r->bad) *r->bad = 1;
    return w;
}

static inline void tap_cols(const fbb_row *r, int ox, int *kx0, int *kx1) {
    const fbb_layer *L = r->L;
    int ix = ox * r->s;
    *kx0 = L->pad - ix > 0 ? L->pad - ix : 0;
    *kx1 = L->w + L->pad - ix < L->k ? L->w + L->pad - ix : L->k;
}

/* Popcount of the weight words of the outside taps (their zero input words counted them):
 * total minus the inside rectangle, from the 2-D prefix sums wpop[(k+1) x (k+1)][cout_pad]. */
static inline const int32_t *pre_at(const fbb_layer *L, int ky, int kx) {
    return L->wpop + ((size_t)ky * (L->k + 1) + kx) * L->cout_pad;
}

static inline int is_border(const fbb_row *r, int kx0, int kx1) {
    return r->ky0 > 0 || r->ky1 < r->L->k || kx0 > 0 || kx1 < r->L->k;
}

/* ---------------------------------------------------------------- portable kernels */

static void stem_row_generic(const fbb_row *r) {
    const fbb_layer *L = r->L;
    const float *x = (const float *)r->in;
    int k = L->k, cp = L->cout_pad;
    float s[32];
    for (int ox = 0; ox < r->ow; ox++)
        for (int ob = 0; ob < cp; ob += 32) {
            for (int j = 0; j < 32; j++) s[j] = 0.0f;
            const float *w = L->wf + ob;
            for (int c = 0; c < L->cin; c++)
                for (int ky = 0; ky < k; ky++) {
                    const float *xr = x + ((size_t)c * r->hp + r->oy + ky) * r->wp + (size_t)ox * r->s;
                    for (int kx = 0; kx < k; kx++, w += cp)
                        for (int j = 0; j < 32; j++) s[j] += xr[kx] * w[j];
                }
            r->out[(size_t)ox * (cp / 32) + ob / 32] = L->alpha ? float_epi(r, ox, ob, s)
                                                             : stem_bits(s, L, ob, r->bad);
        }
}

static inline uint32_t bconv_word(const int32_t *D, const fbb_layer *L, int ob, int nvalid,
                                  const int32_t *corr, const uint32_t *res) {
    uint32_t w = 0, f = L->flip[ob / 32], r = res ? res[ob / 32] : 0;
    for (int j = 0; j < 32; j++) {
        int32_t d = D[j] - (corr ? corr[ob + j] : 0);
        int32_t sum = nvalid - 2 * d;
        int32_t t = (res && ((r >> j) & 1u)) ? L->t1[ob + j] : L->t0[ob + j];
        w |= ((uint32_t)(sum >= t) ^ ((f >> j) & 1u)) << j;
    }
    return w;
}

static void bconv_row_generic(const fbb_row *r, int32_t *corr) {
    const fbb_layer *L = r->L;
    int k = L->k, wi = wd_of(L->cin), cp = L->cout_pad, kw = k * wi;
    const uint32_t *in = (const uint32_t *)r->in;
    int32_t D[32];
    for (int ox = 0; ox < r->ow; ox++) {
        int kx0, kx1;
        tap_cols(r, ox, &kx0, &kx1);
        int border = is_border(r, kx0, kx1);
        if (border)
            for (int o = 0; o < cp; o++)
                corr[o] = pre_at(L, k, k)[o] - pre_at(L, r->ky1, kx1)[o]
                          + pre_at(L, r->ky0, kx1)[o] + pre_at(L, r->ky1, kx0)[o]
                          - pre_at(L, r->ky0, kx0)[o];
        int nvalid = L->cin * (r->ky1 - r->ky0) * (kx1 - kx0);
        for (int ob = 0; ob < cp; ob += 32) {
            for (int j = 0; j < 32; j++) D[j] = 0;
            const uint32_t *w = L->wb + ob;
            for (int ky = 0; ky < k; ky++) {
                const uint32_t *a = in + ((size_t)(r->oy + ky) * r->wp + (size_t)ox * r->s) * wi;
                for (int i = 0; i < kw; i++, w += cp)
                    for (int j = 0; j < 32; j++) D[j] += popcount32(a[i] ^ w[j]);
            }
            if (L->alpha) {
                float pre[32];
                for (int j = 0; j < 32; j++)
                    pre[j] = (float)(nvalid - 2 * (D[j] - (border ? corr[ob + j] : 0)));
                r->out[(size_t)ox * (cp / 32) + ob / 32] = float_epi(r, ox, ob, pre);
            } else
                r->out[(size_t)ox * (cp / 32) + ob / 32] = bconv_word(
                    D, L, ob, nvalid, border ? corr : NULL,
                    r->res ? r->res + (size_t)ox * (cp / 32) : NULL);
        }
    }
}

#if FBB_X86
/* ---------------------------------------------------------------- AVX2 + FMA */

/* float_epi on 4 vectors of pre-activations: fma is correctly rounded as fmaf, the ReLU keeps
 * NaN as the portable path does: bit-identical to it. */
__attribute__((target("avx2,fma"), always_inline))
static inline uint32_t float_epi_avx2(const fbb_row *r, int ox, int ob, const __m256 *pre) {
    const fbb_layer *L = r->L;
    size_t at = (size_t)ox * L->cout_pad + ob;
    uint32_t w = 0;
    const __m256 zero = _mm256_setzero_ps(), inf = _mm256_set1_ps(INFINITY);
    const __m256 abs_ = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 nf = zero;
    for (int i = 0; i < 4; i++) {
        __m256 y = _mm256_fmadd_ps(pre[i], _mm256_loadu_ps(L->alpha + ob + 8 * i),
                                   _mm256_loadu_ps(L->beta + ob + 8 * i));
        if (r->fres) y = _mm256_add_ps(y, _mm256_loadu_ps(r->fres + at + 8 * i));
        if (L->relu) y = _mm256_blendv_ps(y, zero, _mm256_cmp_ps(y, zero, _CMP_LT_OQ));
        if (r->fout) _mm256_storeu_ps(r->fout + at + 8 * i, y);
        if (r->bad) nf = _mm256_or_ps(nf, _mm256_cmp_ps(_mm256_and_ps(y, abs_), inf, _CMP_NLT_UQ));
        w |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(y, zero, _CMP_GT_OQ)) << (8 * i);
    }
    if (r->bad && _mm256_movemask_ps(nf)) *r->bad = 1;
    return w;
}

/* Stem decision word (as stem_bits) of 32 sums in 4 vectors. Where every sum is finite (the
 * thresholds are never NaN), flip ? s < t : s >= t is (s >= t) ^ flip: one compare per
 * vector; a NaN or infinite sum (|s| not below inf, unordered included) takes stem_bits. */
__attribute__((target("avx2")))
static inline uint32_t stem_word_avx2(const __m256 *a, const fbb_layer *L, int ob, int *bad) {
    const __m256 inf = _mm256_set1_ps(INFINITY);
    const __m256 abs_ = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    uint32_t ge = 0;
    __m256 nf = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        ge |= (uint32_t)_mm256_movemask_ps(
                  _mm256_cmp_ps(a[i], _mm256_loadu_ps(L->tf + ob + 8 * i), _CMP_GE_OQ)) << (8 * i);
        nf = _mm256_or_ps(nf, _mm256_cmp_ps(_mm256_and_ps(a[i], abs_), inf, _CMP_NLT_UQ));
    }
    if (__builtin_expect(_mm256_movemask_ps(nf) != 0, 0)) {
        float s[32];
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(s + 8 * i, a[i]);
        return stem_bits(s, L, ob, bad);
    }
    return ge ^ L->flip[ob / 32];
}

/* nb output pixels x 32 output channels per pass: each weight load feeds nb FMAs, and the
 * 4 nb accumulators are independent chains (FMA latency). Taps in the same order on every
 * path, so the sums are bit-identical to the portable path's where the products are exact
 * (+-1 weights; the portable path does not fuse the multiply-add). */
#define STEM2_NB 3
__attribute__((target("avx2,fma"), always_inline))
static inline void stem_px_avx2(const fbb_row *r, int ox, int ob, const int nb) {
    const fbb_layer *L = r->L;
    const float *x = (const float *)r->in;
    int k = L->k, cp = L->cout_pad, s = r->s;
    __m256 a[STEM2_NB][4];
    for (int p = 0; p < nb; p++)
        for (int v = 0; v < 4; v++) a[p][v] = _mm256_setzero_ps();
    const float *w = L->wf + ob;
    for (int c = 0; c < L->cin; c++)
        for (int ky = 0; ky < k; ky++) {
            const float *xr = x + ((size_t)c * r->hp + r->oy + ky) * r->wp + (size_t)ox * s;
            for (int kx = 0; kx < k; kx++, w += cp) {
                __m256 wv[4];
                for (int v = 0; v < 4; v++) wv[v] = _mm256_loadu_ps(w + 8 * v);
                for (int p = 0; p < nb; p++) {
                    __m256 xv = _mm256_set1_ps(xr[kx + p * s]);
                    for (int v = 0; v < 4; v++) a[p][v] = _mm256_fmadd_ps(xv, wv[v], a[p][v]);
                }
            }
        }
    for (int p = 0; p < nb; p++) {
        uint32_t *o = &r->out[(size_t)(ox + p) * (cp / 32) + ob / 32];
        if (L->alpha)
            *o = float_epi_avx2(r, ox + p, ob, a[p]);
        else
            *o = stem_word_avx2(a[p], L, ob, r->bad);
    }
}

__attribute__((target("avx2,fma")))
static void stem_row_avx2(const fbb_row *r) {
    int cp = r->L->cout_pad, ox = 0;
    for (; ox + STEM2_NB <= r->ow; ox += STEM2_NB)
        for (int ob = 0; ob < cp; ob += 32) stem_px_avx2(r, ox, ob, STEM2_NB);
    for (; ox < r->ow; ox++)
        for (int ob = 0; ob < cp; ob += 32) stem_px_avx2(r, ox, ob, 1);
}

__attribute__((target("avx2")))
static inline __m256i popcnt8_avx2(__m256i x) { /* per-byte popcount by nibble table */
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_and_si256(x, m4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

__attribute__((target("avx2")))
static inline __m256i bytes_to_i32(__m256i c8) {
    __m256i s16 = _mm256_maddubs_epi16(c8, _mm256_set1_epi8(1));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}

/* Output bits of 32 channels from their XOR popcounts d[0..3] (8 channels each). */
__attribute__((target("avx2,fma"), always_inline))
static inline uint32_t bconv_word_avx2(const fbb_row *r, int ox, int ob, const __m256i *d,
                                       int correct) {
    const fbb_layer *L = r->L;
    int kx0, kx1;
    tap_cols(r, ox, &kx0, &kx1);
    int border = correct && is_border(r, kx0, kx1); /* D counted the padded taps */
    const __m256i nv = _mm256_set1_epi32(L->cin * (r->ky1 - r->ky0) * (kx1 - kx0));
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    uint32_t rb = r->res ? r->res[(size_t)ox * (L->cout_pad / 32) + ob / 32] : 0, w = 0;
    __m256 pre[4];
    for (int i = 0; i < 4; i++) {
        int o = ob + 8 * i;
        __m256i di = d[i];
        if (border) {
#define LD(p) _mm256_loadu_si256((const __m256i *)(p))
            __m256i in_ = _mm256_sub_epi32(
                _mm256_add_epi32(LD(pre_at(L, r->ky1, kx1) + o), LD(pre_at(L, r->ky0, kx0) + o)),
                _mm256_add_epi32(LD(pre_at(L, r->ky0, kx1) + o), LD(pre_at(L, r->ky1, kx0) + o)));
            di = _mm256_sub_epi32(di, _mm256_sub_epi32(LD(pre_at(L, L->k, L->k) + o), in_));
        }
        __m256i sum = _mm256_sub_epi32(nv, _mm256_add_epi32(di, di));
        if (L->alpha) {
            pre[i] = _mm256_cvtepi32_ps(sum);
            continue;
        }
        __m256i t = LD(L->t0 + o);
        if (r->res) {
            __m256i m = _mm256_cmpeq_epi32(
                _mm256_and_si256(_mm256_set1_epi32((int)(rb >> (8 * i))), sel), sel);
            t = _mm256_blendv_epi8(t, LD(L->t1 + o), m);
        }
#undef LD
        uint32_t lt = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(t, sum)));
        w |= (~lt & 0xffu) << (8 * i);
    }
    if (L->alpha) return float_epi_avx2(r, ox, ob, pre);
    return w ^ L->flip[ob / 32];
}

/* Bits D > dt of 32 channels, D in 4 vectors of 8 (32 bits): the compares packed to bytes
 * (packs interleave the 128-bit lanes; the dword permute restores channel order). */
__attribute__((target("avx2"), always_inline))
static inline uint32_t d_gt_avx2(const __m256i *d, const int32_t *dt) {
    __m256i g[4];
    for (int i = 0; i < 4; i++)
        g[i] = _mm256_cmpgt_epi32(d[i], _mm256_loadu_si256((const __m256i *)(dt + 8 * i)));
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(g[0], g[1]), _mm256_packs_epi32(g[2], g[3]));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    return (uint32_t)_mm256_movemask_epi8(b);
}

/* nb output pixels x 32 output channels per pass: each weight vector loaded once feeds nb
 * XOR-popcounts; per-byte counts flushed to 32 bits before they can overflow. Only the taps
 * inside the image run (rows [ky0, ky1), columns [kx0, kx1), the same for the nb pixels), so
 * no padding correction is needed: D counts valid taps only (a 3x3 conv on a 1x1 map runs
 * one tap, not nine). */
#define BCONV2_NB 2
__attribute__((target("avx2,fma"), always_inline))
static inline void bconv_px_avx2(const fbb_row *r, int ox, int ob, const int nb, int kx0,
                                 int kx1, const int flush) {
    const fbb_layer *L = r->L;
    int k = L->k, wi = wd_of(L->cin), cp = L->cout_pad, kw = (kx1 - kx0) * wi;
    size_t step = (size_t)r->s * wi;
    const uint32_t *in = (const uint32_t *)r->in;
    __m256i d[BCONV2_NB][4], c[BCONV2_NB][4];
    for (int p = 0; p < nb; p++)
        for (int i = 0; i < 4; i++) d[p][i] = c[p][i] = _mm256_setzero_si256();
    int n = 0;
    for (int ky = r->ky0; ky < r->ky1; ky++) {
        const uint32_t *a =
            in + ((size_t)(r->oy + ky) * r->wp + (size_t)ox * r->s + kx0) * wi;
        const uint32_t *w = L->wb + ((size_t)(ky * k + kx0) * wi) * cp + ob;
        for (int j = 0; j < kw; j++, w += cp) {
            __m256i wv[4];
            for (int i = 0; i < 4; i++) wv[i] = _mm256_loadu_si256((const __m256i *)(w + 8 * i));
            for (int p = 0; p < nb; p++) {
                __m256i v = _mm256_set1_epi32((int)a[p * step + j]);
                for (int i = 0; i < 4; i++)
                    c[p][i] = _mm256_add_epi8(c[p][i], popcnt8_avx2(_mm256_xor_si256(v, wv[i])));
            }
            if (flush && ++n == 31) { /* <= 8 per byte per step: flush before 255 */
                n = 0;
                for (int p = 0; p < nb; p++)
                    for (int i = 0; i < 4; i++) {
                        d[p][i] = _mm256_add_epi32(d[p][i], bytes_to_i32(c[p][i]));
                        c[p][i] = _mm256_setzero_si256();
                    }
            }
        }
    }
    const int full = L->di0 && kx0 == 0 && kx1 == k && r->ky0 == 0 && r->ky1 == k;
    for (int p = 0; p < nb; p++) {
        for (int i = 0; i < 4; i++) d[p][i] = _mm256_add_epi32(d[p][i], bytes_to_i32(c[p][i]));
        size_t at = (size_t)(ox + p) * (cp / 32) + ob / 32;
        if (full) { /* (D <= di) ^ flip, residual: di1 where its bit is +1 */
            uint32_t gt = d_gt_avx2(d[p], L->di0 + ob);
            if (r->res) gt = (gt & ~r->res[at]) | (d_gt_avx2(d[p], L->di1 + ob) & r->res[at]);
            r->out[at] = ~gt ^ L->flip[ob / 32];
        } else
            r->out[at] = bconv_word_avx2(r, ox + p, ob, d[p], 0);
    }
}

/* 1x1 convolutions of at most 127 input channels, thresholds (AVX2): one byte lane per output
 * channel, so no widening, no lane shuffles and one compare per 32 channels. XOR of input byte
 * t (broadcast) with wbb[t] and a per-byte popcount count the mismatches of channel o among
 * those 8 inputs in byte o; their sum over the 4 wd_in bytes is D <= cin <= 127, and the
 * output bit (cin - 2 D >= T) ^ flip is (D <= dt) ^ flip. nb pixels x 32 nv channels per
 * pass (each weight vector loaded once feeds nb pixels, each broadcast nv vectors); nt: the
 * number of input bytes, a constant where the caller knows it (unrolled). Exact integers:
 * the same bits as bconv_word. */
#define B1_NB 2
__attribute__((target("avx2"), always_inline))
static inline void bconv1_px_avx2(const fbb_row *r, int ox, int ob, const int nb, const int nv,
                                  const int nt) {
    const fbb_layer *L = r->L;
    int cp = L->cout_pad, wo = cp / 32;
    size_t step = (size_t)r->s * nt; /* bytes from one output pixel's input to the next */
    const uint8_t *in = (const uint8_t *)r->in + ((size_t)r->oy * r->wp + (size_t)ox * r->s) * nt;
    __m256i c[B1_NB][2];
    for (int p = 0; p < nb; p++)
        for (int v = 0; v < nv; v++) c[p][v] = _mm256_setzero_si256();
    const uint8_t *w = L->wbb + ob;
    for (int t = 0; t < nt; t++, w += cp) {
        __m256i wv[2];
        for (int v = 0; v < nv; v++) wv[v] = _mm256_loadu_si256((const __m256i *)(w + 32 * v));
        for (int p = 0; p < nb; p++) {
            __m256i a = _mm256_set1_epi8((char)in[p * step + t]);
            for (int v = 0; v < nv; v++)
                c[p][v] = _mm256_add_epi8(c[p][v], popcnt8_avx2(_mm256_xor_si256(a, wv[v])));
        }
    }
    for (int p = 0; p < nb; p++)
        for (int v = 0; v < nv; v++) {
            int o = ob + 32 * v;
            size_t at = (size_t)(ox + p) * wo + o / 32;
            uint32_t gt = (uint32_t)_mm256_movemask_epi8(
                _mm256_cmpgt_epi8(c[p][v], _mm256_loadu_si256((const __m256i *)(L->dt0 + o))));
            if (r->res) {
                uint32_t rb = r->res[at], g1 = (uint32_t)_mm256_movemask_epi8(_mm256_cmpgt_epi8(
                    c[p][v], _mm256_loadu_si256((const __m256i *)(L->dt1 + o))));
                gt = (gt & ~rb) | (g1 & rb);
            }
            r->out[at] = ~gt ^ L->flip[o / 32];
        }
}

__attribute__((target("avx2"), always_inline))
static inline void bconv1_row_nt_avx2(const fbb_row *r, const int nt) {
    int cp = r->L->cout_pad;
    for (int ox = 0; ox < r->ow;) {
        int ob = 0;
        if (ox + B1_NB <= r->ow) {
            for (; ob + 64 <= cp; ob += 64) bconv1_px_avx2(r, ox, ob, B1_NB, 2, nt);
            for (; ob < cp; ob += 32) bconv1_px_avx2(r, ox, ob, B1_NB, 1, nt);
            ox += B1_NB;
        } else {
            for (; ob + 64 <= cp; ob += 64) bconv1_px_avx2(r, ox, ob, 1, 2, nt);
            for (; ob < cp; ob += 32) bconv1_px_avx2(r, ox, ob, 1, 1, nt);
            ox += 1;
        }
    }
}

__attribute__((target("avx2")))
static void bconv1_row_avx2(const fbb_row *r) {
    int nt = 4 * wd_of(r->L->cin);
    if (nt == 4) bconv1_row_nt_avx2(r, 4);        /* cin <= 32 */
    else if (nt == 8) bconv1_row_nt_avx2(r, 8);   /* cin <= 64 */
    else bconv1_row_nt_avx2(r, nt);
}

__attribute__((target("avx2,fma")))
static void bconv_row_avx2(const fbb_row *r, int32_t *corr) {
    int cp = r->L->cout_pad, k = r->L->k;
    /* <= 8 per byte per tap word: fewer than 31 never reach 255, no flush */
    const int few = (r->ky1 - r->ky0) * k * wd_of(r->L->cin) < 31;
    if (r->L->wbb) {
        bconv1_row_avx2(r);
        return;
    }
    for (int ox = 0; ox < r->ow;) {
        int a0, a1, b0 = 0, b1 = 0;
        tap_cols(r, ox, &a0, &a1);
        if (ox + 1 < r->ow) tap_cols(r, ox + 1, &b0, &b1);
        if (ox + 1 < r->ow && a0 == 0 && a1 == k && b0 == 0 && b1 == k) {
            if (few)
                for (int ob = 0; ob < cp; ob += 32) bconv_px_avx2(r, ox, ob, BCONV2_NB, 0, k, 0);
            else
                for (int ob = 0; ob < cp; ob += 32) bconv_px_avx2(r, ox, ob, BCONV2_NB, 0, k, 1);
            ox += 2;
        } else {
            for (int ob = 0; ob < cp; ob += 32) bconv_px_avx2(r, ox, ob, 1, a0, a1, 1);
            ox += 1;
        }
    }
    (void)corr;
}

/* ---------------------------------------------------------------- AVX-512 (F, VPOPCNTDQ) */

__attribute__((target("avx512f")))
static inline uint32_t stem_word_avx512(__m512 a0, __m512 a1, const fbb_layer *L, int ob,
                                        int *bad) {
    __m512 t0 = _mm512_loadu_ps(L->tf + ob), t1 = _mm512_loadu_ps(L->tf + ob + 16);
    uint32_t ge = (uint32_t)_mm512_cmp_ps_mask(a0, t0, _CMP_GE_OQ)
                  | ((uint32_t)_mm512_cmp_ps_mask(a1, t1, _CMP_GE_OQ) << 16);
    uint32_t lt = (uint32_t)_mm512_cmp_ps_mask(a0, t0, _CMP_LT_OQ)
                  | ((uint32_t)_mm512_cmp_ps_mask(a1, t1, _CMP_LT_OQ) << 16);
    const __m512 pinf = _mm512_set1_ps(INFINITY), ninf = _mm512_set1_ps(-INFINITY);
    uint32_t ip = (uint32_t)_mm512_cmp_ps_mask(a0, pinf, _CMP_EQ_OQ)
                  | ((uint32_t)_mm512_cmp_ps_mask(a1, pinf, _CMP_EQ_OQ) << 16);
    uint32_t in = (uint32_t)_mm512_cmp_ps_mask(a0, ninf, _CMP_EQ_OQ)
                  | ((uint32_t)_mm512_cmp_ps_mask(a1, ninf, _CMP_EQ_OQ) << 16);
    uint32_t un = (uint32_t)_mm512_cmp_ps_mask(a0, a0, _CMP_UNORD_Q)
                  | ((uint32_t)_mm512_cmp_ps_mask(a1, a1, _CMP_UNORD_Q) << 16);
    if (ip | in | un) *bad = 1; /* as stem_bits */
    uint32_t f = L->flip[ob / 32];
    uint32_t w = (ge & ~f) | (lt & f);
    return (w & ~(ip | in)) | (ip & L->pinf[ob / 32]) | (in & L->ninf[ob / 32]);
}

/* nb output pixels x 16*nv output channels per pass: each weight load feeds nb FMAs. */
#define STEM_NB 4
__attribute__((target("avx512f"), always_inline))
static inline void stem_px_avx512(const fbb_row *r, int ox, int ob, const int nb,
                                  const int nv) {
    const fbb_layer *L = r->L;
    const float *x = (const float *)r->in;
    int k = L->k, cp = L->cout_pad;
    __m512 a[STEM_NB][4];
    for (int p = 0; p < nb; p++)
        for (int v = 0; v < nv; v++) a[p][v] = _mm512_setzero_ps();
    const float *w = L->wf + ob;
    for (int c = 0; c < L->cin; c++)
        for (int ky = 0; ky < k; ky++) {
            const float *xr = x + ((size_t)c * r->hp + r->oy + ky) * r->wp + (size_t)ox * r->s;
            for (int kx = 0; kx < k; kx++, w += cp) {
                __m512 wv[4];
                for (int v = 0; v < nv; v++) wv[v] = _mm512_loadu_ps(w + 16 * v);
                for (int p = 0; p < nb; p++) {
                    __m512 xv = _mm512_set1_ps(xr[kx + p * r->s]);
                    for (int v = 0; v < nv; v++) a[p][v] = _mm512_fmadd_ps(xv, wv[v], a[p][v]);
                }
            }
        }
    for (int p = 0; p < nb; p++)
        for (int v = 0; v < nv; v += 2) {
            uint32_t *o = &r->out[(size_t)(ox + p) * (cp / 32) + (ob + 16 * v) / 32];
            if (L->alpha) {
                float pre[32];
                _mm512_storeu_ps(pre, a[p][v]);
                _mm512_storeu_ps(pre + 16, a[p][v + 1]);
                *o = float_epi(r, ox + p, ob + 16 * v, pre);
            } else
                *o = stem_word_avx512(a[p][v], a[p][v + 1], L, ob + 16 * v, r->bad);
        }
}

/* A stem row by PX(r, ox, ob, pixels, blocks of 16 channels): NP pixels at a time, then one;
 * 64 output channels at a time, then 32 (cout_pad is a multiple of 32). */
#define STEM_PX_ALL(PX, NPX)                                                              \
    do {                                                                                  \
        int ob = 0;                                                                       \
        for (; ob + 64 <= r->L->cout_pad; ob += 64) PX(r, ox, ob, NPX, 4);                \
        for (; ob < r->L->cout_pad; ob += 32) PX(r, ox, ob, NPX, 2);                      \
    } while (0)
#define STEM_ROW(PX, NP)                                                                  \
    do {                                                                                  \
        int ox = 0;                                                                       \
        for (; ox + (NP) <= r->ow; ox += (NP)) STEM_PX_ALL(PX, NP);                       \
        for (; ox < r->ow; ox++) STEM_PX_ALL(PX, 1);                                      \
    } while (0)

__attribute__((target("avx512f")))
static void stem_row_avx512(const fbb_row *r) { STEM_ROW(stem_px_avx512, STEM_NB); }

/* Output bits of 32 channels from their XOR popcounts (d0: channels ob..+15, d1: +16..+31). */
__attribute__((target("avx512f")))
static inline uint32_t bconv_word_avx512(const fbb_row *r, int ox, int ob, __m512i d0,
                                         __m512i d1) {
    const fbb_layer *L = r->L;
    int kx0, kx1, cp = L->cout_pad;
    tap_cols(r, ox, &kx0, &kx1);
    if (is_border(r, kx0, kx1)) {
        for (int h = 0; h < 2; h++) {
            int o = ob + 16 * h;
            __m512i in_ = _mm512_sub_epi32(
                _mm512_add_epi32(_mm512_loadu_si512(pre_at(L, r->ky1, kx1) + o),
                                 _mm512_loadu_si512(pre_at(L, r->ky0, kx0) + o)),
                _mm512_add_epi32(_mm512_loadu_si512(pre_at(L, r->ky0, kx1) + o),
                                 _mm512_loadu_si512(pre_at(L, r->ky1, kx0) + o)));
            __m512i cr = _mm512_sub_epi32(_mm512_loadu_si512(pre_at(L, L->k, L->k) + o), in_);
            if (h == 0) d0 = _mm512_sub_epi32(d0, cr);
            else d1 = _mm512_sub_epi32(d1, cr);
        }
    }
    const __m512i nv = _mm512_set1_epi32(L->cin * (r->ky1 - r->ky0) * (kx1 - kx0));
    __m512i s0 = _mm512_sub_epi32(nv, _mm512_add_epi32(d0, d0));
    __m512i s1 = _mm512_sub_epi32(nv, _mm512_add_epi32(d1, d1));
    if (L->alpha) {
        float pre[32];
        _mm512_storeu_ps(pre, _mm512_cvtepi32_ps(s0));
        _mm512_storeu_ps(pre + 16, _mm512_cvtepi32_ps(s1));
        return float_epi(r, ox, ob, pre);
    }
    __m512i t0 = _mm512_loadu_si512(L->t0 + ob), t1 = _mm512_loadu_si512(L->t0 + ob + 16);
    if (r->res) {
        uint32_t rb = r->res[(size_t)ox * (cp / 32) + ob / 32];
        t0 = _mm512_mask_blend_epi32((__mmask16)(rb & 0xffffu), t0,
                                     _mm512_loadu_si512(L->t1 + ob));
        t1 = _mm512_mask_blend_epi32((__mmask16)(rb >> 16), t1,
                                     _mm512_loadu_si512(L->t1 + ob + 16));
    }
    uint32_t ge = (uint32_t)_mm512_cmpge_epi32_mask(s0, t0)
                  | ((uint32_t)_mm512_cmpge_epi32_mask(s1, t1) << 16);
    return ge ^ L->flip[ob / 32];
}

/* NB pixels x 32 channels per pass: each weight load feeds NB XOR-popcounts. */
#define BCONV_NB 4
__attribute__((target("avx512f,avx512vpopcntdq"), always_inline))
static inline void bconv_px_avx512(const fbb_row *r, int ox, const int nb) {
    const fbb_layer *L = r->L;
    int k = L->k, wi = wd_of(L->cin), cp = L->cout_pad, kw = k * wi;
    const uint32_t *in = (const uint32_t *)r->in;
    for (int ob = 0; ob < cp; ob += 32) {
        __m512i d[BCONV_NB][2];
        for (int p = 0; p < nb; p++) d[p][0] = d[p][1] = _mm512_setzero_si512();
        const uint32_t *w = L->wb + ob;
        for (int ky = 0; ky < k; ky++) {
            const uint32_t *a = in + ((size_t)(r->oy + ky) * r->wp + (size_t)ox * r->s) * wi;
            for (int j = 0; j < kw; j++, w += cp) {
                __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 16);
                for (int p = 0; p < nb; p++) {
                    __m512i v = _mm512_set1_epi32((int)a[(size_t)p * r->s * wi + j]);
                    d[p][0] = _mm512_add_epi32(d[p][0],
                                               _mm512_popcnt_epi32(_mm512_xor_si512(v, w0)));
                    d[p][1] = _mm512_add_epi32(d[p][1],
                                               _mm512_popcnt_epi32(_mm512_xor_si512(v, w1)));
                }
            }
        }
        for (int p = 0; p < nb; p++)
            r->out[(size_t)(ox + p) * (cp / 32) + ob / 32] =
                bconv_word_avx512(r, ox + p, ob, d[p][0], d[p][1]);
    }
}

__attribute__((target("avx512f,avx512vpopcntdq")))
static void bconv_row_avx512(const fbb_row *r, int32_t *corr) {
    int ox = 0;
    for (; ox + BCONV_NB <= r->ow; ox += BCONV_NB) bconv_px_avx512(r, ox, BCONV_NB);
    for (; ox < r->ow; ox++) bconv_px_avx512(r, ox, 1);
    (void)corr;
}
#endif

/* ---------------------------------------------------------------- stem on 8-bit pixels */

#if FBB_X86
#define VNNI_T __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
/* 1 where every value of the NCHW image x is k / 255 rounded to float32 (uint8 / 255 bit for
 * bit; -0 passes as 0) for an integer k in [0, 255]: the codes k written to img, the
 * zero-padded NHWC byte image of 4 nq channels per pixel; else 0 (img partly written). */
VNNI_T static int stem_codes(const fbb_layer *L, const float *x, uint8_t *img) {
    int p = L->pad, wp = L->w + 2 * p, c4 = 4 * L->nq;
    memset(img, 0, (size_t)(L->h + 2 * p) * wp * c4);
    const __m512 s = _mm512_set1_ps(255.0f);
    const __m512i hi = _mm512_set1_epi32(255);
    for (int c = 0; c < L->cin; c++)
        for (int y = 0; y < L->h; y++) {
            const float *row = x + ((size_t)c * L->h + y) * L->w;
            uint8_t *o = img + ((size_t)(y + p) * wp + p) * c4 + c;
            for (int j = 0; j < L->w; j += 16) {
                __mmask16 m = L->w - j >= 16 ? (__mmask16)0xFFFF
                                             : (__mmask16)((1u << (L->w - j)) - 1);
                __m512 v = _mm512_maskz_loadu_ps(m, row + j);
                __m512i k = _mm512_cvtps_epi32(_mm512_mul_ps(v, s)); /* nearest */
                __m512 back = _mm512_div_ps(_mm512_cvtepi32_ps(k), s);
                __mmask16 ok = _mm512_mask_cmp_ps_mask(m, back, v, _CMP_EQ_OQ) &
                               _mm512_cmp_epu32_mask(k, hi, _MM_CMPINT_LE);
                if (ok != m) return 0;
                uint8_t b[16];
                _mm_storeu_si128((__m128i *)b, _mm512_cvtepi32_epi8(k));
                for (int t = 0; t < 16 && j + t < L->w; t++) o[(size_t)(j + t) * c4] = b[t];
            }
        }
    return 1;
}

/* NP output pixels from ox, 16 nb output channels from ob: sums of +-k by vpdpbusd (codes
 * u8 x weights s8, four channels of a tap per product), exact in int32. */
#define STEMQ_NP 4
VNNI_T static inline __attribute__((always_inline)) void stemq_px(const fbb_row *r, int ox,
                                                                  int ob, const int np,
                                                                  const int nb) {
    const fbb_layer *L = r->L;
    const uint8_t *img = (const uint8_t *)r->in;
    int k = L->k, nq = L->nq, cp = L->cout_pad, c4 = 4 * nq, st = r->s;
    __m512i a[STEMQ_NP][4];
    for (int q = 0; q < np; q++)
        for (int b = 0; b < nb; b++) a[q][b] = _mm512_setzero_si512();
    for (int ky = 0; ky < k; ky++) {
        const uint8_t *xr = img + ((size_t)(r->oy + ky) * r->wp + (size_t)ox * st) * c4;
        for (int kx = 0; kx < k; kx++)
            for (int q = 0; q < nq; q++) {
                const int8_t *w = L->w8 + ((((size_t)ky * k + kx) * nq + q) * cp + ob) * 4;
                __m512i wv[4];
                for (int b = 0; b < nb; b++) wv[b] = _mm512_loadu_si512((const void *)(w + 64 * b));
                for (int i = 0; i < np; i++) {
                    int32_t quad;
                    memcpy(&quad, xr + ((size_t)(kx + i * st)) * c4 + 4 * q, 4);
                    __m512i xv = _mm512_set1_epi32(quad);
                    for (int b = 0; b < nb; b++) a[i][b] = _mm512_dpbusd_epi32(a[i][b], xv, wv[b]);
                }
            }
    }
    for (int i = 0; i < np; i++)
        for (int b = 0; b < nb; b += 2) {
            int o = ob + 16 * b;
            uint32_t ge = (uint32_t)_mm512_cmpge_epi32_mask(a[i][b], _mm512_loadu_si512(
                              (const void *)(L->ti + o))) |
                          ((uint32_t)_mm512_cmpge_epi32_mask(a[i][b + 1], _mm512_loadu_si512(
                              (const void *)(L->ti + o + 16))) << 16);
            r->out[(size_t)(ox + i) * (cp / 32) + o / 32] = ge ^ L->flip[o / 32];
        }
}

VNNI_T static void stem_row_q(const fbb_row *r) { STEM_ROW(stemq_px, STEMQ_NP); }
#endif

/* ---------------------------------------------------------------- ISA selection */

typedef void (*stem_fn)(const fbb_row *);
typedef void (*bconv_fn)(const fbb_row *, int32_t *);

/* 1 when this CPU (and OS) can run path `isa`. */
int fbb_isa_supported(int isa) {
    if (isa == ISA_GENERIC) return 1;
#if FBB_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#endif
    return 0;
}

/* ---------------------------------------------------------------- layers */

/* Copy a map into the zero-padded scratch `dst` (pad p on each side); `esize` bytes per
 * element, `per` elements per pixel, `planes` planes (NCHW float: per 1, planes C; NHWC bits:
 * per = words, planes 1). Returns dst, or src itself when p == 0. */
static const void *padded(const void *src, void *dst, int planes, int H, int W, int per,
                          int p, size_t esize) {
    if (p == 0) return src;
    int hp = H + 2 * p, wp = W + 2 * p;
    size_t row = (size_t)W * per * esize, prow = (size_t)wp * per * esize;
    memset(dst, 0, (size_t)planes * hp * prow);
    for (int c = 0; c < planes; c++)
        for (int y = 0; y < H; y++)
            memcpy((char *)dst + ((size_t)c * hp + y + p) * prow + (size_t)p * per * esize,
                   (const char *)src + ((size_t)c * H + y) * row, row);
    return dst;
}

static void run_layer(const fbb_layer *L, const void *in, const uint32_t *res, uint32_t *out,
                      const float *fres, float *fout, void *pad, int32_t *corr, stem_fn stem,
                      bconv_fn bconv, int *bad, int stem_q) {
    int k = L->k, p = L->pad, s = L->stride, oh = out_size(L, L->h), ow = out_size(L, L->w);
    int stemop = L->op == OP_STEM, wo = L->cout_pad / 32;
    fbb_row r = {L, NULL, L->w + 2 * p, L->h + 2 * p, 0, ow, 0, 0, NULL, NULL, s, NULL, NULL,
                 stemop ? bad : NULL};
#if FBB_X86
    if (stemop && L->w8 && stem_q && stem_codes(L, (const float *)in, (uint8_t *)pad)) {
        r.in = pad; /* images of 8-bit pixels: the stem's exact integer sums */
        stem = stem_row_q;
    } else
#endif
    r.in = stemop ? padded(in, pad, L->cin, L->h, L->w, 1, p, sizeof(float))
                  : padded(in, pad, 1, L->h, L->w, wd_of(L->cin), p, sizeof(uint32_t));
    for (int oy = 0; oy < oh; oy++) {
        int iy = oy * s;
        r.oy = iy;
        r.ky0 = p - iy > 0 ? p - iy : 0;
        r.ky1 = L->h + p - iy < k ? L->h + p - iy : k;
        r.res = res ? res + (size_t)oy * ow * wo : NULL;
        r.out = out + (size_t)oy * ow * wo;
        r.fres = fres ? fres + (size_t)oy * ow * L->cout_pad : NULL;
        r.fout = fout ? fout + (size_t)oy * ow * L->cout_pad : NULL;
        if (stemop) stem(&r);
        else bconv(&r, corr);
    }
}

/* 2x2 max pool (floor) on +-1 bits: OR. In place is safe (reads stay ahead of writes). */
static void pool_or(uint32_t *m, int H, int W, int wd) {
    int oh = H / 2, ow = W / 2;
    for (int y = 0; y < oh; y++)
        for (int x = 0; x < ow; x++)
            for (int i = 0; i < wd; i++) {
                const uint32_t *r0 = m + ((size_t)(2 * y) * W + 2 * x) * wd + i;
                const uint32_t *r1 = r0 + (size_t)W * wd;
                m[((size_t)y * ow + x) * wd + i] = r0[0] | r0[wd] | r1[0] | r1[wd];
            }
}

/* Max pool (k, stride, padding: padded taps are left out, as PyTorch's -inf) of a float map
 * (NHWC, cout_pad channels); NaN wins as in PyTorch. Output map `fout` (or NULL) and its bits
 * (y > 0) `out`. */
static void pool_f(const fbb_layer *L, const float *in, float *fout, uint32_t *out, float *tmp) {
    int cp = L->cout_pad, oh = out_size(L, L->h), ow = out_size(L, L->w);
    for (int oy = 0; oy < oh; oy++)
        for (int ox = 0; ox < ow; ox++) {
            for (int c = 0; c < cp; c++) tmp[c] = -INFINITY;
            for (int ky = 0; ky < L->k; ky++) {
                int y = oy * L->stride + ky - L->pad;
                if (y < 0 || y >= L->h) continue;
                for (int kx = 0; kx < L->k; kx++) {
                    int x = ox * L->stride + kx - L->pad;
                    if (x < 0 || x >= L->w) continue;
                    const float *v = in + ((size_t)y * L->w + x) * cp;
                    for (int c = 0; c < cp; c++)
                        tmp[c] = (v[c] > tmp[c] || isnan(v[c])) ? v[c] : tmp[c];
                }
            }
            size_t at = (size_t)oy * ow + ox;
            if (fout) memcpy(fout + at * cp, tmp, sizeof(float) * cp);
            for (int ob = 0; ob < cp; ob += 32) {
                uint32_t w = 0;
                for (int j = 0; j < 32; j++) w |= (uint32_t)(tmp[ob + j] > 0.0f) << j;
                out[at * (cp / 32) + ob / 32] = w;
            }
        }
}

/* Average pool of +-1 over the map, then the +-1 affine: the integer sum
 * N = sum_c w[j][c] (2 cnt_c - HW) is exact, so logit = N / HW + bias (two roundings). */
static void run_head(const fbb_layer *L, const uint32_t *in, float *out, int32_t *cnt) {
    int hw = L->h * L->w, wi = wd_of(L->cin);
    memset(cnt, 0, sizeof(int32_t) * L->cin);
    for (int p = 0; p < hw; p++)
        for (int c = 0; c < L->cin; c++) cnt[c] += (int32_t)((in[(size_t)p * wi + c / 32] >> (c % 32)) & 1u);
    for (int j = 0; j < L->cout; j++) {
        int64_t n = 0;
        const float *w = L->wf + (size_t)j * L->cin;
        for (int c = 0; c < L->cin; c++) n += (int64_t)(w[c] > 0 ? 1 : -1) * (2 * cnt[c] - hw);
        out[j] = (float)n / (float)hw + L->bias[j];
    }
}

/* A head of any float weights (a fixed-point classifier): the average of each channel's +-1
 * values (exact: an integer over hw), then the affine in float, channels in order. */
static void run_headf(const fbb_layer *L, const uint32_t *in, float *out, int32_t *cnt) {
    int hw = L->h * L->w, wi = wd_of(L->cin);
    memset(cnt, 0, sizeof(int32_t) * L->cin);
    for (int p = 0; p < hw; p++)
        for (int c = 0; c < L->cin; c++) cnt[c] += (int32_t)((in[(size_t)p * wi + c / 32] >> (c % 32)) & 1u);
    for (int j = 0; j < L->cout; j++) {
        float acc = 0.0f;
        const float *w = L->wf + (size_t)j * L->cin;
        for (int c = 0; c < L->cin; c++) acc += w[c] * ((float)(2 * cnt[c] - hw) / (float)hw);
        out[j] = acc + L->bias[j];
    }
}

/* The head of a float map (NHWC, cp channels): each channel's mean (pixels summed in order,
 * then divided by hw), then the float affine, channels in order (float rounding of PyTorch's). */
static void run_headm(const fbb_layer *L, const float *in, float *out, float *mean) {
    int hw = L->h * L->w, cp = wd_of(L->cin) * 32;
    for (int c = 0; c < L->cin; c++) mean[c] = 0.0f;
    for (int p = 0; p < hw; p++)
        for (int c = 0; c < L->cin; c++) mean[c] += in[(size_t)p * cp + c];
    for (int c = 0; c < L->cin; c++) mean[c] /= (float)hw;
    for (int j = 0; j < L->cout; j++) {
        float acc = 0.0f;
        const float *w = L->wf + (size_t)j * L->cin;
        for (int c = 0; c < L->cin; c++) acc += w[c] * mean[c];
        out[j] = acc + L->bias[j];
    }
}

static int is_head(int op) { return op == OP_HEAD || op == OP_HEADF || op == OP_HEADM; }

static size_t map_words(const fbb_layer *L) {
    return (size_t)out_size(L, L->h) * out_size(L, L->w) * (L->cout_pad / 32);
}

/* Sizes of the scratch areas of a program (in 4-byte units): nb bit maps of mw words, nf float
 * maps of mf floats, the padded input (pw), a per-channel temporary (cw). Returns the total,
 * or -3 when the program is malformed. */
typedef struct { size_t mw, mf, pw, cw; int nb, nf; } fbb_sizes;

static int64_t sizes_of(const fbb_layer *L, int nl, fbb_sizes *z) {
    z->mw = z->mf = z->pw = 1;
    z->cw = 32;
    z->nb = z->nf = 1;
    if (nl < 2 || L[0].op != OP_STEM || !is_head(L[nl - 1].op)) return -3;
    for (int i = 0; i < nl; i++) {
        const fbb_layer *l = &L[i];
        if (l->op < OP_STEM || l->op > OP_HEADM || l->cin < 1 || l->cout < 1 || l->h < 1 ||
            l->w < 1 || l->cout_pad != wd_of(l->cout) * 32 || l->src >= 64 || l->dst >= 64 ||
            l->res >= 64 || l->fsrc >= 64 || l->fdst >= 64 || l->fres >= 64)
            return -3;
        int bufs[3] = {l->src, l->dst, l->res}, fb[3] = {l->fsrc, l->fdst, l->fres};
        /* what each op reads and writes must be there */
        int op = l->op, need_src = op == OP_BCONV || op == OP_HEAD || op == OP_HEADF;
        int need_dst = op == OP_STEM || op == OP_BCONV || op == OP_POOLF;
        int need_fsrc = op == OP_POOLF || op == OP_HEADM;
        if ((need_src && l->src < 0) || (need_dst && l->dst < 0) || (need_fsrc && l->fsrc < 0)
            || ((op == OP_STEM || op == OP_BCONV) && !l->alpha && (!l->flip || (op == OP_BCONV
                && (!l->t0 || !l->t1)) || (op == OP_STEM && (!l->tf || !l->ninf || !l->pinf))))
            || ((op == OP_STEM || op == OP_BCONV) && l->alpha && !l->beta)
            || (op == OP_BCONV && (!l->wb || (l->pad > 0 && !l->wpop)))
            || ((op == OP_STEM || is_head(op)) && !l->wf) || (is_head(op) && !l->bias)
            || (l->res >= 0 && op != OP_BCONV) || (l->fres >= 0 && !l->alpha)
            || (l->wbb && (op != OP_BCONV || l->k != 1 || l->pad != 0 || l->cin > 127
                           || l->alpha || !l->dt0 || !l->dt1))
            || (l->di0 && (op != OP_BCONV || l->alpha || !l->di1))
            || (l->w8 && (op != OP_STEM || l->alpha || !l->ti || l->nq != (l->cin + 3) / 4)))
            return -3;
        for (int j = 0; j < 3; j++) {
            if (bufs[j] < -1 || fb[j] < -1) return -3;
            if (bufs[j] + 1 > z->nb) z->nb = bufs[j] + 1;
            if (fb[j] + 1 > z->nf) z->nf = fb[j] + 1;
        }
        if ((size_t)wd_of(l->cin) * 32 > z->cw) z->cw = (size_t)wd_of(l->cin) * 32;
        if ((size_t)l->cout_pad > z->cw) z->cw = l->cout_pad;
        if (is_head(l->op)) continue;
        if (l->stride < 1 || l->k < 1 || l->pad < 0 || l->h + 2 * l->pad < l->k ||
            l->w + 2 * l->pad < l->k)
            return -3;
        size_t ohw = (size_t)out_size(l, l->h) * out_size(l, l->w);
        if (map_words(l) > z->mw) z->mw = map_words(l);
        if (ohw * l->cout_pad > z->mf) z->mf = ohw * l->cout_pad;
        if ((size_t)l->h * l->w * l->cout_pad > z->mf) z->mf = (size_t)l->h * l->w * l->cout_pad;
        if (l->op == OP_POOLF) continue;
        size_t hw = (size_t)(l->h + 2 * l->pad) * (l->w + 2 * l->pad);
        size_t pad = hw * (l->op == OP_STEM ? (size_t)l->cin : (size_t)wd_of(l->cin));
        if (pad > z->pw) z->pw = pad;
    }
    return (int64_t)(z->mw * z->nb + z->mf * z->nf + z->pw + z->cw);
}

/* 1 where path `isa` runs the stem on 8-bit pixels (AVX-512 with VNNI), else 0. */
int fbb_stem_q(int isa) {
#if FBB_X86
    __builtin_cpu_init();
    return isa == ISA_AVX512 && fbb_isa_supported(isa) && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
    (void)isa;
    return 0;
#endif
}

/* Scratch size (4-byte units) `fbb_run` needs for this program, or -3 (malformed). */
int64_t fbb_workspace(const fbb_layer *L, int nl) {
    fbb_sizes z;
    return sizes_of(L, nl, &z);
}

#ifdef FBB_PROFILE
#include <time.h>
double fbb_prof_ns[256];
#endif

/* Run the program `L[0..nl)` on `n` inputs of `in_size` floats each; logits to `out`
 * (n x the head's cout). `ws`: scratch of `fbb_workspace(L, nl)` 4-byte units (the caller
 * allocates it once). Returns 0, or -1 (unsupported ISA), -2 (workspace too small),
 * -3 (malformed program), -4 (check_finite and the input holds NaN or inf), -5 (check_finite
 * and a value binary_tanh sees after the float stem is NaN/inf: its sums overflowed; the
 * logits are computed all the same). */
int fbb_run(const fbb_layer *L, int nl, int isa, const float *x, int64_t n, int64_t in_size,
            float *out, int64_t out_size_, int check_finite, void *ws, int64_t ws_size) {
    if (!fbb_isa_supported(isa)) return -1;
    if (check_finite) { /* on the bits, branch-free, so that it vectorizes (SSE2) */
        int32_t bad = 0;
        const uint32_t *xb = (const uint32_t *)(const void *)x;
        for (int64_t i = 0; i < n * in_size; i++)
            bad |= (int32_t)(xb[i] & 0x7fffffffu) > 0x7f7fffff; /* exponent all ones: NaN, inf */
        if (bad) return -4;
    }
    stem_fn stem = stem_row_generic;
    bconv_fn bconv = bconv_row_generic;
#if FBB_X86
    if (isa == ISA_AVX2) { stem = stem_row_avx2; bconv = bconv_row_avx2; }
    if (isa == ISA_AVX512) { stem = stem_row_avx512; bconv = bconv_row_avx512; }
#endif
    int stem_q = fbb_stem_q(isa); /* the stem on 8-bit pixels (w8) runs here */
    fbb_sizes z;
    int64_t need = sizes_of(L, nl, &z);
    if (need < 0) return (int)need;
    if (ws == NULL || ws_size < need) return -2;
    int64_t nout = L[nl - 1].cout;
    if (out_size_ != n * nout) return -3;
    /* the stem reads cin h w floats of each input: a shorter one would be read past its end */
    if (in_size != (int64_t)L[0].cin * L[0].h * L[0].w) return -3;
    int bad = 0; /* a value binary_tanh sees after the stem was NaN/inf (checked once, below) */
    uint32_t *buf = (uint32_t *)ws;
    float *fbuf = (float *)(buf + z.mw * z.nb);
    void *pad = fbuf + z.mf * z.nf;
    int32_t *tmp = (int32_t *)((float *)pad + z.pw);
#define BITS(i) ((i) >= 0 ? buf + z.mw * (i) : NULL)
#define FMAP(i) ((i) >= 0 ? fbuf + z.mf * (i) : NULL)
    for (int64_t b = 0; b < n; b++) {
        for (int i = 0; i < nl; i++) {
            const fbb_layer *l = &L[i];
#ifdef FBB_PROFILE /* per-layer CPU time (benchmarks/binary_profile.py) */
            struct timespec t0_, t1_;
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0_);
#endif
            uint32_t *dst = BITS(l->dst);
            const uint32_t *src = BITS(l->src);
            switch (l->op) {
            case OP_HEAD: run_head(l, src, out + b * nout, tmp); break;
            case OP_HEADF: run_headf(l, src, out + b * nout, tmp); break;
            case OP_HEADM: run_headm(l, FMAP(l->fsrc), out + b * nout, (float *)tmp); break;
            case OP_POOLF: pool_f(l, FMAP(l->fsrc), FMAP(l->fdst), dst, (float *)tmp); break;
            default:
                run_layer(l, l->op == OP_STEM ? (const void *)(x + b * in_size)
                                              : (const void *)src,
                          BITS(l->res), dst, FMAP(l->fres), FMAP(l->fdst), pad, tmp, stem,
                          bconv, &bad, stem_q);
                if (l->pool) pool_or(dst, out_size(l, l->h), out_size(l, l->w),
                                     l->cout_pad / 32);
            }
#ifdef FBB_PROFILE
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1_);
            if (i < 256) fbb_prof_ns[i] += (t1_.tv_sec - t0_.tv_sec) * 1000000000.0
                                           + (t1_.tv_nsec - t0_.tv_nsec);
#endif
        }
    }
#undef BITS
#undef FMAP
    return check_finite && bad ? -5 : 0;
}
