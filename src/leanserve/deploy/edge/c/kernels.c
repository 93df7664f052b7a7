/* leanserve portable int8 kernels: see kernels.h for the conventions and the rounding rules.
 * Written for readability first; the loops are plain so any C99 compiler for any core builds them. */
#include "kernels.h"

#include <string.h>

#define LS_MIN(a, b) ((a) < (b) ? (a) : (b))
#define LS_MAX(a, b) ((a) > (b) ? (a) : (b))

/* x * multiplier * 2^(shift - 31), rounded once, ties to even. One 64-bit product and one rounding:
 * gemmlowp's two-step form (a rounding doubling high multiply, then a rounding shift) rounds twice and
 * lands one step off whenever the first rounding reaches a tie the exact value was just short of. */
int32_t ls_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int32_t shift)
{
    const int32_t total = 31 - shift; /* 1..62: the lowering keeps shift <= 30 */
    const int64_t product = (int64_t)x * (int64_t)multiplier;
    int64_t q, remainder, half;
    if (total > 62) {
        return 0;
    }
    q = product >> total; /* floor: an arithmetic shift, as gcc, clang and armcc do */
    remainder = product - q * ((int64_t)1 << total);
    half = (int64_t)1 << (total - 1);
    if (remainder > half || (remainder == half && (q & 1))) {
        q += 1;
    }
    return q > INT32_MAX ? INT32_MAX : (q < INT32_MIN ? INT32_MIN : (int32_t)q);
}

static int8_t ls_saturate(int32_t v, int32_t lo, int32_t hi)
{
    return (int8_t)LS_MIN(LS_MAX(v, lo), hi);
}

/* x rounded to the nearest integer, ties to even, as ONNX QuantizeLinear does; adding and subtracting
 * 1.5 * 2^23 leaves the float unit's round-to-nearest-even to do it without libm's rintf. */
static float ls_round_half_even(float x)
{
    const float magic = 12582912.0f;
    if (x >= 4194304.0f || x <= -4194304.0f) {
        return x; /* already an integer */
    }
    return (x + magic) - magic;
}

void ls_quantize(const float *in, int8_t *out, int32_t n, float scale, int32_t zero_point)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        float v = ls_round_half_even(in[i] / scale) + (float)zero_point;
        v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
        out[i] = (int8_t)(int32_t)v;
    }
}

void ls_dequantize(const int8_t *in, float *out, int32_t n, float scale, int32_t zero_point)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = (float)((int32_t)in[i] - zero_point) * scale;
    }
}

void ls_conv2d(const int8_t *in, const ls_conv_params *p, const int8_t *weights, const int32_t *bias,
               const int32_t *multipliers, const int32_t *shifts, int8_t *out)
{
    const int32_t in_per_group = p->in_c / p->groups;
    const int32_t out_per_group = p->out_c / p->groups;
    int32_t oc, oy, ox, ic, ky, kx;
    for (oc = 0; oc < p->out_c; ++oc) {
        const int32_t first_ic = (oc / out_per_group) * in_per_group;
        const int8_t *w_oc = weights + oc * in_per_group * p->k_h * p->k_w;
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                int32_t acc = bias ? bias[oc] : 0;
                for (ic = 0; ic < in_per_group; ++ic) {
                    const int8_t *plane = in + (first_ic + ic) * p->in_h * p->in_w;
                    const int8_t *w = w_oc + ic * p->k_h * p->k_w;
                    for (ky = 0; ky < p->k_h; ++ky) {
                        const int32_t iy = oy * p->stride_h - p->pad_top + ky * p->dil_h;
                        if (iy < 0 || iy >= p->in_h) {
                            continue; /* padding holds the zero point: it adds nothing */
                        }
                        for (kx = 0; kx < p->k_w; ++kx) {
                            const int32_t ix = ox * p->stride_w - p->pad_left + kx * p->dil_w;
                            if (ix >= 0 && ix < p->in_w) {
                                acc += ((int32_t)plane[iy * p->in_w + ix] - p->in_zp) * (int32_t)w[ky * p->k_w + kx];
                            }
                        }
                    }
                }
                acc = ls_multiply_by_quantized_multiplier(acc, multipliers[oc], shifts[oc]) + p->out_zp;
                out[(oc * p->out_h + oy) * p->out_w + ox] = ls_saturate(acc, p->act_min, p->act_max);
            }
        }
    }
}

void ls_dense(const int8_t *in, int32_t in_features, int32_t out_features, const int8_t *weights,
              const int32_t *bias, const int32_t *multipliers, const int32_t *shifts,
              int32_t in_zp, int32_t out_zp, int32_t act_min, int32_t act_max, int8_t *out)
{
    int32_t o, i;
    for (o = 0; o < out_features; ++o) {
        const int8_t *w = weights + o * in_features;
        int32_t acc = bias ? bias[o] : 0;
        for (i = 0; i < in_features; ++i) {
            acc += ((int32_t)in[i] - in_zp) * (int32_t)w[i];
        }
        acc = ls_multiply_by_quantized_multiplier(acc, multipliers[o], shifts[o]) + out_zp;
        out[o] = ls_saturate(acc, act_min, act_max);
    }
}

