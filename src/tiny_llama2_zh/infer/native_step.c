/* One decode step of the lean decoder (infer/decode.py), whole, in C: every layer and the head for a batch of
 * running rows, one token each, inside a single OpenMP parallel region.
 *
 * Why by hand: a batch-1 step of a small model is ~90 small operations (norms, rotary, attention over the cache,
 * four matrix-vector products per layer). In PyTorch each is a dispatched call whose threads fork and join, which
 * costs more than the arithmetic at these sizes; torch.compile's C++ keeps one parallel region per kernel and calls
 * ATen for the products. llama.cpp and llama2.c's run.c run a step as one loop with one thread team; PyTorch has
 * no such path for CPU decoding. This file is that loop for our model's arithmetic (model.py), reading the weights
 * and the KV cache the Python decoder already holds (no copies): products of float32 or int8 weights (a float32
 * scale per output row and group of inputs, as `tinyllm quantize` stores them), split across the threads by
 * output rows, each thread streaming its rows front to back.
 *
 * Built by infer/native.py with the system's C compiler (-O3 -march=native -fopenmp) and called through ctypes.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <omp.h>

typedef struct {
    const void *data;   /* (out, in), row-major: float32 (kind 0) or int8 (kind 1) */
    const float *scale; /* kind 1: (out, groups) */
    int64_t out, in, groups;
    int64_t kind;
} Matrix;

typedef struct {
    const float *input_norm, *post_norm; /* (dim,) */
    Matrix qkv, o, gate_up, down;
    float *keys, *values; /* the layer's cache: (max_batch, kv_heads, max_len, head_dim) */
} Layer;

typedef struct {
    int64_t dim, hidden, n_layers, n_heads, n_kv_heads, head_dim, max_len;
    float eps, attn_scale;
    const float *embedding; /* (vocab, dim) float32, or NULL: rows of embedding_int8 */
    Matrix embedding_int8;
    const float *final_norm;
    const float *cos, *sin; /* (max_len, head_dim), rotate-half's sign folded into sin */
    Matrix head;
    const Layer *layers;
} Model;

/* ------------------------------------------------------------------------------------- products */
/* Eight floats as one value (GCC/Clang vector extensions): the compiler maps it to the CPU's vector registers
 * (AVX's ymm, or two NEON registers), where a plain loop summing into one float would not be vectorised
 * without -ffast-math's licence to reorder the sum. Each lane sums its own inputs in order. */
typedef float f8 __attribute__((vector_size(32)));

