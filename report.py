"""
Tables and figures for evaluate.py: markdown tables of accuracy ± SEM with a flag for a
SEM above target, gaps to a reference, atomic JSON rows, and the plots (matplotlib is
optional: only --plot needs it).
"""

import json
import math
import os
import re

import torch

import world
from common import ConfigError
from data import true_rewards

BAYES = "bayes_optimal"  # the row name of the Bayes-optimal reference
MARKERS, LINESTYLES = "osD^vPX", ["-", "--", "-.", (0, (3, 1, 1, 1, 1, 1))]


def sem(values):
    return (values.std(unbiased=True) / len(values) ** 0.5).item() if len(values) > 1 else float("inf")


def ranks(x):
    """Ranks 0..N-1 of a 1-D tensor, ties given their average rank."""
    x = torch.as_tensor(x, dtype=torch.float64)
    order = x.argsort(stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(x, y):
    """Spearman's rank correlation; NaN when either side is constant."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return (rx * ry).sum().item() / denom.item() if denom > 0 else math.nan


def mean_sem(values):
    values = torch.as_tensor(values, dtype=torch.float64)
    sem = values.std(unbiased=True).item() / len(values) ** 0.5 if len(values) > 1 else math.inf
    return values.mean().item(), sem


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


def write_json(path, rows):
    """Atomic, so an interrupted write never leaves half an eval.json."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp{os.getpid()}", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(f"{path}.tmp{os.getpid()}", path)


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


# -----------------------------------------------------------------------------
# the steering world (steer_eval.py): tables and plot, seeds pooled


def over_seeds(results, names, key):
    """Mean and sd over the seeds' values of metric `key` (a value or a (mean, sem) pair)."""
    values = [results[n][key][0] if isinstance(results[n][key], tuple) else results[n][key] for n in names]
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), (values.std(unbiased=True).item() if len(values) > 1 else math.nan)


def cell(results, names, key, scale=1.0, digits=1):
    if any(key not in results[n] for n in names):
        return "-"
    mean, sd = over_seeds(results, names, key)
    if len(names) == 1:  # one seed: the SEM over users instead
        value = results[names[0]][key]
        sem = value[1] if isinstance(value, tuple) else math.nan
        return f"{scale * mean:.{digits}f}" + ("" if math.isnan(sem) else f" ± {scale * sem:.{digits}f}")
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def world_tables(results, groups, roles, sizes):
    """Markdown tables of the headline metrics, one row per model (seeds pooled)."""
    def key_at(group, metric, n):
        return f"{metric}@{n if roles[groups[group][0]] == 'np_dpo' else None}"

    header = "| model | seeds | " + " | ".join(f"n={n}" for n in sizes) + " |\n|---|---|" + "---|" * len(sizes)
    out = []
    for title, metric, scale in (("Normalised gold reward, % of the way from the reference to each user's optimum",
                                  "normalised", 100), ("Relevance of the generations (quality), %", "relevance", 100),
                                 ("Implicit-reward accuracy on pairs where the population conflicts, %",
                                  "implicit_conflict", 100),
                                 ("Implicit-reward accuracy on pairs where the population agrees, %", "implicit_agree", 100)):
        lines = [f"{title}:\n", header]
        for group, names in groups.items():
            lines.append(f"| {group} | {len(names)} | " + " | ".join(
                cell(results, names, key_at(group, metric, n) if not metric.startswith("implicit") else f"{metric}@{n}",
                     scale) for n in sizes) + " |")
            if roles[names[0]] == "known" and not metric.startswith("implicit"):
                lines.append(f"| {group}, z = Bayes posterior mean of the n pairs (few-shot ceiling) | {len(names)} | "
                             + " | ".join(cell(results, names, f"posterior_{metric}@{n}", scale) for n in sizes) + " |")
        if metric == "normalised" and f"bayes_limit@{sizes[0]}" in results.get("reference", {}):
            lines.append("| Bayes limit: the response with the highest expected normalised reward under the "
                         "posterior of the n pairs (± SEM over users) | - | "
                         + " | ".join(gold_cell(results, "bayes_limit", n, "reference") for n in sizes) + " |")
        if metric.startswith("implicit"):
            lines.append("| Bayes-optimal given the n pairs (the world's reward family and prior) | - | "
                         + " | ".join(gold_cell(results, metric, n, "bayes") for n in sizes) + " |")
            lines.append("| the user's own gold reward (known preference) | - | "
                         + " | ".join(gold_cell(results, metric, n) for n in sizes) + " |")
        out.append("\n".join(lines))
    lines = ["Continuum (Spearman over the split's users at n = max, and along the interpolation path):\n",
             "| model | seeds | length | tone | interpolation: length | interpolation: tone |", "|---|---|---|---|---|---|"]
    for group, names in groups.items():
        n = sizes[-1]
        lines.append(f"| {group} | {len(names)} | " + " | ".join(
            cell(results, names, key, 1.0, 3) for key in (key_at(group, "spearman_length", n),
                                                         key_at(group, "spearman_tone", n),
                                                         "interpolation_length", "interpolation_tone")) + " |")
        if roles[names[0]] == "known":
            lines.append(f"| {group}, z = Bayes posterior mean of {n} pairs | {len(names)} | " + " | ".join(
                cell(results, names, f"posterior_spearman_{a}@{n}", 1.0, 3) for a in world.ATTRIBUTES) + " | | |")
    out.append("\n".join(lines))
    return "\n\n".join(out)


