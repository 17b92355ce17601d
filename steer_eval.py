"""
Policy evaluation on the steering world (world.py): how far a policy moves each test
user's generations toward that user's best response, and what it costs in quality.

evaluate.py calls `evaluate_world`; the metrics are plain functions, tested on small
fixtures with hand-computed answers (tests/test_steer_eval.py).

For every test user (never seen in training) and context size n:
- contexts are n of the user's own answered pairs, any of them, and never one on the
  evaluated prompt (generation) or one of the scored pairs (implicit reward);
- normalised gold reward = (policy - reference) / (the user's optimum - reference),
  per user, averaged over users with the SEM over users; the optimum is exact
  (world.best_reward) and the reference is the fine-tuned base, sampled alike; beside it
  the Bayes limit of the same n pairs (bayes_limit: the best decision any policy can make);
- continuum: per preference dimension, the Spearman correlation over users between
  the true preference and the attribute of their generations; and along a latent
  path between two users at opposite corners, the Spearman correlation of each
  attribute with the interpolation weight (11 points);
- quality: the relevance of the generations (shared by every user);
- implicit-reward accuracy on the user's other pairs, separately where the population
  conflicts and where it agrees (world.pair_kind), beside two limits on the same
  recorded (Bradley-Terry) choices: the Bayes-optimal prediction from the same n
  context pairs, and the user's own gold reward (their preference known).
"""

import torch
import torch.nn.functional as F

import world
from common import ConfigError
from data import choice_correct, chosen_first
from policy import implicit_reward, policy_and_reference_logprobs
from report import mean_sem, spearman
from text import collate_pairs, tokenize_prompt


# -----------------------------------------------------------------------------
# the metrics


def normalised(policy_reward, reference_reward, best_reward):
    """Per user: (policy - reference) / (optimum - reference). Inputs (U,)."""
    return (policy_reward - reference_reward) / (best_reward - reference_reward)


def attribute_table(prompt_texts):
    """[(prompt, text)] -> (N, 3) tensor of length, tone, relevance."""
    rows = [world.attributes(q, t) for q, t in prompt_texts]
    return torch.tensor([[a["length"], a["tone"], a["relevance"]] for a in rows], dtype=torch.float64)


def rewards_from_attributes(attrs, preferences):
    """attrs (..., 3) of responses, preferences (..., 2) broadcastable -> gold rewards (...)."""
    a = {"length": attrs[..., 0], "tone": attrs[..., 1], "relevance": attrs[..., 2]}
    return world.reward_of(a, (preferences[..., 0], preferences[..., 1]))


# -----------------------------------------------------------------------------
# users, their pairs and contexts


