/* The dense network's epoch in C: a ReLU MLP, the mean softmax cross-entropy of each batch and
   Adam's, AdamW's or RMSprop's step, computed as torch computes them, in one call an epoch.
   dense_loop.py builds it with the machine's C compiler for its own CPU (-march=native) and
   calls it through ctypes; where it does not build, autograd trains the network. Why C: at this
   size (batches of 32 x 187 features, 12,000 weights) torch's and numpy's calls cost more than
   their arithmetic (numpy needed twenty a step), and here a product's sums stay in registers.
   The weights and moments arrive in torch's layout (each layer's weight out x in, then its
   bias) and are transposed to in x out for the epoch, so that every product runs along rows. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* 8 floats, any alignment */

/* c[r][o0 + o], o < 8 * nv: init[o0 + o] (or 0) + sum_k a[r*sr + k*sk] * b[k][o0 + o], four
   rows at a time with their sums in 4 * nv vector registers (nv, 1 or 2, is unrolled away). */
static inline __attribute__((always_inline)) void panel(
    int nv, int m, int n_k, int out, int o0, const float *restrict a, size_t sr, size_t sk,
    const float *restrict b, const float *restrict init, float *restrict c) {
    v8 start[2] = {{0}, {0}};
    for (int v = 0; v < nv; v++)
        if (init) start[v] = *(const v8 *)(init + o0 + 8 * v);
    int r = 0;
    for (; r + 4 <= m; r += 4) {
        v8 acc[4][2];
        for (int q = 0; q < 4; q++)
            for (int v = 0; v < nv; v++) acc[q][v] = start[v];
        for (int k = 0; k < n_k; k++) {
            const float *bk = b + (size_t)k * out + o0;
            for (int q = 0; q < 4; q++) {
                float x = a[(r + q) * sr + k * sk];
                for (int v = 0; v < nv; v++) acc[q][v] += x * *(const v8 *)(bk + 8 * v);
            }
        }
        for (int q = 0; q < 4; q++)
            for (int v = 0; v < nv; v++)
                *(v8 *)(c + (size_t)(r + q) * out + o0 + 8 * v) = acc[q][v];
    }
    for (; r < m; r++) {
        v8 acc[2] = {start[0], start[1]};
        for (int k = 0; k < n_k; k++)
            for (int v = 0; v < nv; v++)
                acc[v] += a[r * sr + k * sk] * *(const v8 *)(b + (size_t)k * out + o0 + 8 * v);
        for (int v = 0; v < nv; v++) *(v8 *)(c + (size_t)r * out + o0 + 8 * v) = acc[v];
    }
}

/* c[r][o] = init[o] (or 0) + sum_k a[r*sr + k*sk] * b[k][o], for m rows: panels of 16 and 8
   columns, then the last few columns one at a time. */
static void gemm(int m, int n_k, int out, const float *restrict a, size_t sr, size_t sk,
                 const float *restrict b, const float *restrict init, float *restrict c) {
    int o0 = 0;
    for (; o0 + 16 <= out; o0 += 16) panel(2, m, n_k, out, o0, a, sr, sk, b, init, c);
    if (o0 + 8 <= out) panel(1, m, n_k, out, o0, a, sr, sk, b, init, c), o0 += 8;
    for (int r = 0; r < m; r++)
        for (int o = o0; o < out; o++) {
            float s = init ? init[o] : 0.0f;
            for (int k = 0; k < n_k; k++) s += a[r * sr + k * sk] * b[(size_t)k * out + o];
            c[(size_t)r * out + o] = s;
        }
}

/* Each layer's weight from torch's out x in to in x out (back: to_torch), biases as they are. */
static void relayout(int layers, const int *dims, const float *src, float *dst, int to_torch) {
    for (int l = 0; l < layers; l++) {
        int in = dims[l], out = dims[l + 1];
        for (int i = 0; i < in; i++)
            for (int o = 0; o < out; o++) {
                size_t torch = (size_t)o * in + i, ours = (size_t)i * out + o;
                dst[to_torch ? torch : ours] = src[to_torch ? ours : torch];
            }
        memcpy(dst + (size_t)in * out, src + (size_t)in * out, sizeof(float) * out);
        src += (size_t)in * out + out, dst += (size_t)in * out + out;
    }
}

