/* Whole-network BinaryNet inference in one call: float stem, XNOR-popcount convolutions on
 * bit-packed activations, integer thresholds in place of batch norm + binary tanh, float head.
 *
 * Layout (as larq compute-engine's canonical bitpacking): activations are NHWC with the
 * channels of a pixel packed into 32-bit words, channel c in bit c % 32 of word c / 32, bit 1
 * meaning +1 and bit 0 meaning -1; bits past the last channel are 0 in both activations and
 * weights, so their XOR is 0 and they count nothing. A binary convolution computes, per output
 * pixel and channel, D = popcount(a XOR w) over the im2col row of the pixel (taps outside the
 * image are zero words), subtracts the popcount of the weight words of those taps (zero-padding
 * correction), and gets the exact integer sum = n_valid - 2 D of +-1 products. The output bit
 * is (sum >= T) XOR flip (T, flip from fewbits.runtime.binary_fold); with a residual input the
 * threshold is T1 where the residual bit is +1 and T0 where it is -1.
 *
 * The stem (float input, +-1 weights) accumulates the taps of each output channel in the
 * same order on every ISA (vectorized over output channels; x * +-1 is exact, so FMA or not
 * gives the same sums): all ISA paths give bit-identical results.
 *
 * ISA paths: AVX-512 (F + VPOPCNTDQ), AVX2 (+FMA, nibble-table popcount as Mula et al.), and
 * portable C, each compiled with a target attribute in this one file and chosen at run time.
 */
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

enum { OP_STEM = 0, OP_BCONV = 1, OP_HEAD = 2 };
enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
enum { NBUF = 4 };

typedef struct {
    int32_t op, cin, cout, h, w, k, pad, pool; /* input map h x w; pool: 2x2 max after */
    int32_t src, dst, res;                     /* buffer indices (-1: none / network input) */
    int32_t cout_pad;                          /* multiple of 32 */
    const float *wf;      /* STEM: [taps][cout_pad] +-1; HEAD: [cout][cin] +-1 */
    const uint32_t *wb;   /* BCONV: [k*k*wd_in][cout_pad] weight words, transposed */
    const int32_t *wpop;  /* BCONV: [k*k][cout_pad] popcount of each tap's weight words */
    const int32_t *t0, *t1; /* BCONV thresholds [cout_pad]; t1 where the residual bit is +1 */
    const float *tf;      /* STEM thresholds [cout_pad] */
    const uint32_t *flip; /* [cout_pad / 32] */
    const uint32_t *ninf, *pinf; /* STEM: decision at -inf / +inf [cout_pad / 32] */
    const float *bias;    /* HEAD [cout] */
} fbb_layer;

static int wd_of(int c) { return (c + 31) / 32; }
static int out_size(const fbb_layer *L, int n) { return n + 2 * L->pad - L->k + 1; }

static inline int popcount32(uint32_t v) { /* SWAR: no popcnt instruction on baseline x86-64 */
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    return (int)((((v + (v >> 4)) & 0x0f0f0f0fu) * 0x01010101u) >> 24);
}

/* Decision word of 32 stem outputs from their float sums s (NaN -> -1 as BN(NaN) is NaN). */
static inline uint32_t stem_bits(const float *s, const fbb_layer *L, int ob) {
    uint32_t f = L->flip[ob / 32], w = 0;
    for (int j = 0; j < 32; j++) {
        float v = s[j], t = L->tf[ob + j];
        int bit;
        if (isinf(v)) bit = (int)(((v > 0 ? L->pinf : L->ninf)[ob / 32] >> j) & 1u);
        else bit = ((f >> j) & 1u) ? (v < t) : (v >= t);
        w |= (uint32_t)bit << j;
    }
    return w;
}

/* ---------------------------------------------------------------- portable kernels */