class TestUsers:
    """The users of one split: their answered rows, true preferences and pair kinds."""

    def __init__(self, data, text_rows, split):
        in_split = torch.from_numpy(data.split == split)
        columns = [j for j in range(len(data.labels)) if ((data.choices[:, j] >= 0) & in_split).any()]
        if not columns:
            raise ValueError(f"no answered pairs in split '{split}'")
        self.data, self.text_rows, self.split, self.columns = data, text_rows, split, columns
        self.labels = [data.labels[j] for j in columns]
        self.rows = [torch.nonzero((data.choices[:, j] >= 0) & in_split).squeeze(1) for j in columns]
        prefs = data.meta["preferences"]
        self.preferences = torch.tensor([prefs[label] for label in self.labels], dtype=torch.float64)  # (U, 2)
        self.latents = world.user_latents(self.labels, prefs)  # (U, 2) scaled, for the known-preference policy
        self.prompt_of = [row["prompt"] for row in text_rows]
        self._margins, self._attrs = {}, {}

    def pair_attributes(self, r):
        """The attributes of row r's responses a and b, read from the text once."""
        if r not in self._attrs:
            row = self.text_rows[r]
            self._attrs[r] = [world.attributes(row["prompt"], row[k]) for k in ("response_a", "response_b")]
        return self._attrs[r]

    def margins(self, rows):
        """(len(rows), G) gold reward of response b minus response a at every grid preference."""
        for r in rows.tolist():
            if r not in self._margins:
                a, b = self.pair_attributes(r)
                grid = (BAYES_GRID[:, 0].double(), BAYES_GRID[:, 1].double())
                self._margins[r] = world.reward_of(b, grid) - world.reward_of(a, grid)
        return torch.stack([self._margins[r] for r in rows.tolist()])

    def context(self, user, n, gen, exclude_rows=None, exclude_prompt=None):
        """(n, 2, D) features of n of the user's pairs, chosen first, and their rows: drawn
        without replacement from the user's rows minus exclude_rows and the evaluated prompt's."""
        rows = self.rows[user]
        keep = torch.ones(len(rows), dtype=torch.bool)
        if exclude_rows is not None:
            keep &= ~torch.isin(rows, exclude_rows)
        if exclude_prompt is not None:
            keep &= torch.tensor([self.prompt_of[r] != exclude_prompt for r in rows.tolist()])
        allowed = rows[keep]
        if len(allowed) < n:
            raise ValueError(f"user {self.labels[user]} has {len(allowed)} pairs to draw a context of {n} from")
        picked = allowed[torch.randperm(len(allowed), generator=gen)[:n]]
        return self.oriented(picked, user), picked

    def oriented(self, rows, user):
        return chosen_first(self.data.pairs[rows], self.answers(rows, user))  # (n, 2, D)

    def answers(self, rows, user):
        """(n,) bool: the user's recorded answers to their rows, True where b was chosen."""
        return self.data.choices[rows, self.columns[user]].bool()

    def simulated_answers(self, rows, user, gen):
        """(n,) bool: the user's answers to any rows of the data, True where b is chosen, drawn
        anew as the world draws choices (Bradley-Terry on their gold reward, temperature 1)."""
        pref = self.preferences[user].tolist()
        margin = torch.tensor([world.reward_of(b, pref) - world.reward_of(a, pref)
                               for a, b in map(self.pair_attributes, rows.tolist())], dtype=torch.float64)
        return torch.rand(len(rows), generator=gen, dtype=torch.float64) < torch.sigmoid(margin)

    def posterior_weights(self, picked, answers=None):
        """(U, G) each user's posterior over BAYES_GRID (uniform prior) given their answers to the
        rows picked[u]: the recorded ones, or answers[u] (True = b chosen) where given."""
        out = []
        for u, rows in enumerate(picked):
            log_post = torch.zeros(len(BAYES_GRID), dtype=torch.float64)
            if len(rows):
                sign = 2 * (self.answers(rows, u) if answers is None else answers[u]).double() - 1  # 1 = b chosen
                log_post = F.logsigmoid(sign[:, None] * self.margins(rows)).sum(0)
            out.append(torch.softmax(log_post, 0))
        return torch.stack(out)

    def posterior_latents(self, picked, answers=None):
        """(U, 2) the known-preference latent of each user's posterior-mean preference (n = 0: the prior mean)."""
        means = self.posterior_weights(picked, answers) @ BAYES_GRID.double()
        return torch.tensor([world.preference_latent(p) for p in means.tolist()], dtype=torch.float32)


def latents_for(policy, role, users, contexts, device, picked=None):
    """(U, d) latents: NP-DPO's from each user's context (U, n, 2, D); the true preferences
    for the known-preference policy, or ('posterior') the Bayes posterior mean from the
    context's rows picked[u]; None for a policy without FiLM."""
    if role == "np_dpo":
        return policy.infer_latent(contexts.to(device))
    if role == "posterior":
        return users.posterior_latents(picked).to(device)
    return users.latents.to(device) if role == "known" else None


# -----------------------------------------------------------------------------
# implicit-reward accuracy, split by pair kind