void ls_max_pool(const int8_t *in, const ls_pool_params *p, int8_t *out)
{
    int32_t c, oy, ox, ky, kx;
    for (c = 0; c < p->c; ++c) {
        const int8_t *plane = in + c * p->in_h * p->in_w;
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                int32_t best = -128;
                for (ky = 0; ky < p->k_h; ++ky) {
                    const int32_t iy = oy * p->stride_h - p->pad_top + ky;
                    for (kx = 0; kx < p->k_w; ++kx) {
                        const int32_t ix = ox * p->stride_w - p->pad_left + kx;
                        if (iy >= 0 && iy < p->in_h && ix >= 0 && ix < p->in_w) {
                            best = LS_MAX(best, (int32_t)plane[iy * p->in_w + ix]);
                        }
                    }
                }
                out[(c * p->out_h + oy) * p->out_w + ox] = (int8_t)best;
            }
        }
    }
}

/* The mean of each window in the output's scale: the window's sum (zero points removed) times
 * in_scale / (out_scale * count), one multiplier per window size when padding makes the count vary
 * (per_count: multipliers[count - 1]), rounded once, ties to even, as every other requantization. */
void ls_avg_pool(const int8_t *in, const ls_pool_params *p, int32_t in_zp, int32_t out_zp, int32_t act_min,
                 int32_t act_max, const int32_t *multipliers, const int32_t *shifts, int32_t per_count, int8_t *out)
{
    int32_t c, oy, ox, ky, kx;
    for (c = 0; c < p->c; ++c) {
        const int8_t *plane = in + c * p->in_h * p->in_w;
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                int32_t sum = 0, count = 0, which, q;
                for (ky = 0; ky < p->k_h; ++ky) {
                    const int32_t iy = oy * p->stride_h - p->pad_top + ky;
                    for (kx = 0; kx < p->k_w; ++kx) {
                        const int32_t ix = ox * p->stride_w - p->pad_left + kx;
                        if (iy >= 0 && iy < p->in_h && ix >= 0 && ix < p->in_w) {
                            sum += (int32_t)plane[iy * p->in_w + ix] - in_zp;
                            ++count;
                        } else if (p->count_include_pad) {
                            ++count; /* the padding holds the zero point: it adds nothing to the sum */
                        }
                    }
                }
                which = per_count ? LS_MAX(count, 1) - 1 : 0;
                q = ls_multiply_by_quantized_multiplier(sum, multipliers[which], shifts[which]) + out_zp;
                out[(c * p->out_h + oy) * p->out_w + ox] = ls_saturate(q, act_min, act_max);
            }
        }
    }
}

/* TensorFlow Lite's int8 Add: both inputs brought to a common scale with 20 bits of headroom, added,
 * then requantized to the output's scale. */
void ls_add(const int8_t *a, const int8_t *b, int32_t n, const ls_add_params *p, int8_t *out)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        const int32_t sa = ls_multiply_by_quantized_multiplier(((int32_t)a[i] - p->a_zp) * (1 << 20), p->a_mult, p->a_shift);
        const int32_t sb = ls_multiply_by_quantized_multiplier(((int32_t)b[i] - p->b_zp) * (1 << 20), p->b_mult, p->b_shift);
        const int32_t v = ls_multiply_by_quantized_multiplier(sa + sb, p->out_mult, p->out_shift) + p->out_zp;
        out[i] = ls_saturate(v, p->act_min, p->act_max);
    }
}

void ls_requantize(const int8_t *in, int32_t n, int32_t in_zp, int32_t out_zp, int32_t multiplier, int32_t shift,
                   int32_t act_min, int32_t act_max, int8_t *out)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        const int32_t v = ls_multiply_by_quantized_multiplier((int32_t)in[i] - in_zp, multiplier, shift) + out_zp;
        out[i] = ls_saturate(v, act_min, act_max);
    }
}

void ls_clamp(const int8_t *in, int32_t n, int32_t lo, int32_t hi, int8_t *out)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = ls_saturate((int32_t)in[i], lo, hi);
    }
}

/* e^x for x <= 0 without libm: x = k ln2 + r with |r| <= ln2/2, e^r by a degree-6 Taylor polynomial
 * (relative error under 1e-6), 2^k by building the float's exponent bits. */
static float ls_exp_nonpositive(float x)
{
    const float ln2 = 0.69314718f;
    float r, poly, scale;
    int32_t k;
    union { float f; uint32_t u; } bits;
    if (x < -87.0f) {
        return 0.0f;
    }
    k = (int32_t)(x / ln2 - 0.5f);
    r = x - (float)k * ln2;
    poly = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    bits.u = (uint32_t)(k + 127) << 23;
    scale = bits.f;
    return poly * scale;
}

void ls_softmax(float *values, int32_t n)
{
    int32_t i;
    float max = values[0], sum = 0.0f;
    for (i = 1; i < n; ++i) {
        max = values[i] > max ? values[i] : max;
    }
    for (i = 0; i < n; ++i) {
        values[i] = ls_exp_nonpositive(values[i] - max);
        sum += values[i];
    }
    for (i = 0; i < n; ++i) {
        values[i] /= sum;
    }
}

/* the index of each row's largest value (the first on ties, as ONNX ArgMax), written as a float */
void ls_argmax(const int8_t *in, int32_t rows, int32_t n, float *out)
{
    int32_t r, i;
    for (r = 0; r < rows; ++r) {
        int32_t best = 0;
        for (i = 1; i < n; ++i) {
            best = in[r * n + i] > in[r * n + best] ? i : best;
        }
        out[r] = (float)best;
    }
}
