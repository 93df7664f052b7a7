/* leanserve portable int8 kernels for microcontrollers (C99, no malloc, no libc beyond stdint.h/string.h).
 *
 * Tensors are NCHW at batch 1; activations are int8 with a zero point (an ONNX uint8 tensor with zero
 * point z is the same tensor as int8 with zero point z - 128); weights are int8 and symmetric (zero
 * point 0), one scale per output channel; biases are int32 in units of input scale x weight scale.
 *
 * Requantization is fixed point: a real multiplier M = in_scale * w_scale / out_scale (computed in float32,
 * as ONNX Runtime computes it) is stored exactly as a Q31 integer m and an exponent e (M = m * 2^(e - 31)),
 * and acc * M is one 64-bit product rounded once, ties to even: ONNX Runtime's rule (it requantizes in
 * float and rounds with nearbyint). So the two agree except where ONNX Runtime's float32 product lands on
 * the other side of a tie (a value within about 1e-6 of x.5), where they differ by one step. This is
 * TensorFlow Lite's and CMSIS-NN's "single rounding" form with ties to even instead of half up, and not
 * gemmlowp's two-step rounding, which rounds twice and differs from ONNX Runtime on about 0.03% of values.
 */
#ifndef LEANSERVE_KERNELS_H
#define LEANSERVE_KERNELS_H

#include <stdint.h>

typedef struct {
    int32_t in_c, in_h, in_w;
    int32_t out_c, out_h, out_w;
    int32_t k_h, k_w, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, groups;
    int32_t in_zp, out_zp, act_min, act_max;
} ls_conv_params;

typedef struct {
    int32_t c, in_h, in_w, out_h, out_w;
    int32_t k_h, k_w, stride_h, stride_w, pad_top, pad_left;
    int32_t count_include_pad; /* average pooling only */
} ls_pool_params;

typedef struct {
    int32_t a_zp, b_zp, out_zp;
    int32_t a_mult, a_shift, b_mult, b_shift, out_mult, out_shift;
    int32_t act_min, act_max;
} ls_add_params;

int32_t ls_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int32_t shift);

void ls_quantize(const float *in, int8_t *out, int32_t n, float scale, int32_t zero_point);
void ls_dequantize(const int8_t *in, float *out, int32_t n, float scale, int32_t zero_point);
void ls_conv2d(const int8_t *in, const ls_conv_params *p, const int8_t *weights, const int32_t *bias,
               const int32_t *multipliers, const int32_t *shifts, int8_t *out);
void ls_dense(const int8_t *in, int32_t in_features, int32_t out_features, const int8_t *weights,
              const int32_t *bias, const int32_t *multipliers, const int32_t *shifts,
              int32_t in_zp, int32_t out_zp, int32_t act_min, int32_t act_max, int8_t *out);
void ls_max_pool(const int8_t *in, const ls_pool_params *p, int8_t *out);
void ls_avg_pool(const int8_t *in, const ls_pool_params *p, int32_t in_zp, int32_t out_zp, int32_t act_min,
                 int32_t act_max, const int32_t *multipliers, const int32_t *shifts, int32_t per_count, int8_t *out);
void ls_add(const int8_t *a, const int8_t *b, int32_t n, const ls_add_params *p, int8_t *out);
void ls_requantize(const int8_t *in, int32_t n, int32_t in_zp, int32_t out_zp, int32_t multiplier, int32_t shift,
                   int32_t act_min, int32_t act_max, int8_t *out);
void ls_clamp(const int8_t *in, int32_t n, int32_t lo, int32_t hi, int8_t *out);
void ls_softmax(float *values, int32_t n);
void ls_argmax(const int8_t *in, int32_t rows, int32_t n, float *out);

#endif