@torch.no_grad()
def implicit_accuracy(policies, users, token_pairs, pad_id, sizes, repeats, seed, device):
    """{(model, n, kind): per-user accuracy (U_kind,)}: each user, `repeats` times per n, gives
    a random context of n of their pairs and is scored on all their other pairs. Model
    'gold' scores the recorded choices with the user's true gold reward (the ceiling)."""
    kinds = [world.pair_kind(r["prompt"], r["response_a"], r["response_b"]) for r in users.text_rows]
    out = {}
    for n in sizes:
        gen = torch.Generator().manual_seed(seed + n)
        per = {}  # (model, kind) -> list of per-user accuracies
        for u in range(len(users.labels)):
            draws = [users.context(u, n, gen) for _ in range(repeats)]
            contexts = torch.stack([c for c, _ in draws])  # (R, n, 2, D)
            targets = [users.rows[u][~torch.isin(users.rows[u], picked)] for _, picked in draws]
            flat = torch.cat(targets)  # (R * T,)
            flipped = users.data.choices[flat, users.columns[u]].bool()
            batch = collate_pairs(token_pairs, flat, flipped, pad_id)
            batch.update(context=contexts, context_mask=torch.ones(contexts.shape[:2], dtype=torch.bool),
                         latent=users.latents[[u] * repeats])
            batch = {k: v.to(device) for k, v in batch.items()}
            target_kinds = [kinds[r] for r in flat.tolist()]
            correct = {name: episode_correct(policy, batch) for name, (policy, _) in policies.items()}
            correct["gold"] = gold_correct(users, u, flat, flipped)
            correct["bayes"] = torch.cat([bayes_correct(users, picked, rows, users.columns[u])
                                          for (_, picked), rows in zip(draws, targets)])
            for name, c in correct.items():
                for kind in ("conflict", "agree"):
                    mask = torch.tensor([k == kind for k in target_kinds])
                    if mask.any():
                        per.setdefault((name, kind), []).append(c[mask].mean().item())
        out.update({(name, n, kind): torch.tensor(v) for (name, kind), v in per.items()})
    return out


def episode_correct(policy, batch):
    """1/0/0.5 per pair: the DPO implicit reward ranks the chosen response higher/lower/equal."""
    chosen, rejected, ref_chosen, ref_rejected = policy_and_reference_logprobs(policy, batch)
    margin = implicit_reward(chosen, ref_chosen) - implicit_reward(rejected, ref_rejected)
    return choice_correct(F.logsigmoid(margin.double())).cpu()


def gold_correct(users, u, rows, flipped):
    """The user's true gold reward as a predictor of their recorded choices."""
    preference = users.preferences[u].tolist()
    margins = []
    for r, second in zip(rows.tolist(), flipped.tolist()):
        row = users.text_rows[r]
        chosen, rejected = (row["response_b"], row["response_a"]) if second else (row["response_a"], row["response_b"])
        margins.append(world.gold_reward(row["prompt"], chosen, preference)
                       - world.gold_reward(row["prompt"], rejected, preference))
    return choice_correct(F.logsigmoid(torch.tensor(margins, dtype=torch.float64)))


BAYES_GRID = torch.cartesian_prod(torch.linspace(*world.LENGTH_RANGE, 41), torch.linspace(*world.TONE_RANGE, 41))


def bayes_correct(users, context_rows, target_rows, column):
    """The Bayes-optimal prediction of one user's target choices from their context choices:
    the world's reward family and its uniform population prior, on a 41 x 41 grid of
    preferences. The limit of any predictor given those n pairs."""
    margins = users.margins(torch.cat([context_rows, target_rows]))  # (n + T, G) reward of b - reward of a
    choices = users.data.choices[torch.cat([context_rows, target_rows]), column].double()  # 1 = b chosen
    sign = 2 * choices - 1
    n = len(context_rows)
    log_post = F.logsigmoid(sign[:n, None] * margins[:n]).sum(0)  # (G,)
    prob_b = (torch.softmax(log_post, 0) * torch.sigmoid(margins[n:])).sum(1)  # (T,)
    prob_chosen = torch.where(choices[n:] == 1, prob_b, 1 - prob_b)
    return choice_correct(prob_chosen.log())


# -----------------------------------------------------------------------------
# generation