static void stem_pixel_generic(const float *col, int taps, const fbb_layer *L, uint32_t *out) {
    float s[32];
    for (int ob = 0; ob < L->cout_pad; ob += 32) {
        for (int j = 0; j < 32; j++) s[j] = 0.0f;
        for (int t = 0; t < taps; t++) {
            const float *w = L->wf + (size_t)t * L->cout_pad + ob;
            for (int j = 0; j < 32; j++) s[j] += col[t] * w[j];
        }
        out[ob / 32] = stem_bits(s, L, ob);
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

static void bconv_pixel_generic(const uint32_t *a, int K, const fbb_layer *L, int nvalid,
                                const int32_t *corr, const uint32_t *res, uint32_t *out) {
    int32_t D[32];
    for (int ob = 0; ob < L->cout_pad; ob += 32) {
        for (int j = 0; j < 32; j++) D[j] = 0;
        for (int k = 0; k < K; k++) {
            const uint32_t *w = L->wb + (size_t)k * L->cout_pad + ob;
            for (int j = 0; j < 32; j++) D[j] += popcount32(a[k] ^ w[j]);
        }
        out[ob / 32] = bconv_word(D, L, ob, nvalid, corr, res);
    }
}

#if FBB_X86
/* ---------------------------------------------------------------- AVX2 + FMA */

__attribute__((target("avx2,fma")))
static void stem_pixel_avx2(const float *col, int taps, const fbb_layer *L, uint32_t *out) {
    float s[32];
    for (int ob = 0; ob < L->cout_pad; ob += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int t = 0; t < taps; t++) {
            const float *w = L->wf + (size_t)t * L->cout_pad + ob;
            __m256 x = _mm256_set1_ps(col[t]);
            a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(w), a0);
            a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(w + 8), a1);
            a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(w + 16), a2);
            a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(w + 24), a3);
        }
        _mm256_storeu_ps(s, a0);
        _mm256_storeu_ps(s + 8, a1);
        _mm256_storeu_ps(s + 16, a2);
        _mm256_storeu_ps(s + 24, a3);
        out[ob / 32] = stem_bits(s, L, ob);
    }
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

__attribute__((target("avx2")))
static void bconv_pixel_avx2(const uint32_t *a, int K, const fbb_layer *L, int nvalid,
                             const int32_t *corr, const uint32_t *res, uint32_t *out) {
    int32_t D[32];
    for (int ob = 0; ob < L->cout_pad; ob += 32) {
        __m256i d[4], c[4];
        for (int i = 0; i < 4; i++) d[i] = c[i] = _mm256_setzero_si256();
        for (int k = 0; k < K; k++) {
            const uint32_t *w = L->wb + (size_t)k * L->cout_pad + ob;
            __m256i x = _mm256_set1_epi32((int)a[k]);
            for (int i = 0; i < 4; i++) /* <= 8 per byte per step: flush every 31 steps */
                c[i] = _mm256_add_epi8(c[i], popcnt8_avx2(_mm256_xor_si256(
                    x, _mm256_loadu_si256((const __m256i *)(w + 8 * i)))));
            if (k % 31 == 30) {
                for (int i = 0; i < 4; i++) {
                    d[i] = _mm256_add_epi32(d[i], bytes_to_i32(c[i]));
                    c[i] = _mm256_setzero_si256();
                }
            }
        }
        for (int i = 0; i < 4; i++) {
            d[i] = _mm256_add_epi32(d[i], bytes_to_i32(c[i]));
            _mm256_storeu_si256((__m256i *)(D + 8 * i), d[i]);
        }
        out[ob / 32] = bconv_word(D, L, ob, nvalid, corr, res);
    }
}

/* ---------------------------------------------------------------- AVX-512 (F, VPOPCNTDQ) */

__attribute__((target("avx512f")))
static void stem_pixel_avx512(const float *col, int taps, const fbb_layer *L, uint32_t *out) {
    for (int ob = 0; ob < L->cout_pad; ob += 32) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (int t = 0; t < taps; t++) {
            const float *w = L->wf + (size_t)t * L->cout_pad + ob;
            __m512 x = _mm512_set1_ps(col[t]);
            a0 = _mm512_fmadd_ps(x, _mm512_loadu_ps(w), a0);
            a1 = _mm512_fmadd_ps(x, _mm512_loadu_ps(w + 16), a1);
        }
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
        uint32_t f = L->flip[ob / 32];
        uint32_t w = (ge & ~f) | (lt & f);
        w = (w & ~(ip | in)) | (ip & L->pinf[ob / 32]) | (in & L->ninf[ob / 32]);
        out[ob / 32] = w;
    }
}

