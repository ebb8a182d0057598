"""Device choice without a GPU: the code picks CUDA for torch and moves flat faiss indexes to the GPUs
when they are there (shown here by making torch and faiss report a GPU), and stays on the CPU otherwise."""

from __future__ import annotations

from types import SimpleNamespace

import faiss
import numpy as np
import torch

from dmad_core import devices


def test_torch_takes_cuda_when_it_is_there_and_the_cpu_otherwise(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.pick_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.pick_device("auto").type == "cuda"
    assert devices.pick_device("cpu").type == "cpu"  # asked for: kept


def test_this_faiss_build_sees_no_gpu_and_indexes_stay_on_the_cpu() -> None:
    index = faiss.IndexFlatL2(8)
    assert devices.faiss_gpus(faiss) == 0 or torch.cuda.is_available()
    if devices.faiss_gpus(faiss) == 0:
        assert devices.index_on_best_device(faiss, index) is index
        assert devices.index_for_saving(faiss, index) is index


def test_a_gpu_faiss_build_gets_flat_indexes_moved_and_saved_back() -> None:
    class GpuIndexFlatL2:  # what faiss's GPU build returns
        pass

    moved: list = []
    fake = SimpleNamespace(
        IndexFlat=faiss.IndexFlat, get_num_gpus=lambda: 2,
        index_cpu_to_all_gpus=lambda index: moved.append(index) or GpuIndexFlatL2(),
        index_gpu_to_cpu=lambda index: "cpu copy")
    flat, hnsw = faiss.IndexFlatL2(8), faiss.IndexHNSWFlat(8, 16)
    flat.add(np.zeros((1, 8), np.float32))
    on_gpu = devices.index_on_best_device(fake, flat)
    assert isinstance(on_gpu, GpuIndexFlatL2) and moved == [flat]
    assert devices.index_on_best_device(fake, hnsw) is hnsw  # faiss has no GPU HNSW
    assert devices.index_on_best_device(fake, flat, requested="cpu") is flat
    assert devices.index_for_saving(fake, on_gpu) == "cpu copy" and devices.index_for_saving(fake, flat) is flat
