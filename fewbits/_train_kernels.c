/* Fused CPU kernels for the activation quantizers of quantization-aware training
 * (fewbits/_kernels.py loads them with ctypes).
 *
 * In eager PyTorch one fixed-point activation quantizer is ~10 passes over the activation
 * (clamp, mask, multiply, abs, round, tie fix, copysign, multiply, NaN check) and its backward
 * two more; here each is one pass. Every kernel repeats the *same float32 operations in the
 * same order* as the PyTorch path in fewbits/_math.py, so the results are bit-identical:
 * rounding is round-half-even (nearbyintf) plus 1 at the ties it sent down, never a
 * `floor(x + 0.5)`, and the file is compiled with -ffp-contract=off so `r * scale + lo` is never
 * fused into one FMA (PyTorch rounds the product first).
 *
 * Every forward also counts the non-finite inputs, so the NaN/inf check costs no extra pass.
 * Work is split over `nt` threads in contiguous chunks (ctypes releases the GIL): built with
 * OpenMP, the threads of the OpenMP runtime PyTorch's CPU ops already use (after each op they
 * spin for a while waiting for the next one: a new pthread would share a core with one of
 * them), else one pthread per chunk. The chunks, and so every result, are the same either way.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define FB_MAX_THREADS 64
#define FB_MIN_CHUNK 16384 /* elements per thread below which a thread costs more than it saves */

typedef struct {
  const float *x, *dy;
  float *y;
  uint8_t *m;
  int64_t i0, i1;
  float a, b, c, d; /* kernel-specific scalars */
  int64_t k;        /* kernel-specific integer */
  const void *args; /* kernel-specific argument block */
  int64_t bad;      /* out: non-finite inputs */
  double s1, s2;    /* out: sums */
} job;

typedef void (*job_fn)(job *);

/* Split [0, n) over up to nt threads, run fn on each chunk, then gather the outputs into
 * jobs[0] (bad count and sums, added in chunk order so the result does not depend on timing). */
typedef struct {
  job j;
  job_fn fn;
} task;

static void *run_task(void *p) {
  task *t = (task *)p;
  t->fn(&t->j);
  return 0;
}

static void parallel(job *proto, int64_t n, int64_t nt, job_fn fn) {
  task t[FB_MAX_THREADS];
  if (nt < 1) nt = 1;
  if (nt > FB_MAX_THREADS) nt = FB_MAX_THREADS;
  if (nt > 1 && n / nt < FB_MIN_CHUNK) nt = n / FB_MIN_CHUNK > 1 ? n / FB_MIN_CHUNK : 1;
  int64_t step = (n + nt - 1) / nt;
  step = (step + 15) & ~(int64_t)15; /* chunks start on 64-byte boundaries of float data */
  int64_t used = 0;
  for (int64_t i = 0; i < nt; ++i) {
    int64_t i0 = i * step, i1 = i0 + step < n ? i0 + step : n;
    if (i0 >= n && i > 0) break;
    t[i].j = *proto;
    t[i].j.i0 = i0;
    t[i].j.i1 = i1 > i0 ? i1 : i0;
    t[i].j.bad = 0;
    t[i].j.s1 = t[i].j.s2 = 0.0;
    t[i].fn = fn;
    ++used;
  }
  if (used == 1) {
    run_task(&t[0]);
  } else {
#ifdef _OPENMP
#pragma omp parallel for num_threads(used) schedule(static, 1)
    for (int64_t i = 0; i < used; ++i) run_task(&t[i]);
#else
    pthread_t th[FB_MAX_THREADS];
    int created[FB_MAX_THREADS] = {0};
    for (int64_t i = 1; i < used; ++i)
      created[i] = pthread_create(&th[i], 0, run_task, &t[i]) == 0;
    run_task(&t[0]);
    for (int64_t i = 1; i < used; ++i) {
      if (created[i])
        pthread_join(th[i], 0);
      else
        run_task(&t[i]); /* no thread to be had: do the chunk here */
    }
#endif
  }
  proto->bad = 0;
  proto->s1 = proto->s2 = 0.0;
  for (int64_t i = 0; i < used; ++i) {
    proto->bad += t[i].j.bad;
    proto->s1 += t[i].j.s1;
    proto->s2 += t[i].j.s2;
  }
}

