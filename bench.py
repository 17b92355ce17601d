"""
Speed and memory figures for the README, measured on this machine. One table.

    python bench.py                                   # both: reward (configs/synthetic.yaml) and policy (steer_text)
    python bench.py reward configs/synthetic.yaml --run=runs/synthetic_np_btl
    python bench.py policy                            # NP-DPO: configs/steer_text.yaml
    python bench.py policy configs/steer_text.yaml --train.batch_size=16 --train.precompute_ref_logps
    python bench.py policy configs/bench_qwen2.5_1.5b.yaml     # GPU: the paper's policy size, random weights

Reward: training throughput (episodes/s, optimizer steps of train.batch_size
episodes, data sampling included) and the latency of adapting to a new user: infer
the latent from `context_pairs` context pairs, then score `candidate_pairs` candidate
pairs (median and 90th percentile over `repeats` calls, batch of one user).

Policy: NP-DPO training throughput (pairs/s and tokens/s of optimizer steps, policy
and reference forwards, backward and batching included; with train.precompute_ref_logps
the reference runs once per pair before the timed steps and its speed is reported
apart) and the latency of adapting to a new user: latent from `context_pairs`
embedded pairs, then greedy generation of `new_tokens` tokens. With bench.random_weights
the base is built from the config.json in policy.base with random weights (no download)
and the pairs are random tokens of fixed lengths (bench.prompt_tokens, bench.response_tokens)
with random context features (bench.context_dim): speed at a real model's size and a
real batch shape, without the model or the data.

Peak memory: on a GPU, torch's peak allocated memory during the timed training steps;
on the CPU, the process's peak resident set size so far (everything the process has
held, the Python interpreter and earlier benchmarks included).
Timings depend on torch's thread count: say which when you report them.
"""

import copy
import os
import resource
import statistics
import time

import numpy as np
import torch

from common import CheckpointError, ConfigError, check, flatten, load_config, pick_device, run_script, seed_everything
from data import EpisodeSampler, PreferenceData, load_training_data, to_device
from defaults import POLICY_RUN, REWARD_RUN
from reward import MODEL_DEFAULTS, build_model, load_reward_model
from runs import load_checkpoint