static inline f8 load_f8(const float *p) {
    f8 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline float lanes_sum(f8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* W[o] . x for one weight row and one input row: four accumulators, so four independent chains of multiply-adds
 * are in flight. */
static inline float dot_f32(const float *w, const float *x, int64_t in) {
    const int64_t body = in - in % 32, body8 = in - in % 8;
    f8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t i = 0;
    for (; i < body; i += 32) {
        a0 += load_f8(w + i) * load_f8(x + i);
        a1 += load_f8(w + i + 8) * load_f8(x + i + 8);
        a2 += load_f8(w + i + 16) * load_f8(x + i + 16);
        a3 += load_f8(w + i + 24) * load_f8(x + i + 24);
    }
    for (; i < body8; i += 8) a0 += load_f8(w + i) * load_f8(x + i);
    float s = lanes_sum((a0 + a1) + (a2 + a3));
    for (; i < in; i++) s += w[i] * x[i];
    return s;
}

/* Two weight rows against four input rows at once (eight sums): each weight vector loaded once for four rows and
 * each input vector once for two, where one dot product at a time loads two vectors per multiply-add and is bound
 * by loads rather than by arithmetic (a batch of rows is arithmetic-bound, one row memory-bound). */
static inline void tile_2x4(const float *w0, const float *x, float *y, int64_t in, int64_t out) {
    const int64_t body8 = in - in % 8;
    const float *w1 = w0 + in, *x0 = x, *x1 = x + in, *x2 = x + 2 * in, *x3 = x + 3 * in;
    f8 a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
    int64_t i = 0;
    for (; i < body8; i += 8) {
        const f8 v0 = load_f8(w0 + i), v1 = load_f8(w1 + i);
        const f8 u0 = load_f8(x0 + i), u1 = load_f8(x1 + i), u2 = load_f8(x2 + i), u3 = load_f8(x3 + i);
        a00 += v0 * u0, a01 += v0 * u1, a02 += v0 * u2, a03 += v0 * u3;
        a10 += v1 * u0, a11 += v1 * u1, a12 += v1 * u2, a13 += v1 * u3;
    }
    float s[2][4] = {{lanes_sum(a00), lanes_sum(a01), lanes_sum(a02), lanes_sum(a03)},
                     {lanes_sum(a10), lanes_sum(a11), lanes_sum(a12), lanes_sum(a13)}};
    for (; i < in; i++)
        for (int r = 0; r < 2; r++)
            for (int b = 0; b < 4; b++) s[r][b] += (r ? w1 : w0)[i] * x[b * in + i];
    for (int b = 0; b < 4; b++) y[b * out] = s[0][b], y[b * out + 1] = s[1][b];
}

/* y[b][o] = W[o] . x[b] for o in [begin, end) and every row b of the batch; x rows `in` apart, y rows `out`.
 * The weights are read front to back, one stream the prefetcher follows: on this project's 2-core AMD EPYC the
 * 24m head (64,798 x 288) took 2.1 ms, 36 GB/s, as fast as a plain sum over it, where four rows at a time (four
 * short interleaved streams) took 3.8-4.0 ms. A pair of rows is read once from memory for the whole batch. */
static void product_f32(const Matrix *m, const float *x, float *y, int64_t batch, int64_t begin, int64_t end) {
    const int64_t in = m->in, out = m->out;
    const float *w = (const float *)m->data;
    for (int64_t o = begin; o < end; o += 2) {
        const int64_t rows = end - o < 2 ? 1 : 2;
        int64_t b = 0;
        if (rows == 2)
            for (; b + 4 <= batch; b += 4) tile_2x4(w + o * in, x + b * in, y + b * out + o, in, out);
        for (; b < batch; b++)
            for (int64_t r = 0; r < rows; r++) y[b * out + o + r] = dot_f32(w + (o + r) * in, x + b * in, in);
    }
}

/* The same for int8 values with a float scale per row and group of `in / groups` inputs: each group's sum of
 * value * input, times its scale. The int8 head is small enough (18.7 MB at 24m) that converting values to float
 * and multiplying, not reading memory, bounds it, so four rows go together (four independent sums) and each sum
 * is 32 lanes wide (simdlen: several vector registers per sum, more multiply-adds in flight). Written as loops for
 * the compiler's vectoriser, which widens int8 to float with vector instructions (GCC 12 compiled the vector
 * extensions' int8 conversion element by element). The 24m head (18.7 MB, in the L3 cache) on this project's
 * 2-core AMD EPYC, 2 threads: one row at a time, one sum, 3.0 ms; four rows, 8 lanes 2.7 ms; 16 lanes 1.3-1.4;
 * 32 lanes 0.75-0.95; 64 lanes 1.5-1.6 (single measurements on a machine whose speed drifts). */
static void product_int8(const Matrix *m, const float *x, float *y, int64_t batch, int64_t begin, int64_t end) {
    const int64_t in = m->in, out = m->out, groups = m->groups, size = in / groups;
    const int8_t *w = (const int8_t *)m->data;
    int64_t o = begin;
    for (; o + 4 <= end; o += 4) {
        const int8_t *w0 = w + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        /* four interleaved rows are four short streams the hardware prefetcher follows poorly from memory (the
         * 134m head, 64,798 x 768 int8: 5.3 ms without this, 2.4-3.4 with it): ask for the rows 16 ahead */
        for (int64_t i = 0; i < 4 * in; i += 64) __builtin_prefetch(w0 + 16 * in + i, 0, 3);
        for (int64_t b = 0; b < batch; b++) {
            const float *xb = x + b * in;
            float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
            for (int64_t g = 0; g < groups; g++) {
                const int64_t at = g * size;
                float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3) simdlen(32)
                for (int64_t i = at; i < at + size; i++) {
                    const float v = xb[i];
                    s0 += (float)w0[i] * v, s1 += (float)w1[i] * v, s2 += (float)w2[i] * v, s3 += (float)w3[i] * v;
                }
                const float *scale = m->scale + o * groups + g;
                t0 += s0 * scale[0], t1 += s1 * scale[groups], t2 += s2 * scale[2 * groups], t3 += s3 * scale[3 * groups];
            }
            float *yb = y + b * out + o;
            yb[0] = t0, yb[1] = t1, yb[2] = t2, yb[3] = t3;
        }
    }
    for (; o < end; o++) {
        const int8_t *wo = w + o * in;
        const float *scale = m->scale + o * groups;
        for (int64_t b = 0; b < batch; b++) {
            const float *xb = x + b * in;
            float total = 0.f;
            for (int64_t g = 0; g < groups; g++) {
                const int8_t *wg = wo + g * size;
                const float *xg = xb + g * size;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < size; i++) s += (float)wg[i] * xg[i];
                total += s * scale[g];
            }
            y[b * out + o] = total;
        }
    }
}