/* ------------------------------------------------------------------ fixed point
 * c = clamp(x, lo, hi); v = c * inv (inv != 0: delta a power of two) or c / delta;
 * y = copysign(round_half_away(|v|), v) * delta; mask = (c == x).
 * `xi <= lo` (not `<`) makes c = +0.0 for x = -0.0 when lo = 0, as PyTorch's maximum(x, 0)
 * returns. a = lo, b = hi, c = inv, d = delta. Each variant is its own loop so that it vectorises
 * (branch-free body, restrict pointers, the non-finite flag as an OR). */
#define FB_FIXED_POINT_LOOP(SCALE, STORE_MASK)                                        \
  for (int64_t i = i0; i < i1; ++i) {                                                 \
    const float xi = x[i];                                                            \
    bad |= !(xi - xi == 0.0f);                                                        \
    const float c = xi <= lo ? lo : (xi > hi ? hi : xi);                              \
    const float v = SCALE;                                                            \
    const float a = fabsf(v);                                                         \
    float r = nearbyintf(a);                                                          \
    r += (a - r == 0.5f) ? 1.0f : 0.0f;                                               \
    y[i] = copysignf(r, v) * d;                                                       \
    STORE_MASK;                                                                       \
  }

static void fixed_point_chunk(job *j) {
  const int64_t i0 = j->i0, i1 = j->i1; /* locals: a uint8_t store may alias j */
  const float *restrict x = j->x;
  float *restrict y = j->y;
  uint8_t *restrict m = j->m;
  const float lo = j->a, hi = j->b, inv = j->c, d = j->d;
  int bad = 0;
  if (m && inv != 0.0f) {
    FB_FIXED_POINT_LOOP(c * inv, m[i] = c == xi)
  } else if (m) {
    FB_FIXED_POINT_LOOP(c / d, m[i] = c == xi)
  } else if (inv != 0.0f) {
    FB_FIXED_POINT_LOOP(c * inv, (void)0)
  } else {
    FB_FIXED_POINT_LOOP(c / d, (void)0)
  }
  j->bad = bad;
}

int64_t fb_fixed_point(const float *x, float *y, uint8_t *mask, int64_t n, float lo, float hi,
                       float inv, float delta, int64_t nt) {
  job p = {0};
  p.x = x, p.y = y, p.m = mask, p.a = lo, p.b = hi, p.c = inv, p.d = delta;
  parallel(&p, n, nt, fixed_point_chunk);
  return p.bad;
}

/* ------------------------------------------------------------------ min-max
 * c = clamp(x, lo, hi); v = (c - lo) / scale (>= 0 or -0.0); r = round_half_even(v) + [tie];
 * y = r * scale + lo; code = 1 if x < lo, 2 if x > hi, else 0.  a = lo, b = hi, c = scale. */
#define FB_MIN_MAX_LOOP(STORE_CODE)                                                   \
  for (int64_t i = i0; i < i1; ++i) {                                                 \
    const float xi = x[i];                                                            \
    bad |= !(xi - xi == 0.0f);                                                        \
    const float c = xi <= lo ? lo : (xi > hi ? hi : xi);                              \
    const float v = (c - lo) / s;                                                     \
    float r = nearbyintf(v);                                                          \
    r += (v - r == 0.5f) ? 1.0f : 0.0f;                                               \
    const float q = r * s;                                                            \
    y[i] = q + lo;                                                                    \
    STORE_CODE;                                                                       \
  }

