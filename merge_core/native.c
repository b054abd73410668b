/* One chunk of generalized task arithmetic in one pass over memory (see merge_core/native.py).
 *
 * Every step rounds where methods.py's torch code rounds (16-bit floats: computed in float32, rounded to
 * nearest even after each op; sums accumulate in float32 and round once), so both give the same bytes.
 * Compiled with -ffp-contract=off: a fused multiply-add would round differently. */
#include <stdint.h>
#include <string.h>

#define BLOCK 256
#define MAX_ROWS 64

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even; NaN stays a (quiet) NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

static inline uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint64_t sfc64_next(uint64_t *s) { /* numpy's SFC64: state a, b, c, counter */
    uint64_t out = s[0] + s[1] + s[3]++;
    s[0] = s[1] ^ (s[1] >> 11);
    s[1] = s[2] + (s[2] << 3);
    s[2] = ((s[2] << 24) | (s[2] >> 40)) + out;
    return out;
}

/* Row i of `n` entries, before the combination: its delta (given, or model - base), masked (a bit mask,
 * all ones keeps; or its magnitude bits against `thresholds[i]`, ties kept before `ties_ends[i]`; or a
 * random keep when `drawn[i]`, from the SFC64 state in `states`), times `scales[i]` when `has_scale[i]`,
 * times `factors[i]`; all in the storage type's bits. */
