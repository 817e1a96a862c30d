"""The jitted outer iteration on tiny random models: loss signs, the attack, one defender step, the mesh."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax import config_lib, sharding
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import ddim
from advunlearn_jax.models.unet import UNet2DConditionModel
from advunlearn_jax.testing import tiny_models
from advunlearn_jax.unlearn import attack, prompts, retain, wiring
from advunlearn_jax.unlearn import bank as bank_lib
from advunlearn_jax.unlearn import frozen as frozen_lib
from advunlearn_jax.unlearn import step as step_lib

STEP = wiring.train_step  # donates its state: a test that needs the input state afterwards passes a copy
# The typed sections at config_lib's defaults (they have none of their own), for the tests that vary one of them.
DEFAULTS = wiring.TrainingSections.from_config(config_lib.base_config())
FIXED_BANK = dataclasses.replace(DEFAULTS.bank, refresh_trajectories=0, refresh_retain=0, refresh_every=1)


def step_run_config():
  """The run config the step tests share: the tiny random models' sizes, Adam fast enough to see a step."""
  c = config_lib.base_config()
  c.concept.prompts = ("nudity",)
  c.retain.dataset, c.retain.prompts = "", tuple(retain.load_dataset("coco_object")[:16])
  c.retain.batch = 8
  c.retain.weight = 0.0
  c.train.lr = 1e-3
  c.attack.steps = 2
  return c


@functools.cache
def setup(mesh=None):
  clip, unet = tiny_models.params()
  config = step_run_config()
  wired = wiring.wire(
    config,
    wiring.TrainingSections.from_config(config),
    clip_config=tiny_models.CLIP,
    clip_params=clip,
    unet_config=tiny_models.UNET,
    unet_params=unet,
    schedule=tiny_models.SCHEDULE,
    tokenizer=tok_lib.load_tokenizer(),
    retain_prompts=config.retain.prompts,
    mesh=mesh,
  )
  return wired.cfg, wired.models, wired.frozen


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _batch(seed=0):
  return step_lib.Batch(jnp.arange(8, dtype=jnp.int32), jax.random.key(seed))


def test_esd_target_sign():
  e_0, e_p = jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0])
  np.testing.assert_allclose(step_lib.esd_target(e_0, e_p, 1.0), 2 * e_0 - e_p)
  np.testing.assert_allclose(step_lib.esd_target(e_0, e_p, 0.0), e_0)


def test_retain_term_is_zero_at_the_original_and_a_step_lowers_the_esd_loss():
  cfg, models, frozen = setup()
  cfg = _replace(cfg, retain=cfg.retain._replace(weight=0.5))
  state = step_lib.init_state(cfg, models, frozen)
  batch = _batch(3)
  state1, m1 = STEP(cfg, models, state, frozen, batch, False)
  assert float(m1["loss_retain"]) < 1e-10  # theta == original: student and teacher agree
  # The same draw again (same key): its loss is now measured at the updated parameters.
  _, m2 = STEP(cfg, models, state1, frozen, batch, False)
  assert float(m2["loss_unlearn"]) < float(m1["loss_unlearn"])
  assert float(m2["loss_retain"]) > 0  # and the update moved the retain predictions


def test_attack_lowers_its_loss_on_a_fixed_draw():
  words = jnp.asarray(np.random.default_rng(0).normal(size=(77, 8)), jnp.float32)
  target = jnp.asarray(np.random.default_rng(1).normal(size=(77, 8)), jnp.float32)
  lay = prompts.layout("prefix_k", 2, 2)
  loss = lambda seq, point: jnp.mean((jnp.tanh(seq) - target) ** 2)
  run = lambda cfg, delta0: attack.run(
    cfg, delta0, words, jnp.asarray(lay.word_index), jnp.asarray(lay.delta_index), loss, jnp.zeros(cfg.steps)
  )
  delta0 = words[:2]
  for method in ("pgd", "fast_at"):
    cfg = DEFAULTS.attack._replace(method=method, steps=20, lr=0.05)
    res = run(cfg, delta0)
    assert float(res.last_loss) < float(res.first_loss)
  # Faithful: the returned sequence is the one built before the final update; clean: after it.
  faithful = run(DEFAULTS.attack._replace(steps=3, lr=0.05), delta0)
  clean = run(DEFAULTS.attack._replace(steps=3, lr=0.05, return_pre_final=False), delta0)
  np.testing.assert_allclose(clean.sequence[1:3], clean.delta)
  np.testing.assert_allclose(faithful.sequence[1:3], faithful.delta)  # delta: the rows that built the sequence
  assert not np.allclose(faithful.delta, clean.delta)
  # An eps-ball projection keeps delta within eps of its init.
  ball = run(DEFAULTS.attack._replace(steps=20, lr=0.5, eps=0.1, norm="linf"), delta0)
  assert float(jnp.abs(ball.delta - delta0).max()) <= 0.1 + 1e-6


