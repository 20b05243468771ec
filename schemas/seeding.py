"""Per-sample randomness: every random draw comes from a Generator derived from (spec hash, sample index, purpose, attempt).

No global random state anywhere in pairforge; sample k can be rebuilt alone.
"""
from __future__ import annotations

import numpy as np

# Stream ids keep the request plan stable when a sample is regenerated after a failed QC.
STREAM_REQUEST = 0
STREAM_GENERATE = 1


def seed_sequence(spec_hash: str, index: int, stream: int, attempt: int = 0) -> np.random.SeedSequence:
    entropy = int(spec_hash[:32], 16)
    return np.random.SeedSequence(entropy, spawn_key=(int(index), int(stream), int(attempt)))


def sample_rng(spec_hash: str, index: int, stream: int, attempt: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed_sequence(spec_hash, index, stream, attempt)))


def torch_seed(rng: np.random.Generator) -> int:
    """A seed for torch.Generator drawn from the sample's own rng (63 bits, always non-negative)."""
    return int(rng.integers(0, 2**63 - 1))
