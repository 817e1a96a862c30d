"""A plain PyTorch transcription of STEREO's two erasing steps, as the test oracle of unlearn/stereo.py.

Transcribed from koushiksrivats/robust-concept-erasing at 86f124f (line numbers are that commit's):
utils/stereo.py `train_erasing` (STE's erase, one loop pass :48-93) and `robustly_erase_once` (REO, one pass
:401-486), utils/apg.py (the targets), utils/utils.py (`StableDiffuser`'s encoding, prediction and DDIM rollout;
`FineTunedModel`, the `noxattn` modules and the `with finetuner` swap). Their draws (stereo.py:59-60, :422-423)
are passed in, and prompts come as token ids: the tokenizer is not what is under test. What the oracle leaves
out: the per-stage seeding (:19-22), stratified schedules (:376-397) and progress printing.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# ---------------------------------------------------------------------------------------------- utils/apg.py


def project(v0, v1):
  """apg.py:13-22: the parts of v0 along and across v1, in float64."""
  dtype = v0.dtype
  v0, v1 = v0.double(), v1.double()
  v1 = torch.nn.functional.normalize(v1, dim=[-1, -2, -3])
  v0_parallel = (v0 * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
  v0_orthogonal = v0 - v0_parallel
  return v0_parallel.to(dtype), v0_orthogonal.to(dtype)


def normalized_guidance(pred_cond, pred_uncond, guidance_scale, eta=1.0):
  """apg.py:24-47 without momentum and norm threshold (stereo.py:88 passes neither)."""
  diff = pred_cond - pred_uncond  # :32
  diff_parallel, diff_orthogonal = project(diff, pred_cond)  # :43
  normalized_update = diff_orthogonal + eta * diff_parallel  # :44
  return pred_cond - (guidance_scale - 1) * normalized_update  # :46, "for negative guidance"


def normalized_compositional_guidance(pred_conds, pred_uncond, guidance_scales, eta=1.0):
  """apg.py:50-99 without momentum and norm threshold (stereo.py:478 passes neither)."""
  positive_update = torch.zeros_like(pred_uncond)  # :58-60
  negative_update = torch.zeros_like(pred_uncond)
  pos_count, neg_count = 0, 0
  for pred_cond, guidance_scale in zip(pred_conds, guidance_scales):  # :63
    diff = pred_cond - pred_uncond  # :65
    diff_parallel, diff_orthogonal = project(diff, pred_cond)  # :78
    normalized_update = diff_orthogonal + eta * diff_parallel  # :79
    if guidance_scale > 0:  # :82-87
      positive_update += (guidance_scale - 1) * normalized_update
      pos_count += 1
    else:
      negative_update += (guidance_scale - 1) * normalized_update
      neg_count += 1
  if pos_count > 0:  # :90-93
    positive_update /= pos_count
  if neg_count > 0:
    negative_update /= neg_count
  return pred_uncond + (positive_update + negative_update)  # :96, :99


# ---------------------------------------------------------------------------------------------- utils/utils.py


def sd_ddim_scheduler():
  """CompVis/stable-diffusion-v1-4's scheduler/scheduler_config.json, what utils.py:137 loads for 'DDIM'."""
  return diffusers.DDIMScheduler(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
  )  # fmt: skip


