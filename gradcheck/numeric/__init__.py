"""The numeric core: NumPy only, knows no framework.

Directions, finite differences with Richardson extrapolation and error estimates,
and the dtype-keyed tolerance table. Backends supply evaluate/differentiate; this
package decides what to evaluate and how to judge it.
"""
