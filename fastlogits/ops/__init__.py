"""The public functions, one module per family: validate, fill defaults, dispatch to a backend."""
