"""Where the work runs: the torch device for the backbone and scorers, and the faiss index's device.

The project never needs a GPU; it uses one when it is there. ``pick_device("auto")`` takes CUDA when
torch sees it. A flat faiss index moves to the GPUs when the installed faiss is a GPU build
(``pip install 'dmad-inspect[gpu]'`` installs ``faiss-gpu-cu12`` in place of ``faiss-cpu``) and sees one;
an HNSW index stays on the CPU (faiss has no GPU HNSW). Saved indexes are always CPU indexes.

Example:
    >>> pick_device("cpu").type
    'cpu'
"""

from __future__ import annotations

from typing import Any

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``"auto"``: CUDA when torch sees a GPU, else the CPU; anything else is taken as asked."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def faiss_gpus(faiss: Any) -> int:
    """How many GPUs the installed faiss can use (0 for a CPU build)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None and hasattr(faiss, "index_cpu_to_all_gpus") else 0


def index_on_best_device(faiss: Any, index: Any, requested: str = "auto") -> Any:
    """``index`` on all GPUs faiss sees (a flat index, with ``requested`` "auto" or "cuda"), else as it is."""
    if requested == "cpu" or not isinstance(index, faiss.IndexFlat) or faiss_gpus(faiss) == 0:
        return index
    return faiss.index_cpu_to_all_gpus(index)


def index_for_saving(faiss: Any, index: Any) -> Any:
    """A CPU copy of a GPU index (faiss writes CPU indexes only); a CPU index as it is."""
    on_gpu = faiss_gpus(faiss) > 0 and type(index).__name__.startswith("Gpu")
    return faiss.index_gpu_to_cpu(index) if on_gpu else index