/* The optimizer's step over every parameter, in torch's order of operations (its Adam's lerp
   of the average, the bias corrections as factors); RMSprop: no average, corrections of 1. */
static void optimizer_step(int size, float *restrict w, float *restrict g, float *restrict avg,
                           float *restrict sq, double lr, double t, double beta1, double beta2,
                           double eps, double decay, int decoupled, int rmsprop) {
    float keep = (float)(1.0 - lr * decay), l2 = (float)decay, e = (float)eps;
    float c1 = (float)(1.0 - beta1), b2 = (float)beta2, c2 = (float)(1.0 - beta2);
    float unbias = rmsprop ? 1.0f : (float)(1.0 / sqrt(1.0 - pow(beta2, t)));
    float rate = (float)(-lr / (rmsprop ? 1.0 : 1.0 - pow(beta1, t)));
    if (decay != 0.0 && decoupled)
        for (int k = 0; k < size; k++) w[k] *= keep;
    else if (decay != 0.0)
        for (int k = 0; k < size; k++) g[k] += l2 * w[k];
    for (int k = 0; k < size; k++) {
        sq[k] = sq[k] * b2 + g[k] * g[k] * c2;
        if (!rmsprop) avg[k] += (g[k] - avg[k]) * c1;
        w[k] += (rmsprop ? g[k] : avg[k]) / (sqrtf(sq[k]) * unbias + e) * rate;
    }
}

/* One network's shape and its working buffers: weights and gradients in the kernel's layout,
   a batch's inputs, hidden activations, logits and two buffers of d loss / d activations. */
typedef struct {
    int layers;
    const int *dims;
    size_t size, hidden;
    float *w, *g, *wt, *in, *acts, *z, *delta, *other;
} Net;

/* The batch's hidden activations (ReLU(a W + b), layer after layer) and its logits */
static void forward(const Net *net, int rows) {
    const float *a = net->in, *wl = net->w;
    float *h = net->acts;
    for (int l = 0; l < net->layers; l++) {
        int fan_in = net->dims[l], out = net->dims[l + 1];
        float *y = l == net->layers - 1 ? net->z : h;
        gemm(rows, fan_in, out, a, fan_in, 1, wl, wl + (size_t)fan_in * out, y);
        if (l < net->layers - 1) {
            for (size_t k = 0; k < (size_t)rows * out; k++) y[k] = y[k] > 0.0f ? y[k] : 0.0f;
            a = y, h = y + (size_t)rows * out;
        }
        wl += (size_t)fan_in * out + out;
    }
}

/* d mean loss / d logits, (softmax - one-hot) / rows, into delta; the summed loss and the count
   of rows whose first maximum is their label added to totals[0] and totals[1] */
static void loss_gradient(const Net *net, int rows, const long long *order,
                          const long long *labels, double *totals) {
    int classes = net->dims[net->layers];
    for (int r = 0; r < rows; r++) {
        float *z = net->z + (size_t)r * classes, *d = net->delta + (size_t)r * classes, sum = 0.0f;
        int label = (int)labels[order[r]], top = 0;
        for (int c = 1; c < classes; c++) top = z[c] > z[top] ? c : top;
        float shift = z[top];
        for (int c = 0; c < classes; c++) z[c] -= shift, d[c] = expf(z[c]), sum += d[c];
        totals[0] += log((double)sum) - z[label];
        totals[1] += top == label;
        sum *= (float)rows;
        for (int c = 0; c < classes; c++) d[c] = d[c] / sum - (c == label ? 1.0f / rows : 0.0f);
    }
}

/* Every layer's gradients into g, the last layer first, passing delta W^T (through W^T's
   transpose in wt, masked where the ReLU gave 0) down to the layer below */
