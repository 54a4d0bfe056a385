"""Strict JSON (RFC 8259) for the command line's summaries: it has no NaN or infinity, so a non-finite
float is written as null (Python's json would write the non-standard NaN / Infinity)."""
import json

import numpy as np


def value(v):
    """v with every non-finite float replaced by None, NumPy scalars and arrays as plain Python."""
    if isinstance(v, dict):
        return {k: value(u) for k, u in v.items()}
    if isinstance(v, (list, tuple)):
        return [value(u) for u in v]
    if isinstance(v, np.ndarray):
        return value(v.tolist())
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.generic):      # other NumPy scalars (an ml_dtypes bfloat16, say)
        return value(v.item())
    return v


def dumps(obj, **kw):
    return json.dumps(value(obj), allow_nan=False, **kw)
