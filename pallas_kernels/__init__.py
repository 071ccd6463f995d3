"""Pallas grouped-matmul kernels for mixture-of-experts layers (TPU Mosaic and GPU Triton).

Public entry points (differentiable ``gmm``, plain ``tgmm``, both with a
``backend`` switch and ``interpret=``) live in `pallas_kernels.ops`; one kernel
per file, each with its jitted wrapper: `gmm_tpu`, `tgmm_tpu`, `gmm_gpu`,
`tgmm_gpu`. `pallas_kernels.reference` holds the one pure-jnp reference of
both (``gmm_reference``, ``tgmm_reference``) that every test checks against.
"""

from pallas_kernels.common import Backend
from pallas_kernels.ops import gmm, tgmm
from pallas_kernels.reference import gmm_reference, tgmm_reference

__all__ = ["Backend", "gmm", "gmm_reference", "tgmm", "tgmm_reference"]