static void backward(const Net *net, int rows) {
    float *delta = net->delta, *other = net->other;
    size_t offset = net->size, before = net->hidden;
    for (int l = net->layers - 1; l >= 0; l--) {
        int fan_in = net->dims[l], out = net->dims[l + 1];
        offset -= (size_t)fan_in * out + out;
        before -= l ? fan_in : 0;
        const float *inputs = l ? net->acts + (size_t)rows * before : net->in;
        float *gw = net->g + offset, *gb = gw + (size_t)fan_in * out;
        memset(gb, 0, sizeof(float) * out);
        for (int r = 0; r < rows; r++)
            for (int o = 0; o < out; o++) gb[o] += delta[(size_t)r * out + o];
        gemm(fan_in, rows, out, inputs, 1, fan_in, delta, NULL, gw);
        if (l == 0) break;
        const float *wl = net->w + offset;
        float *wt = net->wt;
        for (int i = 0; i < fan_in; i++)
            for (int o = 0; o < out; o++) wt[(size_t)o * fan_in + i] = wl[(size_t)i * out + o];
        gemm(rows, out, fan_in, delta, out, 1, wt, NULL, other);
        for (size_t k = 0; k < (size_t)rows * fan_in; k++)
            other[k] = inputs[k] > 0.0f ? other[k] : 0.0f;
        float *swap = delta;
        delta = other, other = swap;
    }
}

/* One epoch, one step a batch of `batch` rows (the last may be short) taken from x (rows of
   dims[0] features) in the epoch's order; labels holds every row's class, lrs each step's rate,
   step the optimizer's step count before the epoch. w, avg and sq (torch's layout; avg unused
   by RMSprop) are updated in place; result gets the summed loss and the count of rows whose
   logits' first maximum is their label. Returns 0, or -1 when memory runs out. */
int dense_epoch(int layers, const int *dims, float *w, float *avg, float *sq, const float *x,
                const long long *order, const long long *labels, int n, int batch,
                const double *lrs, double step, double beta1, double beta2, double eps,
                double decay, int decoupled, int rmsprop, double *result) {
    Net net = {.layers = layers, .dims = dims};
    size_t width = 0, features = dims[0];
    for (int l = 0; l < layers; l++) net.size += (size_t)dims[l] * dims[l + 1] + dims[l + 1];
    for (int l = 1; l <= layers; l++) width = (size_t)dims[l] > width ? (size_t)dims[l] : width;
    for (int l = 1; l < layers; l++) net.hidden += dims[l];
    size_t size = net.size, rows_total = batch * (features + net.hidden + 3 * width);
    float *buffer = malloc(sizeof(float) * (5 * size + rows_total)), *avgs, *sqs;
    if (!buffer) return -1;
    net.w = buffer, avgs = net.w + size, sqs = avgs + size, net.g = sqs + size;
    net.wt = net.g + size, net.in = net.wt + size, net.acts = net.in + batch * features;
    net.z = net.acts + batch * net.hidden, net.delta = net.z + batch * width;
    net.other = net.delta + batch * width;
    relayout(layers, dims, w, net.w, 0);
    if (!rmsprop) relayout(layers, dims, avg, avgs, 0);
    relayout(layers, dims, sq, sqs, 0);
    result[0] = result[1] = 0.0;
    for (int start = 0, s = 0; start < n; start += batch, s++) {
        int rows = n - start < batch ? n - start : batch;
        for (int r = 0; r < rows; r++) /* the batch's rows, gathered */
            memcpy(net.in + r * features, x + order[start + r] * features, sizeof *x * features);
        forward(&net, rows);
        loss_gradient(&net, rows, order + start, labels, result);
        backward(&net, rows);
        optimizer_step((int)size, net.w, net.g, avgs, sqs, lrs[s], step + s + 1, beta1, beta2, eps,
                       decay, decoupled, rmsprop);
    }
    relayout(layers, dims, net.w, w, 1);
    if (!rmsprop) relayout(layers, dims, avgs, avg, 1);
    relayout(layers, dims, sqs, sq, 1);
    free(buffer);
    return 0;
}
