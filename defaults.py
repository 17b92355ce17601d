"""
The default config of each kind of run: a reward run (train_reward.py) and a policy run
(train_policy.py). A YAML file overrides them, then --key=value (common.load_config);
configs/ hold only what differs. The model sections are the models' own defaults
(reward.MODEL_DEFAULTS, policy.DEFAULTS, toy.TOY_MODEL_DEFAULTS). Every key is
commented where it is defined.
"""

import policy
import toy
from reward import MODEL_DEFAULTS


def run_keys(stage, out_dir):
    """The keys every run has, first in its config."""
    return {
        "stage": stage,  # which trainer a config is for (reward | policy); the other trainer refuses it
        "out_dir": out_dir,  # checkpoints, config and logs go here
        "seed": 0,  # seeds torch, numpy, python and the episode sampler
        "device": "auto",  # auto = cuda if available, else cpu
        "resume": False,  # continue the run in out_dir from its ckpt_last.pt
        "overwrite": False,  # replace the run already in out_dir (without it, such a folder is refused)
    }


REWARD_RUN = {
    **run_keys("reward", "runs/synthetic_np_btl"),
    "data": {
        "path": "data/paper_synthetic.npz",  # feature-pair .npz (format: data.py)
        "synthetic": "paper",  # generator of a missing data.path at its default path: paper | linear | null
        "generate": False,  # also generate a missing data.path that is not the generator's default path
        "labels": None,  # train on these labels only (a label-specific BTL); null = all
    },
    "model": MODEL_DEFAULTS,  # reward.py: kind, sizes, encoder, kl_beta, predict_samples
    "train": {
        "steps": 30000,  # optimizer steps: the cap, as train.patience ends the run when val/loss plateaus
        "epochs": 0.0,  # > 0: steps = epochs * answered train (pair, label) cells / (batch_size * num_targets)
        "batch_size": 64,  # episodes per step
        "num_targets": 20,  # target pairs per episode
        "min_context": 0,  # fewest context pairs in a training episode
        "max_context": 10,  # most context pairs in a training episode
        "lr": 1e-3,  # peak AdamW learning rate
        "min_lr": 1e-5,  # cosine decay floor
        "warmup_steps": 100,  # linear warmup
        "weight_decay": 0.0,  # AdamW weight decay
        "grad_clip": 1.0,  # max gradient norm (0 = off)
        "patience": 8,  # > 0: once val/loss has not improved for this many evals, cool down and stop; 0 = off
        "cooldown": 0.25,  # with patience: cosine decay over this fraction of the steps trained so far
    },
    "eval": {
        "interval": 250,  # steps between validations and checkpoints
        "context_sizes": [0, 1, 3, 5, 10],  # n at which validation is scored
        "episodes": 256,  # val episodes per context size
        "num_targets": 20,  # target pairs per val episode
    },
}

POLICY_RUN = {
    **run_keys("policy", "runs/steer_world_np_dpo"),
    "data": {
        "pairs": "data/steer_world/pairs.jsonl",  # text pairs (JSONL, text.py)
        "features": "data/steer_world/features.npz",  # context embeddings, row-aligned with pairs
        "preferences": "data/steer_world/users.json",  # {user: true preference vector} (the steering world); null = none
        "embedder": None,  # the model that embedded the features (used for new users); null = policy.base
        "labels": None,  # train on these labels only (a label-specific oracle); null = all
        "max_length": 64,  # prompt + response tokens; longer pairs are dropped and counted
        "skip_bad_lines": False,  # drop malformed JSONL lines instead of stopping
        "toy": True,  # a built-in world: build its missing pairs, base model and features at their default paths
        "world": "continuum",  # continuum (world.py: users on a 2-D continuum) | two_types (concise vs detailed)
        "generate": False,  # also build missing toy inputs away from their default paths
        "world_users": [1000, 40, 100],  # continuum: train, val and test users
        "world_pairs_per_user": 24,  # continuum: pairs each user answers
        "world_answers_per_pair": 4,  # continuum: users who answer each pair
        "world_corpus": 20000,  # continuum: (prompt, response) texts the base model is fine-tuned on
        "toy_pairs": 6000,  # two_types: toy text pairs to generate
        "toy_conflict_fraction": 0.8,  # two_types: share of toy pairs the two user types rank oppositely
    },
    "toy_model": toy.TOY_MODEL_DEFAULTS,  # the built-in worlds' tiny Llama-style base (toy.py)
    "policy": dict(policy.DEFAULTS, base="runs/steer_world_base"),  # see policy.DEFAULTS
    "train": {
        "steps": 3000,  # optimizer steps
        "batch_size": 8,  # episodes per step (each num_targets pairs)
        "grad_accum": 1,  # micro-batches per optimizer step
        "num_targets": 4,  # target pairs per episode
        "min_context": 0,  # fewest context pairs in an episode
        "max_context": 10,  # most context pairs in an episode
        "beta": 0.1,  # DPO temperature
        "nll_weight": 0.3,  # weight of the chosen responses' NLL per token added to the DPO loss (RPO)
        "lr": 1e-3,  # peak AdamW learning rate
        "min_lr": 2e-5,  # cosine decay floor
        "warmup_steps": 30,  # linear warmup
        "weight_decay": 0.0,  # AdamW weight decay
        "grad_clip": 1.0,  # max gradient norm (0 = off)
        "autocast": "bf16",  # on GPU: bf16 | fp16 | none; CPU always runs fp32
        "gradient_checkpointing": False,  # recompute decoder activations in backward (less memory, slower)
        "precompute_ref_logps": False,  # reference log-probs once per pair before training, not every step
        "encoder_warmup_steps": 12000,  # NP-DPO: first train the encoder by the NP-BTL loss on the context
        # features (a throwaway reward head, batches of 64 episodes), then DPO; 0 = off
        "active_selector": None,  # a reward run on these context features (runs/steer_world_reward): in a share
        # active_fraction of episodes the context is the questions it asks the user first by infogain; null = off
        "active_fraction": 0.5,  # with active_selector: the share of episodes whose context is chosen
        "steering_lr_scale": 1.0,  # FiLM and encoder learn at this multiple of train.lr (LoRA at train.lr)
        "condition_on": "context",  # context: NP-DPO's encoder infers z | preferences: z = the user's true
        # preference vector from data.preferences (the known-preference policy, a ceiling); plain DPO ignores it
    },
    "eval": {
        "interval": 250,  # steps between validations and checkpoints (was 500: RESULTS, "Which checkpoint")
        "context_sizes": [0, 1, 3, 5, 10],  # n at which validation is scored
        "episodes": 32,  # val episodes per context size
        "num_targets": 4,  # target pairs per val episode
    },
}