class StableDiffuser(torch.nn.Module):
  """utils.py:109-281, the parts the two stages call, around given modules (theirs loads SD v1.4)."""

  def __init__(self, unet, text_encoder):
    super().__init__()
    self.text_encoder, self.unet = text_encoder, unet
    self.scheduler = sd_ddim_scheduler()
    self.eval()  # :141

  def text_encode(self, ids):
    return self.text_encoder(ids)[0]  # :165, the last hidden state

  def get_text_embeddings(self, ids, uncond_ids):
    """:195-207 with n_imgs 1, prompts already tokenised: [uncond; cond]."""
    return torch.cat([self.text_encode(uncond_ids), self.text_encode(ids)])

  def set_scheduler_timesteps(self, n_steps):
    self.scheduler.set_timesteps(n_steps)  # :185

  def get_initial_latents(self, noise):
    return noise * self.scheduler.init_noise_sigma  # :191, the noise (:189) drawn by the caller

  def predict_noise(self, iteration, latents, text_embeddings, guidance_scale=7.5):
    """:209-230: one batch of [uncond; cond], then CFG (guidance 1: the conditional prediction)."""
    latents = torch.cat([latents] * 2)  # :217
    latents = self.scheduler.scale_model_input(latents, self.scheduler.timesteps[iteration])  # :218-219
    noise_prediction = self.unet(
      latents, self.scheduler.timesteps[iteration], encoder_hidden_states=text_embeddings
    ).sample  # :222-223
    noise_prediction_uncond, noise_prediction_text = noise_prediction.chunk(2)  # :226
    return noise_prediction_uncond + guidance_scale * (noise_prediction_text - noise_prediction_uncond)  # :227-228

  @torch.no_grad()
  def diffusion(self, latents, text_embeddings, end_iteration, start_iteration=0, **kwargs):
    """:233-281 without traces, return_steps or pred_x0: [x after end_iteration DDIM steps]."""
    latents_steps = []
    for iteration in range(start_iteration, end_iteration):  # :249
      noise_pred = self.predict_noise(iteration, latents, text_embeddings, **kwargs)  # :255-259
      output = self.scheduler.step(noise_pred, self.scheduler.timesteps[iteration], latents)  # :262
      latents = output.prev_sample  # :270
      if iteration == end_iteration - 1:  # :272-279
        latents_steps.append(latents)
    return latents_steps, []


class FineTunedModel(torch.nn.Module):
  """utils.py:326-403 for train_method 'noxattn': a trainable copy of every Linear and Conv2d under `unet` whose
  name lacks attn2; `with finetuner:` swaps the copies in."""

  def __init__(self, model):
    super().__init__()
    self.model, self.ft_modules, self.orig_modules = model, {}, {}
    for p in self.model.parameters():  # :339 freeze
      p.requires_grad = False
    for module_name, module in model.named_modules():  # :341-365
      if "unet" not in module_name:
        continue
      if module.__class__.__name__ in ["Linear", "Conv2d", "LoRACompatibleLinear", "LoRACompatibleConv"]:
        if "attn2" in module_name:  # :351-353
          continue
        ft_module = copy.deepcopy(module)
        self.orig_modules[module_name] = module
        self.ft_modules[module_name] = ft_module
        for p in ft_module.parameters():  # :365 unfreeze
          p.requires_grad = True

  def _set(self, name, module):  # utils.py:74-83 set_module
    parent, _, leaf = name.rpartition(".")
    setattr(self.model.get_submodule(parent), leaf, module)

  def __enter__(self):  # :385-388
    for key, ft_module in self.ft_modules.items():
      self._set(key, ft_module)

  def __exit__(self, exc_type, exc_value, tb):  # :390-393
    for key, module in self.orig_modules.items():
      self._set(key, module)

  def parameters(self):  # :395-403
    return [p for m in self.ft_modules.values() for p in m.parameters()]


def optimizer(finetuner, lr):
  """stereo.py:31 and :371: torch AdamW at its defaults (betas .9/.999, eps 1e-8, weight decay 1e-2)."""
  return torch.optim.AdamW(finetuner.parameters(), lr=lr)


# ---------------------------------------------------------------------------------------------- utils/stereo.py

NSTEPS = 50  # stereo.py:24 and :361