def gold_cell(results, metric, n, name="gold"):
    return cell(results, [name], f"{metric}@{n}", 100) if name in results else "-"


def plot_world(results, groups, roles, sizes, out):
    """steering.png: normalised reward against n; attribute against true preference at the
    largest n (first seed of each model); attribute against interpolation weight."""
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
        if all(f"posterior_normalised@{n}" in results[name] for name in names for n in sizes):
            stats = [over_seeds(results, names, f"posterior_normalised@{n}") for n in sizes]
            errorbar_curve(axes[0], sizes, [100 * m for m, _ in stats], [100 * (0 if math.isnan(s) else s) for _, s in stats],
                           dict(style, linestyle=":"), f"{group}, z = posterior mean (few-shot ceiling)")
        scatter = results[names[0]]["scatter"]
        prefs = torch.tensor(scatter["preference"])
        for ax, d, attribute in ((axes[1], 0, "length"), (axes[2], 1, "tone")):
            ax.scatter(prefs[:, d], scatter[attribute], s=10, color=style["color"], marker=style["marker"], label=group)
        if "interpolation_path" in results[names[0]]:
            path = results[names[0]]["interpolation_path"]
            axes[3].plot(path["weights"], path["length"], color=style["color"], marker="o", label=f"{group}: length")
            axes[3].plot(path["weights"], [3.5 + 2.5 * t for t in path["tone"]], color=style["color"], marker="s",
                         linestyle="--", label=f"{group}: tone (scaled to 1-6)")
    if f"bayes_limit@{sizes[0]}" in results.get("reference", {}):
        axes[0].plot(sizes, [100 * results["reference"][f"bayes_limit@{n}"][0] for n in sizes], color="black",
                     linestyle=":", label="Bayes limit of the n pairs")
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


# -----------------------------------------------------------------------------
# training seeds

RUN_ONLY_KEYS = ("seed", "out_dir", "resume", "overwrite", "device")


def seed_groups(run_configs):
    """{group name: [run names]}: runs whose configs differ only in seed and run folder are one
    model trained with several seeds. A group is named by its runs' common name prefix."""
    groups = {}
    for name, config in run_configs.items():
        key = json.dumps({k: v for k, v in config.items() if k not in RUN_ONLY_KEYS}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(name)
    named = {}
    for names in groups.values():
        prefix = names[0]
        for other in names[1:]:
            while not other.startswith(prefix):
                prefix = prefix[:-1]
        if len(names) > 1 and all(len(prefix) < len(n) for n in names):  # x_s1, x_s2 -> x
            prefix = re.sub(r"[_-]*(seed|s)?$", "", prefix)
        named[prefix or names[0]] = names
    return named
