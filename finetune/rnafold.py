"""ViennaRNA RNAfold (MFE structure) as the thermodynamic baseline, scored with the same metric."""
from __future__ import annotations

import numpy as np

from finetune.structure import parse_dot_bracket


def rnafold_pairs(sequence: str) -> np.ndarray:
    """MFE pairs (0-based, i < j) from RNAfold with default parameters (37 C, Turner 2004); ViennaRNA reads lower
    case and T as RNA itself."""
    import RNA  # viennarna; imported lazily so the package works without it

    structure, _energy = RNA.fold_compound(sequence).mfe()
    return parse_dot_bracket(structure, where=f"RNAfold output for {sequence[:20]}...")