__attribute__((target("avx512f,avx512vpopcntdq")))
static void bconv_pixel_avx512(const uint32_t *a, int K, const fbb_layer *L, int nvalid,
                               const int32_t *corr, const uint32_t *res, uint32_t *out) {
    const __m512i nv = _mm512_set1_epi32(nvalid);
    for (int ob = 0; ob < L->cout_pad; ob += 32) {
        __m512i d0 = _mm512_setzero_si512(), d1 = d0;
        const uint32_t *w = L->wb + ob;
        for (int k = 0; k < K; k++, w += L->cout_pad) {
            __m512i x = _mm512_set1_epi32((int)a[k]);
            d0 = _mm512_add_epi32(d0, _mm512_popcnt_epi32(_mm512_xor_si512(
                x, _mm512_loadu_si512(w))));
            d1 = _mm512_add_epi32(d1, _mm512_popcnt_epi32(_mm512_xor_si512(
                x, _mm512_loadu_si512(w + 16))));
        }
        if (corr) {
            d0 = _mm512_sub_epi32(d0, _mm512_loadu_si512(corr + ob));
            d1 = _mm512_sub_epi32(d1, _mm512_loadu_si512(corr + ob + 16));
        }
        __m512i s0 = _mm512_sub_epi32(nv, _mm512_add_epi32(d0, d0));
        __m512i s1 = _mm512_sub_epi32(nv, _mm512_add_epi32(d1, d1));
        __m512i t0 = _mm512_loadu_si512(L->t0 + ob), t1 = _mm512_loadu_si512(L->t0 + ob + 16);
        if (res) {
            uint32_t r = res[ob / 32];
            t0 = _mm512_mask_blend_epi32((__mmask16)(r & 0xffffu), t0,
                                         _mm512_loadu_si512(L->t1 + ob));
            t1 = _mm512_mask_blend_epi32((__mmask16)(r >> 16), t1,
                                         _mm512_loadu_si512(L->t1 + ob + 16));
        }
        uint32_t ge = (uint32_t)_mm512_cmpge_epi32_mask(s0, t0)
                      | ((uint32_t)_mm512_cmpge_epi32_mask(s1, t1) << 16);
        out[ob / 32] = ge ^ L->flip[ob / 32];
    }
}
#endif

/* ---------------------------------------------------------------- ISA selection */

typedef void (*stem_fn)(const float *, int, const fbb_layer *, uint32_t *);
typedef void (*bconv_fn)(const uint32_t *, int, const fbb_layer *, int, const int32_t *,
                         const uint32_t *, uint32_t *);

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

static void run_stem(const fbb_layer *L, const float *x, uint32_t *out, float *col,
                     stem_fn kern) {
    int k = L->k, p = L->pad, H = L->h, W = L->w, oh = out_size(L, H), ow = out_size(L, W);
    int taps = L->cin * k * k, wd = L->cout_pad / 32;
    for (int oy = 0; oy < oh; oy++)
        for (int ox = 0; ox < ow; ox++) {
            int t = 0; /* PyTorch weight order: (c, ky, kx) */
            for (int c = 0; c < L->cin; c++)
                for (int ky = 0; ky < k; ky++) {
                    int y = oy + ky - p;
                    for (int kx = 0; kx < k; kx++, t++) {
                        int xx = ox + kx - p;
                        col[t] = (y >= 0 && y < H && xx >= 0 && xx < W)
                                     ? x[((size_t)c * H + y) * W + xx] : 0.0f;
                    }
                }
            kern(col, taps, L, out + ((size_t)oy * ow + ox) * wd);
        }
}

