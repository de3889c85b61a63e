/* CPU kernels for fewbits' fast inference path (fewbits/export/runtime.py).
 *
 * XNOR / popcount convolution (binary nets), and an in-place per-channel fused multiply-add
 * (evaluation batch norm, which PyTorch computes as fma(x, alpha, beta)).
 *
 * Activations and weights are +-1; bit 1 stands for +1. Channels are packed 64 to a uint64 word
 * (unused high bits are 0 in both operands, so they never count as a mismatch). For one output
 * pixel and channel, each kernel tap inside the image contributes C - 2 * popcount(x ^ w); taps in
 * the zero padding contribute 0, as in a float convolution with zero padding. The result is an
 * exact integer, returned as float.
 *
 * Plain C with pthreads, no torch headers, so it compiles in about a second; Python loads it with
 * ctypes (which releases the GIL during the call).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define FB_MAX_THREADS 64

typedef struct {
  const float *x;
  uint64_t *o;
  int64_t C, Wd, r0, r1;
} pack_args;

static void *pack_run(void *p) {
  const pack_args *a = (const pack_args *)p;
  for (int64_t i = a->r0; i < a->r1; ++i) {
    const float *px = a->x + i * a->C;
    for (int64_t j = 0; j < a->Wd; ++j) {
      uint64_t v = 0;
      const int64_t c0 = 64 * j, c1 = c0 + 64 < a->C ? c0 + 64 : a->C;
      for (int64_t c = c0; c < c1; ++c) v |= (uint64_t)(px[c] > 0.0f) << (c - c0);
      a->o[i * a->Wd + j] = v;
    }
  }
  return 0;
}

/* x: rows x C floats (row-major), out: rows x ceil(C/64) words; bit = (x > 0). */
int fb_pack_signs(const float *x, uint64_t *out, int64_t rows, int64_t C, int64_t nt) {
  const int64_t Wd = (C + 63) / 64;
  pthread_t th[FB_MAX_THREADS];
  pack_args a[FB_MAX_THREADS];
  if (nt < 1) nt = 1;
  if (nt > FB_MAX_THREADS) nt = FB_MAX_THREADS;
  if (nt > rows) nt = rows > 0 ? rows : 1;
  int created[FB_MAX_THREADS] = {0};
  for (int64_t t = 0; t < nt; ++t) {
    a[t] = (pack_args){x, out, C, Wd, rows * t / nt, rows * (t + 1) / nt};
    if (t) created[t] = pthread_create(&th[t], 0, pack_run, &a[t]) == 0;
    if (t && !created[t]) pack_run(&a[t]); /* no thread: do its share here */
  }
  pack_run(&a[0]);
  for (int64_t t = 1; t < nt; ++t)
    if (created[t]) pthread_join(th[t], 0);
  return 0;
}

typedef struct {
  const uint64_t *x, *w;
  float *o;
  int64_t H, W, Wd, C, O, KH, KW, ph, pw, sh, sw, Ho, Wo, r0, r1;
} conv_args;

static void *conv_run(void *p) {
  const conv_args *a = (const conv_args *)p;
  const int64_t O = a->O, Wd = a->Wd;
  int32_t *acc = (int32_t *)malloc(sizeof(int32_t) * (size_t)(O > 0 ? O : 1));
  if (!acc) return (void *)1;
  for (int64_t r = a->r0; r < a->r1; ++r) { /* r = n * Ho + oh */
    const int64_t n = r / a->Ho, oh = r % a->Ho;
    for (int64_t ow = 0; ow < a->Wo; ++ow) {
      int32_t taps = 0;
      for (int64_t o = 0; o < O; ++o) acc[o] = 0;
      for (int64_t kh = 0; kh < a->KH; ++kh) {
        const int64_t ih = oh * a->sh - a->ph + kh;
        if (ih < 0 || ih >= a->H) continue;
        for (int64_t kw = 0; kw < a->KW; ++kw) {
          const int64_t iw = ow * a->sw - a->pw + kw;
          if (iw < 0 || iw >= a->W) continue;
          ++taps;
          const uint64_t *xv = a->x + ((n * a->H + ih) * a->W + iw) * Wd;
          const uint64_t *wv = a->w + (kh * a->KW + kw) * O * Wd;
          if (Wd == 1) {
            const uint64_t xx = xv[0];
            for (int64_t o = 0; o < O; ++o) acc[o] += (int32_t)__builtin_popcountll(xx ^ wv[o]);
          } else {
            for (int64_t o = 0; o < O; ++o) {
              int32_t m = 0;
              for (int64_t j = 0; j < Wd; ++j) m += (int32_t)__builtin_popcountll(xv[j] ^ wv[o * Wd + j]);
              acc[o] += m;
            }
          }
        }
      }
      float *po = a->o + ((n * a->Ho + oh) * a->Wo + ow) * O;
      const int32_t base = taps * (int32_t)a->C;
      for (int64_t o = 0; o < O; ++o) po[o] = (float)(base - 2 * acc[o]);
    }
  }
  free(acc);
  return 0;
}

