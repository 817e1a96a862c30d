"""pytorch-fid's FID Inception weights, converted once into the cache where `evaluation.fid` finds them.

  python -m advunlearn_jax.tools.fetch_inception [--pth=pt_inception-2015-12-05-6726825d.pth] [--out=FILE]

Without `--pth` the file is downloaded from pytorch-fid's release and its SHA-256 checked (convert/inception.py).
"""

from __future__ import annotations

import os

from absl import app, flags

from advunlearn_jax import cli
from advunlearn_jax.convert import inception
from advunlearn_jax.errors import ConfigError

_PTH = flags.DEFINE_string("pth", "", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth; empty: download it")
_OUT = flags.DEFINE_string("out", "", f"output .safetensors; empty: the cache ({inception.CACHE_FILE})")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = _OUT.value or inception.cached_path()
  if _PTH.value and not os.path.isfile(_PTH.value):
    raise ConfigError(f"--pth={_PTH.value}: no such file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
  if os.path.isdir(out):
    raise ConfigError(f"--out={out} is a folder; give the .safetensors file to write")
  cli.check_output_folder(os.path.dirname(os.path.abspath(out)), "out")
  path = inception.convert(_PTH.value, out) if _PTH.value else inception.download_and_convert(out)
  print(f"wrote {path}: FID Inception weights, {len(inception.expected_keys())} tensors checked")


if __name__ == "__main__":
  cli.run(main)