def ste_step(diffuser, finetuner, opt, erase_ids, uncond_ids, iteration, noise, negative_guidance):
  """One pass of train_erasing's loop (stereo.py:48-93) with erase_from == erase_concept (as STE calls it,
  :307-308); `iteration` is :59's draw in [1, 48], `noise` :60's. Returns the loss."""
  criteria = torch.nn.MSELoss()  # :32
  with torch.no_grad():  # :49
    neutral_text_embeddings = diffuser.get_text_embeddings(uncond_ids, uncond_ids)  # :53
    positive_text_embeddings = diffuser.get_text_embeddings(erase_ids, uncond_ids)  # :54
    target_text_embeddings = positive_text_embeddings  # :55, the same prompt
    diffuser.set_scheduler_timesteps(NSTEPS)  # :57
    opt.zero_grad()  # :58
    latents = diffuser.get_initial_latents(noise)  # :60
    with finetuner:  # :62-70
      latents_steps, _ = diffuser.diffusion(
        latents, positive_text_embeddings, start_iteration=0, end_iteration=iteration, guidance_scale=3
      )
    diffuser.set_scheduler_timesteps(1000)  # :72
    iteration = int(iteration / NSTEPS * 1000)  # :73
    positive_latents = diffuser.predict_noise(iteration, latents_steps[0], positive_text_embeddings, guidance_scale=1)
    neutral_latents = diffuser.predict_noise(iteration, latents_steps[0], neutral_text_embeddings, guidance_scale=1)
  with finetuner:  # :83-84
    negative_latents = diffuser.predict_noise(iteration, latents_steps[0], target_text_embeddings, guidance_scale=1)
  pred_neg_guidance = normalized_guidance(positive_latents, neutral_latents, negative_guidance)  # :88
  loss = criteria(negative_latents, pred_neg_guidance)  # :89
  loss.backward()  # :92
  opt.step()  # :93
  return loss.item()


def reo_step(diffuser, finetuner, opt, erase_ids, sampled, anchor_ids, uncond_ids, iteration, noise, scale):
  """One pass of robustly_erase_once's loop (stereo.py:401-486): `erase_ids` every erase concept's ids (the
  concept's, then the learned tokens'), `sampled` the step's index into them (:403), `anchor_ids` the step's one
  anchor (:404); `iteration` and `noise` :422-423's draws. Returns the loss."""
  criteria = torch.nn.MSELoss()  # :372
  with torch.no_grad():  # :402
    neutral_text_embeddings = diffuser.get_text_embeddings(uncond_ids, uncond_ids)  # :408
    target_text_embeddings = diffuser.get_text_embeddings(erase_ids[sampled], uncond_ids)  # :409
    negative_word_embs = [diffuser.get_text_embeddings(ids, uncond_ids) for ids in erase_ids]  # :412-414
    anchor_word_embs = [diffuser.get_text_embeddings(anchor_ids, uncond_ids)]  # :416-418
    diffuser.set_scheduler_timesteps(NSTEPS)  # :420
    opt.zero_grad()  # :421
    latents = diffuser.get_initial_latents(noise)  # :423
    with finetuner:  # :425-433
      latents_steps, _ = diffuser.diffusion(
        latents, target_text_embeddings, start_iteration=0, end_iteration=iteration, guidance_scale=3
      )
    diffuser.set_scheduler_timesteps(1000)  # :437
    iteration = int(iteration / NSTEPS * 1000)  # :438
    neutral_latents = diffuser.predict_noise(iteration, latents_steps[0], neutral_text_embeddings, guidance_scale=1)
    e_negatives_latents = [  # :443-445
      diffuser.predict_noise(iteration, latents_steps[0], emb, guidance_scale=1) for emb in negative_word_embs
    ]
    e_anchor_latents = [  # :448-450
      diffuser.predict_noise(iteration, latents_steps[0], emb, guidance_scale=1) for emb in anchor_word_embs
    ]
  with finetuner:  # :454-455
    negative_latents = diffuser.predict_noise(iteration, latents_steps[0], target_text_embeddings, guidance_scale=1)
  neg_guidance_scales = [-float(scale)] * len(e_negatives_latents)  # :463-465
  pos_guidance_scales = [float(scale)] * len(e_anchor_latents)  # :468-470
  estimate = normalized_compositional_guidance(  # :474-478
    e_negatives_latents + e_anchor_latents, neutral_latents, neg_guidance_scales + pos_guidance_scales
  )
  loss = criteria(negative_latents, estimate)  # :480
  loss.backward()  # :485
  opt.step()  # :486
  return loss.item()
