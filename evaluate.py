"""
Accuracy on a user's unseen pairs as the context grows, for one or more trained
reward models, side by side on identical episodes.

    python evaluate.py runs/synthetic_np_btl
    python evaluate.py runs/synthetic_np_btl runs/synthetic_btl runs/synthetic_dpl --plot
    python evaluate.py runs/synthetic_np_btl/ckpt_last.pt --split=val --num-context=[0,1,2,4]
    python evaluate.py runs/synthetic_np_btl --queries=random,uncertainty,infogain --plot

With --queries, accuracy is scored against the number of questions asked, each chosen by
a strategy (queries.py) from a pool of the user's pairs, beside Bayes-random and
Bayes-active; policies of the steering world are scored by normalised gold reward, their
questions chosen by the reward run query.selector. It writes queries.json (and
queries.png), never over eval.json.

Each context size n gets `episodes` episodes (a count fixed in advance, so there is no
stopping on a lucky batch) of one label each: n context pairs and num_targets target
pairs, disjoint, labels balanced (round-robin). The SEM is over episodes; a SEM above
`max_sem` is flagged (!). On data from a known generator (the paper's task, the waves
and linear user types: exact posterior; a continuous linear population: importance
sampling over the population prior, whose Monte Carlo error is reported and added to
its SEM), the Bayes-optimal accuracy on the same episodes is printed beside the
models, with each model's gap to it. A stochastic NP-BTL is scored twice: at the mean
of q(z | context) and by its posterior predictive over `predict_samples` draws.

Writes eval.json (a list of rows: model, num_context, label, accuracy, sem, episodes)
to `out` (default: the first run dir); --plot also writes accuracy.png and, for
one-dimensional options, reward_curves.png (the learned r(y) per user type given
10 context pairs, the paper's figure); policy runs of the toy task get steering.png.
eval.json is written before the plots. A relative data path recorded in a run is
looked up from here, then from the folder the run was trained in.
"""

import functools
import json
import math
import os

import torch

from common import (CheckpointError, ConfigError, check, check_positive, load_config, pick_device, read_yaml,
                    run_script)
from runs import load_checkpoint, resolve_path, run_in_use
from data import DataError, EpisodeSampler, chosen_first, load_pairs, true_rewards
from runs import check_out_path
from bayes import bayes_log_prob_chosen, population_log_prob_chosen
from reward import load_reward_model, run_data_path
from data import choice_correct

DEFAULTS = {
    "split": "test",  # train | val | test
    "num_context": [0, 1, 3, 5, 10],  # context sizes n to score
    "num_targets": 50,  # target pairs per episode
    "episodes": 4000,  # episodes per context size, fixed in advance: no stopping once the SEM looks good
    "max_sem": 0.002,  # the target SEM (fraction, 0.002 = 0.2 points); a SEM above it is flagged (!)
    "chunk": 500,  # episodes per forward
    "predict_samples": 64,  # stochastic NP-BTL: also score its posterior predictive over this many z (0 = off)
    "bayes_samples": 16000,  # prior draws of the Monte Carlo Bayes reference (continuous populations)
    "max_label_rows": 20,  # more labels than this: report and check only the overall row
    "seed": 1234,  # episode sampling
    "plot": False,  # write accuracy.png (and reward_curves.png for 1-D options)
    "out": None,  # where eval.json and plots go; default: the first run dir
    "device": "cpu",  # cpu | cuda | auto
    "queries": "",  # reward runs: compare question strategies instead, e.g. random,uncertainty,infogain (queries.py)
    "query": {  # --queries only; writes queries.json (and queries.png), not eval.json
        "pool": 100,  # candidate questions per episode: answered pairs of the user, disjoint from the targets
        "questions": 10,  # questions asked, greedily one after another
        "episodes": 4000,  # episodes, fixed in advance
        "target_inputs": 16,  # unlabelled pairs of the split whose answers infogain is about
        "samples": 8,  # a stochastic NP-BTL's draws of z per look-ahead prediction
        "lookahead": True,  # infogain by the model's look-ahead (false: EPIG from draws of q(z | context))
        "bayes_samples": 2000,  # prior draws of the Bayes belief that chooses questions (populations)
        "selector": "",  # policy runs: the reward run that chooses the questions (NP-BTL on the same features)
    },
    "policy_eval": {  # policies only
        "episodes": 256,  # implicit-reward episodes per n (labels balanced)
        "num_targets": 8,  # conflicting target pairs per episode
        "batch_episodes": 64,  # episodes per forward
        "contexts_per_prompt": 16,  # user contexts drawn per test prompt, label and n
        "samples_per_context": 4,  # responses sampled per context
        "max_new_tokens": 40,  # response length cap
        "temperature": 1.0,  # sampling temperature
        "prompts": 8,  # steering world: evaluated test prompts
        "samples": 4,  # steering world: responses per user, prompt and n
        "reference_samples": 64,  # steering world: reference responses per prompt
        "interpolation_samples": 32,  # steering world: responses per prompt at each interpolation point
        "repeats": 4,  # steering world: random contexts per user and n for implicit-reward accuracy
    },
}
ALIASES = {"num-context": "num_context", "max-sem": "max_sem"}
BAYES = "bayes_optimal"


def run_dir_of(path):
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def load_models(paths, device):
    """{name: model} for run dirs or checkpoint files that share one data file."""
    data_paths = [run_data_path(p) for p in paths]
    if len({os.path.realpath(p) for p in data_paths}) != 1:
        raise ConfigError(f"the models were trained on different data files {sorted(set(data_paths))}")
    data = load_pairs(data_paths[0])
    models = {}
    for path in paths:
        name = os.path.basename(os.path.normpath(run_dir_of(path)))
        models[name if name not in models else path], _ = load_reward_model(path, data.dim, device, data.path)
    return models, data


