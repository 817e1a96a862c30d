"""CLIP tokenizer: a pipeline's `tokenizer/` folder, or the identical BPE tokenizer built offline.

The offline tokenizer is generated from `bpe_simple_vocab_16e6.txt.gz`, the BPE vocabulary OpenAI ships in
the `openai-clip` package (we read the file and never import that package, which would pull in torch).
The construction follows openai/CLIP's `simple_tokenizer.py`: 256 byte symbols, the same with `</w>`,
48,894 merges, then `<|startoftext|>` and `<|endoftext|>`: 49,408 entries.

Trap: in transformers 5, `CLIPTokenizer(vocab_file=..., merges_file=...)` silently ignores the files, so we
always write a folder and load it with `from_pretrained`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import threading
import warnings
from collections.abc import Sequence

import numpy as np

from advunlearn_jax.convert.weights_io import atomic_folder, cache_dir

MAX_LENGTH = 77
EOT_ID = 49407
_NUM_MERGES = 49152 - 256 - 2  # = 48894, as in openai/CLIP
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable-unicode table, which CLIP's BPE symbols are written in."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def openai_bpe_path() -> str:
  spec = importlib.util.find_spec("clip")  # locates the package without executing it
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the 'openai-clip' package is not installed (pip install openai-clip==1.0.1)")
  path = os.path.join(list(spec.submodule_search_locations)[0], _BPE_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing; reinstall openai-clip")
  return path


def build_vocab_and_merges(bpe_path: str) -> tuple[dict[str, int], list[str]]:
  lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
  merges = lines[1 : _NUM_MERGES + 1]
  symbols = list(_bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols]
  vocab += ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  return {token: i for i, token in enumerate(vocab)}, merges


def default_cache_dir() -> str:
  return cache_dir("clip_tokenizer")


def write_clip_tokenizer_folder(out_dir: str, bpe_path: str | None = None, pad_token: str = "<|endoftext|>") -> str:
  """Writes vocab.json, merges.txt and the configs of SD 1.x's tokenizer (pad = `<|endoftext|>`); SDXL's
  tokenizer_2/ is the same with pad_token "!" (id 0)."""
  vocab, merges = build_vocab_and_merges(bpe_path or openai_bpe_path())
  special = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": pad_token,
  }
  with atomic_folder(out_dir) as staging:
    with open(os.path.join(staging, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(staging, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(staging, "special_tokens_map.json"), "w") as f:
      json.dump(special, f, indent=2)
    with open(os.path.join(staging, "tokenizer_config.json"), "w") as f:
      config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True}
      json.dump({**config, **special}, f, indent=2)
  return out_dir


def offline_tokenizer_folder(cache_dir: str | None = None) -> str:
  """The offline tokenizer folder, generated on first use."""
  folder = cache_dir or default_cache_dir()
  if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
    write_clip_tokenizer_folder(folder)
  return folder


# transformers resolves `from transformers import X` lazily, and that first resolution is not thread-safe: the
# runs of a population (one thread per device group) load their tokenizers at the same time.
_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def load_tokenizer(folder: str | None = None):
  """`transformers.CLIPTokenizer` from a `tokenizer/` folder; None -> the offline CLIP tokenizer."""
  with _LOAD_LOCK:
    from transformers import CLIPTokenizer

    folder = folder or offline_tokenizer_folder()
    # transformers 4 writes vocab.json + merges.txt; transformers 5 writes only tokenizer.json.
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "tokenizer.json")):
      raise FileNotFoundError(f"{folder}: no vocab.json or tokenizer.json; expected a CLIP tokenizer folder")
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
  """int32 ids [B, max_length]: SOT, tokens, EOT, padded with the tokenizer's pad id.

  Prompts that do not fit are truncated (keeping the final EOT) with a warning, as diffusers does.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  full = tokenizer(prompts, padding=False, truncation=False)["input_ids"]
  for prompt, ids in zip(prompts, full):
    if len(ids) > max_length:
      warnings.warn(f"prompt of {len(ids)} tokens truncated to {max_length}: {prompt[:80]!r}", stacklevel=2)
  out = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
  return np.asarray(out, dtype=np.int32)
