# cython: language_level=3
"""Cython declarations of fastlogits' public C API (``fastlogits.h``), for other Cython code.

Usage::

    from fastlogits.clib cimport fl_lse_state, fl_lse_init, fl_lse_update_f32, fl_lse_result

and compile with ``include_dirs=[fastlogits.get_include()]``. Every function is ``nogil``; the header is
header-only, so there is nothing to link but ``-lm``.
"""
from libc.stdint cimport int64_t, uint16_t


cdef extern from "fastlogits.h" nogil:
    int FASTLOGITS_VERSION_MAJOR
    int FASTLOGITS_VERSION_MINOR

    ctypedef struct fl_lse_state:
        double m
        double s

    ctypedef struct fl_ent_state:
        double m
        double s
        double t

    ctypedef struct fl_ce_state:
        fl_lse_state lse
        int64_t label
        double target
        int found

    ctypedef struct fl_argmax_state:
        double value
        int64_t index

    void fl_lse_init(fl_lse_state *st)
    void fl_lse_update_f32(fl_lse_state *st, const float *x, size_t n)
    void fl_lse_update_f64(fl_lse_state *st, const double *x, size_t n)
    void fl_lse_update_f16(fl_lse_state *st, const uint16_t *x, size_t n)
    void fl_lse_update_bf16(fl_lse_state *st, const uint16_t *x, size_t n)
    void fl_lse_merge(fl_lse_state *into, const fl_lse_state *other)
    double fl_lse_result(const fl_lse_state *st)
    double fl_cross_entropy_f32(const float *row, size_t n, int64_t label)

    void fl_ce_init(fl_ce_state *st, int64_t label)
    void fl_ce_update_f32(fl_ce_state *st, const float *x, size_t n, int64_t start)
    void fl_ce_update_f64(fl_ce_state *st, const double *x, size_t n, int64_t start)
    void fl_ce_merge(fl_ce_state *into, const fl_ce_state *other)
    double fl_ce_result(const fl_ce_state *st)

    void fl_argmax_init(fl_argmax_state *st)
    void fl_argmax_update_f32(fl_argmax_state *st, const float *x, size_t n, int64_t start)
    void fl_argmax_merge(fl_argmax_state *into, const fl_argmax_state *other)
    int64_t fl_argmax_f32(const float *x, size_t n)

    void fl_ent_init(fl_ent_state *st)
    void fl_ent_update_f32(fl_ent_state *st, const float *x, size_t n)
    void fl_ent_update_f64(fl_ent_state *st, const double *x, size_t n)
    void fl_ent_update_f16(fl_ent_state *st, const uint16_t *x, size_t n)
    void fl_ent_update_bf16(fl_ent_state *st, const uint16_t *x, size_t n)
    void fl_ent_merge(fl_ent_state *into, const fl_ent_state *other)
    double fl_ent_result(const fl_ent_state *st)

    float fl_f16_to_f32(uint16_t h)
    uint16_t fl_f32_to_f16(float x)
    float fl_bf16_to_f32(uint16_t h)
    uint16_t fl_f32_to_bf16(float x)
    const char *fl_simd_path()