def _bank(models, frozen, trajectories=2):
  return bank_lib.build(
    models.unet,
    frozen.unet,
    frozen,
    jax.random.key(1),
    dataclasses.replace(FIXED_BANK, concept_trajectories=trajectories),
    latent_shape=(8, 8, 4),
    guidance=3.0,
  )


def test_step_with_attack_from_the_bank_records_the_sequence():
  cfg, models, frozen = setup()
  cfg = _replace(cfg, retain=cfg.retain._replace(weight=0.5))  # a retain term: the retain group is rolled out
  bank_cfg = _replace(cfg, xt_source="bank", bank=dataclasses.replace(FIXED_BANK, concept_trajectories=2))
  # The rollouts are the step's only while_loops (the attack's loop is a scan): none from the bank, one per
  # point group in the reference's order (none for retain rows when the loss has no retain term), batched one for
  # the slots (the default) or one per bucket width.
  bank_state = step_lib.init_state(bank_cfg, models, frozen, _bank(models, frozen))
  sequential = _replace(cfg, xt_source="online_sequential")
  buckets = _replace(cfg, rollout_rows_per_call=0, rollout_buckets=8)
  for c, loops in (
    (bank_cfg, 0),
    (sequential, 3),
    (_replace(sequential, retain=sequential.retain._replace(weight=0.0)), 2),
    (cfg, 1),
    (buckets, 8),
  ):
    state = bank_state if c is bank_cfg else step_lib.init_state(c, models, frozen)
    jaxpr = jax.make_jaxpr(lambda s, b, c=c: step_lib.train_step(c, models, s, frozen, b, True))(state, _batch(1))
    assert str(jaxpr).count("while[") == loops, c.xt_source
  state, metrics = STEP(bank_cfg, models, bank_state, frozen, _batch(1), True)
  assert bool(state.has_last) and np.isfinite(float(metrics["attack_loss_last"]))
  # prefix_k, k = 1: the clean 'nudity' rows sit after the adversarial row.
  table = frozen.clip["embeddings"]["token_embedding"]["embedding"]
  np.testing.assert_allclose(state.last_sequence[2], table[frozen.concept_ids[0, 1]], atol=1e-6)


def test_between_prompt_updates_the_defender_reuses_the_latest_adversarial_prompt():
  cfg, models, frozen = setup()
  attacked, searched = STEP(cfg, models, step_lib.init_state(cfg, models, frozen), frozen, _batch(1), True)
  reused, metrics = STEP(cfg, models, _copy(attacked), frozen, _batch(2), True, new_prompt=False)
  assert "attack_loss_last" in searched and "attack_loss_last" not in metrics  # no attack between updates
  np.testing.assert_array_equal(reused.last_sequence, attacked.last_sequence)
  # The defender trained on the stored sequence: another one gives another loss at the same points.
  other = attacked._replace(last_sequence=attacked.last_sequence.at[1].set(0.0))
  _, moved = STEP(cfg, models, other, frozen, _batch(2), True, new_prompt=False)
  assert float(moved["loss_unlearn"]) != float(metrics["loss_unlearn"])


def _replace(cfg, **changes):
  return dataclasses.replace(cfg, **changes)