static void min_max_chunk(job *j) {
  const int64_t i0 = j->i0, i1 = j->i1; /* locals: a uint8_t store may alias j */
  const float *restrict x = j->x;
  float *restrict y = j->y;
  uint8_t *restrict m = j->m;
  const float lo = j->a, hi = j->b, s = j->c;
  int bad = 0;
  if (m) {
    FB_MIN_MAX_LOOP(m[i] = (uint8_t)((xi < lo) | ((xi > hi) << 1)))
  } else {
    FB_MIN_MAX_LOOP((void)0)
  }
  j->bad = bad;
}

/* The grid of one min-max range: _math.min_max_range's float32 operations in its order (the
 * eps nudge, scale, zero point clamped or rounded half away, lo, hi); out = {scale, lo, hi}.
 * A scalar computation, but from Python it was ~15 tensor operations (~0.15 ms) per call. */
void fb_min_max_grid(float rmin, float rmax, float lmin, float lmax, float eps, float *out) {
  const float qmax = rmax - rmin < eps ? rmin + eps : rmax;
  const float s = (qmax - rmin) / (lmax - lmin);
  float zp = lmin - rmin / s;
  if (zp <= lmin) {
    zp = lmin;
  } else if (zp >= lmax) {
    zp = lmax;
  } else {
    const float a = fabsf(zp);
    float r = nearbyintf(a);
    r += (a - r == 0.5f) ? 1.0f : 0.0f;
    zp = copysignf(r, zp);
  }
  out[0] = s;
  out[1] = (lmin - zp) * s;
  out[2] = (lmax - zp) * s;
}

int64_t fb_min_max(const float *x, float *y, uint8_t *code, int64_t n, float lo, float hi,
                   float scale, int64_t nt) {
  job p = {0};
  p.x = x, p.y = y, p.m = code, p.a = lo, p.b = hi, p.c = scale;
  parallel(&p, n, nt, min_max_chunk);
  return p.bad;
}

/* ------------------------------------------------------------------ power of two
 * The float32 bit path of _math._pow2_bits, on int32 bits with the same wrap-around:
 * a = bits(|x|); in_range = a < limit; keep = a >= thr (with zero); a = clamp((a + R) & EXP,
 * pmin, pmax); then the sign bit where x < 0 (signed), or negatives to 0 / pmin (unsigned).
 * flags: bit 0 sign, bit 1 with_zero. */
typedef struct {
  int32_t limit, thr, round, pmin, pmax;
  int64_t flags;
} pow2_args;

#define FB_POW2_LOOP(STORE_MASK)                                                      \
  for (int64_t i = i0; i < i1; ++i) {                                                 \
    const float xi = x[i];                                                            \
    bad |= !(xi - xi == 0.0f);                                                        \
    int32_t a = (int32_t)(xb[i] & 0x7FFFFFFFu);                                       \
    int32_t in_range = a < P.limit;                                                   \
    const int32_t keep = with_zero ? a >= P.thr : 1;                                  \
    const int32_t neg = xi < 0.0f;                                                    \
    a = (int32_t)(((uint32_t)a + (uint32_t)P.round) & 0x7F800000u);                   \
    a = a < P.pmin ? P.pmin : (a > P.pmax ? P.pmax : a);                              \
    if (sign) {                                                                       \
      a = a * keep;                                                                   \
      a = (int32_t)((uint32_t)a | (neg ? 0x80000000u : 0u));                          \
    } else {                                                                          \
      in_range = in_range & !neg;                                                     \
      a = a * (keep & !neg);                                                          \
      a = with_zero ? a : a + neg * P.pmin;                                           \
    }                                                                                 \
    yb[i] = (uint32_t)a;                                                              \
    STORE_MASK;                                                                       \
  }

static void pow2_chunk(job *j) {
  const int64_t i0 = j->i0, i1 = j->i1; /* locals: a uint8_t store may alias j */
  const float *restrict x = j->x;
  const uint32_t *restrict xb = (const uint32_t *)j->x;
  uint32_t *restrict yb = (uint32_t *)j->y;
  uint8_t *restrict m = j->m;
  const pow2_args P = *(const pow2_args *)j->args;
  const int sign = (int)(P.flags & 1), with_zero = (int)((P.flags >> 1) & 1);
  int bad = 0;
  if (m) {
    FB_POW2_LOOP(m[i] = (uint8_t)in_range)
  } else {
    FB_POW2_LOOP((void)0)
  }
  j->bad = bad;
}

