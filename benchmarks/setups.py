"""What the benchmarks run on besides the models (advunlearn_jax/testing/tiny_models.py: the sizes, random
weights): the H200's dense peak for MFU, and an H200 to compile for on a host without one."""

from __future__ import annotations

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
TARGETS = {"h200": H200_TARGET_CONFIG}
# Triton's GEMM tiles are the autotuner's to pick; without a device some small dots find none, so cuBLAS there.
DEVICELESS_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def deviceless_gpu(target: str) -> jax.sharding.Sharding:
  """One device of `target` (a TARGETS key) to place abstract inputs on: what is lowered for it compiles with
  XLA:GPU on this host, GPU or not, with JAX's platforms set to cpu (a host without a GPU driver fails the CUDA
  plugin's checks otherwise). Needs the plugin: ValueError says how to install it."""
  from jax.experimental import topologies

  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target], topology="1x1x1")
  except NotImplementedError:
    raise ValueError(
      f"--target={target} compiles with XLA:GPU, which needs JAX's CUDA plugin: pip install "
      f'"jax[cuda12]=={jax.__version__}"'
    ) from None
  mesh = topologies.make_mesh(topology, (1,), ("device",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