def eval_prompts(split, count):
    """The first `count` prompts of the split, templates outer and topics inner, so a few
    prompts already cover every topic."""
    topics = world.TOPICS[split]
    ordered = [t.format(topic) for t in world.TEMPLATES for topic in topics]
    return ordered[:count]


@torch.no_grad()
def sample_texts(policy, tokenizer, prompt, latent, count, samples, config, device, reference=False):
    """count * samples responses to `prompt`; row r * samples + s is conditioned on latent row r."""
    ids = torch.tensor([tokenize_prompt(tokenizer, prompt)] * count, device=device)
    kwargs = dict(do_sample=True, temperature=config["temperature"], num_return_sequences=samples,
                  max_new_tokens=config["max_new_tokens"], pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if reference:
        with policy.reference_mode():
            out = policy.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    else:
        out = policy.generate(ids, torch.ones_like(ids), latent=latent, **kwargs)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def generation_attributes(policy, role, users, tokenizer, prompts, n, config, gen, device, reranker=None):
    """(U, Q, S, 3) attributes of each user's generations at context size n. With a reranker
    (policy_eval.Reranker; NP-DPO), each of the S is the best of reranker.samples draws by its reward."""
    per_prompt, (U, S), k = [], (len(users.labels), config["samples"]), reranker.samples if reranker else 1
    for q in prompts:
        contexts = picked = None
        if role in ("np_dpo", "posterior"):  # the same draws for both, from the same generator state
            drawn = [users.context(u, n, gen, exclude_prompt=q) for u in range(U)]
            contexts, picked = torch.stack([c for c, _ in drawn]), [r for _, r in drawn]
        latent = latents_for(policy, role, users, contexts, device, picked)
        texts = sample_texts(policy, tokenizer, q, latent, U, S * k, config, device)
        attrs = attribute_table([(q, t) for t in texts]).view(U, S * k, 3)
        per_prompt.append(best_of(attrs, reranker.scores(q, texts, contexts), S) if reranker else attrs)
    return torch.stack(per_prompt, 1)


def best_of(attrs, scores, samples):
    """(U, samples, 3): of each sample's k draws (attrs (U, samples * k, 3)), the one scored highest (scores,
    U, samples * k)."""
    pick = scores.view(len(attrs), samples, -1).argmax(-1)  # (U, samples)
    return attrs.view(len(attrs), samples, -1, 3).gather(2, pick[..., None, None].expand(-1, -1, 1, 3)).squeeze(2)


def reference_attributes(policy, tokenizer, prompts, config, device):
    """(Q, S_ref, 3) attributes of the reference's responses to each prompt, at reference_temperature unless 0."""
    config, out = dict(config, temperature=config.get("reference_temperature") or config["temperature"]), []
    for q in prompts:
        texts = sample_texts(policy, tokenizer, q, None, 1, config["reference_samples"], config, device, reference=True)
        out.append(attribute_table([(q, t) for t in texts]))
    return torch.stack(out)


def reference_and_best(policy, users, tokenizer, prompts, config, device):
    """The reference's attributes (Q, S_ref, 3), its gold reward per user (U,) and each user's
    exact optimum (U,): the 0 % and 100 % of the normalised gold reward."""
    attrs = reference_attributes(policy, tokenizer, prompts, config, device)
    reward = rewards_from_attributes(attrs[None], users.preferences[:, None, None, :]).mean((1, 2))
    return attrs, reward, torch.tensor([world.best_reward(u) for u in users.preferences.tolist()], dtype=torch.float64)


def user_scores(attrs, users, reference, best):
    """Per user (U,): gold reward, normalised gold reward and the mean of each attribute."""
    prefs = users.preferences[:, None, None, :]  # (U, 1, 1, 2)
    reward = rewards_from_attributes(attrs, prefs).mean((1, 2))  # (U,)
    return {"reward": reward, "normalised": normalised(reward, reference, best),
            "length": attrs[..., 0].mean((1, 2)), "tone": attrs[..., 1].mean((1, 2)),
            "relevance": attrs[..., 2].mean((1, 2))}


def decision_scores(preferences, ref_attrs):
    """(P, C) the normalised gold reward of every candidate response (world.candidate_responses)
    for each preference (P, 2), against the reference's responses ref_attrs (Q, S, 3)."""
    candidates = torch.tensor([[a["length"], a["tone"], a["relevance"]] for a in world.candidate_responses()],
                              dtype=torch.float64)
    reward = rewards_from_attributes(candidates[None], preferences[:, None, :])  # (P, C)
    reference = rewards_from_attributes(ref_attrs[None], preferences[:, None, None, :]).mean((1, 2))  # (P,)
    return normalised(reward, reference[:, None], reward.max(1, keepdim=True).values)


def bayes_decision(weights, grid_scores, true_scores):
    """(U,) each user's true normalised score of the candidate with the highest expected normalised
    score under their posterior weights (U, G): the Bayes decision for the reported metric."""
    return true_scores.gather(1, (weights @ grid_scores).argmax(1, keepdim=True)).squeeze(1)


def decision_tables(users, ref_attrs):
    """decision_scores of the BAYES_GRID preferences (G, C) and of the users' true ones (U, C)."""
    return decision_scores(BAYES_GRID.double(), ref_attrs), decision_scores(users.preferences, ref_attrs)


def bayes_limit(users, prompts, n, gen, ref_attrs):
    """(U,) the Bayes limit of n of each user's pairs (NP-DPO's draws in generation_attributes): their
    normalised score of the Bayes decision, averaged over prompts. No policy reading the same pairs
    scores more in expectation (up to the grid prior)."""
    grid, truth = decision_tables(users, ref_attrs)
    return torch.stack([bayes_decision(users.posterior_weights([users.context(u, n, gen, exclude_prompt=q)[1]
                                                               for u in range(len(users.labels))]), grid, truth)
                        for q in prompts]).mean(0)


def interpolation(policy, role, users, tokenizer, prompts, config, gen, device, points=11):
    """Attributes along the latent path between the two users at opposite corners of the
    population: {'weights', 'length', 'tone', 'relevance'} (points,), and the two users."""
    corner = users.latents.sum(1)
    a, b = int(corner.argmin()), int(corner.argmax())
    if role == "np_dpo":
        contexts = torch.stack([users.context(u, 10, gen, exclude_rows=prompt_rows(users, u, prompts))[0]
                                for u in (a, b)])
        ends = policy.infer_latent(contexts.to(device))
    else:
        ends = users.latents[[a, b]].to(device)
    weights = torch.linspace(0, 1, points)
    path = (1 - weights[:, None].to(device)) * ends[0] + weights[:, None].to(device) * ends[1]  # (points, d)
    attrs = torch.stack([attribute_table([(q, t) for t in sample_texts(
        policy, tokenizer, q, path, points, config["interpolation_samples"], config, device)]).view(points, -1, 3)
        for q in prompts], 1)  # (points, Q, S, 3)
    mean = attrs.mean((1, 2))
    return {"weights": weights, "length": mean[:, 0], "tone": mean[:, 1], "relevance": mean[:, 2],
            "users": (users.labels[a], users.labels[b])}


def score_summary(scores, users, n, prefix=""):
    """{metric@n: value}: mean ± SEM over users of user_scores(), and per dimension the
    Spearman correlation between true preference and attribute."""
    out = {f"{prefix}{key}@{n}": mean_sem(scores[key]) for key in ("normalised", "relevance", "length", "tone")}
    for d, attribute in enumerate(world.ATTRIBUTES):
        out[f"{prefix}spearman_{attribute}@{n}"] = spearman(users.preferences[:, d], scores[attribute])
    return out


def prompt_rows(users, u, prompts):
    return torch.tensor([r for r in users.rows[u].tolist() if users.prompt_of[r] in prompts], dtype=torch.long)


# -----------------------------------------------------------------------------
# everything, per policy


def evaluate_world(policies, users, token_pairs, tokenizer, config, device, reranker=None):
    """{model: {metric: value}} for every policy (and 'reference'), all on the same users,
    prompts and contexts. config is evaluate.py's (num_context, seed, policy_eval); a reranker
    picks NP-DPO's generations (generation_attributes)."""
    p = config["policy_eval"]  # prompts, samples, reference_samples, interpolation_samples, repeats, ...
    sizes, seed = sorted(config["num_context"]), config["seed"]
    prompts = eval_prompts(users.split, p["prompts"])
    torch.manual_seed(seed)
    ref_attrs, reference, best = reference_and_best(next(iter(policies.values()))[0], users, tokenizer, prompts, p, device)
    results = {"reference": {"relevance": ref_attrs[..., 2].mean().item(), "reference_reward": reference.mean().item(),
                             "best_reward": best.mean().item(), "temperature": p["temperature"],
                             "reference_temperature": p.get("reference_temperature") or p["temperature"]}}
    limit_gen = torch.Generator().manual_seed(seed)  # NP-DPO's draws, in NP-DPO's order
    for n in sizes:
        results["reference"][f"bayes_limit@{n}"] = mean_sem(bayes_limit(users, prompts, n, limit_gen, ref_attrs))
    for name, (policy, role) in policies.items():
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        res = {}
        for n in (sizes if role == "np_dpo" else [None]):
            attrs = generation_attributes(policy, role, users, tokenizer, prompts, n, p, gen, device,
                                          reranker if role == "np_dpo" else None)
            scores = user_scores(attrs, users, reference, best)
            res.update(score_summary(scores, users, n))
            if n in (None, sizes[-1]):  # the scatter of the plot
                res["scatter"] = {"preference": users.preferences.tolist(),
                                  **{a: scores[a].tolist() for a in world.ATTRIBUTES}}
        if role == "known":  # the few-shot ceiling: z = the Bayes posterior mean of NP-DPO's contexts
            posterior_gen = torch.Generator().manual_seed(seed)  # NP-DPO's draws, in NP-DPO's order
            for n in sizes:
                attrs = generation_attributes(policy, "posterior", users, tokenizer, prompts, n, p, posterior_gen,
                                              device)
                res.update(score_summary(user_scores(attrs, users, reference, best), users, n, "posterior_"))
        if role in ("np_dpo", "known"):
            path = interpolation(policy, role, users, tokenizer, prompts, p, gen, device)
            for attribute in ("length", "tone"):
                res[f"interpolation_{attribute}"] = spearman(path["weights"], path[attribute])
            res["interpolation_path"] = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in path.items()}
        results[name] = res
    accuracy = implicit_accuracy(policies, users, token_pairs, tokenizer.pad_token_id, sizes, p["repeats"], seed, device)
    for (name, n, kind), values in accuracy.items():
        results.setdefault(name, {})[f"implicit_{kind}@{n}"] = mean_sem(values)
    return results