def test_inversion_objective_is_textual_inversions_loss_and_both_adds_the_two():
  """attack.objective=inversion: the attack's loss at its start is CCE's denoising loss on the step's noised image of
  the concept through the student at the initial rows (computed here by hand); `both` is that plus the reference's."""
  cfg, models, frozen = setup()
  side, channels, steps = cfg.latent_hw, cfg.latent_channels, cfg.attack.steps
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  alphas = jnp.linspace(0.999, 0.01, 1000)
  frozen = frozen._replace(concept_latents=normal(3, side, side, channels), alphas_cumprod=alphas)
  point = (normal(steps, side, side, channels), jnp.full((steps,), 500, jnp.int32), normal(steps, side, side, channels))
  state = step_lib.init_state(cfg, models, frozen)
  keys = step_lib.iteration_keys(jax.random.key(1))

  def first_loss(objective):
    c = _replace(cfg, attack=cfg.attack._replace(objective=objective))
    attack = lambda s, f, p: step_lib.attack(c, models, s, f, keys, 0, f.clip, f.unet, p).first_loss  # noqa: E731
    return float(jax.jit(attack)(state, frozen, point))

  esd, inversion, both = map(first_loss, ("esd", "inversion", "both"))
  assert both == pytest.approx(esd + inversion, rel=1e-5) and inversion != pytest.approx(esd, rel=1e-2)
  inv = _replace(cfg, attack=cfg.attack._replace(objective="inversion"))
  drawn = step_lib.inversion_points(inv, frozen, keys)
  assert drawn.x_t.shape == (steps, side, side, channels) and 0 <= int(drawn.t.min()) <= int(drawn.t.max()) < 1000
  delta0 = step_lib._initial_delta(inv, models, state, frozen, keys, 0, None, None)
  words = frozen.clip["embeddings"]["token_embedding"]["embedding"][frozen.concept_ids[0]]
  sequence = prompts.build_sequence(words, delta0, frozen.word_index[0], frozen.delta_index[0])
  cond = step_lib._encode(models)(frozen.clip, sequence[None])
  eps = step_lib._unet(models)(frozen.unet, drawn.x_t[:1], drawn.t[:1], cond)
  assert inversion == pytest.approx(float(step_lib.mse(eps, drawn.noise[:1])), rel=1e-5)


def test_persistent_attack_starts_from_the_carried_rows_unless_it_restarts():
  """`latest` init without the reference's slicing quirk starts from the rows that built the last sequence,
  whichever layout built it; a round that restarts (attack.restart_every, decided by the host) draws random rows."""
  cfg, models, frozen = setup()
  cfg = _replace(cfg, attack=cfg.attack._replace(init="latest", latest_init_quirk=False))
  fresh = step_lib.init_state(cfg, models, frozen)
  rows = jnp.arange(fresh.last_delta.size, dtype=jnp.float32).reshape(fresh.last_delta.shape)
  carried = fresh._replace(last_delta=rows, has_last=jnp.ones((), bool))
  keys = step_lib.iteration_keys(jax.random.key(0))
  start = lambda state, restart: step_lib._initial_delta(cfg, models, state, frozen, keys, 0, None, restart)  # noqa: E731
  random_rows = start(fresh, None)
  assert not np.allclose(random_rows, rows)
  np.testing.assert_array_equal(start(carried, None), rows)
  np.testing.assert_array_equal(start(carried, jnp.zeros((), bool)), rows)
  np.testing.assert_array_equal(start(carried, jnp.ones((), bool)), random_rows)


def _points(cfg, frozen, attack_t, defender_t, retain_batch, seed=0):
  """Points with chosen t_enc (t_ddpm in their bins), random start codes."""
  rng = np.random.default_rng(seed)

  def group(t_enc, prompts):
    n = len(prompts)
    t_enc = jnp.asarray(t_enc, jnp.int32).reshape(n)
    noise = jnp.asarray(rng.normal(size=(n, cfg.latent_hw, cfg.latent_hw, 4)), jnp.float32)
    return step_lib.Points(t_enc, 20 * t_enc + 7, noise, jnp.zeros(n, jnp.int32), jnp.asarray(prompts, jnp.int32))

  return step_lib.IterationPoints(
    group(attack_t, [0] * len(attack_t)),
    group([defender_t] * cfg.concept_batch, [0] * cfg.concept_batch),
    group([defender_t] * retain_batch, list(range(retain_batch))),
  )


ROLL_OUT = jax.jit(step_lib.roll_out, static_argnums=(0, 1))


