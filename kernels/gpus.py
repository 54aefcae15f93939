"""GPU datasheets: the one table of the GPUs that the memory planner (fastgrpo/perf/plan.py, ``fastgrpo
plan --gpu a40-48gb``) and the roofline (roofline.py, ``GPUS["A40"]``) know; each reads its view of it.

It lives in the kernels because the roofline is part of them and the kernels import nothing from
the rest of fastgrpo, while fastgrpo may import fastgrpo.kernels. Plain data: importing it loads
no compiler and no torch.

Sources: NVIDIA product datasheets and architecture whitepapers. A40: 149.7 TFLOPS bf16, 696 GB/s
GDDR6, 84 SMs, 6 MB L2 (GA102 whitepaper); A100 SXM: 312 TFLOPS, 1,555 GB/s (40 GB) / 2,039 GB/s
(80 GB), 108 SMs, 40 MB L2 (A100 whitepaper); H100 SXM5: 989 TFLOPS, 3,350 GB/s, 132 SMs, 50 MB L2
(H100 whitepaper); H200 SXM: the H100's processor and rates, 4,800 GB/s HBM3e (H200 datasheet), 132 SMs
and 60 MB of L2 as the CUDA runtime reports them on an H200. Memory in MiB as nvidia-smi reports it: A40 46,068 (ECC on), A100-SXM4
40,960 / 81,920, H100 SXM 81,559, H200 143,771, L4 23,034 (ECC on), RTX 4090 24,564, RTX A6000 49,140 (ECC off;
46,068 with ECC on).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuDatasheet:
    """Published numbers of one GPU. The roofline's fields (sms, l2_mib, cc) are filled only for the
    GPUs it models (None elsewhere: the planner needs memory and peaks only)."""

    name: str  # the product, as the planner's report prints it
    label: str  # the short name the roofline's tables print ("A40")
    memory_mib: int  # total memory as nvidia-smi reports it (ECC on where it is on by default)
    bf16_tflops: float  # peak dense bf16 tensor-core TFLOP/s (fp32 accumulate, no sparsity)
    mem_bw_gbs: float  # DRAM bandwidth, GB/s
    sms: int | None = None  # streaming multiprocessors
    l2_mib: int | None = None  # L2 cache in MiB (the datasheets' "MB" are 2^20 bytes)
    cc: int | None = None  # compute capability, 86 = sm_86


# Keyed by the planner's command-line names (`fastgrpo plan --gpu a40-48gb`).
GPU_DATASHEETS: dict[str, GpuDatasheet] = {
    "a40-48gb": GpuDatasheet("NVIDIA A40 48 GB", "A40", 46068, 149.7, 696.0, sms=84, l2_mib=6, cc=86),
    "a100-40gb": GpuDatasheet("NVIDIA A100 SXM 40 GB", "A100-40GB", 40960, 312.0, 1555.0),
    "a100-80gb": GpuDatasheet("NVIDIA A100 SXM 80 GB", "A100", 81920, 312.0, 2039.0, sms=108, l2_mib=40, cc=80),
    "h100-80gb": GpuDatasheet("NVIDIA H100 SXM 80 GB", "H100", 81559, 989.0, 3350.0, sms=132, l2_mib=50, cc=90),
    "h200-141gb": GpuDatasheet("NVIDIA H200 SXM 141 GB", "H200", 143771, 989.0, 4800.0, sms=132, l2_mib=60, cc=90),
    "l4-24gb": GpuDatasheet("NVIDIA L4 24 GB", "L4", 23034, 121.0, 300.0),
    "rtx4090-24gb": GpuDatasheet("NVIDIA GeForce RTX 4090 24 GB", "RTX4090", 24564, 165.2, 1008.0),
    "a6000-48gb": GpuDatasheet("NVIDIA RTX A6000 48 GB", "A6000", 49140, 154.8, 768.0),
}
