"""P4D as its authors' code runs it, beside ours, on the shipped tiny model: the loss over the steps and the seconds
per step of both, for one case (the prompt, its seed, the original model's image of it as the target).

  git clone https://github.com/joycenerd/P4D /tmp/p4d
  python -m venv /tmp/p4d_env && /tmp/p4d_env/bin/pip install torch==2.13.0 transformers==4.28.1 \
      diffusers==0.18.2 accelerate==0.21.0 huggingface_hub==0.15.1 numpy==1.24.3 safetensors pillow
  python benchmarks/p4d_original_tiny.py --original=/tmp/p4d --original_python=/tmp/p4d_env/bin/python
  python benchmarks/p4d_original_tiny.py --original=/tmp/p4d --original_python=... --steps=40   # a smoke run

The original is `prompt_optimization/optimize_n.py`'s (or optimize_k.py's) `optimize`, unmodified, called as
run_p4dn.py:219-233 calls it, on two pipelines loaded as its `load_sd` loads them (run_p4dn.py:52-78: DPMSolver,
the UNet in train mode), both the tiny diffusers export: the case is the tiny model against itself, as ours runs
it here. Their pinned packages (diffusers 0.12.1, transformers 4.29.2) are close to the environment above (the CCE
benchmark's); what the script changes around their code, and nothing else:
* devices: `.cuda(device)` returns the tensor, `torch.cuda.device` and `empty_cache` do nothing (it hard-codes
  two GPUs, optimize_n.py:187-198, :253-255);
* transformers' `_build_causal_attention_mask`, which their pipeline calls (model/p4dn/
  modified_stable_diffusion_pipeline.py:80), is added as transformers 4.29 wrote it where a newer one lacks it;
* `sentence_transformers.util` (semantic_search, dot_score, normalize_embeddings, 2.2.2's) where the package is not
  installed, and torchvision's ToTensor (run_p4dn.py:171-177, at the model's size: Resize and CenterCrop are the
  identity) written out; the open_clip ViT-H-14 selection model is replaced by raw pixels (selection is not timed);
* `torch.manual_seed(seed)` before it starts (its initial tokens and timesteps are unseeded), and
  `torch.nn.functional.mse_loss` wrapped to record each step's loss and time.
Their seconds per step are the intervals between consecutive losses from the second on (the first holds their
step-0 evaluation, a render); ours the median of blocks of `--block` steps after a compiling one. The losses come
from independent draws (tokens, t, noise), so they are compared as means over windows of steps.

Run it on an otherwise idle machine: under contention torch's default threads spin (on 2 busy cores the
original took 0.7 s a step, 0.085 s with OMP_NUM_THREADS=1 in the command's environment, which its runner inherits).
Writes --out/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from advunlearn_jax import config_lib  # noqa: E402
from advunlearn_jax.configs import tiny as tiny_config  # noqa: E402
from advunlearn_jax.convert import diffusers as sd_convert  # noqa: E402
from advunlearn_jax.evals import attacks, p4d, prompt_sets  # noqa: E402

RUNNER = r'''"""Runs joycenerd/P4D's optimize (optimize_n.py or optimize_k.py) on a diffusers folder on the CPU."""
import argparse, contextlib, json, sys, time, types

import numpy as np
import torch
from PIL import Image

parser = argparse.ArgumentParser()
for name in ("original", "model", "image", "prompt", "variant", "config", "out"):
  parser.add_argument(f"--{name}")
for name in ("seed", "steps"):
  parser.add_argument(f"--{name}", type=int)
parser.add_argument("--guidance", type=float)
cli = parser.parse_args()
sys.path.insert(0, cli.original)

# devices: the original hard-codes CUDA
torch.Tensor.cuda = lambda self, *args, **kwargs: self
torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()
torch.cuda.empty_cache = lambda: None

# transformers' private causal mask, as 4.29 wrote it, where a newer one has dropped it
from transformers.models.clip import modeling_clip

if not hasattr(modeling_clip.CLIPTextTransformer, "_build_causal_attention_mask"):
  def _build_causal_attention_mask(self, bsz, seq_len, dtype):
    mask = torch.empty(bsz, seq_len, seq_len, dtype=dtype)
    mask.fill_(torch.tensor(torch.finfo(dtype).min))
    mask.triu_(1)
    return mask.unsqueeze(1)

  modeling_clip.CLIPTextTransformer._build_causal_attention_mask = _build_causal_attention_mask

try:
  import sentence_transformers.util  # noqa: F401