@pytest.mark.parametrize(
  "attack_t,defender_t,retain_batch,rows_per_call",
  [
    ((0, 1, 49, 25), 2, 3, 0),  # the edges: 49 steps for t_enc 0 and 1, one for 49
    ((7, 7, 7, 7), 7, 3, 0),  # every point walks as far: all in one bucket
    ((49, 0, 30), 0, 0, 0),  # retain batch 0
    ((0, 1, 49, 25), 2, 3, 3),  # slots: 3 points walking per UNet call, each slot refilled as its point ends
    ((49, 0, 30), 0, 0, 5),  # slots outnumbering the points, retain batch 0
  ],
)
def test_batched_points_equal_sequential_points(attack_t, defender_t, retain_batch, rows_per_call):
  cfg, models, frozen = setup()
  cfg = _replace(cfg, rollout_buckets=3, rollout_rows_per_call=rows_per_call)
  points = _points(cfg, frozen, attack_t, defender_t, retain_batch)
  batched, stats = ROLL_OUT(cfg, models, frozen, frozen.unet, None, points)
  in_sequence = _replace(cfg, xt_source="online_sequential")
  sequential, seq_stats = ROLL_OUT(in_sequence, models, frozen, frozen.unet, None, points)
  # The tiny random UNet drives latents to |x| ~ 30 over 49 steps; batch composition changes XLA's rounding.
  for got, ref in zip(batched, sequential):
    np.testing.assert_allclose(got, ref, atol=1e-5 + 2e-6 * float(jnp.abs(ref).max(initial=0)), rtol=0)
  steps = np.asarray(ddim.num_unet_steps(jnp.asarray([*attack_t, defender_t])))
  if not rows_per_call:
    assert int(stats.calls) == steps.max()  # the longest walk, once
  assert int(stats.calls) < int(seq_stats.calls)
  assert int(stats.useful_rows) == int(seq_stats.useful_rows) <= int(stats.computed_rows)


def test_one_iteration_equals_the_sequential_modes():
  cfg, models, frozen = setup()
  attack_cfg = DEFAULTS.attack._replace(steps=3)
  cfg = _replace(cfg, retain=cfg.retain._replace(weight=0.5), attack=attack_cfg, rollout_buckets=3)
  results = {}
  for source in ("online", "online_sequential"):
    c = _replace(cfg, xt_source=source)
    results[source] = STEP(c, models, step_lib.init_state(c, models, frozen), frozen, _batch(5), True)
  (batched, m_b), (sequential, m_s) = results["online"], results["online_sequential"]
  for key in ("loss", "loss_unlearn", "attack_loss_first", "attack_loss_last", "rollout_useful_rows"):
    np.testing.assert_allclose(m_b[key], m_s[key], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(batched.last_sequence, sequential.last_sequence, atol=1e-5, rtol=0)
  # Adam's first step moves each element by lr g / (|g| + eps): by ~lr in the sign of its gradient, except where
  # |g| is near eps (1e-8) and rounding noise is amplified. So the updates are compared as whole vectors (measured:
  # cosine 0.999998, 99.8% of elements within 1% of lr).
  flat = lambda params: np.concatenate([np.ravel(p) for p in jax.tree.leaves(params)])
  initial = flat(step_lib.init_state(cfg, models, frozen).params)
  u_b, u_s = flat(batched.params) - initial, flat(sequential.params) - initial
  cosine = u_b @ u_s / (np.linalg.norm(u_b) * np.linalg.norm(u_s))
  assert cosine > 0.999 and np.mean(np.abs(u_b - u_s) < 0.01 * cfg.lr) > 0.99
  assert int(m_b["rollout_calls"]) < int(m_s["rollout_calls"])


def test_renewing_bank_replaces_its_oldest_trajectories():
  cfg, models, frozen = setup()
  bank_cfg = dataclasses.replace(
    DEFAULTS.bank, concept_trajectories=3, refresh_trajectories=1, refresh_retain=2, refresh_every=2
  )
  cfg = _replace(cfg, xt_source="bank", bank=bank_cfg)
  bank = _bank(models, frozen, trajectories=3)
  state = step_lib.init_state(cfg, models, frozen, bank)
  fingerprint = lambda latents: {float(v) for v in np.asarray(latents[..., 0, 0, 0, 0]).ravel()}  # first step
  seen_concept, seen_retain = fingerprint(bank.concept), fingerprint(bank.retain)
  iterations = 6
  for i in range(iterations):
    before = jax.device_get(state.bank)  # the step donates the state, bank included
    state, _ = STEP(cfg, models, state, frozen, _batch(10 + i), False)  # renewal does not wait for the attack
    changed = np.flatnonzero(np.any(np.asarray(state.bank.concept != before.concept), axis=(0, 2, 3, 4, 5)))
    retain_changed = np.flatnonzero(np.any(np.asarray(state.bank.retain != before.retain), axis=(1, 2, 3, 4, 5)))
    if i % 2:  # renews every 2 iterations
      assert changed.size == 0 and retain_changed.size == 0
    else:  # renewal r = i // 2 writes slot r mod 3 of the concept, retain prompts 2r, 2r + 1
      assert changed.tolist() == [(i // 2) % 3] and retain_changed.tolist() == [i, i + 1]
    seen_concept |= fingerprint(state.bank.concept)
    seen_retain |= fingerprint(state.bank.retain)
  renewals = iterations // 2
  assert len(seen_concept) == 3 + renewals  # every renewal brought a start code never seen before
  assert len(seen_retain) == 16 + 2 * renewals


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.slow  # ~60-75 s of compilation on 2 cores; run with -m slow
def test_eight_device_mesh_matches_one_device():
  cfg, models, frozen = setup()
  state = step_lib.init_state(cfg, models, frozen)
  single_state, single = STEP(cfg, models, _copy(state), frozen, _batch(2), True)

  mesh = sharding.make_mesh(jax.devices()[:8], fsdp=1)
  cfg8, models8, frozen8 = setup(mesh)
  state8 = sharding.replicate(step_lib.init_state(cfg8, models8, frozen8), mesh)
  multi_state, multi = STEP(cfg8, models8, state8, frozen8, _batch(2), True)
  del single["rollout_computed_rows"], multi["rollout_computed_rows"]  # 8 devices: bucket widths of 8k rows
  for key in single:
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-6)
  # Parameters: within 2% of one Adam step. Adam normalises each gradient, so for leaves whose gradient is
  # near its eps (1e-8) the all-reduce's different summation order is visible at that scale.
  tol = 0.02 * cfg.lr
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=tol, rtol=0), multi_state.params, single_state.params)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), single_state.params, state.params)
  assert max(jax.tree.leaves(moved)) > 0.5 * cfg.lr  # the step did move the parameters


