/* Host sampling (sample.c), shared with the captured step's MTP ops (program.c). */
#pragma once
#include "common.h"

typedef struct {
    float inv_temperature; /* 0: greedy (the captured step's ops take the argmax) */
    float top_p, min_p, u;
    int64_t top_k; /* 0 or ≥ V: no top-k */
} SampleRow;

/* One row of logits → its drawn token (when `token`, with p->u; a row with no finite logit gives its first maximum)
 * and/or its distribution (when `probs`). Scratch:
 * SAMPLE_SCRATCH(V) floats. */
#define SAMPLE_SCRATCH(V) (5 * (V))
void sample_row(const float *x, int64_t V, const SampleRow *p, int64_t *token, float *probs, float *scratch);

/* The first column whose cumulative weight exceeds u · the total of the row's positive weights (0 when none has
 * weight). */
int64_t draw_weights(const float *w, int64_t V, float u);