/* x: (N, H, W, Wd) packed activations; w: (KH, KW, O, Wd) packed weights;
 * out: (N, Ho, Wo, O) float. Returns 0, or 1 when a worker could not allocate. */
int fb_xnor_conv(const uint64_t *x, const uint64_t *w, float *out, int64_t N, int64_t H, int64_t W,
                 int64_t C, int64_t O, int64_t KH, int64_t KW, int64_t ph, int64_t pw, int64_t sh,
                 int64_t sw, int64_t nt) {
  const int64_t Wd = (C + 63) / 64, Ho = (H + 2 * ph - KH) / sh + 1, Wo = (W + 2 * pw - KW) / sw + 1;
  const int64_t rows = N * Ho;
  pthread_t th[FB_MAX_THREADS];
  conv_args a[FB_MAX_THREADS];
  int failed = 0;
  if (nt < 1) nt = 1;
  if (nt > FB_MAX_THREADS) nt = FB_MAX_THREADS;
  if (nt > rows) nt = rows > 0 ? rows : 1;
  int created[FB_MAX_THREADS] = {0};
  for (int64_t t = 0; t < nt; ++t) {
    a[t] = (conv_args){x, w, out, H, W, Wd, C, O, KH, KW, ph, pw, sh, sw, Ho, Wo,
                       rows * t / nt, rows * (t + 1) / nt};
    if (t) created[t] = pthread_create(&th[t], 0, conv_run, &a[t]) == 0;
    if (t && !created[t]) failed |= conv_run(&a[t]) != 0; /* no thread: do its share here */
  }
  failed |= conv_run(&a[0]) != 0;
  for (int64_t t = 1; t < nt; ++t) {
    void *ret = 0;
    if (!created[t]) continue;
    pthread_join(th[t], &ret);
    failed |= ret != 0;
  }
  return failed;
}

typedef struct {
  float *x;
  const float *a, *b;
  int64_t C, inner, r0, r1;
} affine_args;

static void *affine_run(void *p) {
  const affine_args *g = (const affine_args *)p;
  const int64_t C = g->C, inner = g->inner;
  if (inner == 1) { /* channels last: rows of C */
    for (int64_t r = g->r0; r < g->r1; ++r) {
      float *x = g->x + r * C;
      for (int64_t c = 0; c < C; ++c) x[c] = fmaf(x[c], g->a[c], g->b[c]);
    }
  } else { /* channels first: rows are (n, c) planes of `inner` values */
    for (int64_t r = g->r0; r < g->r1; ++r) {
      float *x = g->x + r * inner;
      const float a = g->a[r % C], b = g->b[r % C];
      for (int64_t i = 0; i < inner; ++i) x[i] = fmaf(x[i], a, b);
    }
  }
  return 0;
}

/* x[..., c, ...] = fma(x, a[c], b[c]) in place. inner == 1: x is rows x C (channels last);
 * else x is rows x inner with channel = row % C (N, C, H, W contiguous). */
int fb_affine_inplace(float *x, const float *a, const float *b, int64_t rows, int64_t C,
                      int64_t inner, int64_t nt) {
  pthread_t th[FB_MAX_THREADS];
  affine_args g[FB_MAX_THREADS];
  int created[FB_MAX_THREADS] = {0};
  if (nt < 1) nt = 1;
  if (nt > FB_MAX_THREADS) nt = FB_MAX_THREADS;
  if (rows * C * inner < (1 << 16)) nt = 1; /* not worth a thread */
  if (nt > rows) nt = rows > 0 ? rows : 1;
  for (int64_t t = 0; t < nt; ++t) {
    g[t] = (affine_args){x, a, b, C, inner, rows * t / nt, rows * (t + 1) / nt};
    if (t) created[t] = pthread_create(&th[t], 0, affine_run, &g[t]) == 0;
    if (t && !created[t]) affine_run(&g[t]);
  }
  affine_run(&g[0]);
  for (int64_t t = 1; t < nt; ++t)
    if (created[t]) pthread_join(th[t], 0);
  return 0;
}