@pytest.mark.slow  # ~60-75 s of compilation on 2 cores; run with -m slow
def test_condition_embd_attack_and_retain_iter_mode():
  """condition_embd places delta into the encoder output; the defender still trains through its clean rows.
  retain.mode='iter' runs extra Adam steps on the retain loss after the main update."""
  base_cfg, models, frozen = setup()
  cfg = _replace(
    base_cfg,
    attack=DEFAULTS.attack._replace(steps=2, embedding="condition_embd"),
    retain=DEFAULTS.retain._replace(mode="iter", steps=2),
  )
  state = step_lib.init_state(cfg, models, frozen)
  new_state, metrics = STEP(cfg, models, _copy(state), frozen, _batch(4), True)
  assert np.isfinite(float(metrics["attack_loss_last"])) and float(metrics["loss_retain"]) > 0
  # The recorded sequence is conditioning: its clean rows are the frozen encoder's output for 'nudity'.
  clean = frozen_lib.encode_in_chunks(tiny_models.CLIP, frozen.clip, np.asarray(frozen.concept_ids))[0]
  np.testing.assert_allclose(new_state.last_sequence[2], clean[1], atol=1e-5)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_state.params, state.params)
  assert max(jax.tree.leaves(moved)) > 0


def test_frozen_unet_stored_in_bf16_changes_nothing():
  """What train.run does for text-encoder methods in bf16: the read-only UNet's kernels stored in bf16. The step
  reads that UNet forward and back-propagates through it to the conditioning, so that is what must not move."""
  _, models, frozen = setup()
  half = models._replace(unet=UNet2DConditionModel(tiny_models.UNET, jnp.bfloat16))
  compiled_before = frozen_lib._kernels_cast._cache_size()
  unet, cast = frozen.unet, frozen_lib.store_for_compute(frozen, half).unet
  size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  assert size(cast) < 0.52 * size(unet)
  # One compiled program for the whole tree, not one per kernel shape (at SD size, 40 eager programs), and a
  # second wiring of the same shapes reuses it.
  frozen_lib.store_for_compute(frozen, half)
  assert frozen_lib._kernels_cast._cache_size() <= compiled_before + 1
  assert frozen_lib.store_for_compute(frozen, models) is frozen  # fp32 compute: nothing to gain
  trained = dataclasses.replace(DEFAULTS.trained, method="full")
  trains_unet = half._replace(trained=trained, mask=frozenset({("conv_in", "kernel")}))
  assert frozen_lib.store_for_compute(frozen, trains_unet) is frozen  # master weights start from these leaves
  model = half.unet
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(2, 77, tiny_models.CLIP.hidden_size)), jnp.float32)
  t = jnp.array([10, 700])

  @jax.jit
  def loss_and_grad(params, ctx):
    return jax.value_and_grad(lambda c: jnp.mean(model.apply({"params": params}, x, t, c) ** 2))(ctx)

  (value, grad), (value_cast, grad_cast) = loss_and_grad(unet, ctx), loss_and_grad(cast, ctx)
  assert float(value) == float(value_cast)
  np.testing.assert_array_equal(grad, grad_cast)