int64_t fb_pow2(const float *x, float *y, uint8_t *mask, int64_t n, int32_t limit, int32_t thr,
                int32_t round, int32_t pmin, int32_t pmax, int64_t flags, int64_t nt) {
  pow2_args a = {limit, thr, round, pmin, pmax, flags};
  job p = {0};
  p.x = x, p.y = y, p.m = mask, p.args = &a;
  parallel(&p, n, nt, pow2_chunk);
  return p.bad;
}

/* ------------------------------------------------------------------ binary
 * y = 1 if x > 0, z if x == 0, else low (a = low, b = z); mask = |x| < 1. The binary activations
 * pass z = low; BinaryConnect weights low = -1, z = sign(0) without a mask. */
#define FB_BINARY_LOOP(STORE_MASK)                                                      \
  for (int64_t i = i0; i < i1; ++i) {                                                 \
    const float xi = x[i];                                                            \
    bad |= !(xi - xi == 0.0f);                                                        \
    y[i] = xi > 0.0f ? 1.0f : (xi == 0.0f ? z : low);                                 \
    STORE_MASK;                                                                       \
  }

static void binary_act_chunk(job *j) {
  const int64_t i0 = j->i0, i1 = j->i1; /* locals: a uint8_t store may alias j */
  const float *restrict x = j->x;
  float *restrict y = j->y;
  uint8_t *restrict m = j->m;
  const float low = j->a, z = j->b;
  int bad = 0;
  if (m) {
    FB_BINARY_LOOP(m[i] = fabsf(xi) < 1.0f)
  } else {
    FB_BINARY_LOOP((void)0)
  }
  j->bad = bad;
}

int64_t fb_binary_act(const float *x, float *y, uint8_t *mask, int64_t n, float low, float z,
                      int64_t nt) {
  job p = {0};
  p.x = x, p.y = y, p.m = mask, p.a = low, p.b = z;
  parallel(&p, n, nt, binary_act_chunk);
  return p.bad;
}

/* ------------------------------------------------------------------ backward
 * dx = (m == keep) ? dy * g : +0.0   (g = a; g == 1 skips the multiply, as PyTorch does).
 * With sums (k bit 0): s1 = sum of dy where m == 1, s2 = sum of dy where m == 2, in double,
 * optionally writing dx in the same pass (one read of dy and m, not two). The sums use 16
 * independent double lanes: lane k takes the elements i0 + k (mod 16) of the chunk, the tail
 * goes to lane 0, then the lanes are added in order 0..15. No float sum is reassociated, and
 * the lanes and their order are the same with or without dx, so the sums do not depend on it. */

/* The backward kernels' view of a job (locals: a uint8_t store may alias j). */
#define FB_KEEP_LOCALS(j)                                                             \
  const int64_t i0 = (j)->i0, i1 = (j)->i1;                                           \
  const float *restrict dy = (j)->dy;                                                 \
  float *restrict dx = (j)->y;                                                        \
  const uint8_t *restrict m = (j)->m;                                                 \
  const uint8_t keep = (uint8_t)(j)->b;                                               \
  const float g = (j)->a

/* Without sums: dx alone, and return. */
#define FB_KEEP_DX_ONLY(j)                                                            \
  if (!((j)->k & 1)) {                                                                \
    if (dx && g == 1.0f) {                                                            \
      for (int64_t i = i0; i < i1; ++i) dx[i] = m[i] == keep ? dy[i] : 0.0f;          \
    } else if (dx) {                                                                  \
      for (int64_t i = i0; i < i1; ++i) dx[i] = m[i] == keep ? dy[i] * g : 0.0f;      \
    }                                                                                 \
    return;                                                                           \
  }

