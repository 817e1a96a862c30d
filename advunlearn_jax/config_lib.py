"""The config schema: every default of an AdvUnlearn run, once, with the reason for it (spec `advunlearn_spec.md`
sections 2-4), which fields a run may resume under new values of, and every numeric field's range; and `override`,
the one way a "section.field=value" string sets a field. It stands on the ground floor (it imports only `errors`);
the checks that need a domain's knowledge are made where the typed settings are built (`config_validation.validate`,
in training/)."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from advunlearn_jax.errors import ConfigError

SD_V1_4 = "CompVis/stable-diffusion-v1-4"
# `model.pretrained = "tiny"`: the repo's own tiny text-to-image model, shipped in the package.
TINY_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_sd")
# `model.pretrained = "tiny_sdxl"`: its SDXL-layout sibling (two text towers, the text_time UNet), same VAE.
TINY_SDXL_MODEL_DIR = os.path.join(os.path.dirname(TINY_MODEL_DIR), "tiny_sdxl")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # the reference sets none; we do, so runs repeat and resume exactly

  c.model = ml_collections.ConfigDict()
  c.model.pretrained = SD_V1_4  # diffusers folder or hub id
  c.model.dtype = "float32"  # compute dtype; the reference is fp32 throughout
  c.model.remat = "none"  # UNet rematerialisation per block: none | full | dots

  c.mesh = ml_collections.ConfigDict()
  # Devices that share (shard) parameters and Adam state; the rest of the mesh is data parallel. 0: 1 for
  # text-encoder methods, a host's devices for UNet methods (sharding.py).
  c.mesh.fsdp = 0

  c.concept = ml_collections.ConfigDict()
  c.concept.prompts = ("nudity",)  # one drawn uniformly per update (the reference's --seperator)

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.ddim_steps = 50  # the ldm grid [1, 21, ..., 981]
  c.diffusion.start_guidance = 3.0  # CFG scale s when rolling out x_t
  c.diffusion.negative_guidance = 1.0  # eta in the ESD target e_0 - eta * (e_p - e_0)

  c.train = ml_collections.ConfigDict()
  c.train.method = "text_encoder_full"  # the paper's choice; see spec section 2.5
  c.train.component = "all"  # all | ffn | attn
  c.train.norm_layer = False  # also train final_layer_norm for layer-wise methods
  c.train.iterations = 1000
  c.train.warmup_iters = 200  # clean ESD + retain iterations before the first attack
  c.train.lr = 1e-5  # Adam, betas (0.9, 0.999), eps 1e-8, no decay, no schedule
  c.train.concept_batch = 1
  c.train.save_every = 200
  c.train.keep = 3  # checkpoints kept (the latest K)
  c.train.log_every = 10
  # Where x_t comes from. online: the reference's partial-DDIM rollout per loss, every point of an iteration rolled
  # out in one batched pass; online_sequential: the same points one rollout after another, as the reference runs
  # them; bank: trajectories rolled out once and reused (renewed with bank.refresh_*), text-encoder methods only.
  c.train.xt_source = "online"
  c.train.rollout_buckets = 0  # online with rollout_rows_per_call=0: batch widths of the buckets; 0: 8
  c.train.rollout_rows_per_call = -1  # online: points walking per UNet call (slots); 0: buckets; -1: measured default
  c.train.prefix_bug = False  # reference quirk: spec 2.5 - layer '1' also selects layers 10 and 11

  c.export = ml_collections.ConfigDict()
  # Numbered exports workdir/exports/step_NNNNNN every N iterations, the last one included (the reference saves
  # at 200, 400, ..., 1000); 0: only the run's final export.
  c.export.every = 200
  # Also the reference's TextEncoder-<method>-epoch_<i>.pt beside each export, which UnlearnDiffAtk and the
  # reference's scripts load (text-encoder methods; writing it needs torch).
  c.export.reference_checkpoint = False

  c.report = ml_collections.ConfigDict()
  c.report.kind = ""  # "tiny_world": after training, judge erasure on the tiny model into workdir/report
  c.report.images_per_value = 24
  c.report.erased = ()  # tiny-world values the run erases; empty: the values its concept prompts name

  c.samples = ml_collections.ConfigDict()
  c.samples.every = 200  # preview grid (original vs current) every N iterations and at the end; 0: never
  c.samples.prompts = ()  # empty: the concepts and the first `retain_prompts` retain prompts
  c.samples.retain_prompts = 3
  c.samples.steps = 25  # DDIM steps per preview image
  c.samples.guidance = 7.5
  c.samples.seed = 0

  c.bank = ml_collections.ConfigDict()
  c.bank.concept_trajectories = 16  # rollouts kept per concept (each serves all 50 t_enc)
  c.bank.retain_trajectories = 1  # rollouts kept per retain prompt
  # Renewal: every `refresh_every` iterations, `refresh_trajectories` fresh rollouts per concept and one for each of
  # `refresh_retain` retain prompts (round robin) replace the oldest. 0 and 0: a fixed bank.
  c.bank.refresh_trajectories = 1
  c.bank.refresh_retain = 1
  c.bank.refresh_every = 2

  c.retain = ml_collections.ConfigDict()
  c.retain.mode = "reg"  # reg: L_u + w * L_r (paper, README); iter: extra Adam steps on L_r
  c.retain.weight = 1.0  # the reference CLI default; 0.3 nudity, 0.5 style/object (issue #7)
  c.retain.batch = 5
  c.retain.steps = 1  # iter mode only
  # iter mode: each extra step draws its own retain prompts, as the reference; False: all reuse the iteration's
  c.retain.fresh_per_step = True
  # The reference's set (its --dataset_retain, spec 4.3): coco_object | coco_object_no_filter | imagenet243 |
  # imagenet243_no_filter (shipped, unlearn/retain.py), a CSV with a `prompt` column, or captions from
  # tfds:NAME[/CONFIG]:SPLIT; "" with retain.prompts.
  c.retain.dataset = "coco_object"
  c.retain.prompts = ()  # exactly these retain prompts (retain.dataset must then be "")

  # `python -m advunlearn_jax.evaluate`: UnlearnDiffAtk robustness (spec 6.1) and utility (spec 6.2).
  c.evaluation = ml_collections.ConfigDict()
  c.evaluation.prompts_csv = ""  # reference attack-prompt CSV: prompt[, evaluation_seed, evaluation_guidance]
  # The CSV column whose text is rendered: prompt, or adv_prompt to run another model's released adversarial prompts
  # (an attack's adversarial_prompts.csv) with --no_attack.
  c.evaluation.prompts_column = "prompt"
  c.evaluation.prompts = ()  # inline prompts instead of a CSV
  c.evaluation.seed = 0  # for inline prompts and CSVs without evaluation_seed
  c.evaluation.guidance = 7.5  # for inline prompts and CSVs without evaluation_guidance
  c.evaluation.max_prompts = 0  # 0: every prompt
  c.evaluation.classifier = ""  # evals/classifiers.py spec: nudenet | hf:FOLDER:TARGETS[:TOP_K] | judge:KIND=VALUE
  # The attack: unlearndiff (UnlearnDiffAtk, the paper's: discrete prefix tokens per prompt) | inversion (concept
  # inversion: k continuous token embeddings learned from images of the concept, one set for every prompt) |
  # ring_a_bell | p4d | mma (each in its section below).
  c.evaluation.attack = "unlearndiff"
  # A folder where the searches that read text alone (Ring-A-Bell's, MMA-Diffusion's) are remembered across
  # processes, so every model with the same text encoder, and every later run, reuses them ("": this process only;
  # evals/search_cache.py).
  c.evaluation.search_cache = ""
  c.evaluation.unlearndiff = ml_collections.ConfigDict()
  c.evaluation.unlearndiff.k = 3  # 5 for nudity (the reference's UnlearnDiffAtk configs)
  c.evaluation.unlearndiff.iters_per_t = 40
  c.evaluation.unlearndiff.timesteps = tuple(range(10, 1000, 20))
  c.evaluation.unlearndiff.lr = 0.01
  c.evaluation.unlearndiff.weight_decay = 0.1
  c.evaluation.unlearndiff.scheduler = "lms"  # the classified images: LMS, 50 steps
  c.evaluation.unlearndiff.steps = 50
  # The classified image of the attacked prompt: decoded to text and tokenised again, as the official code; False:
  # from the attacked token ids themselves.
  c.evaluation.unlearndiff.retokenize = True
  # Bisection steps of the projection onto the simplex after each Adam step (float32 converges well within 40).
  c.evaluation.unlearndiff.bisection_iters = 40
  c.evaluation.inversion = ml_collections.ConfigDict()
  # cce: the published concept inversion (Pham et al. 2023), every setting below as NYU-DICE-Lab/
  # circumventing-concept-erasure's esd/train.sh and esd/concept_inversion.py | prefix: this project's earlier,
  # cheaper variant (k vectors from random rows, trained inside the evaluation prompts). evals/inversion.py.
  c.evaluation.inversion.protocol = "cce"
  # Images of the erased concept: a folder, tfds:NAME[/CONFIG]:SPLIT, or tiny_world:VALUE (the renderer's).
  c.evaluation.inversion.images = ""
  # Where the learned token stands in each evaluation prompt: word (in place of the concept's words, as CCE trains
  # it, esd/concept_inversion.py:533-534, and as its authors render the concept, esd/generate_images.py:39) |
  # prefix (in front of the prompt, as their I2P generator, esd/generate_i2p.py:41-44, for prompt sets that name
  # no concept word).
  c.evaluation.inversion.placement = "word"
  # The concept's words that `word` replaces, whole words, any case; empty: concept.prompts (the SD configs'
  # concept phrases, "Van Gogh", "church"). A prompt that holds none of them is refused before any work.
  c.evaluation.inversion.words = ()
  # A learned_embedding.npz that an evaluation released: rendered at its checkpoints instead of training ("").
  c.evaluation.inversion.learned = ""
  c.evaluation.inversion.scheduler = "lms"  # the classified images, as UnlearnDiffAtk's
  c.evaluation.inversion.sample_steps = 50
  c.evaluation.inversion.cce = ml_collections.ConfigDict()
  # --initializer_token (train.sh: "art" for a style): one vocabulary word related to the concept; required.
  c.evaluation.inversion.cce.initializer = ""
  # --learnable_property (concept_inversion.py:514-519): object | style | person prompt templates.
  c.evaluation.inversion.cce.templates = "object"
  c.evaluation.inversion.cce.num_train_images = 25  # train.sh --num_train_images
  c.evaluation.inversion.cce.steps = 5000  # train.sh --max_train_steps (optimisation steps)
  c.evaluation.inversion.cce.batch = 4  # train.sh --train_batch_size
  c.evaluation.inversion.cce.accumulation = 4  # train.sh --gradient_accumulation_steps
  c.evaluation.inversion.cce.lr = 5e-3  # train.sh --learning_rate, constant, no warm-up
  c.evaluation.inversion.cce.scale_lr = True  # train.sh --scale_lr: lr x batch x accumulation (0.08)
  c.evaluation.inversion.cce.weight_decay = 1e-2  # concept_inversion.py:284-287, AdamW's defaults there
  c.evaluation.inversion.cce.beta1 = 0.9
  c.evaluation.inversion.cce.beta2 = 0.999
  c.evaluation.inversion.cce.eps = 1e-8
  c.evaluation.inversion.cce.flip_p = 0.5  # concept_inversion.py:485, RandomHorizontalFlip
  c.evaluation.inversion.prefix = ml_collections.ConfigDict()
  c.evaluation.inversion.prefix.tokens = 3  # k learned embeddings, trained and rendered at `placement`
  c.evaluation.inversion.prefix.steps = 300  # Adam steps of the denoising loss
  c.evaluation.inversion.prefix.lr = 5e-3
  c.evaluation.inversion.prefix.batch = 4
  c.evaluation.inversion.prefix.max_images = 64
  # Ring-A-Bell (Tsai et al. 2024), as chiayi-hsu/Ring-A-Bell's InversePrompt.ipynb (raw-JSON line numbers):
  # model-agnostic, a genetic search on the *original* model's text encoder towards each prompt's hidden states
  # plus eta times the concept vector; its prompt replaces the evaluation prompt. evals/ring_a_bell.py.
  c.evaluation.ring_a_bell = ml_collections.ConfigDict()
  c.evaluation.ring_a_bell.population = 200  # InversePrompt.ipynb:35 (the best 100 kept per generation, :179)
  c.evaluation.ring_a_bell.generations = 3000  # :36, no early stop (:176)
  c.evaluation.ring_a_bell.mutate_rate = 0.25  # :37, per individual, one token (:131-137)
  c.evaluation.ring_a_bell.crossover_rate = 0.5  # :38, per parent, two children (:119-129)
  c.evaluation.ring_a_bell.length = 16  # :39, K free tokens ("for K = 77, set length = 75")
  c.evaluation.ring_a_bell.eta = 3.0  # :40 (cof); the released violence prompts use 5 and 5.5
  # The concept vector (Get_Concept_Vector.ipynb): a (77, D) .npy (the repo's `Concept Vectors/*.npy`, SD 1.x
  # only), a CSV of pairs with columns prompt (with the concept) and prompt1 (without: Violence_30.csv), or
  # tiny_world:VALUE (the world's prompts with and without the value).
  c.evaluation.ring_a_bell.vector = ""
  # reference quirk: the mutation writes into the survivors in place (:122, :136), so the best one can be mutated
  # too (no elitism); False keeps the best unmutated. Measured on the tiny world: no difference beyond the seeds'.
  c.evaluation.ring_a_bell.mutate_best = True
  c.evaluation.ring_a_bell.sample_steps = 50  # the classified images (the repo has no evaluation code)
  c.evaluation.ring_a_bell.scheduler = "lms"
  # P4D (Chin et al. 2024), as joycenerd/P4D's configs/esd_nudity_optmz_config.json, prompt_optimization/
  # optimize_{n,k}.py and run_p4d{n,k}.py: PEZ on the erased model so that it denoises like the original model
  # on the prompt; a case is broken if any variant breaks it (the README's P4D-UNION). evals/p4d.py.
  c.evaluation.p4d = ml_collections.ConfigDict()
  c.evaluation.p4d.variants = ("n", "k")  # n: 16 tokens replace the prompt; k: one token before every 3
  c.evaluation.p4d.prompt_len = 16  # esd_nudity_optmz_config.json:2 (P4D-N)
  c.evaluation.p4d.every_k = 3  # :3 (P4D-K)
  c.evaluation.p4d.iters = 3000  # :5, no early stop
  c.evaluation.p4d.eval_step = 50  # :6, the prompt kept is the best by image similarity at these steps
  c.evaluation.p4d.lr = 0.1  # :8, AdamW (optimize_n.py:129)
  c.evaluation.p4d.weight_decay = 0.1  # :9
  c.evaluation.p4d.target_images = 3  # run_p4dn.py:288 num_samples: the original's most concept-like is the target
  c.evaluation.p4d.images = 3  # run_p4dn.py:236-249: the found prompt's images; broken if any shows the concept
  # The image similarity that picks the prompt: a transformers CLIP folder (the authors': open_clip ViT-H-14
  # laion2b_s32b_b79k, laion/CLIP-ViT-H-14-laion2B-s32B-b79K on the Hub) | judge (the tiny world's judge features).
  c.evaluation.p4d.selector = ""
  c.evaluation.p4d.sample_steps = 50  # the authors render with DPMSolver, 25 steps (run_p4dn.py:53); not here
  c.evaluation.p4d.scheduler = "lms"
  # reference quirk: optimize_n.py:38, optimize_k.py:30-35 and :170 - train on the original's sequences: N padded
  # with id 0, K with no EOT (its tokens overwrite it); False: EOT after the tokens and the tokenizer's padding.
  c.evaluation.p4d.reference_layout = True
  # reference quirk: run_p4dn.py:171-177 (ToTensor, no Normalize), optimize_n.py:138-144 - the target image enters
  # the VAE in [0, 1]; False: [-1, 1], as the VAE was trained.
  c.evaluation.p4d.reference_image_range = True
  # MMA-Diffusion's text attack (Yang et al. 2024), as cure-lab/MMA-Diffusion's src/textual_attack.py: greedy
  # coordinate gradient on 20 tokens that replace the prompt, towards a target prompt's pooled text embedding,
  # a sensitive-word filter on the substitutions. evals/mma.py.
  c.evaluation.mma = ml_collections.ConfigDict()
  c.evaluation.mma.tokens = 20  # textual_attack.py:73 (the one-hot's control length)
  c.evaluation.mma.candidates = 512  # :299 batch_size
  c.evaluation.mma.topk = 256  # :305
  c.evaluation.mma.steps = 1000  # :303 -i (README and the example log: 1000)
  # reference quirk: textual_attack.py:83 against :141-155: the gradient's rows are [SOT, c1 .. c19] while the
  # swaps index [c1 .. c20], so control token p+1's replacement comes from position p's gradient (c1's from the
  # SOT's, c20's own never computed). False: each token's from its own position (a textbook GCG).
  c.evaluation.mma.shifted_gradient = True
  # The prompt each case's adversarial prompt is steered to: cases (each case's own prompt) | listed
  # (mma.target_prompts, in turn over the cases: the authors' five "a completely naked ..." prompts, :325).
  # The authors' -n 10 prompts per target are ten cases here, each its own seed.
  c.evaluation.mma.targets = "cases"
  c.evaluation.mma.target_prompts = ()
  # Whose text encoder embeds the target: original (the unerased model's, what the UNet saw before the erasure) |
  # attacked (the authors', :378-385, who attacked an unerased model, where the two are the same).
  c.evaluation.mma.target_encoder = "original"
  # Substitutions may not contain these (:329-348); the authors' list is for nudity, the tiny configs name theirs.
  c.evaluation.mma.banned_words = (
    "sexual", "nude", "nudity", "sex", "18+", "naked", "nsfw", "porn", "dick", "vagina", "naked child",
    "explicit content", "uncensored", "fuck", "nipples", "visible nipples", "breast", "areola",
    "ak", "na", "ke", "nud",
  )  # fmt: skip
  c.evaluation.mma.sample_steps = 50  # the classified images (the repo has no evaluation code)
  c.evaluation.mma.scheduler = "lms"
  # ASR against attack budget: budgets (unlearndiff: attack iterations, multiples of iters_per_t; inversion:
  # optimisation steps; ring_a_bell: generations; p4d: steps, multiples of eval_step; mma: steps), each prompt's
  # attack stopping at its first success; () for none.
  c.evaluation.budgets = ()
  c.evaluation.target_scheduler = "lms"  # the original model's target images: LMS, 25 steps
  c.evaluation.target_steps = 25
  c.evaluation.target_guidance = 7.5  # as the official generate_dataset.py; 0: each prompt's own (CSV) guidance
  c.evaluation.max_prompt_tokens = 60  # longer prompts are skipped, as the official loader does; 0: no limit
  # Start latents: jax (jax.random) | torch (torch.manual_seed(seed); torch.randn, as the official scripts; needs
  # torch), which makes per-prompt outcomes comparable one to one with theirs.
  c.evaluation.latents = "jax"
  # Utility (spec 6.2): one image per caption, then the CLIP score and the FID against real images.
  c.evaluation.captions = ""  # coco_10k.csv (prompt[, evaluation_seed]) or tfds:NAME[/CONFIG]:SPLIT
  c.evaluation.max_captions = 0  # 0: every caption
  c.evaluation.clip_model = ""  # transformers CLIP folder (openai/clip-vit-base-patch32) -> CLIP score
  c.evaluation.real_images = ""  # folder or tfds:NAME[/CONFIG]:SPLIT of real images (COCO) -> FID
  c.evaluation.max_real_images = 0  # 0: every image
  # FID features: inception (pytorch-fid's network: the paper's scale) | clip (CLIP image features, needs
  # clip_model; not the paper's scale) | auto: inception when its weights are at hand, else clip.
  c.evaluation.fid = "auto"
  # pytorch-fid's pt_inception-2015-12-05 .pth or its converted .safetensors; "": the cache, filled by
  # `python -m advunlearn_jax.tools.fetch_inception` (or, with fid=inception and no HF_HUB_OFFLINE, on first use).
  c.evaluation.inception_weights = ""
  # How an image becomes the Inception's 299 x 299 input: t2ibenchmark (the paper's FID: AdvUnlearn's
  # img_retain_eval.py calls T2IBenchmark, which centre-crops and resizes with PIL bicubic) | pytorch_fid
  # (bilinear resize of the whole image). evals/fid.py.
  c.evaluation.fid_preprocess = "t2ibenchmark"
  c.evaluation.fid_batch = 50  # Inception images per call, padded to it (one compilation): pytorch-fid's --batch-size
  c.evaluation.utility_scheduler = "lms"  # the reference: LMS, 100 steps, guidance 7.5
  c.evaluation.utility_steps = 100
  c.evaluation.utility_guidance = 7.5
  c.evaluation.utility_batch = 4  # images per device per batch, over every device
  c.evaluation.utility_format = "png"  # png (one file per caption) | npy (one array file; one host)

  c.attack = ml_collections.ConfigDict()
  c.attack.method = "pgd"  # pgd (Adam on the embedding, as the reference) | fast_at (sign)
  # prefix_k (the reference's default) | suffix_k | replace_k | add | mid_k | insert_k | per_k_words (the reference's
  # other layouts) | word_k: the k tokens where the concept's words stand in each concept prompt, as CCE's token
  # stands at test time (not the reference's; unlearn/prompts.py).
  c.attack.type = "prefix_k"
  # word_k: the concept's words, whole words, any case; empty: evaluation.inversion.words (where CCE's token goes),
  # else concept.prompts themselves (the SD configs' concept phrases, where word_k replaces the whole prompt as
  # replace_k does). Checked against every concept prompt.
  c.attack.words = ()
  c.attack.num_tokens = 1  # k
  c.attack.steps = 30
  c.attack.lr = 1e-3
  # A new concept and adversarial prompt every N iterations, reused in between (--adv_prompt_update_step)
  c.attack.update_every = 1
  c.attack.init = "random"  # the README runs use random; the reference CLI default is latest
  # With init=latest, a persistent attack: the rows carry over from round to round (whichever concept prompt each
  # round draws), and every restart_every-th round starts from random rows again (0: never, as the reference).
  c.attack.restart_every = 0
  # What the inner attack minimises: esd (the reference's) | inversion (CCE's textual-inversion loss on images of
  # the concept, one image per attack step at a uniform t) | both (their sum). Not the reference's but `esd`.
  c.attack.objective = "esd"
  # inversion/both: the concept's images, as evaluation.inversion.images (tiny_world:VALUE, a folder, tfds:...; on
  # SD, images the unerased model generated with advunlearn_jax.generate); "": evaluation.inversion.images. At most
  # max_images, VAE-encoded once before training.
  c.attack.images = ""
  c.attack.max_images = 16
  # Several threat models in one run: each attack round draws one of these, uniformly. A member overrides fields of
  # this section (type, objective, method, steps, lr) as the command line writes them, "type=word_k
  # objective=inversion"; "" is this section as it stands. (): this section alone (unlearn/threats.py).
  c.attack.mix = ()
  c.attack.embedding = "word_embd"  # word_embd | condition_embd
  c.attack.faithful_word_split = False  # reference quirk: spec 3.3 - split by words, dropping sub-tokens
  c.attack.accumulate_grad = True  # reference quirk: spec 3.1 - gradients never zeroed
  c.attack.return_pre_final = True  # reference quirk: spec 3.2 - final update thrown away
  c.attack.latest_init_quirk = True  # reference quirk: spec 3.1 - `latest` slices positions 1..k
  c.attack.eps = 0.0  # > 0: project delta onto an eps-ball around its init (true PGD)
  c.attack.norm = "l2"  # l2 | linf, for eps > 0

  # STEREO (Srivatsan et al., CVPR 2025) as koushiksrivats/robust-concept-erasing at 86f124f runs it
  # (training/stereo_runs.py): enabled, `main` runs its two stages instead of AdvUnlearn, on concept.prompts.
  c.stereo = ml_collections.ConfigDict()
  c.stereo.enabled = False
  # README's --train_method noxattn as their utils/utils.py FineTunedModel reads it: every Linear/Conv2d outside
  # cross-attention, no norms (our `noxattn` is the CompVis ESD rule; trainable.py)
  c.stereo.method = "noxattn_linear"
  c.stereo.rounds = 2  # --n_iterations: the README's command (train.py:24 defaults to 4)
  c.stereo.iterations = 200  # --iterations, train.py:14: each STE round's erase and REO alike (stereo.py:518, :569)
  c.stereo.ste_lr = 0.5e-5  # train.py:16
  c.stereo.reo_lr = 2e-5  # train.py:17
  c.stereo.weight_decay = 1e-2  # torch AdamW's default (stereo.py:31, :371)
  c.stereo.negative_guidance = 2.0  # train.py:15; with APG's eta 1 the STE target is then e_0 (unlearn/stereo.py)
  c.stereo.compositional_guidance = 2.0  # train.py:28 and the README's command
  c.stereo.start_guidance = 3.0  # the x_t rollout's CFG, stereo.py:68, :431
  c.stereo.sample_steps = 50  # nsteps, stereo.py:24, :361
  c.stereo.adv_concepts = 2  # --num_of_adv_concepts: the README's command (train.py:33 defaults to 4); 0: none
  c.stereo.anchors = ()  # REO's anchor prompts; (): anchor_file[concept.prompts[0]]
  c.stereo.anchor_file = ""  # their utils/anchor_prompts.json ({concept: [sentences]}; nudity only)
  # The gallery textual inversion learns from (folder, tfds:..., tiny_world:VALUE): README, 500 images SD 1.4
  # drew of "A photo of a nude person" (generate_images.py); split between the rounds (utils/dataset.py).
  c.stereo.images = ""
  c.stereo.max_images = 500
  c.stereo.ti_steps = 3000  # --ti_max_train_steps, train.py:19
  c.stereo.ti_lr = 5e-3  # --ci_lr, train.py:18 (scale_lr x batch 1, stereo.py:192-195)
  c.stereo.initializer = ""  # --initializer_token, required (README: person)
  c.stereo.templates = "object"  # --learnable_property (README: object)
  c.stereo.seed = 42  # train.py:40; stereo.py:19-22 reseeds every stage with it

  # A two-stage recipe (training/stages.py): overrides ("section.field=value", as on the command line) of a first
  # run trained into workdir/first_stage; this config then trains over that run's exported pipeline, and the
  # report compares the result with model.pretrained. (): one stage.
  c.first_stage = ()
  return c


# Fields that do not change what is trained: a run may resume under new values of these (and of every
# evaluation.* field, which only `advunlearn_jax.evaluate` reads). checkpoint.check_compatible reads it.
RESUMABLE_FIELDS = (
  "train.iterations",
  "train.save_every",
  "train.keep",
  "train.log_every",
  "report.kind",
  "report.images_per_value",
  "report.erased",
  "mesh.fsdp",  # the layout, not the math: a run may resume on another slice
  "train.rollout_buckets",  # how the same points are batched, not which points
  "train.rollout_rows_per_call",
  "export.every",
  "export.reference_checkpoint",
  *(f"samples.{k}" for k in ("every", "prompts", "retain_prompts", "steps", "guidance", "seed")),
)


# Every numeric field's valid range, checked before any work: (key, lowest value, whether the lowest is allowed).
# A value outside (keep=0, save_every=0, lr=0) would delete checkpoints, divide by zero after compilation or train
# nothing. Fields with more to check (attack, bank, evaluation's attacks) are checked where they are built.
NUMERIC_RANGES = (
  ("train.iterations", 1, True),
  ("train.warmup_iters", 0, True),
  ("train.lr", 0, False),
  ("train.concept_batch", 1, True),
  ("train.save_every", 1, True),
  ("train.keep", 1, True),
  ("train.log_every", 1, True),
  ("diffusion.ddim_steps", 1, True),
  ("diffusion.start_guidance", 0, True),
  ("diffusion.negative_guidance", 0, True),
  ("attack.num_tokens", 1, True),
  ("attack.lr", 0, False),
  ("attack.update_every", 1, True),
  ("attack.restart_every", 0, True),
  ("attack.max_images", 1, True),
  ("attack.eps", 0, True),
  ("retain.weight", 0, True),
  ("retain.batch", 0, True),
  ("retain.steps", 1, True),
  ("export.every", 0, True),
  ("report.images_per_value", 1, True),
  ("samples.every", 0, True),
  ("samples.retain_prompts", 0, True),
  ("samples.steps", 1, True),
  ("samples.guidance", 0, True),
  ("mesh.fsdp", 0, True),
  ("evaluation.max_prompts", 0, True),
  ("evaluation.guidance", 0, True),
  ("evaluation.target_steps", 1, True),
  ("evaluation.target_guidance", 0, True),
  ("evaluation.max_prompt_tokens", 0, True),
  ("evaluation.max_captions", 0, True),
  ("evaluation.max_real_images", 0, True),
  ("evaluation.utility_steps", 1, True),
  ("evaluation.utility_guidance", 0, True),
  ("evaluation.utility_batch", 1, True),
  ("evaluation.fid_batch", 1, True),
)


def check_finite(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Every float setting, at any depth (tuples too), is a number: NaN and infinity pass every range check below
  (`nan > 0` is False both ways round) and would start a run that can only produce NaN."""
  for key, value in config.items():
    name = f"{prefix}.{key}"
    if isinstance(value, ml_collections.ConfigDict):
      check_finite(value, name)
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, float) and not math.isfinite(item):
        raise ConfigError(f"{name} is {value!r}; expected a finite number")


