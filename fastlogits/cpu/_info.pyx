# cython: language_level=3
"""What this build of the CPU backend can do: the SIMD path chosen at load time and OpenMP."""
from cython.parallel cimport prange
from libc.stdint cimport int64_t

from fastlogits.clib cimport fl_simd_path


cdef extern from "fastlogits.h" nogil:
    pass

cdef extern from * nogil:
    """
    /* The read ceiling: a sum of n float32 values in float lanes, four vectors a step, prefetching a chunk
       ahead as the kernels do. (fl__sum, inlined into Cython's code as baseline SSE2 code with its TwoSum
       blocks, read 6.4 GB/s where torch.sum read 15.4: a benchmark audit found the kernels at 218% of it.) */
    FL_MULTIVERSION static double fl__read_sum_f32(const float *x, int64_t n) {
        float acc[64] = {0.0f};
        double t = 0.0;
        int64_t i = 0;
        int j;
        for (; i + 64 <= n; i += 64) {
            for (j = 0; j < 64; j += 16) FL_PREFETCH((const char *)(const void *)(x + i + j) + 4 * FL_CHUNK);
            FL_LANE_LOOP
            for (j = 0; j < 64; j++) acc[j] += x[i + j];
        }
        for (j = 0; j < 64; j++) t += acc[j];
        for (; i < n; i++) t += x[i];
        return t;
    }
    """
    double fl__read_sum_f32(const float *x, int64_t n)

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fl_openmp_enabled(void) { return 1; }
    static int fl_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int fl_openmp_enabled(void) { return 0; }
    static int fl_omp_max_threads(void) { return 1; }
    #endif
    """
    int fl_openmp_enabled()
    int fl_omp_max_threads()


def simd_path():
    """"avx512", "avx2" or "baseline": the code path of the chunk kernels on this processor."""
    return fl_simd_path().decode()


def openmp_enabled():
    """Whether the kernels were compiled with OpenMP (threads across rows)."""
    return bool(fl_openmp_enabled())


def omp_max_threads():
    return fl_omp_max_threads()


def read_sum(x, int threads):
    """Sum of a C-contiguous 2-D float32 array, rows split across threads, by a vectorized,
    multiversioned loop that prefetches as the kernels do: one streaming read, the ceiling that
    ``fastlogits bench`` measures the kernels against."""
    cdef const float *p = <const float *> <size_t> x.__array_interface__["data"][0]
    cdef int64_t rows = x.shape[0], n = x.shape[1], i
    cdef double tot = 0.0
    with nogil:
        for i in prange(rows, num_threads=threads, schedule="static"):
            tot += fl__read_sum_f32(p + i * n, n)
    return tot
