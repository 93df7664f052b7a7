"""Microcontroller artifacts: an int8 QDQ model lowered to dependency-free C99 (``leanserve edge --target c``).

``lower`` reads the QDQ ONNX graph into integer layers, ``arena`` plans the scratch buffer from their
lifetimes, ``codegen`` writes the C files, ``verify`` compiles them for this machine and compares them with
ONNX Runtime, ``cortex_m`` cross-compiles them for a Cortex-M4 and runs them on QEMU, and ``build`` chooses
the int8 model within the accuracy budget and registers the artifact.
"""
