"""A plain PyTorch transcription of the reference's AdvUnlearn iteration (spec sections 2-3), as an oracle.

It follows the reference's code paths (ldm partial DDIM, `CustomTextEncoder` fed word embeddings, the attack's
Adam without zero_grad returning the sequence built at the start of its last step, the ESD target, the
retain distillation) on diffusers/transformers modules, with every random draw passed in.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


def partial_ddim(model, x_T, cond, uncond, t_enc, scale):
  """The reference's ldm sampler: grid [1, 21, ..., 981] minus its last point, stop after index + 1 == t_enc."""
  betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
  alphas_cumprod = torch.cumprod(1 - betas, 0).float()
  ddim_timesteps = np.arange(0, 1000, 20) + 1
  alphas = alphas_cumprod[ddim_timesteps].to(x_T.device)
  alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]]).to(x_T.device)
  timesteps = ddim_timesteps[:-1]  # t_start = -1
  total_steps = len(timesteps)
  img = x_T
  with torch.no_grad():
    for i, step in enumerate(np.flip(timesteps)):
      index = total_steps - i - 1
      ts = torch.full((img.shape[0] * 2,), int(step), dtype=torch.long, device=img.device)
      e_u, e_c = model(torch.cat([img, img]), ts, torch.cat([uncond, cond])).sample.chunk(2)
      e_t = e_u + scale * (e_c - e_u)
      a_t, a_prev = alphas[index], alphas_prev[index]
      pred_x0 = (img - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
      img = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
      if index + 1 == t_enc:
        break
  return img


def encode_embeds(clip, ids, embeds):
  """The reference's CustomTextEncoder: word embeddings in, last hidden state out (ids pick the mask shape)."""
  hook = clip.embeddings.token_embedding.register_forward_hook(lambda m, i, o: embeds)
  try:
    return clip(input_ids=ids).last_hidden_state
  finally:
    hook.remove()


class Draw(NamedTuple):
  t_enc: int
  t_ddpm: int
  noise: torch.Tensor  # NCHW


class Draws(NamedTuple):
  init_ids: list[int]
  attack: list[Draw]
  defender: Draw
  retain_noise: torch.Tensor


def prefix_sequence(words, delta, concept_len):
  """prefix_k: [SOT, delta, mid (L), eot (76 - L - k)]."""
  k = delta.shape[0]
  return torch.cat([words[:1], delta, words[1 : 1 + concept_len], words[1 + concept_len + k :]])


def iteration(
  unet,
  clip,
  frozen_clip,
  ids_c,
  concept_len,
  retain_ids,
  draws: Draws,
  *,
  attack_steps,
  attack_lr,
  lr,
  retain_weight,
  start_guidance=3.0,
  eta=1.0,
):
  """One outer iteration after warm-up: returns (adversarial sequence, defender loss); updates `clip`."""
  with torch.no_grad():
    emb_p = frozen_clip(input_ids=ids_c).last_hidden_state
    emb_0 = frozen_clip(
      input_ids=torch.full_like(ids_c, 49407).index_fill_(1, torch.tensor([0]), 49406)
    ).last_hidden_state
    retain_emb = frozen_clip(input_ids=retain_ids).last_hidden_state
  table = clip.embeddings.token_embedding.weight.detach()
  words = table[ids_c[0]]

  # ---- attack: Adam on delta, gradients accumulated (no zero_grad), return the pre-final-step sequence
  for p in clip.parameters():
    p.requires_grad_(False)
  delta = table[torch.tensor(draws.init_ids, device=table.device)].clone().requires_grad_(True)
  opt = torch.optim.Adam([delta], lr=attack_lr)
  returned = None
  for d in draws.attack:
    seq = prefix_sequence(words, delta, concept_len)
    returned = seq.detach().clone()
    x_t = partial_ddim(unet, d.noise, emb_p, emb_0, d.t_enc, start_guidance)
    t = torch.tensor([d.t_ddpm], device=d.noise.device)
    with torch.no_grad():
      e_p = unet(x_t, t, emb_p).sample
    e_adv = unet(x_t, t, encode_embeds(clip, ids_c, seq[None])).sample
    torch.nn.functional.mse_loss(e_adv, e_p).backward()
    opt.step()

  # ---- defender: ESD + retain distillation at one shared (t_enc, t_ddpm)
  trained = [p for n, p in clip.named_parameters() if n.startswith(("encoder.", "final_layer_norm."))]
  for p in trained:
    p.requires_grad_(True)
  opt = torch.optim.Adam(trained, lr=lr)
  d = draws.defender
  t = torch.tensor([d.t_ddpm], device=d.noise.device)
  x_t = partial_ddim(unet, d.noise, emb_p, emb_0, d.t_enc, start_guidance)
  n_r = retain_ids.shape[0]
  x_r = partial_ddim(unet, draws.retain_noise, retain_emb, emb_0.expand(n_r, -1, -1), d.t_enc, start_guidance)
  with torch.no_grad():
    e_0 = unet(x_t, t, emb_0).sample
    e_p = unet(x_t, t, emb_p).sample
    r_p = unet(x_r, t.expand(n_r), retain_emb).sample
  e_n = unet(x_t, t, encode_embeds(clip, ids_c, returned[None])).sample
  loss = torch.nn.functional.mse_loss(e_n, e_0 - eta * (e_p - e_0))
  r_n = unet(x_r, t.expand(n_r), clip(input_ids=retain_ids).last_hidden_state).sample
  loss = loss + retain_weight * torch.nn.functional.mse_loss(r_n, r_p)
  opt.zero_grad()
  loss.backward()
  opt.step()
  return returned, float(loss)


class LegacyCLIPTextModel(torch.nn.Module):
  """transformers 4.25.1's CLIPTextModel layout (the reference's pin): the tower under `text_model`, with
  `position_ids` a persistent buffer. transformers 5 keeps the tower's modules at the top and the buffer out of
  the state dict."""

  def __init__(self, tower):
    super().__init__()
    embeddings = tower.embeddings
    embeddings.register_buffer("position_ids", embeddings.position_ids, persistent=True)
    self.text_model = tower


class CustomTextEncoder(torch.nn.Module):
  """The module layout of the reference's `CustomTextEncoder` (UnlearnDiffAtk `src/tasks/utils/text_encoder.py`,
  AdvUnlearn's train-scripts): the CLIPTextModel registered whole and again through three aliases, so its state
  dict names every tensor twice."""

  def __init__(self, tower):
    super().__init__()
    self.text_encoder = LegacyCLIPTextModel(tower)
    self.embedding = tower.embeddings
    self.encoder = tower.encoder
    self.final_layer_norm = tower.final_layer_norm

  def forward(self, input_ids, inputs_embeds):
    return encode_embeds(self.text_encoder.text_model, input_ids, inputs_embeds)