def sem(values):
    return (values.std(unbiased=True) / len(values) ** 0.5).item() if len(values) > 1 else float("inf")


def predictors(models, config):
    """{row name: batch -> log P(chosen) (B, T)}. A stochastic NP-BTL is scored twice: at the
    mean of q(z | context), and by its posterior predictive (config predict_samples)."""
    out = {}
    for name, model in models.items():
        if getattr(model, "stochastic", False) and config["predict_samples"] > 0:
            out[f"{name} (mean z)"] = functools.partial(model.log_prob_chosen, samples=0)
            out[f"{name} (predictive)"] = functools.partial(model.log_prob_chosen, samples=config["predict_samples"])
        else:
            out[name] = model.log_prob_chosen
    return out


def bayes_reference(meta, batch, config):
    """The Bayes-optimal log P(chosen) (B, T) or None, and for a continuous population the
    Monte Carlo groups' log P(chosen) (G, B, T), whose spread is the reference's own error."""
    if meta.get("generator") == "linear_population":
        return population_log_prob_chosen(meta, batch, config["bayes_samples"], seed=config["seed"])
    return bayes_log_prob_chosen(meta, batch), None


def mc_error(group_accs):
    """Monte Carlo error of the reference's mean accuracy: the spread of its independent sample groups."""
    if not group_accs:
        return 0.0
    means = torch.cat(group_accs, 1).mean(1)  # (G,)
    return (means.std() / len(means) ** 0.5).item()


@torch.no_grad()
def score_context_size(predict, data, sampler, n, config, device):
    """Per-episode accuracies {name: (E,)} on config['episodes'] episodes (a count fixed in
    advance), their label rows (E,) and the Bayes reference's Monte Carlo error (0 if exact)."""
    sampler.gen.manual_seed(config["seed"] + n)
    torch.manual_seed(config["seed"] + n)  # the predictive's draws of z
    accs, group_accs, label_rows = {name: [] for name in list(predict) + [BAYES]}, [], []
    for start in range(0, config["episodes"], config["chunk"]):
        rows = torch.arange(start, min(start + config["chunk"], config["episodes"])) % len(sampler.labels)
        batch = sampler.sample(len(rows), num_context=n, label_rows=rows)  # labels balanced, round-robin
        label_rows.append(rows)
        on_device = {k: v.to(device) for k, v in batch.items()}
        for name, log_prob_chosen in predict.items():
            accs[name].append(choice_correct(log_prob_chosen(on_device)).mean(1).cpu())
        bayes, groups = bayes_reference(data.meta, batch, config)
        if bayes is not None:
            accs[BAYES].append(choice_correct(bayes).float().mean(1))
        if groups is not None:
            group_accs.append(choice_correct(groups).mean(2))  # (G, B)
    return {k: torch.cat(v) for k, v in accs.items() if v}, torch.cat(label_rows), mc_error(group_accs)


def table_rows(accs, label_rows, labels, n, max_label_rows, mc=0.0):
    """Rows of accuracy and SEM over episodes; the Bayes reference's SEM includes its Monte Carlo error `mc`."""
    rows = []
    for name, acc in accs.items():
        groups = [(label, label_rows == i) for i, label in enumerate(labels)] if len(labels) <= max_label_rows else []
        for label, mask in groups + [("all", torch.ones_like(label_rows, dtype=torch.bool))]:
            error = mc if name == BAYES else 0.0
            rows.append({"model": name, "num_context": n, "label": label, "accuracy": acc[mask].mean().item(),
                         "sem": math.hypot(sem(acc[mask]), error), "episodes": int(mask.sum()),
                         **({"mc_error": error} if name == BAYES else {})})
    return rows


def markdown(rows, sizes, max_sem):
    """One line per (model, label), one column per n: accuracy ± sem in points."""
    cell = {(r["model"], r["label"], r["num_context"]): r for r in rows}
    keys = list(dict.fromkeys((r["model"], r["label"]) for r in rows))
    lines = ["| model | label | " + " | ".join(f"n={n}" for n in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for model, label in keys:
        cells = []
        for n in sizes:
            r = cell[(model, label, n)]
            flag = "" if r["sem"] <= max_sem else " (!)"
            cells.append(f"{100 * r['accuracy']:.2f} ± {100 * r['sem']:.2f}{flag}")
        lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_gaps(rows, gaps, n):
    """Each model's overall row at n gains its gap to Bayes-optimal and that gap's SEM."""
    for row in rows:
        if (row["model"], n) in gaps and row["num_context"] == n and row["label"] == "all":
            diff, mc = gaps[(row["model"], n)]
            row.update(gap_to_bayes=diff.mean().item(), gap_sem=math.hypot(sem(diff), mc))


def gap_lines(gaps, sizes):
    """gaps: {(model, n): (per-episode accuracy minus Bayes-optimal accuracy on the same
    episodes, the reference's Monte Carlo error)}."""
    if not gaps:
        return "Bayes-optimal accuracy: not available for this data (unknown generator)."
    lines = ["Gap to Bayes-optimal on the same episodes, overall (points, ± SEM of the paired difference, "
             "with the reference's Monte Carlo error where it has one):"]
    for model in dict.fromkeys(m for m, _ in gaps):
        cells = []
        for n in sizes:
            diff, mc = gaps[(model, n)]
            cells.append(f"n={n} {100 * diff.mean().item():+.2f} ± {100 * math.hypot(sem(diff), mc):.2f}")
        lines.append(f"  {model}: " + ", ".join(cells))
    return "\n".join(lines)


MARKERS, LINESTYLES = "osD^vPX", ["-", "--", "-.", (0, (3, 1, 1, 1, 1, 1))]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; without matplotlib, --plot is an error."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("config key 'plot': --plot needs matplotlib, which is not installed here "
                          "(pip install matplotlib, or drop --plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def model_styles(names):
    """One look per model, the same in every panel. Colour, marker and line style all differ,
    so curves that lie on top of each other (BTL and DPL often do) stay distinguishable."""
    names = list(dict.fromkeys(names))
    models = [name for name in names if name != BAYES]
    styles = {name: {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)], "markersize": 6,
                     "linestyle": LINESTYLES[i % len(LINESTYLES)]} for i, name in enumerate(models)}
    for name in models[1::2]:  # hollow markers: a point under another one still shows
        styles[name]["markerfacecolor"] = "white"
    if BAYES in names:
        styles[BAYES] = {"color": "k", "marker": "*", "markersize": 9, "linestyle": ":"}
    return styles


