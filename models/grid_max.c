enum { TILE = 8 };
static inline REAL larger(REAL best, REAL value) { return (value > best || value != value) ? value : best; }
void grid_max_forward(const REAL *restrict first, const REAL *restrict second, REAL *restrict pooled, long count,
                      long positions, long channels, long begin, long end) {
    long map = positions * channels;
    for (long j0 = 0; j0 < count; j0 += TILE)
    for (long i = begin; i < end; ++i) {
        for (long j = j0; j < (j0 + TILE < count ? j0 + TILE : count); ++j) {
            const REAL *a = first + i * map, *b = second + j * map;
            REAL *best = pooled + (i * count + j) * channels;
            for (long c = 0; c < channels; ++c) best[c] = a[c] + b[c];
            for (long p = 1; p < positions; ++p)
                for (long c = 0; c < channels; ++c) best[c] = larger(best[c], a[p * channels + c] + b[p * channels + c]);
        }
    }
}
void grid_max_backward(const REAL *restrict first, const REAL *restrict second, const REAL *restrict pooled,
                       const REAL *restrict grad, REAL *restrict grad_first, REAL *restrict grad_second,
                       long count, long positions, long channels, long begin, long end) {
    long map = positions * channels;
    REAL share[4096];
    for (long k = begin * map; k < end * map; ++k) grad_first[k] = 0;
    for (long j0 = 0; j0 < count; j0 += TILE)
    for (long i = begin; i < end; ++i) {
        REAL *to_first = grad_first + i * map;
        for (long j = j0; j < (j0 + TILE < count ? j0 + TILE : count); ++j) {
            const REAL *a = first + i * map, *b = second + j * map;
            const REAL *best = pooled + (i * count + j) * channels, *g = grad + (i * count + j) * channels;
            REAL *to_second = grad_second + j * map;
            for (long c = 0; c < channels; ++c) share[c] = 0;
            for (long p = 0; p < positions; ++p)
                for (long c = 0; c < channels; ++c) share[c] += a[p * channels + c] + b[p * channels + c] == best[c];
            for (long c = 0; c < channels; ++c) share[c] = g[c] / share[c];
            for (long p = 0; p < positions; ++p)
                for (long c = 0; c < channels; ++c) {
                    long k = p * channels + c;
                    REAL spread = a[k] + b[k] == best[c] ? share[c] : 0;
                    to_first[k] += spread;
                    to_second[k] += spread;
                }
        }
    }
}
