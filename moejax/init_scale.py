"""`model.init_scale`: all weight matrices drawn at a smaller scale (Switch Transformer, Sec. 2.3).

Fedus et al. (2021) draw every weight matrix from a truncated normal with standard deviation
sqrt(s / fan_in) and find that s = 0.1 instead of the usual 1.0 makes training more stable and
cuts the spread of quality over seeds (Table 3). In moejax, `model.init_scale` = s multiplies
the variance of every weight matrix initialised by variance scaling, i.e. its freshly drawn values
by sqrt(s) (a truncated normal times a constant is the truncated normal of that scale):

    scaled       attention wq, wk, wv, wo; the dense FFN's wi, wo (wg); the MoE router (its own
                 scale 0.1 becomes 0.1 * s); the experts' wi, wo (wg); the shared experts' wi,
                 wo (wg); the output projection `unembed` when embeddings are not tied
    not scaled   the token embedding `embed` (drawn with standard deviation 1, not by variance
                 scaling; tied, it is also the output projection, whose logits the model scales
                 by M^-1/2), the RMSNorm scales (ones), soft MoE's learned logit scale (one), and
                 router state that is not a parameter (balancing bias, hash table)

`init_scale = 1.0` leaves the parameters untouched (bitwise the initialisation without it).
"""

from __future__ import annotations

import math

from flax import nnx

# The names of the parameters `rescale` leaves alone (all others with >= 2 dimensions are the
# variance-scaled matrices listed above).
UNSCALED = frozenset({"embed"})


def is_scaled(name: str, ndim: int) -> bool:
  """Whether `init_scale` applies to a parameter of this attribute name and rank."""
  return ndim >= 2 and name not in UNSCALED


def rescale(model: nnx.Module, scale: float) -> None:
  """Multiplies, in place, every variance-scaled weight matrix of `model` by sqrt(`scale`)."""
  if scale == 1.0:
    return
  factor = math.sqrt(scale)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param) and path and is_scaled(str(path[-1]), node[...].ndim):
      node[...] = (node[...] * factor).astype(node[...].dtype)
