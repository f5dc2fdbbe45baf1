"""The numeric core: array-API code, knows no framework.

Directions, finite differences with Richardson extrapolation and error estimates,
and the dtype-keyed tolerance table. Backends supply evaluate/differentiate; this
package decides what to evaluate and how to judge it.

Written against the array API (through array-api-compat, see ``arrays``): every
function takes its namespace from its inputs, so the same code runs on NumPy arrays
and on torch tensors, on their device, and no module here imports a framework.
Random draws are the exception the standard leaves open: a NumPy Generator on the
host, or a backend's own draw (``directions.Draw``).
"""