static void run_bconv(const fbb_layer *L, const uint32_t *in, const uint32_t *res,
                      uint32_t *out, uint32_t *col, int32_t *corr, bconv_fn kern) {
    int k = L->k, p = L->pad, H = L->h, W = L->w, oh = out_size(L, H), ow = out_size(L, W);
    int wi = wd_of(L->cin), wo = L->cout_pad / 32, K = k * k * wi;
    for (int oy = 0; oy < oh; oy++) {
        int ky0 = p - oy > 0 ? p - oy : 0, ky1 = H + p - oy < k ? H + p - oy : k;
        for (int ox = 0; ox < ow; ox++) {
            int kx0 = p - ox > 0 ? p - ox : 0, kx1 = W + p - ox < k ? W + p - ox : k;
            int border = ky0 > 0 || ky1 < k || kx0 > 0 || kx1 < k;
            const uint32_t *a;
            if (k == 1 && !border) {
                a = in + ((size_t)oy * W + ox) * wi;
            } else {
                for (int ky = 0; ky < k; ky++)
                    for (int kx = 0; kx < k; kx++) {
                        uint32_t *dst = col + (size_t)(ky * k + kx) * wi;
                        if (ky >= ky0 && ky < ky1 && kx >= kx0 && kx < kx1)
                            memcpy(dst, in + ((size_t)(oy + ky - p) * W + (ox + kx - p)) * wi,
                                   sizeof(uint32_t) * wi);
                        else
                            memset(dst, 0, sizeof(uint32_t) * wi);
                    }
                a = col;
            }
            if (border) { /* the zero words of outside taps counted their weights' popcount */
                memset(corr, 0, sizeof(int32_t) * L->cout_pad);
                for (int ky = 0; ky < k; ky++)
                    for (int kx = 0; kx < k; kx++) {
                        if (ky >= ky0 && ky < ky1 && kx >= kx0 && kx < kx1) continue;
                        const int32_t *wp = L->wpop + (size_t)(ky * k + kx) * L->cout_pad;
                        for (int o = 0; o < L->cout_pad; o++) corr[o] += wp[o];
                    }
            }
            int nvalid = L->cin * (ky1 - ky0) * (kx1 - kx0);
            size_t pix = (size_t)oy * ow + ox;
            kern(a, K, L, nvalid, border ? corr : NULL, res ? res + pix * wo : NULL,
                 out + pix * wo);
        }
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

static size_t map_words(const fbb_layer *L) {
    return (size_t)out_size(L, L->h) * out_size(L, L->w) * (L->cout_pad / 32);
}

/* Run the program `L[0..nl)` on `n` inputs of `in_size` floats each; logits to `out`
 * (n x the head's cout). Returns 0, or -1 (unsupported ISA), -2 (out of memory),
 * -3 (malformed program). */
int fbb_run(const fbb_layer *L, int nl, int isa, const float *x, int64_t n, int64_t in_size,
            float *out, int64_t out_size_) {
    if (!fbb_isa_supported(isa)) return -1;
    stem_fn stem = stem_pixel_generic;
    bconv_fn bconv = bconv_pixel_generic;
#if FBB_X86
    if (isa == ISA_AVX2) { stem = stem_pixel_avx2; bconv = bconv_pixel_avx2; }
    if (isa == ISA_AVX512) { stem = stem_pixel_avx512; bconv = bconv_pixel_avx512; }
#endif
    if (nl < 2 || L[0].op != OP_STEM || L[nl - 1].op != OP_HEAD) return -3;
    size_t mw = 1, colw = 1, padw = 32;
    for (int i = 0; i < nl; i++) {
        if (L[i].op != OP_HEAD && map_words(&L[i]) > mw) mw = map_words(&L[i]);
        size_t taps = (size_t)L[i].k * L[i].k * (L[i].op == OP_STEM ? L[i].cin : wd_of(L[i].cin));
        if (taps > colw) colw = taps;
        if ((size_t)L[i].cout_pad > padw) padw = L[i].cout_pad;
        if ((size_t)L[i].cin > padw) padw = L[i].cin;
    }
    uint32_t *buf = malloc(sizeof(uint32_t) * mw * NBUF);
    void *col = malloc(sizeof(float) * colw + 64);
    int32_t *tmp = malloc(sizeof(int32_t) * padw);
    if (!buf || !col || !tmp) { free(buf); free(col); free(tmp); return -2; }
    int64_t nout = L[nl - 1].cout;
    if (out_size_ != n * nout) { free(buf); free(col); free(tmp); return -3; }
    for (int64_t b = 0; b < n; b++) {
        for (int i = 0; i < nl; i++) {
            const fbb_layer *l = &L[i];
            uint32_t *dst = l->dst >= 0 ? buf + mw * l->dst : NULL;
            const uint32_t *src = l->src >= 0 ? buf + mw * l->src : NULL;
            if (l->op == OP_STEM) run_stem(l, x + b * in_size, dst, col, stem);
            else if (l->op == OP_BCONV)
                run_bconv(l, src, l->res >= 0 ? buf + mw * l->res : NULL, dst, col, tmp, bconv);
            else run_head(l, src, out + b * nout, tmp);
            if (l->pool && l->op != OP_HEAD)
                pool_or(dst, out_size(l, l->h), out_size(l, l->w), l->cout_pad / 32);
        }
    }
    free(buf); free(col); free(tmp);
    return 0;
}