# -----------------------------------------------------------------------------
# steering against questions asked (queries.py)


def question_contexts(users, belief, strategy, prompt, questions, seed, pool=0):
    """Each user's answers, chosen first, to K questions picked by `strategy` (U, K, 2, D), the
    asked rows (U, K) and the answers (U, K; True = b chosen). The candidates: the user's own
    answered pairs not on `prompt`, or (pool > 0) `pool` random pairs of the split not on it,
    answered by the simulated user (TestUsers.simulated_answers). The same candidates and
    answers for every strategy; infogain is about 16 random pairs of the split, and so is
    'bayes-active', the limit: greedy EPIG under the exact posterior (BAYES_GRID), no model."""
    import queries

    split_rows = torch.cat(users.rows)  # a pair once per user who answered it
    off_prompt = torch.tensor([r for r in torch.unique(split_rows).tolist() if users.prompt_of[r] != prompt])
    if pool > len(off_prompt):  # pool 0: the user's own pairs below
        raise ConfigError(f"query.world_pool = {pool}, but split '{users.split}' has {len(off_prompt)} pairs off "
                         f"the prompt '{prompt}'")
    contexts, asked, chosen = [], [], []
    for u in range(len(users.labels)):
        gen = torch.Generator().manual_seed(seed + u)
        if pool:
            rows = off_prompt[torch.randperm(len(off_prompt), generator=gen)[:pool]]
            second = users.simulated_answers(rows, u, gen)
        else:
            rows = torch.tensor([r for r in users.rows[u].tolist() if users.prompt_of[r] != prompt])
            second = users.answers(rows, u)
        cand, answers = queries.shown(chosen_first(users.data.pairs[rows], second)[None], gen)  # all: same targets
        target_rows = split_rows[torch.randint(len(split_rows), (16,), generator=gen)]
        if strategy == "bayes-active":  # the limit: the exact posterior chooses
            p_b = [torch.sigmoid(users.margins(r)).T for r in (rows, target_rows)]  # (G, C), (G, 16)
            picks = queries.exact_active(*p_b, second, questions, gen)[None]
            context = chosen_first(users.data.pairs[rows[picks]], second[picks])
        else:
            targets = users.data.pairs[target_rows][None]
            context, picks = queries.ask(belief, strategy, cand, answers, questions, targets, gen)
        contexts.append(context[0])
        asked.append(rows[picks[0]])
        chosen.append(second[picks[0]])
    return torch.stack(contexts), torch.stack(asked), torch.stack(chosen)


