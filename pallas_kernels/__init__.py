"""Pallas grouped-matmul kernels for mixture-of-experts layers (TPU Mosaic and GPU Triton).

Public entry points (differentiable ``gmm``, plain ``tgmm``, both with a
``backend`` switch and ``interpret=``) live in `pallas_kernels.ops`; one kernel
per file: `gmm_tpu`, `tgmm_tpu`, `gmm_gpu`, `tgmm_gpu`, each with its jitted
wrapper and the pure-jnp ``reference`` beside it (``gmm_reference`` and
``tgmm_reference`` here are the TPU files' ones).
"""

from pallas_kernels.common import Backend
from pallas_kernels.gmm_tpu import reference as gmm_reference
from pallas_kernels.ops import gmm, tgmm
from pallas_kernels.tgmm_tpu import reference as tgmm_reference

__all__ = ["Backend", "gmm", "gmm_reference", "tgmm", "tgmm_reference"]