def x_offsets(names, sizes):
    """A small horizontal shift per model (context sizes), so error bars at one n do not hide each other."""
    gaps = [b - a for a, b in zip(sizes, sizes[1:])]
    step = min(0.08 * min(gaps), 0.012 * (sizes[-1] - sizes[0])) if gaps else 0.08  # well inside a gap, yet visible
    return {name: (i - (len(names) - 1) / 2) * step for i, name in enumerate(names)}


def errorbar_curve(ax, xs, ys, errors, style, label):
    ax.errorbar(xs, ys, yerr=errors, capsize=4, elinewidth=1.5, capthick=1.5, label=label, **style)


def save_figure(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(rows, sizes, where, path):
    """Overall accuracy against n per model, with the Bayes-optimal curve where known."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = list(dict.fromkeys(r["model"] for r in rows))
    styles, offsets = model_styles(names), x_offsets(names, sizes)
    for model in names:
        overall = sorted((r for r in rows if r["model"] == model and r["label"] == "all"), key=lambda r: r["num_context"])
        errorbar_curve(ax, [r["num_context"] + offsets[model] for r in overall], [100 * r["accuracy"] for r in overall],
                       [100 * r["sem"] for r in overall], styles[model], model)
    ax.set_title(f"Accuracy on a user's unseen pairs against context size\n{where}; error bars ±1 SEM over episodes",
                 fontsize=9)
    ax.set_xlabel("context pairs n (pairs from the same user)")
    ax.set_ylabel("accuracy on unseen target pairs (%)")
    ax.set_xticks(sizes)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    save_figure(plt, fig, path)


@torch.no_grad()
def plot_reward_curves(models, data, sampler, where, path, num_context=10):
    """Learned reward against y per user type given `num_context` context pairs. BTL rewards
    are identified only up to shift and scale, so each curve is standardised (z-scored)."""
    plt = pyplot()
    grid = torch.linspace(0, 1, 201)[:, None]  # (G, 1)
    standardise = lambda r: (r - r.mean()) / r.std()
    truth = true_rewards(data.meta, grid)  # (G, K) or None
    styles = model_styles(models)
    fig, axes = plt.subplots(1, len(sampler.labels), figsize=(4.5 * len(sampler.labels), 4.4), squeeze=False)
    for row, (ax, label) in enumerate(zip(axes[0], sampler.labels)):
        batch = sampler.sample(1, num_context=num_context, label_rows=torch.tensor([row]))
        if truth is not None and row < truth.shape[1]:
            ax.plot(grid[:, 0], standardise(truth[:, row]), color="0.7", linewidth=4, label="true reward", zorder=0)
        for name, model in models.items():
            latent = model.infer_latent(batch["context"], batch["context_mask"]) if hasattr(model, "infer_latent") else None
            r = model.rewards(grid[None].to(next(model.parameters()).device), latent)[0].cpu()
            ax.plot(grid[:, 0], standardise(r), markevery=25, label=name, **styles[name])
        ax.set_title(f"user type {label}", fontsize=9)
        ax.set_xlabel("option feature y")
        ax.set_ylabel("reward, standardised (z-score)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: the curves stay visible
    fig.suptitle(f"Learned reward r(y) given n={num_context} context pairs, {where}\n"
                 "only the ordering of rewards is identifiable (BTL: any shift and scale fit equally), "
                 "so each curve is standardised", fontsize=9)
    save_figure(plt, fig, path)


def plot_reward_figures(models, data, sampler, rows, sizes, split, out):
    """accuracy.png, and reward_curves.png for 1-D options; returns the names written."""
    where = f"split '{split}' of {data.path}"
    plot_accuracy(rows, sizes, where, os.path.join(out, "accuracy.png"))
    if data.dim != 1:
        return ["accuracy.png"]
    plot_reward_curves(models, data, sampler, where, os.path.join(out, "reward_curves.png"))
    return ["accuracy.png", "reward_curves.png"]


# -----------------------------------------------------------------------------
# policies: implicit-reward accuracy and steering by generation


def is_policy_checkpoint(path):
    return "policy_config" in load_checkpoint(path)


def policy_role(policy, run_config):
    """'np_dpo', 'known' (FiLM on the users' true preferences), 'dpo', or 'oracle:<label>'
    for a DPO policy trained on one label only."""
    if policy.encoder is not None:
        return "np_dpo"
    if policy.film is not None:
        return "known"
    labels = run_config["data"]["labels"]
    return f"oracle:{labels[0]}" if labels and len(labels) == 1 else "dpo"


def load_policies(paths, device):
    """{name: (policy, role)}, and the shared evaluation inputs of the first run."""
    from policy import load_policy
    from text import load_inputs

    policies, first, configs = {}, None, {}
    for path in paths:
        policy, checkpoint = load_policy(path if not os.path.isdir(path) else os.path.join(path, "ckpt_best.pt"),
                                         device=device)
        first = first or checkpoint
        name = os.path.basename(os.path.normpath(run_dir_of(path)))
        if name in policies:
            raise ConfigError(f"two runs are named {name}: give runs in folders of different names")
        policies[name] = (policy.eval(), policy_role(policy, checkpoint["config"]))
        configs[name] = checkpoint["config"]
    d = first["config"]["data"]
    first_config = dict(first["config"], data=dict(d, pairs=resolve_path(d["pairs"], first),
                                                   features=resolve_path(d["features"], first)))
    inputs_config = dict(first_config, data=dict(first_config["data"], labels=None, toy=False))
    data, token_pairs, tokenizer = load_inputs(inputs_config)
    first_config["run_configs"] = configs
    return policies, data, token_pairs, tokenizer, first_config


def conflicting_only(data):
    """The same pairs, with choices kept only where every label answered and not all agree."""
    answered = (data.choices >= 0).all(1)
    conflict = answered & (data.choices.min(1).values != data.choices.max(1).values)
    choices = torch.where(conflict[:, None], data.choices, torch.full_like(data.choices, -1))
    return type(data)(data.pairs, choices, data.labels, data.split, data.meta, data.path)


@torch.no_grad()
def implicit_reward_rows(policies, data, token_pairs, pad_id, config, device):
    """DPO implicit-reward accuracy on held-out conflicting pairs, per label and n."""
    from policy import implicit_reward, policy_and_reference_logprobs
    from text import episode_batch

    p = config["policy_eval"]
    conflicts = conflicting_only(data)
    sampler = EpisodeSampler(conflicts, config["split"], p["num_targets"], max(config["num_context"]), seed=config["seed"])
    rows = []
    for n in sorted(config["num_context"]):
        sampler.gen.manual_seed(config["seed"] + n)
        label_rows = torch.arange(p["episodes"]) % len(sampler.labels)
        per_model = {name: [] for name in policies}
        for start in range(0, p["episodes"], p["batch_episodes"]):
            chunk = label_rows[start:start + p["batch_episodes"]]
            episodes = sampler.sample(len(chunk), num_context=n, label_rows=chunk)
            batch = episode_batch(episodes, token_pairs, pad_id, device)
            for name, (policy, _) in policies.items():
                chosen, rejected, ref_chosen, ref_rejected = policy_and_reference_logprobs(policy, batch)
                margin = implicit_reward(chosen, ref_chosen) - implicit_reward(rejected, ref_rejected)  # (E * T,)
                correct = (margin > 0).float() + 0.5 * (margin == 0).float()
                per_model[name].append(correct.view(len(chunk), -1).mean(1).cpu())
        accs = {name: torch.cat(v) for name, v in per_model.items()}
        rows += table_rows(accs, label_rows, sampler.labels, n, config["max_label_rows"])
    return rows


def user_contexts(data, candidates, exclude_prompt_rows, n, count, gen):
    """`count` contexts of n pairs (count, n, 2, D), chosen first, drawn from `candidates`
    (rows, label column) minus the rows of the evaluated prompt."""
    rows, column = candidates
    allowed = rows[~torch.isin(rows, exclude_prompt_rows)]
    picks = torch.rand(count, len(allowed), generator=gen).argsort(1)[:, :n]  # (count, n)
    pair_idx = allowed[picks]
    return chosen_first(data.pairs[pair_idx], data.choices[pair_idx, column].bool())  # (count, n, 2, D)


@torch.no_grad()
def sample_responses(policy, tokenizer, prompt, count, samples, latent, config, device):
    """`count` * `samples` responses to one prompt (texts), row r*samples + s from latent row r."""
    from text import tokenize_prompt

    p = config["policy_eval"]
    prompt_ids = torch.tensor([tokenize_prompt(tokenizer, prompt)] * count, device=device)
    out = policy.generate(prompt_ids, torch.ones_like(prompt_ids), latent=latent, do_sample=True,
                          temperature=p["temperature"], num_return_sequences=samples,
                          max_new_tokens=p["max_new_tokens"], pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, prompt_ids.shape[1]:], skip_special_tokens=True)


def steering_rows(policies, data, tokenizer, text_rows, config, device):
    """Gold reward of generations for every label and n, and win-rate against plain DPO."""
    from toy import toy_gold_reward

    p, split = config["policy_eval"], config["split"]
    torch.manual_seed(config["seed"])
    gen = torch.Generator().manual_seed(config["seed"])
    in_split = torch.from_numpy(data.split == split)
    prompts = sorted({row["prompt"] for row, keep in zip(text_rows, in_split.tolist()) if keep})
    prompt_rows = {q: torch.tensor([i for i, row in enumerate(text_rows) if row["prompt"] == q]) for q in prompts}
    count, samples = p["contexts_per_prompt"], p["samples_per_context"]
    scores = {}  # (model, label, n) -> (prompts * count, samples) gold rewards
    for name, (policy, role) in policies.items():
        for j, label in enumerate(data.labels):
            candidates = (torch.nonzero(in_split & (data.choices[:, j] >= 0)).squeeze(1), j)
            if role.startswith("oracle:") and role != f"oracle:{label}":
                continue
            for n in sorted(config["num_context"]) if role == "np_dpo" else [None]:
                per_prompt = []
                for q in prompts:
                    latent = None
                    if role == "np_dpo":
                        context = user_contexts(data, candidates, prompt_rows[q], n, count, gen).to(device)
                        latent = policy.infer_latent(context)
                    texts = sample_responses(policy, tokenizer, q, count, samples, latent, config, device)
                    per_prompt.append(torch.tensor([toy_gold_reward(q, t, label) for t in texts]).view(count, samples))
                scores[(name, label, n)] = torch.cat(per_prompt)
    return scores


def steering_table(scores, policies, labels, sizes):
    """Rows of gold reward (and win-rate against plain DPO) and their Markdown table.
    A policy without a context encoder has one row per label (num_context None),
    repeated in every column of the table."""
    dpo = next((name for name, (_, role) in policies.items() if role == "dpo"), None)
    rows, lines = [], ["| model | label | " + " | ".join(f"n={n}" for n in sizes) + " |",
                       "|---|---|" + "---|" * len(sizes)]
    for (name, label, n), s in scores.items():
        row = {"model": name, "num_context": n, "label": label, "gold_reward": s.mean().item(),
               "sem": sem(s.mean(1)), "samples": s.numel()}
        if dpo is not None and name != dpo:
            wins = (s > scores[(dpo, label, None)]).float() + 0.5 * (s == scores[(dpo, label, None)]).float()
            row.update(win_rate=wins.mean().item(), win_rate_sem=sem(wins.mean(1)))
        rows.append(row)
    cell = {(r["model"], r["label"], r["num_context"]): r for r in rows}
    for name, label in dict.fromkeys((r["model"], r["label"]) for r in rows):
        cells = []
        for n in sizes:
            r = cell.get((name, label, n)) or cell[(name, label, None)]
            cells.append(f"{r['gold_reward']:.3f} ± {r['sem']:.3f}" + (f" (win {r['win_rate']:.2f})" if "win_rate" in r else ""))
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def closure_lines(rows, policies, labels, sizes):
    """Share of the gap from plain DPO to each label's oracle that NP-DPO closes at each n."""
    gold = {(r["model"], r["label"], r["num_context"]): r["gold_reward"] for r in rows}
    roles = {role: name for name, (_, role) in policies.items()}
    if "dpo" not in roles or "np_dpo" not in roles:
        return "Gap closure needs a plain DPO run and an NP-DPO run."
    lines = ["Gap closure (NP-DPO - DPO) / (oracle - DPO), gold reward:"]
    for label in labels:
        oracle = roles.get(f"oracle:{label}")
        if oracle is None:
            lines.append(f"  {label}: no oracle run given")
            continue
        base, top = gold[(roles["dpo"], label, None)], gold[(oracle, label, None)]
        curve = [gold[(roles["np_dpo"], label, n)] for n in sizes]
        rising = all(b >= a for a, b in zip(curve, curve[1:]))
        lines.append(f"  {label}: " + ", ".join(f"n={n} {100 * (g - base) / (top - base):.1f}%" for n, g in zip(sizes, curve))
                     + f"; gold reward {'rises' if rising else 'does not rise'} monotonically with n")
    return "\n".join(lines)


def plot_steering(rows, labels, sizes, where, out):
    """Gold reward against n per user type: a curve for each NP-DPO policy, a flat line with a
    ±SEM band for each policy without an encoder. Each model keeps one look in every panel."""
    plt = pyplot()
    names = list(dict.fromkeys(r["model"] for r in rows))
    styles = model_styles(names)
    offsets = x_offsets([m for m in names if any(r["num_context"] is not None for r in rows if r["model"] == m)], sizes)
    fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 4.6), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for model in names:
            mine = sorted((r for r in rows if r["model"] == model and r["label"] == label),
                          key=lambda r: -1 if r["num_context"] is None else r["num_context"])
            if mine and mine[0]["num_context"] is not None:
                errorbar_curve(ax, [r["num_context"] + offsets[model] for r in mine], [r["gold_reward"] for r in mine],
                               [r["sem"] for r in mine], styles[model], model)
            elif mine:
                flat, style = mine[0], dict(styles[model], marker=None)
                ax.axhline(flat["gold_reward"], label=f"{model} (no context)", **style)
                ax.axhspan(flat["gold_reward"] - flat["sem"], flat["gold_reward"] + flat["sem"], color=style["color"],
                           alpha=0.15)
        ax.set_title(f"user type {label}", fontsize=9)
        ax.set_xlabel("context pairs n (pairs from the same user)")
        ax.set_ylabel("gold reward of sampled responses (a.u.)")
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: the lines stay visible
    fig.suptitle(f"Steering by generation: gold reward against context size, {where}\n"
                 "error bars and bands ±1 SEM over prompt x context", fontsize=9)
    save_figure(plt, fig, os.path.join(out, "steering.png"))
    return ["steering.png"]


def plot_world(results, groups, roles, sizes, out):
    """steering.png: normalised reward against n; attribute against true preference at the
    largest n (first seed of each model); attribute against interpolation weight."""
    from steer_eval import over_seeds

    plt = pyplot()
    styles = model_styles(list(groups))
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    for group, names in groups.items():
        style, np_dpo = styles[group], roles[names[0]] == "np_dpo"
        if np_dpo:
            stats = [over_seeds(results, names, f"normalised@{n}") for n in sizes]
            errorbar_curve(axes[0], sizes, [100 * m for m, _ in stats], [100 * (0 if math.isnan(s) else s) for _, s in stats],
                           style, group)
        else:
            mean, _ = over_seeds(results, names, "normalised@None")
            axes[0].axhline(100 * mean, label=f"{group} (no context)", **dict(style, marker=None))
        scatter = results[names[0]]["scatter"]
        prefs = torch.tensor(scatter["preference"])
        for ax, d, attribute in ((axes[1], 0, "length"), (axes[2], 1, "tone")):
            ax.scatter(prefs[:, d], scatter[attribute], s=10, color=style["color"], marker=style["marker"], label=group)
        if "interpolation_path" in results[names[0]]:
            path = results[names[0]]["interpolation_path"]
            axes[3].plot(path["weights"], path["length"], color=style["color"], marker="o", label=f"{group}: length")
            axes[3].plot(path["weights"], [3.5 + 2.5 * t for t in path["tone"]], color=style["color"], marker="s",
                         linestyle="--", label=f"{group}: tone (scaled to 1-6)")
    axes[0].set(xlabel="context pairs n", ylabel="normalised gold reward (%)", xticks=sizes,
                title="0 % = reference, 100 % = each user's optimum")
    axes[1].set(xlabel="user's preferred length", ylabel="mean sentences generated", title=f"n = {sizes[-1]}")
    axes[2].set(xlabel="user's preferred tone", ylabel="mean tone generated", title=f"n = {sizes[-1]}")
    axes[3].set(xlabel="interpolation weight", ylabel="attribute", title="latent path between two opposite users")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(plt, fig, os.path.join(out, "steering.png"))
    return ["steering.png"]


def evaluate_policies(paths, config, device):
    """Rows for eval.json and the function that draws the plots into a folder (None: no plots)."""
    from text import read_text_pairs

    policies, data, token_pairs, tokenizer, run_config = load_policies(paths, device)
    sizes = sorted(config["num_context"])
    if run_config["data"].get("world") == "continuum":
        return evaluate_world_policies(policies, data, token_pairs, tokenizer, run_config, config, device)
    rows = implicit_reward_rows(policies, data, token_pairs, tokenizer.pad_token_id, config, device)
    print(f"DPO implicit-reward accuracy (points ± SEM) on held-out conflicting pairs, split '{config['split']}'\n")
    print(markdown(rows, sizes, float("inf")))
    if not run_config["data"]["toy"]:
        print("\nSteering by generation needs gold rewards: only the toy task has them.")
        return rows, None
    text_rows = read_text_pairs(run_config["data"]["pairs"], run_config["data"]["skip_bad_lines"])
    scores = steering_rows(policies, data, tokenizer, text_rows, config, device)
    steer_rows, table = steering_table(scores, policies, data.labels, sizes)
    print("\nGold reward of sampled responses (± SEM over prompt x context; win = win-rate against plain DPO)\n")
    print(table + "\n\n" + closure_lines(steer_rows, policies, data.labels, sizes))
    where = f"split '{config['split']}' of {run_config['data']['pairs']}"
    return rows + steer_rows, functools.partial(plot_steering, steer_rows, data.labels, sizes, where)


def evaluate_world_policies(policies, data, token_pairs, tokenizer, run_config, config, device):
    """The steering world (steer_eval.py): rows for eval.json, the tables, and the plots."""
    import steer_eval
    from text import read_text_pairs

    text_rows = read_text_pairs(run_config["data"]["pairs"], run_config["data"]["skip_bad_lines"])
    if "preferences" not in data.meta:
        raise DataError(f"{run_config['data']['preferences']}: the users' preferences are needed to score steering")
    users = steer_eval.TestUsers(data, text_rows, config["split"])
    results = steer_eval.evaluate_world(policies, users, token_pairs, tokenizer, config, device)
    groups = steer_eval.seed_groups(run_config["run_configs"])
    roles = {name: role for name, (_, role) in policies.items()}
    sizes = sorted(config["num_context"])
    print(f"Steering world, split '{config['split']}': {len(users.labels)} users never seen in training, "
          f"prompts {steer_eval.eval_prompts(users.split, config['policy_eval']['prompts'])}; "
          "mean ± sd over training seeds (one seed: ± SEM over users)\n")
    print(steer_eval.world_tables(results, groups, roles, sizes))
    ref = results["reference"]
    print(f"\nreference (the fine-tuned base): gold reward {ref['reference_reward']:.3f}, relevance "
          f"{100 * ref['relevance']:.1f} %; users' optimum (exact) {ref['best_reward']:.3f} on average")
    rows = [{"model": name, "role": roles.get(name, name), **res} for name, res in results.items()]
    return rows, functools.partial(plot_world, results, groups, roles, sizes)


def evaluate_rewards(paths, config, device):
    """Rows for eval.json and the function that draws the plots into a folder."""
    models, data = load_models(paths, device)
    sizes = sorted(config["num_context"])
    sampler = EpisodeSampler(data, config["split"], config["num_targets"], max(sizes), seed=config["seed"])
    predict = predictors(models, config)
    rows, gaps = [], {}
    for n in sizes:
        accs, label_rows, mc = score_context_size(predict, data, sampler, n, config, device)
        rows += table_rows(accs, label_rows, sampler.labels, n, config["max_label_rows"], mc)
        if BAYES in accs:
            gaps.update({(name, n): (accs[name] - accs[BAYES], mc) for name in predict})
            add_gaps(rows, gaps, n)
    print(f"split '{config['split']}' of {data.path}; accuracy ± SEM in points over {config['episodes']} episodes "
          f"per n (fixed in advance), {config['num_targets']} targets each; (!) = SEM above "
          f"{100 * config['max_sem']:.2f}\n")
    print(markdown(rows, sizes, config["max_sem"]) + "\n\n" + gap_lines(gaps, sizes))
    return rows, functools.partial(plot_reward_figures, models, data, sampler, rows, sizes, config["split"])


def query_strategies(config):
    """The --queries list, checked: [] when off."""
    import queries

    names = [s.strip() for s in str(config["queries"] or "").split(",") if s.strip()]
    for name in names:
        check(name in queries.STRATEGIES, "queries", f"unknown strategy '{name}' (expected some of "
              f"{', '.join(queries.STRATEGIES)}, comma-separated)")
    check(len(set(names)) == len(names), "queries", "names a strategy twice")
    return names


def query_rows(curves, name, strategy, reference):
    """Rows (one per number of questions) of a strategy's curve, with the paired gap to `reference`."""
    rows = []
    for k in range(curves[(name, strategy)].shape[1]):
        acc = curves[(name, strategy)][:, k]
        row = {"model": name, "strategy": strategy, "questions": k, "accuracy": acc.mean().item(), "sem": sem(acc),
               "episodes": len(acc)}
        if reference in curves and (name, strategy) != reference:
            diff = acc - curves[reference][:, k]
            row.update(gap_to_bayes_active=diff.mean().item(), gap_sem=sem(diff))
        rows.append(row)
    return rows


def query_summary(rows):
    """Per model: how many questions each strategy needs to reach random's accuracy after the most
    questions, and each strategy's largest shortfall against Bayes-active."""
    import queries

    curves = {}
    for r in rows:
        curves.setdefault(r["model"], {}).setdefault(r["strategy"], []).append(r)
    lines = []
    for name, by_strategy in curves.items():
        if "random" in by_strategy:
            level = by_strategy["random"][-1]["accuracy"]
            reach = ", ".join(f"{s} after {queries.questions_to_reach(torch.tensor([r['accuracy'] for r in c]), level)}"
                              for s, c in by_strategy.items() if s != "random") or "-"
            lines.append(f"  {name}: random's {len(by_strategy['random']) - 1}-question accuracy {100 * level:.2f} "
                         f"is reached by {reach}")
        for s, c in by_strategy.items():
            gaps = [(r["gap_to_bayes_active"], r["questions"], r["gap_sem"]) for r in c if "gap_to_bayes_active" in r]
            if gaps:
                gap, k, error = min(gaps)
                lines.append(f"  {name} ({s}): furthest behind Bayes-active at k = {k}: {100 * gap:+.2f} ± "
                             f"{100 * error:.2f} points (model minus limit, same episodes)")
    return "\n".join(lines)


def plot_queries(rows, where, path):
    """Accuracy against questions asked, one line per (model, strategy)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    keys = list(dict.fromkeys((r["model"], r["strategy"]) for r in rows))
    styles = model_styles([f"{m} ({s})" for m, s in keys])
    for model, strategy in keys:
        curve = [r for r in rows if r["model"] == model and r["strategy"] == strategy]
        errorbar_curve(ax, [r["questions"] for r in curve], [100 * r["accuracy"] for r in curve],
                       [100 * r["sem"] for r in curve], styles[f"{model} ({strategy})"], f"{model} ({strategy})")
    ax.set_title(f"Accuracy on a user's held-out pairs against questions asked\n{where}; ±1 SEM over episodes",
                 fontsize=9)
    ax.set_xlabel("questions asked (answers in the context)")
    ax.set_ylabel("accuracy on held-out target pairs (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    save_figure(plt, fig, path)
    return ["queries.png"]


def evaluate_queries(paths, strategies, config, device):
    """--queries: accuracy against questions for each NP model and strategy, with Bayes-random and
    Bayes-active beside them where the generator is known. Rows for queries.json and the plot."""
    import queries

    models, data = load_models(paths, device)
    for name in [n for n, m in models.items() if not hasattr(m, "encoder")]:
        print(f"note: {name} reads no context: no question changes its predictions; left out")
        del models[name]
    check(len(models) > 0, "run", "--queries compares question strategies for NP-BTL runs: give at least one")
    known = true_rewards(data.meta, data.pairs[:1]) is not None or data.meta.get("generator") == "linear_population"
    bayes = (lambda batch: bayes_reference(data.meta, batch, config)[0]) if known else None
    curves = queries.evaluate(models, data, config["split"], strategies, config, device, bayes)
    reference = ("bayes_optimal", "infogain")
    rows = [row for key in curves for row in query_rows(curves, *key, reference)]
    q = config["query"]
    where = (f"split '{config['split']}' of {data.path}, {q['episodes']} episodes, pool {q['pool']}, "
             f"{config['num_targets']} targets")
    print(f"{where}; accuracy ± SEM in points after k questions (the same episodes and random questions for all); "
          f"(!) = SEM above {100 * config['max_sem']:.2f}\n")
    sizes = list(range(q["questions"] + 1))
    table = [{"model": f"{r['model']} ({r['strategy']})", "label": "all", "num_context": r["questions"], **{
        k: r[k] for k in ("accuracy", "sem")}} for r in rows]
    print(markdown(table, sizes, config["max_sem"]))
    print("\n" + query_summary(rows))
    return rows, lambda out: plot_queries(rows, where, os.path.join(out, "queries.png"))


def evaluate_policy_queries(paths, strategies, config, device):
    """--queries on steering-world policies: normalised gold reward against questions asked, the
    questions chosen by the reward run query.selector (steer_eval.question_curves)."""
    import queries
    import steer_eval
    from text import read_text_pairs

    policies, data, _, tokenizer, run_config = load_policies(paths, device)
    check(run_config["data"].get("world") == "continuum", "queries", "policies are scored against questions on "
          "the steering world only (data.world: continuum), where gold rewards are known")
    selector = config["query"]["selector"]
    check(bool(selector) or strategies == ["random"], "query.selector", "give the reward run that chooses the "
          "questions (an NP-BTL trained on the policy's context features, e.g. runs/steer_world_reward)")
    belief = None
    if selector:
        check_runs([selector])
        q = config["query"]
        belief = queries.run_belief(selector, data.dim, q["samples"], q["lookahead"], device, data.path)
    users = steer_eval.TestUsers(data, read_text_pairs(run_config["data"]["pairs"]), config["split"])
    curves = steer_eval.question_curves(policies, belief, users, tokenizer, strategies, config, device)
    check(len(curves) > 0, "run", "--queries scores NP-DPO policies (steered by answers): give at least one")
    sizes = sorted(config["num_context"])
    rows = [{"model": name, "strategy": s, "questions": n, **{k: v[0] for k, v in res.items()},
             **{f"{k}_sem": v[1] for k, v in res.items()}} for (name, s, n), res in curves.items()]
    print(f"Steering world, split '{config['split']}', {len(users.labels)} users; questions chosen by {selector or '-'}"
          f"\n\nNormalised gold reward (%) ± SEM over users, against the number of questions answered:\n")
    print("| model | strategy | " + " | ".join(f"n={n}" for n in sizes) + " |\n|---|---|" + "---|" * len(sizes))
    for key in dict.fromkeys((r["model"], r["strategy"]) for r in rows):
        cells = [f"{100 * r['normalised']:.1f} ± {100 * r['normalised_sem']:.1f} (rel {100 * r['relevance']:.0f})"
                 for r in rows if (r["model"], r["strategy"]) == key]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return rows, None


def check_arguments(config, paths):
    check(len(paths) > 0, "run", "give at least one run dir or checkpoint")
    check(config["split"] in ("train", "val", "test"), "split", "must be train, val or test")
    check(len(config["num_context"]) > 0 and all(isinstance(n, int) and n >= 0 for n in config["num_context"]),
          "num_context", "must be a non-empty list of non-negative integers")
    check(config["max_sem"] > 0, "max_sem", "must be positive")
    check(config["chunk"] > 0, "chunk", "must be positive")
    check(config["episodes"] >= 2, "episodes", "must be at least 2 (a standard error needs two)")
    check(config["predict_samples"] >= 0, "predict_samples", "must be non-negative (0 = mean z only)")
    check(config["bayes_samples"] >= 4, "bayes_samples", "must be at least 4 (four Monte Carlo groups)")
    check(config["query"]["questions"] <= config["query"]["pool"], "query.questions",
          f"must be at most query.pool = {config['query']['pool']}: a question is asked once")
    check_positive(config, "num_targets", *(f"policy_eval.{k}" for k in config["policy_eval"]),
                   *(f"query.{k}" for k in config["query"] if k not in ("selector", "lookahead")))


def check_runs(paths):
    """Every run dir or checkpoint exists; a run dir holds the ckpt_best.pt we evaluate. A
    run still training is scored as its ckpt_best.pt stands now, with a note."""
    for path in paths:
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such run dir or checkpoint file")
        holder = run_in_use(run_dir_of(path))
        if holder:
            print(f"note: {run_dir_of(path)} is still training ({holder}): scoring its best checkpoint so far")
        best, last = os.path.join(path, "ckpt_best.pt"), os.path.join(path, "ckpt_last.pt")
        if os.path.isdir(path) and not os.path.isfile(best):
            hint = f" (evaluate {last} instead?)" if os.path.isfile(last) else " (not a run dir?)"
            raise CheckpointError(f"{path} holds no ckpt_best.pt{hint}")


def write_json(path, rows):
    """Atomic, so an interrupted write never leaves half an eval.json."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp{os.getpid()}", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(f"{path}.tmp{os.getpid()}", path)


def main(argv):
    """Everything a user can get wrong is refused before any work, and nothing is written
    until the numbers exist; eval.json goes first, so a failing plot loses no numbers."""
    for arg in argv:  # a run's training config is not an evaluation config
        if arg.endswith((".yaml", ".yml")) and os.path.isfile(arg) and "stage" in read_yaml(arg):
            raise ConfigError(f"{arg} is a run's training config: give the run's folder "
                              f"({os.path.dirname(arg) or '.'}) to evaluate it")
    config, paths = load_config(DEFAULTS, argv, ALIASES)
    check_arguments(config, paths)
    device = pick_device(config["device"])  # first: an unavailable device is not a bad checkpoint
    if config["plot"]:
        pyplot()
    check_runs(paths)
    out = config["out"] or run_dir_of(paths[0])
    check_out_path("out", out, folder=True)
    kinds = {is_policy_checkpoint(p) for p in paths}
    check(len(kinds) == 1, "run", "give reward runs or policy runs, not both")
    strategies = query_strategies(config)
    policy_runs = kinds.pop()
    if strategies:
        rows, draw = (evaluate_policy_queries if policy_runs else evaluate_queries)(paths, strategies, config, device)
    else:
        rows, draw = (evaluate_policies if policy_runs else evaluate_rewards)(paths, config, device)
    name = "queries.json" if strategies else "eval.json"
    write_json(os.path.join(out, name), rows)
    print(f"\nwrote {out}/{name}")
    if config["plot"] and draw is not None:
        print(f"wrote {', '.join(draw(out))} to {out}")
    return rows


if __name__ == "__main__":
    run_script(main)