@torch.no_grad()
def question_curves(policies, belief, users, tokenizer, strategies, config, device):
    """{(model, strategy, n): {'normalised', 'relevance'} (mean, SEM over users), 'users': normalised (U,)}:
    generations steered by the user's answers to the first n questions that `belief` (a reward model
    on the same context features) chose by `strategy`. NP-DPO reads the answers with its encoder; a
    known-preference policy is scored as the few-shot ceiling, at the Bayes posterior mean of the
    same answers (model 'NAME@posterior'); model 'Bayes limit' is the Bayes decision given them
    (bayes_limit). The same users, prompts and sampling seeds for every
    strategy; random questions are today's random contexts. With infogain, Bayes-active too."""
    p, sizes, seed = config["policy_eval"], sorted(config["num_context"]), config["seed"]
    prompts = eval_prompts(users.split, p["prompts"])
    torch.manual_seed(seed)
    ref_attrs, reference, best = reference_and_best(next(iter(policies.values()))[0], users, tokenizer, prompts, p,
                                                    device)
    pool = config.get("query", {}).get("world_pool", 0)
    strategies = [*strategies, "bayes-active"] if "infogain" in strategies else strategies
    asked = {(s, q): question_contexts(users, belief, s, q, max(sizes), seed, pool)
             for s in strategies for q in prompts}
    out = {}
    grid, truth = decision_tables(users, ref_attrs)
    for strategy, n in ((s, n) for s in strategies for n in sizes):  # the Bayes limit of the same answers
        scores = torch.stack([bayes_decision(users.posterior_weights(*(a[:, :n] for a in asked[(strategy, q)][1:])),
                                             grid, truth) for q in prompts]).mean(0)
        out[("Bayes limit", strategy, n)] = {"normalised": mean_sem(scores), "users": scores, "relevance": (1.0, 0.0)}
    for name, (policy, role) in policies.items():
        if role not in ("np_dpo", "known"):
            continue
        for strategy in strategies:
            for n in sizes:
                torch.manual_seed(seed + n)
                latents = {q: policy.infer_latent(asked[(strategy, q)][0][:, :n].to(device)) if role == "np_dpo"
                           else users.posterior_latents(*(a[:, :n] for a in asked[(strategy, q)][1:])).to(device)
                           for q in prompts}
                attrs = torch.stack([attribute_table([(q, t) for t in sample_texts(
                    policy, tokenizer, q, latents[q], len(users.labels), p["samples"], p, device)]).view(
                    len(users.labels), p["samples"], 3) for q in prompts], 1)
                scores = user_scores(attrs, users, reference, best)
                model = name if role == "np_dpo" else f"{name}@posterior"
                out[(model, strategy, n)] = {"normalised": mean_sem(scores["normalised"]), "users": scores["normalised"],
                                             "relevance": mean_sem(scores["relevance"])}
    return out