#define FB_SUM_LOOP(STORE_DX)                                                        \
  for (; i + 16 <= i1; i += 16)                                                       \
    for (int k = 0; k < 16; ++k) {                                                    \
      const float v = dy[i + k];                                                      \
      const uint8_t mk = m[i + k];                                                    \
      STORE_DX;                                                                       \
      a1[k] += mk == 1 ? (double)v : 0.0;                                             \
      a2[k] += mk == 2 ? (double)v : 0.0;                                             \
    }

/* After the blocks of 16: the tail into lane 0, then s1, s2 = the lanes added in order. */
#define FB_SUM_TAIL                                                                   \
  for (; i < i1; ++i) {                                                               \
    if (dx) dx[i] = m[i] == keep ? (g == 1.0f ? dy[i] : dy[i] * g) : 0.0f;            \
    a1[0] += m[i] == 1 ? (double)dy[i] : 0.0;                                         \
    a2[0] += m[i] == 2 ? (double)dy[i] : 0.0;                                         \
  }                                                                                   \
  double s1 = 0.0, s2 = 0.0;                                                          \
  for (int k = 0; k < 16; ++k) s1 += a1[k], s2 += a2[k]

/* The portable form, and the kernel of CPUs without the vector code below. The compiler does
 * not vectorise its sum loop (~10x slower than the vector code on a 64x32x32x32 gradient).
 * Which NaN an addition of two NaNs returns depends on the operand order the compiler picked
 * for each lane here (x86 returns the first operand's NaN), so the vector code, whose results
 * are otherwise the same bits (the same IEEE additions in the same order), redoes a chunk with
 * NaN sums here: even NaN payloads stay what this code gives. */
/* noinline: compiled on its own, as it always was, whatever code calls it. */
__attribute__((noinline)) static void keep_chunk_scalar(job *j) {
  FB_KEEP_LOCALS(j);
  FB_KEEP_DX_ONLY(j);
  double a1[16] = {0}, a2[16] = {0};
  int64_t i = i0;
  if (dx && g == 1.0f) {
    FB_SUM_LOOP(dx[i + k] = mk == keep ? v : 0.0f)
  } else if (dx) {
    FB_SUM_LOOP(dx[i + k] = mk == keep ? v * g : 0.0f)
  } else {
    FB_SUM_LOOP((void)0)
  }
  FB_SUM_TAIL;
  j->s1 = s1, j->s2 = s2;
}

/* The vector form (x86 AVX-512 or AVX2 intrinsics): fb_keep16 does 16 elements, one per lane.
 * A lane left out of a sum adds +0.0, as the scalar `cond ? x : 0.0` does, and selecting before
 * widening to double is the same as after (both exact). */
#if defined(__AVX512F__)
#include <immintrin.h>
#define FB_VEC_LANES 16
typedef struct {
  __m512d a1lo, a1hi, a2lo, a2hi; /* lanes 0-7 and 8-15 of each sum */
} fb_acc;

static inline void fb_keep16(const float *dy, const uint8_t *m, float *dx, uint8_t keep, float g,
                             fb_acc *a) {
  const __m512 v = _mm512_loadu_ps(dy);
  const __m512i mi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)m));
  if (dx) {
    const __m512 w = g == 1.0f ? v : _mm512_mul_ps(v, _mm512_set1_ps(g));
    _mm512_storeu_ps(dx, _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(mi, _mm512_set1_epi32(keep)),
                                             w));
  }
  const __mmask16 k1 = _mm512_cmpeq_epi32_mask(mi, _mm512_set1_epi32(1));
  const __mmask16 k2 = _mm512_cmpeq_epi32_mask(mi, _mm512_set1_epi32(2));
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  a->a1lo = _mm512_add_pd(a->a1lo, _mm512_maskz_cvtps_pd((__mmask8)k1, lo));
  a->a1hi = _mm512_add_pd(a->a1hi, _mm512_maskz_cvtps_pd((__mmask8)(k1 >> 8), hi));
  a->a2lo = _mm512_add_pd(a->a2lo, _mm512_maskz_cvtps_pd((__mmask8)k2, lo));
  a->a2hi = _mm512_add_pd(a->a2hi, _mm512_maskz_cvtps_pd((__mmask8)(k2 >> 8), hi));
}