except ImportError:  # sentence-transformers 2.2.2's util, the three functions optimize_n.py imports
  util = types.ModuleType("sentence_transformers.util")

  def normalize_embeddings(embeddings):
    return torch.nn.functional.normalize(embeddings, p=2, dim=1)

  def dot_score(a, b):
    a, b = (x if x.dim() == 2 else x.unsqueeze(0) for x in (a, b))
    return torch.mm(a, b.transpose(0, 1))

  def semantic_search(query_embeddings, corpus_embeddings, query_chunk_size=100, corpus_chunk_size=500000,
                      top_k=10, score_function=dot_score):
    queries_result_list = [[] for _ in range(len(query_embeddings))]
    for q in range(0, len(query_embeddings), query_chunk_size):
      for c in range(0, len(corpus_embeddings), corpus_chunk_size):
        scores = score_function(query_embeddings[q:q + query_chunk_size], corpus_embeddings[c:c + corpus_chunk_size])
        values, indices = torch.topk(scores, min(top_k, len(scores[0])), dim=1, largest=True, sorted=False)
        for i in range(len(scores)):
          for idx, value in zip(indices[i].tolist(), values[i].tolist()):
            queries_result_list[q + i].append({"corpus_id": c + idx, "score": value})
    return [sorted(r, key=lambda x: x["score"], reverse=True)[:top_k] for r in queries_result_list]

  util.normalize_embeddings, util.dot_score, util.semantic_search = normalize_embeddings, dot_score, semantic_search
  package = types.ModuleType("sentence_transformers")
  package.util = util
  sys.modules.update({"sentence_transformers": package, "sentence_transformers.util": util})

# each step's loss and when it was computed
losses, times = [], []
mse_loss = torch.nn.functional.mse_loss


def recorded_mse_loss(*args, **kwargs):
  loss = mse_loss(*args, **kwargs)
  losses.append(loss.item())
  times.append(time.perf_counter())
  return loss


torch.nn.functional.mse_loss = recorded_mse_loss

from diffusers import DPMSolverMultistepScheduler  # noqa: E402

if cli.variant == "n":
  from model.p4dn.modified_stable_diffusion_pipeline import ModifiedStableDiffusionPipeline
  from prompt_optimization.optimize_n import optimize
else:
  from model.p4dk.modified_stable_diffusion_pipeline import ModifiedStableDiffusionPipeline
  from prompt_optimization.optimize_k import optimize


def load_sd(device, weight_dtype):  # run_p4dn.py:52-78, without the ESD checkpoint and the v1-4 safety checker
  scheduler = DPMSolverMultistepScheduler.from_pretrained(cli.model, subfolder="scheduler")
  pipe = ModifiedStableDiffusionPipeline.from_pretrained(cli.model, scheduler=scheduler, torch_dtype=weight_dtype)
  pipe = pipe.to(device)
  pipe.vae.requires_grad_(False)
  pipe.text_encoder.requires_grad_(False)
  pipe.unet.requires_grad_(True)
  pipe.unet.train()
  return pipe, torch.Generator(device=device)


def to_tensor(image):  # torchvision's ToTensor
  return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)


class PixelModel:  # the selection model's stand-in: measure_similarity's encode_image on raw pixels
  def encode_image(self, batch):
    return batch.flatten(1)


with open(cli.config) as f:
  args = argparse.Namespace(**json.load(f))
size = Image.open(cli.image).size[0]
args.__dict__.update(iter=cli.steps, eval_step=cli.steps + 1, print_step=cli.steps + 1, image_length=size,
                     device="cpu", device_2="cpu", weight_dtype=torch.float32, filter=False)
torch.manual_seed(cli.seed)
pipe, gen = load_sd(args.device, args.weight_dtype)
erase_pipe, erase_gen = load_sd(args.device_2, args.weight_dtype)
target = Image.open(cli.image).convert("RGB")
best_text, best_sim = optimize(
  clip_model=PixelModel(), clip_preprocess=to_tensor, img_preprocess=to_tensor, pipe=pipe,
  generator=gen.manual_seed(cli.seed), erase_pipe=erase_pipe, erase_generator=erase_gen.manual_seed(cli.seed),
  target_prompt=cli.prompt, negative_prompt=None, target_imgs=[target], guidance=cli.guidance, safe_config=None,
  args=args,
)
with open(cli.out, "w") as f:
  json.dump({"losses": losses, "times": times, "prompt": best_text}, f)
