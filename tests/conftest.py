"""Suite-wide settings: tiny models run fastest (and deterministically) on one intra-op thread."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