static inline void fb_acc_store(const fb_acc *a, double *a1, double *a2) {
  _mm512_storeu_pd(a1, a->a1lo), _mm512_storeu_pd(a1 + 8, a->a1hi);
  _mm512_storeu_pd(a2, a->a2lo), _mm512_storeu_pd(a2 + 8, a->a2hi);
}
#elif defined(__AVX2__)
#include <immintrin.h>
#define FB_VEC_LANES 16
typedef struct {
  __m256d a1[4], a2[4]; /* lanes 0-3, 4-7, 8-11, 12-15 of each sum */
} fb_acc;

static inline void fb_keep16(const float *dy, const uint8_t *m, float *dx, uint8_t keep, float g,
                             fb_acc *a) {
  for (int h = 0; h < 2; ++h) { /* two halves of 8 */
    const __m256 v = _mm256_loadu_ps(dy + 8 * h);
    const __m256i mi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(m + 8 * h)));
    if (dx) {
      const __m256 w = g == 1.0f ? v : _mm256_mul_ps(v, _mm256_set1_ps(g));
      const __m256i sel = _mm256_cmpeq_epi32(mi, _mm256_set1_epi32(keep));
      _mm256_storeu_ps(dx + 8 * h, _mm256_and_ps(w, _mm256_castsi256_ps(sel)));
    }
    const __m256 t1 = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(
                                           mi, _mm256_set1_epi32(1))));
    const __m256 t2 = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(
                                           mi, _mm256_set1_epi32(2))));
    a->a1[2 * h] = _mm256_add_pd(a->a1[2 * h], _mm256_cvtps_pd(_mm256_castps256_ps128(t1)));
    a->a1[2 * h + 1] = _mm256_add_pd(a->a1[2 * h + 1],
                                     _mm256_cvtps_pd(_mm256_extractf128_ps(t1, 1)));
    a->a2[2 * h] = _mm256_add_pd(a->a2[2 * h], _mm256_cvtps_pd(_mm256_castps256_ps128(t2)));
    a->a2[2 * h + 1] = _mm256_add_pd(a->a2[2 * h + 1],
                                     _mm256_cvtps_pd(_mm256_extractf128_ps(t2, 1)));
  }
}

static inline void fb_acc_store(const fb_acc *a, double *a1, double *a2) {
  for (int q = 0; q < 4; ++q) _mm256_storeu_pd(a1 + 4 * q, a->a1[q]);
  for (int q = 0; q < 4; ++q) _mm256_storeu_pd(a2 + 4 * q, a->a2[q]);
}
#endif

#ifdef FB_VEC_LANES
static void keep_chunk(job *j) {
  FB_KEEP_LOCALS(j);
  FB_KEEP_DX_ONLY(j);
  fb_acc acc;
  memset(&acc, 0, sizeof acc); /* all lanes +0.0 */
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) fb_keep16(dy + i, m + i, dx ? dx + i : 0, keep, g, &acc);
  double a1[16], a2[16];
  fb_acc_store(&acc, a1, a2);
  FB_SUM_TAIL;
  if (s1 == s1 && s2 == s2) {
    j->s1 = s1, j->s2 = s2;
  } else { /* NaN sums (a diverged step): the NaN bits of the scalar code */
    keep_chunk_scalar(j);
  }
}
#else
#define keep_chunk keep_chunk_scalar
#endif

/* dx may be NULL (sums only); sums may be NULL (no range gradients). */
void fb_keep(const float *dy, const uint8_t *m, float *dx, int64_t n, int64_t keep, float g,
             double *sums, int64_t nt) {
  job p = {0};
  p.dy = dy, p.m = (uint8_t *)m, p.y = dx, p.a = g, p.b = (float)keep, p.k = sums != 0;
  parallel(&p, n, nt, keep_chunk);
  if (sums) sums[0] = p.s1, sums[1] = p.s2;
}