#define DEFINE_TASK_ARITHMETIC(NAME, T, I, LOAD, ROUND, SIGN, MAGNITUDE)                                     \
    int NAME(int64_t rows, int64_t n, const T *base, const T *const *inputs, int inputs_are_deltas,           \
             const I *const *masks, const int64_t *thresholds, const int64_t *ties_ends, uint64_t *states,    \
             const int32_t *drawn, const int64_t *cuts, const float *scales,                                 \
             const int32_t *has_scale, const float *factors, const float *weights, int elect, int normalize, \
             int clamp_tiny, float divisor_all, float lambda, int use_lambda, T *out) {                       \
        if (rows < 1 || rows > MAX_ROWS) return -1;                                                          \
        const int per_word = 8 / (int)sizeof(T);                                                             \
        const float tiny = 1.17549435e-38f;                                                                   \
        T row[MAX_ROWS][BLOCK];                                                                              \
        uint64_t words[BLOCK];                                                                               \
        float total[BLOCK], kept_weight[BLOCK];                                                              \
        T vote_sign[BLOCK];                                                                                  \
        for (int64_t start = 0; start < n; start += BLOCK) {                                                 \
            int64_t m = n - start < BLOCK ? n - start : BLOCK;                                              \
            const T *b = base + start;                                                                       \
            for (int64_t i = 0; i < rows; i++) {                                                             \
                T *r = row[i];                                                                               \
                const T *in = inputs[i] + start;                                                             \
                if (inputs_are_deltas) memcpy(r, in, (size_t)m * sizeof(T));                                 \
                else for (int64_t x = 0; x < m; x++) r[x] = (T)ROUND(LOAD(in[x]) - LOAD(b[x]));               \
                if (masks[i]) {                                                                              \
                    const I *mask = masks[i] + start;                                                        \
                    for (int64_t x = 0; x < m; x++) r[x] &= (T)mask[x];                                      \
                }                                                                                            \
                if (thresholds[i] >= 0) { /* magnitudes above the key, or equal to it before ties_end */       \
                    T key = (T)thresholds[i];                                                                \
                    int64_t ties_end = ties_ends[i] - start;                                                 \
                    for (int64_t x = 0; x < m; x++) {                                                        \
                        T magnitude = r[x] & MAGNITUDE;                                                      \
                        r[x] = (x < ties_end ? magnitude >= key : magnitude > key) ? r[x] : 0;               \
                    }                                                                                        \
                }                                                                                            \
                if (drawn[i]) {                                                                     \
                    uint64_t *state = states + 4 * i;                                                        \
                    for (int64_t w = 0; w < (m + per_word - 1) / per_word; w++) words[w] = sfc64_next(state);\
                    I draws[BLOCK];                                                                          \
                    memcpy(draws, words, (size_t)m * sizeof(I));                                             \
                    I cut = (I)cuts[i];                                                                      \
                    for (int64_t x = 0; x < m; x++) r[x] = (I)(draws[x] >> 1) < cut ? r[x] : 0;              \
                }                                                                                            \
                if (has_scale[i]) {                                                                          \
                    float scale = scales[i];                                                                 \
                    for (int64_t x = 0; x < m; x++) r[x] = (T)ROUND(LOAD(r[x]) * scale);                     \
                }                                                                                            \
                float factor = factors[i];                                                                   \
                for (int64_t x = 0; x < m; x++) r[x] = (T)ROUND(LOAD(r[x]) * factor);                        \
            }                                                                                                \
            for (int64_t x = 0; x < m; x++) total[x] = LOAD(row[0][x]);                                      \
            for (int64_t i = 1; i < rows; i++)                                                               \
                for (int64_t x = 0; x < m; x++) total[x] += LOAD(row[i][x]);                                 \
            if (elect) { /* keep entries with the sign of the sum of votes (-0 counts as +) */               \
                for (int64_t x = 0; x < m; x++) {                                                            \
                    T vote = (T)ROUND(total[x]);                                                             \
                    vote_sign[x] = (vote & MAGNITUDE) ? (vote & SIGN) : 0;                                   \
                }                                                                                            \
                for (int64_t i = 0; i < rows; i++) {                                                         \
                    float weight = weights[i];                                                               \
                    for (int64_t x = 0; x < m; x++) {                                                        \
                        T kept = ((row[i][x] ^ vote_sign[x]) & SIGN) ? 0 : row[i][x];                        \
                        float value = LOAD(kept), counted = (kept & MAGNITUDE) ? weight : 0.0f;              \
                        total[x] = i ? total[x] + value : value;                                             \
                        kept_weight[x] = i ? kept_weight[x] + counted : counted;                             \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
            if (normalize && elect) {                                                                        \
                for (int64_t x = 0; x < m; x++) {                                                            \
                    float divisor = LOAD((T)ROUND(kept_weight[x]));                                          \
                    divisor = clamp_tiny ? (divisor < tiny ? tiny : divisor) : (divisor == 0.0f ? 1.0f : divisor);\
                    total[x] = LOAD((T)ROUND(LOAD((T)ROUND(total[x])) / divisor));                          \
                }                                                                                            \
            } else if (normalize) {                                                                          \
                for (int64_t x = 0; x < m; x++) total[x] = LOAD((T)ROUND(LOAD((T)ROUND(total[x])) / divisor_all));\
            }                                                                                                \
            if (use_lambda)                                                                                  \
                for (int64_t x = 0; x < m; x++) total[x] = LOAD((T)ROUND(LOAD((T)ROUND(total[x])) * lambda));\
            for (int64_t x = 0; x < m; x++) out[start + x] = (T)ROUND(LOAD(b[x]) + LOAD((T)ROUND(total[x])));\
        }                                                                                                    \
        return 0;                                                                                            \
    }

DEFINE_TASK_ARITHMETIC(task_arithmetic_bf16, uint16_t, int16_t, bf16_to_float, float_to_bf16, 0x8000u, 0x7FFFu)
DEFINE_TASK_ARITHMETIC(task_arithmetic_f32, uint32_t, int32_t, bits_float, float_bits, 0x80000000u, 0x7FFFFFFFu)

/* out = (Σ inputs[i]·weights[i]) [/ divisor] in float32, rounded once. `fused`: linear's (mergekit's
 * addcmul: each product added to an accumulator starting at +0 with one rounding, a fused multiply-add);
 * else slerp's (each product rounded, then added in order). */
#define DEFINE_WEIGHTED_SUM(NAME, T, LOAD, ROUND)                                                            \
    int NAME(int64_t rows, int64_t n, const T *const *inputs, const float *weights, int fused, int divide,    \
             float divisor, T *out) {                                                                        \
        if (rows < 1) return -1;                                                                             \
        float total[BLOCK];                                                                                  \
        for (int64_t start = 0; start < n; start += BLOCK) {                                                 \
            int64_t m = n - start < BLOCK ? n - start : BLOCK;                                              \
            for (int64_t i = 0; i < rows; i++) {                                                             \
                const T *in = inputs[i] + start;                                                             \
                float w = weights[i];                                                                        \
                if (fused)                                                                                   \
                    for (int64_t x = 0; x < m; x++) total[x] = __builtin_fmaf(LOAD(in[x]), w, i ? total[x] : 0.0f);\
                else if (i) for (int64_t x = 0; x < m; x++) total[x] += LOAD(in[x]) * w;                     \
                else for (int64_t x = 0; x < m; x++) total[x] = LOAD(in[x]) * w;                             \
            }                                                                                                \
            if (divide) for (int64_t x = 0; x < m; x++) total[x] /= divisor;                                 \
            for (int64_t x = 0; x < m; x++) out[start + x] = (T)ROUND(total[x]);                             \
        }                                                                                                    \
        return 0;                                                                                            \
    }

DEFINE_WEIGHTED_SUM(weighted_sum_bf16, uint16_t, bf16_to_float, float_to_bf16)
DEFINE_WEIGHTED_SUM(weighted_sum_f32, uint32_t, bits_float, float_bits)

/* counts[k] += how many deltas (values - base, rounded; or values when base is NULL) have magnitude bits
 * whose top 16 are k: the first round of TIES's radix selection of the density threshold. */
#define DEFINE_MAGNITUDE_HISTOGRAM(NAME, T, LOAD, ROUND, MAGNITUDE, SHIFT)                                   \
    void NAME(int64_t n, const T *base, const T *values, int64_t *counts) {                                  \
        T keys[BLOCK];                                                                                       \
        for (int64_t start = 0; start < n; start += BLOCK) {                                                 \
            int64_t m = n - start < BLOCK ? n - start : BLOCK;                                              \
            if (base) for (int64_t x = 0; x < m; x++)                                                        \
                keys[x] = (T)ROUND(LOAD(values[start + x]) - LOAD(base[start + x])) & MAGNITUDE;             \
            else for (int64_t x = 0; x < m; x++) keys[x] = values[start + x] & MAGNITUDE;                    \
            for (int64_t x = 0; x < m; x++) counts[keys[x] >> SHIFT]++;                                      \
        }                                                                                                    \
    }

DEFINE_MAGNITUDE_HISTOGRAM(magnitude_histogram_bf16, uint16_t, bf16_to_float, float_to_bf16, 0x7FFFu, 0)
DEFINE_MAGNITUDE_HISTOGRAM(magnitude_histogram_f32, uint32_t, bits_float, float_bits, 0x7FFFFFFFu, 16)
