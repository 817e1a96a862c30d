"""What the benchmarks run on besides the models (advunlearn_jax/testing/tiny_models.py: the sizes, random
weights): the H200's dense peak for MFU, and the accelerators to compile for on a host without them (an H200
through XLA:GPU, TPU slices through libtpu's ahead-of-time topologies)."""

from __future__ import annotations

from typing import NamedTuple

import jax

H200_PEAK_TFLOPS = {"bfloat16": 989.0, "float32": 494.0}  # fp32 as TF32, JAX's default precision there

# XLA:GPU's device description of an H200 SXM (141 GB HBM3e; Hopper's SM limits), what its compiler reads
# from the device when there is one. Deviceless compiles skip the autotuner: XLA's default algorithms.
H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150754820096 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H200"
"""
GPU_TARGETS = {"h200": H200_TARGET_CONFIG}


class TpuTarget(NamedTuple):
  topology: str  # libtpu's topology name: generation, then chips per axis
  hbm_gib: float  # per chip, Cloud TPU's system architecture pages
  options: dict  # libtpu's: megacore (one JAX device per chip, as on a real v4/v5p), the chips of one host


# Cloud TPU names slices by TensorCores (v4, v5p: 2 per chip) or chips (v5e); the topology counts chips.
MEGACORE = {"chip_config_name": "megacore"}
TPU_TARGETS = {
  "v4-8": TpuTarget("v4:2x2x1", 32.0, MEGACORE),
  "v4-32": TpuTarget("v4:2x2x4", 32.0, MEGACORE),  # 16 chips on 4 hosts: FSDP within a host, data across them
  "v5e-1": TpuTarget("v5e:1x1", 16.0, {"chips_per_host_bounds": (1, 1, 1)}),  # one chip: no partitioning
  "v5e-8": TpuTarget("v5e:2x4", 16.0, {"chips_per_host_bounds": (2, 4, 1)}),  # one host of 8 chips
  "v5p-8": TpuTarget("v5p:2x2x1", 95.0, MEGACORE),
}
TARGETS = (*GPU_TARGETS, *TPU_TARGETS)
HBM_GIB = {"h200": 150754820096 / 2**30, **{name: t.hbm_gib for name, t in TPU_TARGETS.items()}}
# Triton's GEMM tiles are the autotuner's to pick; without a device some small dots find none, so cuBLAS there.
DEVICELESS_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def target_devices(target: str) -> list:
  """The devices of `target` (a TARGETS name), to build a mesh of and place abstract inputs on: what is lowered
  for them compiles on this host with the target's own compiler (XLA:GPU, or libtpu's), no accelerator needed.
  JAX's platforms must be cpu (a host without a GPU driver fails the CUDA plugin's checks otherwise). ValueError
  says which plugin is missing and how to install it."""
  from jax.experimental import topologies

  if target in GPU_TARGETS:
    platform, kwargs, install = "cuda", {"target_config": GPU_TARGETS[target], "topology": "1x1x1"}, "cuda12"
  else:
    tpu = TPU_TARGETS[target]
    platform, kwargs, install = "tpu", {"topology_name": tpu.topology, **tpu.options}, "tpu"
  try:
    topology = topologies.get_topology_desc(platform=platform, **kwargs)
  except RuntimeError as e:  # NotImplementedError: no CUDA plugin; a RuntimeError saying so: no libtpu
    if not isinstance(e, NotImplementedError) and "support not installed" not in str(e):
      raise
    raise ValueError(
      f"--target={target} compiles with {'XLA:GPU' if platform == 'cuda' else 'libtpu'}, which needs JAX's "
      f'{platform.upper()} plugin, in its own venv: pip install "jax[{install}]=={jax.__version__}"'
    ) from None
  return list(topology.devices)
