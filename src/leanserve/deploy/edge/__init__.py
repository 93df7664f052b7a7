"""Edge artifacts: a version made small and checked for a device.

- ``build``: the API (``build_edge``), choosing a variant on selection data and reporting it held out;
- ``device``: device profiles and runs in a child process held to a profile's threads and memory;
- ``executorch``: the ExecuTorch program target; ``report``: the report every target writes;
- ``c/``: C99 sources for microcontrollers (lowering, arena planning, code generation, host and QEMU checks).
"""