/* This thread's share of the product (a contiguous block of rows), then a barrier: the next step reads all of y. */
static void product(const Matrix *m, const float *x, float *y, int64_t batch) {
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    int64_t share = (m->out + threads - 1) / threads;
    share = (share + 15) / 16 * 16; /* whole cache lines of y per thread */
    int64_t begin = thread * share, end = begin + share;
    if (end > m->out) end = m->out;
    if (begin < end) {
        if (m->kind == 0)
            product_f32(m, x, y, batch, begin, end);
        else
            product_int8(m, x, y, batch, begin, end);
    }
#pragma omp barrier
}

/* ------------------------------------------------------------------------------------- the rest */
static void rms_norm(const float *x, const float *weight, float *y, int64_t n, float eps) {
    float squares = 0.f;
    for (int64_t i = 0; i < n; i++) squares += x[i] * x[i];
    const float scale = 1.f / sqrtf(squares / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = weight[i] * (x[i] * scale);
}

/* x (head_dim) rotated in place: x * cos + roll(x, head_dim / 2) * sin, as the Python decoder's `_rotate`. */
static void rotate(float *x, const float *cos, const float *sin, int64_t head_dim, float *tmp) {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < head_dim; i++) tmp[i] = x[i];
    for (int64_t i = 0; i < head_dim; i++) x[i] = tmp[i] * cos[i] + tmp[(i + half) % head_dim] * sin[i];
}

/* The structures' layout as this compiler lays them out: each structure's size, then the offset of each of its
 * fields in declaration order (Matrix, Layer, Model). native.py compares it with its ctypes mirror before the first
 * step, so that a field added or moved on one side only is refused instead of read from the wrong bytes. */
#define TL_PUT(value) do { if (n < capacity) out[n] = (int64_t)(value); n++; } while (0)
#define TL_OFFSET(type, field) TL_PUT(offsetof(type, field))
int64_t tl_layout(int64_t *out, int64_t capacity) { /* writes at most `capacity`, returns how many there are */
    int64_t n = 0;
    TL_PUT(sizeof(Matrix));
    TL_OFFSET(Matrix, data); TL_OFFSET(Matrix, scale); TL_OFFSET(Matrix, out); TL_OFFSET(Matrix, in);
    TL_OFFSET(Matrix, groups); TL_OFFSET(Matrix, kind);
    TL_PUT(sizeof(Layer));
    TL_OFFSET(Layer, input_norm); TL_OFFSET(Layer, post_norm); TL_OFFSET(Layer, qkv); TL_OFFSET(Layer, o);
    TL_OFFSET(Layer, gate_up); TL_OFFSET(Layer, down); TL_OFFSET(Layer, keys); TL_OFFSET(Layer, values);
    TL_PUT(sizeof(Model));
    TL_OFFSET(Model, dim); TL_OFFSET(Model, hidden); TL_OFFSET(Model, n_layers); TL_OFFSET(Model, n_heads);
    TL_OFFSET(Model, n_kv_heads); TL_OFFSET(Model, head_dim); TL_OFFSET(Model, max_len); TL_OFFSET(Model, eps);
    TL_OFFSET(Model, attn_scale); TL_OFFSET(Model, embedding); TL_OFFSET(Model, embedding_int8);
    TL_OFFSET(Model, final_norm); TL_OFFSET(Model, cos); TL_OFFSET(Model, sin); TL_OFFSET(Model, head);
    TL_OFFSET(Model, layers);
    return n;
}

/* Scratch floats `tl_step` needs for a batch of `batch` rows. */
int64_t tl_scratch_size(const Model *m, int64_t batch) {
    const int64_t qkv = (m->n_heads + 2 * m->n_kv_heads) * m->head_dim;
    const int64_t per_row = 2 * m->dim + qkv + m->n_heads * m->head_dim + 3 * m->hidden;
    return batch * (per_row + m->n_heads * m->max_len) + m->head_dim * (m->n_heads + m->n_kv_heads);
}