REWARD_DEFAULTS = dict(REWARD_RUN, bench={
    "run": None,  # a run dir whose trained weights to time (speed does not depend on them)
    "train_steps": 200,  # timed optimizer steps (after 20 warm-up steps)
    "context_pairs": 10,  # a new user's context size
    "candidate_pairs": 100,  # pairs scored for that user
    "repeats": 1000,  # latency measurements
    "question_candidates": 1000,  # the pool a new user's next question is chosen from (queries.py)
    "question_targets": 16,  # unlabelled pairs whose answers infogain is about
    "particles": 32,  # particles of the particle rows (evaluate.py --particles)
    "particle_latents": 2048,  # ... summarising this many training users' latents (k-means)
})
ALIASES = {"run": "bench.run"}
POLICY_BENCH = {
    "train_steps": 20,  # timed optimizer steps (after 3 warm-up steps)
    "context_pairs": 10,  # a new user's context size
    "new_tokens": 32,  # greedily generated tokens
    "repeats": 20,  # latency measurements
    "question_candidates": 1000,  # cached candidate pairs a new user's next question is chosen from
    "question_targets": 16,  # unlabelled pairs whose answers infogain is about
    "random_weights": False,  # base from policy.base's config.json with random weights, random token pairs
    "random_pairs": 512,  # random token pairs (random_weights only)
    "prompt_tokens": 256,  # tokens per random prompt
    "response_tokens": 256,  # tokens per random response
    "context_dim": 4096,  # size of a random context feature (Llama-3-8B's hidden size)
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def start_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_row(device, what):
    if device.type == "cuda":
        return f"{what}: peak GPU memory allocated, GiB", f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{what}: peak process memory (RSS so far), MiB", f"{peak_kib / 1024:,.0f}"


def check_bench(b):
    check(b["train_steps"] > 0, "bench.train_steps", "must be positive")
    check(b["repeats"] >= 2, "bench.repeats", "must be at least 2 (a median and a 90th percentile)")
    check(b.get("particles", 1) > 0, "bench.particles", "must be positive")
    check(b.get("particle_latents", 1) > 0, "bench.particle_latents", "must be positive")


def percentiles_ms(times):
    return 1000 * statistics.median(times), 1000 * statistics.quantiles(times, n=10)[-1]


# -----------------------------------------------------------------------------
# reward


def check_run_matches(run, model_config):
    """--run times the trained weights of exactly the model the config describes."""
    if not os.path.exists(run):
        raise CheckpointError(f"--run: {run}: no such run dir or checkpoint file")
    checkpoint = load_checkpoint(run)
    if "policy_config" in checkpoint:
        raise CheckpointError(f"--run: {run} is a policy run; bench.py reward times a reward model "
                              "(a run of train_reward.py)")
    trained, here = flatten(checkpoint["config"]["model"], "model."), flatten(model_config, "model.")
    differ = [k for k in here if k in trained and trained[k] != here[k]]  # a key newer than the run: its default
    if differ:
        raise ConfigError(f"--run: {run} was trained with " + ", ".join(
            f"{k} = {trained[k]!r} (benchmarked: {here[k]!r})" for k in differ) +
            "; give the run's config (python bench.py reward CONFIG --run=RUN)")


def time_reward_training(model, sampler, config, device):
    t, b = config["train"], config["bench"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"])
    for step in range(20 + b["train_steps"]):
        if step == 20:
            sync(device)
            start_peak_memory(device)
            start = time.perf_counter()
        loss, _ = model.loss(to_device(sampler.sample(t["batch_size"]), device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return b["train_steps"] * t["batch_size"] / (time.perf_counter() - start)


def new_user(data, b, device):
    """One test user's episode: `context_pairs` answered pairs and `candidate_pairs` pairs to score."""
    sampler = EpisodeSampler(data, "test", b["candidate_pairs"], b["context_pairs"], seed=0)
    return to_device(sampler.sample(1, num_context=b["context_pairs"]), device)


@torch.no_grad()
def time_reward_adaptation(model, data, config, device):
    """Seconds per call of: latent from the context, then P(chosen) of candidate pairs (the
    Monte Carlo posterior predictive where model.predict_samples > 0)."""
    b = config["bench"]
    batch = new_user(data, b, device)
    model.eval()
    times = []
    for _ in range(b["repeats"]):
        start = time.perf_counter()
        model.log_prob_chosen(batch)  # (1, candidates)
        sync(device)
        times.append(time.perf_counter() - start)
    return percentiles_ms(times)


@torch.no_grad()
def particle_adaptation_row(model, data, config, device, particles):
    """evaluate.py --particles for one new user: the weights of the particles from the context,
    then P(chosen) of the candidate pairs under each, mixed. The candidates' probabilities under
    the particles depend on no user, so a fixed set of pairs to score can keep them (cached)."""
    import queries

    b = config["bench"]
    batch = new_user(data, b, device)
    kept = queries.ParticleBelief(model.eval(), particles)
    medians = []
    for make in (lambda: queries.ParticleBelief(model, particles), lambda: kept):
        times = []
        for _ in range(b["repeats"]):
            start = time.perf_counter()
            make().log_prob_chosen(batch)
            sync(device)
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return (f"reward: adapt to a new user under {len(particles.latents)} particles (evaluate.py --particles), "
            f"weights from {b['context_pairs']} pairs + score {b['candidate_pairs']} pairs, median ms with the scored "
            "pairs new / cached", " / ".join(f"{1000 * t:.2f}" for t in medians))


@torch.no_grad()
def time_question_choice(model, data, b, device, answers, repeats=20, belief=None, consistent=True):
    """Median seconds per choice of the next question by infogain (queries.next_question) for one
    user with `answers` answers, from `question_candidates` candidate pairs of the data (their
    features cached): the model's look-ahead (skipping candidates that cannot win), or
    `belief()`, a fresh belief per choice. The answers are a test user's own (`consistent`) or
    random pairs with random answers, which no user gives and which leave more candidates to look at."""
    import queries

    gen = torch.Generator().manual_seed(0)
    pick = lambda k: data.pairs[torch.randint(len(data.pairs), (k,), generator=gen)][None].to(device)
    context, cand, targets = pick(answers), pick(b["question_candidates"]), pick(b["question_targets"])
    if consistent and answers:  # drawn after `pick`, so every case sees the same candidates and targets
        context = user_answers(data, answers).to(device)
    excluded = torch.zeros(1, b["question_candidates"], dtype=torch.bool)
    make = belief or (lambda: queries.ModelBelief(model.eval()))
    times = []
    for _ in range(repeats + 2):
        belief = make()
        start = time.perf_counter()
        queries.next_question(belief, "infogain", context, cand, excluded, targets, gen)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def answering_split(data):
    """The split whose users answer the bench's questions: test, or train where it has none (random data)."""
    return "test" if (data.split == "test").any() else "train"


def user_answers(data, n):
    """(1, n, 2, D) n pairs one user of the data answered, chosen first."""
    sampler = EpisodeSampler(data, answering_split(data), 0, n, seed=0)
    return sampler.sample(1, num_context=n)["context"]


def question_row(model, data, b, device, who):
    import queries

    n = b["context_pairs"]
    times = [time_question_choice(model, data, b, device, 0), time_question_choice(model, data, b, device, n),
             time_question_choice(model, data, b, device, n, consistent=False)]
    belief = queries.ModelBelief(model)
    how = (f"look-ahead at the mean of q, then over {belief.samples} draws of z for the best {belief.screen}"
           if belief.samples > 1 else "look-ahead, deterministic z")
    return (f"{who}: choose the next question by infogain from {b['question_candidates']} cached candidates "
            f"({how}, {b['question_targets']} target pairs), median ms with no answers yet / with {n} answers "
            f"of a {answering_split(data)} user / with {n} random answers",
            " / ".join(f"{1000 * t:.1f}" for t in times))


def particle_row(model, data, b, device, particles):
    """evaluate.py --query.belief=particles: a pool's candidates are first computed under every particle
    (once per pool; evaluate.py draws a pool per user); a question from that pool then only reweights."""
    import queries

    fresh = time_question_choice(model, data, b, device, 0, repeats=5,
                                 belief=lambda: queries.ParticleBelief(model, particles))
    warm = queries.ParticleBelief(model, particles)
    cached = [time_question_choice(model, data, b, device, n, belief=lambda: warm) for n in (0, b["context_pairs"])]
    return (f"reward: choose the next question by infogain under {len(particles.latents)} particles (evaluate.py "
            f"--query.belief=particles) from {b['question_candidates']} candidates, median ms for the first "
            f"question from a new pool / from a cached pool with no answers / with {b['context_pairs']} "
            f"answers of a {answering_split(data)} user", " / ".join(f"{1000 * t:.1f}" for t in [fresh] + cached))


def predictive_note(model):
    samples = getattr(model, "predict_samples", 0)
    return f" (posterior predictive, {samples} draws of z)" if samples else ""


def adaptive_row(model, data, b, device, latents):
    """evaluate.py --query.belief=adaptive: each question weighs every latent by the answers,
    summarises that posterior into bench.particles particles and scores the candidates under them."""
    import queries

    make = lambda: queries.AdaptiveBelief(model, latents, b["particles"])
    times = [time_question_choice(model, data, b, device, n, belief=make) for n in (0, b["context_pairs"])]
    return (f"reward: choose the next question by infogain under {b['particles']} particles that follow the posterior "
            f"over {len(latents.latents)} latents (evaluate.py --query.belief=adaptive) from "
            f"{b['question_candidates']} candidates, median ms with no answers / with {b['context_pairs']} answers "
            f"of a {answering_split(data)} user", " / ".join(f"{1000 * t:.1f}" for t in times))


def bench_reward(argv, device_name=None):
    """-> (description, rows of (measure, value))."""
    config, rest = load_config(REWARD_DEFAULTS, argv or ["configs/synthetic.yaml"], ALIASES)
    if rest:
        raise ConfigError(f"unexpected arguments {rest}")
    check_bench(config["bench"])
    seed_everything(config["seed"])
    device = pick_device(device_name or config["device"])
    t, b = config["train"], config["bench"]
    if b["run"]:
        check_run_matches(b["run"], config["model"])
    data = load_training_data(config["data"])
    if b["run"]:
        model, _ = load_reward_model(b["run"], data.dim, device, data.path)
        model.train()
    else:
        model = build_model(config["model"], data.dim).to(device)
    sampler = EpisodeSampler(data, "train", t["num_targets"], t["max_context"], t["min_context"], seed=0)
    weights = copy.deepcopy(model.state_dict())
    episodes_per_s = time_reward_training(model, sampler, config, device)
    memory = peak_memory_row(device, "reward training")
    model.load_state_dict(weights)  # the latency rows time the run's own weights, not the timed steps'
    median, p90 = time_reward_adaptation(model, data, config, device)
    question = []
    if hasattr(model, "encoder"):
        import particles as particle_lib

        latents = particle_lib.Particles(particle_lib.training_latents(model.eval(), data, t["max_context"],
                                                                       b["particle_latents"], seed=0))
        particles = particle_lib.summarise(latents.latents, b["particles"])
        question = [particle_adaptation_row(model, data, config, device, particles),
                    question_row(model, data, b, device, "reward"), particle_row(model, data, b, device, particles),
                    adaptive_row(model, data, b, device, latents)]
    name = f"reward {config['model']['kind']} ({config['model']['encoder']['aggregator']} aggregator)"
    return name, [
        (f"reward training, episodes/s (batch {t['batch_size']}, {t['num_targets']} targets)",
         f"{episodes_per_s:,.0f}"),
        memory,
        (f"reward: adapt to a new user, latent from {b['context_pairs']} pairs + score {b['candidate_pairs']} pairs"
         f"{predictive_note(model)}, median / p90 ms", f"{median:.3f} / {p90:.3f}"),
    ] + question


# -----------------------------------------------------------------------------
# policy


def time_policy_training(policy, optimizer, sampler, token_pairs, pad_id, config, device, ref_logps):
    """(pairs/s, tokens/s) over bench.train_steps optimizer steps, after 3 warm-up steps."""
    import policy as policy_lib
    from text import autocast, make_batch

    t, b = config["train"], config["bench"]
    for step in range(3 + b["train_steps"]):
        if step == 3:
            sync(device)
            start_peak_memory(device)
            start, pairs, tokens = time.perf_counter(), 0, 0
        batch = make_batch(sampler, token_pairs, t["batch_size"], pad_id, device, ref_logps=ref_logps)
        with autocast(device, t["autocast"]):
            loss, _ = policy_lib.dpo_step(policy, batch, t["beta"], t["nll_weight"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 3:
            pairs += batch["chosen_input_ids"].shape[0]
            tokens += int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    sync(device)
    seconds = time.perf_counter() - start
    return pairs / seconds, tokens / seconds


@torch.no_grad()
def time_policy_adaptation(policy, sampler, prompt_ids, pad_id, config, device):
    """Seconds per call of: latent from the context, then greedy generation."""
    b = config["bench"]
    policy.eval()
    context = sampler.sample(1, num_context=b["context_pairs"])["context"].to(device)
    prompt = torch.tensor([prompt_ids], device=device)
    times = []
    for _ in range(b["repeats"]):
        start = time.perf_counter()
        latent = policy.infer_latent(context) if policy.encoder is not None else None
        policy.generate(prompt, torch.ones_like(prompt), latent=latent, do_sample=False,
                        min_new_tokens=b["new_tokens"], max_new_tokens=b["new_tokens"],
                        pad_token_id=pad_id)
        sync(device)
        times.append(time.perf_counter() - start)
    return percentiles_ms(times)


def bench_policy(argv, device_name=None):
    """-> (description, rows of (measure, value))."""
    import policy as policy_lib
    from text import load_inputs, reference_logprobs

    config, rest = load_config(dict(POLICY_RUN, bench=POLICY_BENCH), argv or ["configs/steer_text.yaml"])
    if rest:
        raise ConfigError(f"unexpected arguments {rest}")
    check_bench(config["bench"])
    seed_everything(config["seed"])
    device = pick_device(device_name or config["device"])
    t, b, p = config["train"], config["bench"], config["policy"]
    if b["random_weights"]:
        base, data, token_pairs, prompt_ids, pad_id = random_policy_inputs(config)
    else:
        from text import tokenize_prompt

        data, token_pairs, tokenizer = load_inputs(config)
        base = policy_lib.build_base_model(p["base"], p["dtype"], p["trust_remote_code"])
        prompt_ids, pad_id = tokenize_prompt(tokenizer, "tell me about cats ."), tokenizer.pad_token_id
    policy = policy_lib.SteerablePolicy(base, p, data.dim).to(device)
    if t["gradient_checkpointing"]:
        policy.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=t["lr"])
    sampler = EpisodeSampler(data, "train", t["num_targets"], t["max_context"], t["min_context"], seed=0)
    rows, ref_logps = [], None
    if t["precompute_ref_logps"]:
        start = time.perf_counter()
        ref_logps = reference_logprobs(policy, data, token_pairs, config, pad_id, device)
        sync(device)
        pairs = int((~ref_logps[:, 0].isnan()).sum())
        pairs_per_s = pairs / (time.perf_counter() - start)
        rows.append(("NP-DPO: reference log-probs precomputed once, pairs/s", f"{pairs_per_s:,.1f}"))
    pairs_per_s, tokens_per_s = time_policy_training(policy, optimizer, sampler, token_pairs, pad_id, config, device,
                                                     ref_logps)
    memory = peak_memory_row(device, "NP-DPO training")
    median, p90 = time_policy_adaptation(policy, sampler, prompt_ids, pad_id, config, device)
    reference = "precomputed reference" if ref_logps is not None else "policy and reference forwards"
    random_inputs = f"random weights, {b['prompt_tokens']} + {b['response_tokens']} tokens a pair, "
    weights = random_inputs if b["random_weights"] else ""
    name = (f"policy {p['base']} ({weights}{p['dtype']}), "
            f"batch {t['batch_size']} episodes x {t['num_targets']} targets, "
            f"autocast {t['autocast'] if device.type == 'cuda' else 'none (CPU)'}")
    return name, rows + [
        (f"NP-DPO training, pairs/s ({reference})", f"{pairs_per_s:,.1f}"),
        ("NP-DPO training, tokens/s (chosen + rejected tokens)", f"{tokens_per_s:,.0f}"),
        memory,
        (f"NP-DPO: adapt to a new user, latent from {b['context_pairs']} pairs + {b['new_tokens']} greedy tokens, "
         "median / p90 ms", f"{median:.1f} / {p90:.1f}"),
        question_row(build_model(MODEL_DEFAULTS, data.dim).to(device), data, b, device,
                     f"NP-DPO's selector (an NP-BTL on its {data.dim}-dim context features)"),
    ]


def random_policy_inputs(config):
    """A base model with random weights from policy.base's config.json, and random token
    pairs with random context features, answered oppositely by two users (all train).
    Returns (base, data, token_pairs, prompt_ids, pad_id)."""
    import policy as policy_lib
    from transformers import AutoConfig

    p, b = config["policy"], config["bench"]
    model_config = AutoConfig.from_pretrained(p["base"], trust_remote_code=p["trust_remote_code"])
    base = policy_lib.build_base_model(model_config, p["dtype"], p["trust_remote_code"])
    n, vocab = b["random_pairs"], model_config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(config["seed"])
    def tokens(length):
        return torch.randint(1, vocab, (length,), generator=gen).tolist()
    token_pairs = [(tokens(b["prompt_tokens"]), (tokens(b["response_tokens"]), tokens(b["response_tokens"])))
                   for _ in range(n)]
    first = torch.randint(2, (n, 1), generator=gen, dtype=torch.int8)
    data = PreferenceData(torch.randn(n, 2, b["context_dim"], generator=gen), torch.cat([first, 1 - first], 1),
                          ["user_a", "user_b"], np.full(n, "train"), {}, "<random pairs>")
    return base, data, token_pairs, token_pairs[0][0], 0


# -----------------------------------------------------------------------------


def main(argv):
    mode = argv[0] if argv and argv[0] in ("reward", "policy") else None
    args = argv[1:] if mode else argv
    if mode is None and args:
        raise ConfigError("usage: python bench.py [reward|policy [CONFIG] [--key=value ...]]")
    results = []
    if mode in (None, "reward"):
        results.append(bench_reward(args))
    if mode in (None, "policy"):
        results.append(bench_policy(args))
    device = pick_device("auto")
    print(f"\ndevice {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; " + "; ".join(name for name, _ in results) + "\n")
    print("| measure | value |\n|---|---|")
    for _, rows in results:
        for measure, value in rows:
            print(f"| {measure} | {value} |")
    return [row for _, rows in results for row in rows]


if __name__ == "__main__":
    run_script(main)