'''


def windows(losses: np.ndarray, width: int) -> list[float]:
  return [float(np.mean(losses[i : i + width])) for i in range(0, len(losses), width)]


def ours(tiny, prompt: str, image: np.ndarray, variant: str, seed: int, steps: int, block: int) -> dict:
  """Our PEZ loop on the same case: the losses of `steps` steps and the median seconds per step of the blocks
  after the first (compiling) one."""
  import jax

  settings = [f"evaluation.p4d.iters={steps}", f"evaluation.p4d.eval_step={block}"]
  cfg = p4d.P4DConfig.from_config(config_lib.override(tiny_config.get_config("triangle"), settings).evaluation)
  problem = p4d.prepare(tiny, tiny, prompt, image, cfg, variant, seed)
  embeds, opt_state = problem.init, problem.tx.init(problem.init)
  losses, seconds = [], []
  for start in range(0, steps, block):
    t = time.perf_counter()
    embeds, opt_state, block_losses = jax.block_until_ready(p4d.advance(problem, embeds, opt_state, start))
    seconds.append((time.perf_counter() - t) / block)
    losses += np.asarray(block_losses).tolist()
  held_out = [p4d.held_out_loss(problem, e) for e in (problem.init, embeds)]
  return {
    "losses": losses,
    "seconds_per_step": float(np.median(seconds[1:] or seconds)),
    "final_prompt": p4d.decode(problem, embeds),  # the last projection (no selection here)
    "held_out_loss": held_out,  # 16 fixed (t, noise) draws: at the start and at the end
  }


def theirs(args, prompt: str, image_path: str, variant: str, seed: int, out_dir: str) -> dict:
  runner = os.path.join(out_dir, "runner.py")
  with open(runner, "w") as f:
    f.write(RUNNER)
  out = os.path.join(out_dir, f"original_{variant}.json")
  command = [
    args.original_python,
    runner,
    f"--original={args.original}",
    f"--model={config_lib.TINY_MODEL_DIR}",
    f"--image={image_path}",
    f"--prompt={prompt}",
    f"--variant={variant}",
    f"--config={os.path.join(args.original, 'configs', 'esd_nudity_optmz_config.json')}",
    f"--out={out}",
    f"--seed={seed}",
    f"--steps={args.steps}",
    f"--guidance={args.guidance}",
  ]
  with open(os.path.join(out_dir, f"original_{variant}.log"), "w") as log:
    subprocess.run(command, check=True, stdout=log, stderr=log, cwd=args.original)
  with open(out) as f:
    raw = json.load(f)
  intervals = np.diff(raw["times"])[1:]  # the first interval holds their step-0 evaluation
  # their selection ran at step 0 only (eval_step > steps): its prompt is the first projection
  return {"losses": raw["losses"], "seconds_per_step": float(np.median(intervals)), "step0_prompt": raw["prompt"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--original", required=True, help="a clone of joycenerd/P4D")
  parser.add_argument("--original_python", default=sys.executable, help="an interpreter with their packages")
  parser.add_argument("--out", default=os.path.join(ROOT, "workdirs", "p4d_original_tiny"))
  parser.add_argument("--prompt", default="a photo of a striped red triangle")
  parser.add_argument("--seed", type=int, default=100)
  parser.add_argument("--guidance", type=float, default=5.0)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--block", type=int, default=50, help="our steps per compiled block (their eval_step)")
  parser.add_argument("--variants", default="n,k")
  args = parser.parse_args()
  if args.steps % args.block:
    raise SystemExit(f"--steps={args.steps} must be a multiple of --block={args.block}")
  os.makedirs(args.out, exist_ok=True)

  from PIL import Image

  tiny = sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR)
  ev = tiny_config.get_config("triangle").evaluation
  case = prompt_sets.inline([args.prompt], seed=args.seed, guidance=args.guidance)
  image = attacks.target_images(tiny, case, ev)[0]
  image_path = os.path.join(args.out, "target.png")
  Image.fromarray(image).save(image_path)

  results, lines = {}, []
  width = max(1, args.steps // 4)
  header = f"| run | loss, mean over windows of {width} steps | seconds per step |"
  lines += [header, "|---|---|---|"]
  for variant in args.variants.split(","):
    runs = {
      f"original (optimize_{variant}.py)": theirs(args, args.prompt, image_path, variant, args.seed, args.out),
      "ours (evals/p4d.py)": ours(tiny, args.prompt, image, variant, args.seed, args.steps, args.block),
    }
    for name, run in runs.items():
      cells = " / ".join(f"{w:.4f}" for w in windows(np.asarray(run["losses"]), width))
      lines.append(f"| P4D-{variant.upper()} {name} | {cells} | {run['seconds_per_step']:.4f} |")
    results[variant] = runs
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"prompt": args.prompt, "seed": args.seed, "steps": args.steps, "runs": results}, f, indent=2)


if __name__ == "__main__":
  main()
