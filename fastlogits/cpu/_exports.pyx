# cython: language_level=3
"""C entry points with plain C signatures, exported from this extension module so that other JIT code
(``fastlogits.numba``) can call the C core through their addresses, with no Python in between."""

cdef extern from *:
    """
    #include "fastlogits.h"
    #if defined(__GNUC__) || defined(__clang__)
    #define FL_EXPORT __attribute__((visibility("default")))
    #else
    #define FL_EXPORT
    #endif

    /* The logsumexp state of one row: n values of dtype FL_F32 or FL_F64, `stride` bytes apart; *r is
     * set to the row (for reading single values of it afterwards). */
    static fl_lse_state fastlogits__row_state(fl_row *r, const char *data, int64_t n, int64_t stride,
                                              int dtype) {
        r->data = data; r->n = n; r->stride = stride; r->dtype = dtype;
        r->temperature = 1.0; r->softcap = 0.0;
        if (dtype == FL_F64) {
            double buf[FL_CHUNK / 2];
            return fl_row_lse_f64(r, 0, n, FL_CHUNK / 2, buf);
        }
        float buf[FL_CHUNK];
        return fl_row_lse_f32(r, 0, n, FL_CHUNK, buf);
    }

    /* logsumexp of one row. */
    FL_EXPORT double fastlogits_lse_row(const char *data, int64_t n, int64_t stride, int dtype) {
        fl_row r;
        fl_lse_state st = fastlogits__row_state(&r, data, n, stride, dtype);
        return fl_lse_result(&st);
    }

    /* -log softmax(row)[label] (NaN where PyTorch's log_softmax is NaN, and for a label outside
     * [0, n), as fl_cross_entropy_f32 gives: compiled callers cannot all raise). */
    FL_EXPORT double fastlogits_ce_row(const char *data, int64_t n, int64_t stride, int dtype,
                                       int64_t label) {
        fl_row r;
        fl_lse_state st;
        if (label < 0 || label >= n) return NAN;
        st = fastlogits__row_state(&r, data, n, stride, dtype);
        double xt = dtype == FL_F64 ? fl_row_value_f64(&r, label) : fl_row_value_f32(&r, label);
        if (!(st.m > -INFINITY && st.m < INFINITY)) return NAN;
        return (st.m - xt) + fl__log(st.s);
    }
    """


def symbols():
    """Names of the exported entry points (for ctypes)."""
    return ("fastlogits_lse_row", "fastlogits_ce_row")