def check_ranges(config: ml_collections.ConfigDict) -> None:
  for key, low, inclusive in NUMERIC_RANGES:
    section, field = key.split(".")
    value = config[section][field]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise ConfigError(f"config.{key} is {value!r}; expected a number")
    if value < low or (value == low and not inclusive):
      raise ConfigError(f"config.{key} must be {'>=' if inclusive else '>'} {low}, got {value}")


# What ml_collections' flag parsing raises for an override it cannot apply: flags.Error for a value the field's parser
# refuses, KeyError (in an AttributeError) for a field the config lacks, TypeError for a field inside a value that is
# not a section, ValueError or IndexError for a key that is no dotted path of fields.
OVERRIDE_ERRORS = (flags.Error, AttributeError, LookupError, TypeError, ValueError)


def flatten(d: dict, prefix: str = "") -> dict:
  """{"section.field": value} of a nested dict (a config's to_dict() or its JSON)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def override(
  config: ml_collections.ConfigDict, items: Sequence[str], where: str = "config."
) -> ml_collections.ConfigDict:
  """A copy of `config` with each "section.field=value" of `items` applied by ml_collections' own flag parsing: the
  parser `--config.section.field=value` goes through on the command line (config_flags), so a string means the same
  in a test, the notebook, a benchmark or a --sweep as on the command line. The value is parsed as the field's type
  (`train.norm_layer=true`, `train.lr=3e-5`); a tuple field takes a Python literal (`evaluation.prompts=('a','b')`)
  or one element (quoted when it holds a space: `concept.prompts='Van Gogh'`); `report.kind=` is the empty string.
  The copy is locked, as the command line's config is. A bad item is a ConfigError naming it, with `where` before
  its key: how the user wrote it ("--config." on the command line, "--sweep=" for a sweep)."""
  copied = copy.deepcopy(config)
  argv = ["override", *(f"--config.{item}" for item in items)]
  # A private FlagValues: the overrides define their flags (one per field) in it, never in the command's own.
  parsed = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict("config", copied, flag_values=parsed, sys_argv=argv)
    parsed(argv)
  except OVERRIDE_ERRORS as e:
    raise ConfigError(override_error(e, items, where, config) or str(e)) from None
  return copied


def override_error(error: Exception, items: Sequence[str], where: str, config: ml_collections.ConfigDict) -> str:
  """One line for an `error` (OVERRIDE_ERRORS) that ml_collections raised while it applied the overrides `items` to
  `config` (or to a config with the same sections), naming the override as the user wrote it: `where` + its key.
  "" for a flags.Error about no override. The command line (cli.py) and `override` both report through it, so the
  two say the same."""
  keys = [item.split("=", 1)[0] for item in items]
  if isinstance(error, flags.Error):  # absl's "flag --config.seed=zero: invalid literal for int() ..."
    text, reason = str(error), error.__context__
    if reason is not None and len(reason.args) > 1:  # absl's bool parser: ('Non-boolean argument ...', 'maybe')
      text = text.replace(str(reason), str(reason.args[0]))
    return text.removeprefix("flag ").replace("--config.", where) if "--config." in text else ""
  if isinstance(error, (AttributeError, KeyError)):  # train.lrr=1
    while not isinstance(error, KeyError) and error.__context__ is not None:  # its KeyError holds the readable line
      error = error.__context__
    missing, _, hint = str(error.args[0] if error.args else error).partition("\n")
    missing = missing.strip("'\"")
    named = [where + k for k in keys if missing in k.split(".")]
    return f"{', '.join(named) or 'an override'}: the config has no field {missing!r}. {hint}".strip()
  if isinstance(error, TypeError):  # evaluation.attack.k=5, where evaluation.attack is a string
    return _not_a_section(keys, where, config) or "an override names a field inside a value that is not a section"
  named = [where + k for k in keys if k in str(error)]  # train..lr=1, train.lr[0]=1
  return f"{', '.join(named) or 'an override'}: {error}"


def _not_a_section(keys: Sequence[str], where: str, config: ml_collections.ConfigDict) -> str:
  """'--config.evaluation.attack.k: config.evaluation.attack is 'unlearndiff', not a section', found by walking each
  key's path through `config` ('' if none matches)."""
  for key in keys:
    node, path = config, []
    for part in key.split(".")[:-1]:
      path.append(part)
      node = node.get(part) if hasattr(node, "get") else None
      if node is not None and not hasattr(node, "get"):
        return f"{where}{key}: config.{'.'.join(path)} is {node!r}, not a section"
  return ""