/* Feed tokens[b] at positions[b] to cache row b (b < batch), write the next-token logits (batch, vocab). */
void tl_step(const Model *m, const int64_t *tokens, const int64_t *positions, int64_t batch, float *logits,
             float *scratch, int threads) {
    const int64_t dim = m->dim, hidden = m->hidden, hd = m->head_dim, heads = m->n_heads, kv = m->n_kv_heads;
    const int64_t qkv_size = (heads + 2 * kv) * hd, groups = heads / kv, max_len = m->max_len;
    const int64_t row_stride = kv * max_len * hd; /* one batch row of a layer's cache */
    float *x = scratch, *xb = x + batch * dim, *qkv = xb + batch * dim, *att = qkv + batch * qkv_size;
    float *hb = att + batch * heads * hd, *act = hb + batch * 2 * hidden, *scores = act + batch * hidden;
    float *tmp = scores + batch * heads * max_len;

    for (int64_t b = 0; b < batch; b++) { /* the embedding rows */
        float *xr = x + b * dim;
        if (m->embedding) {
            const float *row = m->embedding + tokens[b] * dim;
            for (int64_t i = 0; i < dim; i++) xr[i] = row[i];
        } else {
            const Matrix *e = &m->embedding_int8;
            const int8_t *row = (const int8_t *)e->data + tokens[b] * dim;
            const int64_t size = dim / e->groups;
            for (int64_t i = 0; i < dim; i++) xr[i] = (float)row[i] * e->scale[tokens[b] * e->groups + i / size];
        }
    }

#pragma omp parallel num_threads(threads)
    {
        for (int64_t l = 0; l < m->n_layers; l++) {
            const Layer *layer = &m->layers[l];
#pragma omp single
            for (int64_t b = 0; b < batch; b++) rms_norm(x + b * dim, layer->input_norm, xb + b * dim, dim, m->eps);
            product(&layer->qkv, xb, qkv, batch);
#pragma omp single
            for (int64_t b = 0; b < batch; b++) { /* rotary on q and k, the new key and value into the cache */
                float *row = qkv + b * qkv_size;
                const int64_t pos = positions[b];
                const float *cos = m->cos + pos * hd, *sin = m->sin + pos * hd;
                for (int64_t h = 0; h < heads + kv; h++) rotate(row + h * hd, cos, sin, hd, tmp);
                for (int64_t h = 0; h < kv; h++) {
                    float *key = layer->keys + b * row_stride + (h * max_len + pos) * hd;
                    float *value = layer->values + b * row_stride + (h * max_len + pos) * hd;
                    const float *k = row + (heads + h) * hd, *v = row + (heads + kv + h) * hd;
                    for (int64_t i = 0; i < hd; i++) key[i] = k[i], value[i] = v[i];
                }
            }
#pragma omp for collapse(2) schedule(static)
            for (int64_t b = 0; b < batch; b++) { /* softmax(q k / sqrt(hd)) v over the row's cached positions */
                for (int64_t h = 0; h < heads; h++) {
                    const float *q = qkv + b * qkv_size + h * hd;
                    const float *keys = layer->keys + b * row_stride + (h / groups) * max_len * hd;
                    const float *values = layer->values + b * row_stride + (h / groups) * max_len * hd;
                    float *score = scores + (b * heads + h) * max_len, *out = att + (b * heads + h) * hd;
                    const int64_t span = positions[b] + 1;
                    float top = -INFINITY;
                    for (int64_t t = 0; t < span; t++) {
                        float s = 0.f;
#pragma omp simd reduction(+ : s)
                        for (int64_t i = 0; i < hd; i++) s += q[i] * keys[t * hd + i];
                        score[t] = s * m->attn_scale;
                        if (score[t] > top) top = score[t];
                    }
                    float total = 0.f;
                    for (int64_t t = 0; t < span; t++) total += (score[t] = expf(score[t] - top));
                    for (int64_t i = 0; i < hd; i++) out[i] = 0.f;
                    for (int64_t t = 0; t < span; t++) {
                        const float weight = score[t] / total;
#pragma omp simd
                        for (int64_t i = 0; i < hd; i++) out[i] += weight * values[t * hd + i];
                    }
                }
            }
            product(&layer->o, att, xb, batch);
#pragma omp single
            for (int64_t b = 0; b < batch; b++) {
                for (int64_t i = 0; i < dim; i++) x[b * dim + i] += xb[b * dim + i];
                rms_norm(x + b * dim, layer->post_norm, xb + b * dim, dim, m->eps);
            }
            product(&layer->gate_up, xb, hb, batch);
#pragma omp single
            for (int64_t b = 0; b < batch; b++) { /* SwiGLU: silu(gate) * up */
                const float *gate = hb + b * 2 * hidden, *up = gate + hidden;
                float *a = act + b * hidden;
                for (int64_t i = 0; i < hidden; i++) a[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
            }
            product(&layer->down, act, xb, batch);
#pragma omp single
            for (int64_t b = 0; b < batch; b++)
                for (int64_t i = 0; i < dim; i++) x[b * dim + i] += xb[b * dim + i];
        }
#pragma omp single
        for (int64_t b = 0; b < batch; b++) rms_norm(x + b * dim, m->final_norm, xb + b * dim, dim, m->eps);
        product(&m->head, xb, logits, batch);
    }
}

/* y (batch, out) = x (batch, in) times one matrix: the step's product on its own, for the decoder's other
 * products of a few rows (a prompt's last position through the head, say). */
void tl_product(const Matrix *m, const float *x, float *y, int64_t batch, int threads) {
#pragma omp parallel num_threads(threads)
    product(m, x, y, batch);
}
