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
questions chosen by the reward run query.selector from the user's own answered pairs, or
(--query.world_pool=N) from N pairs of the split that the simulated user answers. It
writes queries.json (and queries.png), never over eval.json. Policies are scored on the
test users of their world, or with --world_data=DIR on that world built again with more
(prepare/steer_world.py): the same training pairs, new users, a smaller SEM. With
--rerank=REWARD_RUN, NP-DPO's response is the best of rerank_samples draws by that NP-BTL's
reward for the user (read from the same context pairs), sampled at policy_eval.temperature;
the NP-BTL must have been trained on the world's own features (checked). Its latent is its
encoder's, or with --rerank_latent=particles the posterior mean of its training users' latents.

Each context size n gets `episodes` episodes (a count fixed in advance, so there is no
stopping on a lucky batch) of one label each: n context pairs and num_targets target
pairs, disjoint, labels balanced (round-robin). The SEM is over episodes; a SEM above
`max_sem` is flagged (!). On data from a known generator (the paper's task, the waves
and linear user types: exact posterior; a continuous linear population: importance
sampling over the population prior, whose Monte Carlo error is reported and added to
its SEM), the Bayes-optimal accuracy on the same episodes is printed beside the
models, with each model's gap to it. A stochastic NP-BTL is scored twice: at the mean
of q(z | context) and by its posterior predictive over `predict_samples` draws (with
--queries, by the predictive only). With --particles=S, every NP-BTL is also scored by the
predictive under S particles, the k-means summary of its training users' latents, weighted
by its likelihood of the context (particles.particle_predictor): a posterior the encoder's
single z cannot express. With --query.belief=particles, they choose the questions; with
--query.belief=adaptive, so does the posterior over all the latents, summarised anew per question.

Writes eval.json (a list of rows: model, num_context, label, accuracy, sem, episodes)
to `out` (default: the first run dir); --plot also writes accuracy.png and, for
one-dimensional options, reward_curves.png (the learned r(y) per user type given
10 context pairs, the paper's figure); policy runs of the toy task get steering.png.
An explicit `out` already holding this evaluation's file is refused (--overwrite replaces
it); a run folder's own is replaced. eval.json is written before the plots. A relative
data path recorded in a run is looked up from here, then from the folder the run was
trained in.
"""

import functools
import os

import torch

from bayes import bayes_log_prob_chosen, population_log_prob_chosen
from common import ConfigError, check, check_positive, load_config, pick_device, read_yaml, run_script
from data import EpisodeSampler, choice_correct, load_pairs, true_rewards
from policy_eval import check_rerank_options, evaluate_policies, evaluate_policy_queries, is_policy_checkpoint
from report import (BAYES, add_gaps, gap_lines, markdown, plot_queries, plot_reward_figures, pyplot, sem, table_rows,
                    write_json)
from reward import load_reward_model, run_data_path
from runs import check_out_path, check_runs, run_dir_of

DEFAULTS = {
    "split": "test",  # train | val | test
    "num_context": [0, 1, 3, 5, 10],  # context sizes n to score
    "num_targets": 50,  # target pairs per episode
    "episodes": 4000,  # episodes per context size, fixed in advance: no stopping once the SEM looks good
    "max_sem": 0.002,  # the target SEM (fraction, 0.002 = 0.2 points); a SEM above it is flagged (!)
    "chunk": 500,  # episodes per forward
    "predict_samples": 64,  # stochastic NP-BTL: also score its posterior predictive over this many z (0 = off)
    "particles": 0,  # NP-BTL: also score the predictive under this many particles (particles.py; 0 = off)
    "particle_latents": 2048,  # the training users' latents the particles summarise (k-means; also --query.particles)
    "bayes_samples": 16000,  # prior draws of the Monte Carlo Bayes reference (continuous populations)
    "max_label_rows": 20,  # more labels than this: report and check only the overall row
    "seed": 1234,  # episode sampling
    "plot": False,  # write accuracy.png (and reward_curves.png for 1-D options)
    "out": None,  # where eval.json and plots go; default: the first run dir
    "overwrite": False,  # replace eval.json / queries.json already in an explicit --out
    "device": "cpu",  # cpu | cuda | auto
    "world_data": "",  # policy runs: score on this folder's pairs.jsonl, features.npz and users.json, the runs'
    # world built again with other test users (--data.world_users); its train and val pairs must be the runs'
    "rerank": "",  # steering-world policy runs: NP-DPO's response is the best of rerank_samples draws by this
    # reward run's reward for the user (an NP-BTL on the same context features; policy_eval.Reranker)
    "rerank_samples": 16,  # ... draws per response, sampled at policy_eval.temperature
    "rerank_latent": "encoder",  # ... the NP-BTL's latent: encoder (of the context), or particles: the posterior
    # mean of particle_latents training users' latents given the context's answers (particles.posterior_latent)
    "queries": "",  # reward runs: compare question strategies instead, e.g. random,uncertainty,infogain (queries.py)
    "query": {  # --queries only; writes queries.json (and queries.png), not eval.json
        "pool": 100,  # candidate questions per episode: answered pairs of the user, disjoint from the targets
        "questions": 10,  # questions asked, greedily one after another
        "episodes": 4000,  # episodes, fixed in advance
        "target_inputs": 16,  # unlabelled pairs of the split whose answers infogain is about
        "samples": 32,  # a stochastic NP-BTL's draws of z per look-ahead prediction
        "screen": 16,  # ... looked ahead at over draws only for the best this many at the mean of q (0: all)
        "lookahead": True,  # infogain by the model's look-ahead (false: EPIG from draws of q(z | context))
        "belief": "lookahead",  # lookahead: the encoder's belief (above); particles: the training users' latents,
        # weighted by the model's likelihood of the answers; adaptive: their posterior, summarised anew per question
        "particles": 32,  # particles, adaptive: summarised in this many (queries.py)
        "bayes_samples": 2000,  # prior draws of the Bayes belief that chooses questions (populations)
        "selector": "",  # policy runs: the reward run that chooses the questions (NP-BTL on the same features)
        "world_pool": 0,  # policy runs: candidates are the user's own answered pairs (0), or this many pairs of the
        # split, answered by the simulated user (Bradley-Terry on their gold reward, as the world draws choices)
    },
    "policy_eval": {  # policies only
        "episodes": 256,  # implicit-reward episodes per n (labels balanced)
        "num_targets": 8,  # conflicting target pairs per episode
        "batch_episodes": 64,  # episodes per forward
        "contexts_per_prompt": 16,  # user contexts drawn per test prompt, label and n
        "samples_per_context": 4,  # responses sampled per context
        "max_new_tokens": 40,  # response length cap
        "temperature": 1.0,  # sampling temperature
        "reference_temperature": 0.0,  # steering world: the reference's (0 % of the normalised reward); 0: the same
        "prompts": 8,  # steering world: evaluated test prompts
        "samples": 4,  # steering world: responses per user, prompt and n
        "reference_samples": 64,  # steering world: reference responses per prompt
        "interpolation_samples": 32,  # steering world: responses per prompt at each interpolation point
        "repeats": 4,  # steering world: random contexts per user and n for implicit-reward accuracy
    },
}
ALIASES = {"num-context": "num_context", "max-sem": "max_sem"}


def load_models(paths, device):
    """{name: model}, the data, and {name: training config} for run dirs or checkpoint files that
    share one data file."""
    data_paths = [run_data_path(p) for p in paths]
    if len({os.path.realpath(p) for p in data_paths}) != 1:
        raise ConfigError(f"the models were trained on different data files {sorted(set(data_paths))}")
    data = load_pairs(data_paths[0])
    models, configs = {}, {}
    for path in paths:
        name = os.path.basename(os.path.normpath(run_dir_of(path)))
        name = name if name not in models else path
        models[name], configs[name] = load_reward_model(path, data.dim, device, data.path)
    return models, data, configs


def training_particles(model, data, train_config, num, config):
    """`num` particles summarising config's particle_latents latents of the training users, each read
    from as many pairs as the run was trained on (particles.training_particles)."""
    import particles as particle_lib

    return particle_lib.training_particles(model, data, train_config["train"]["max_context"], num,
                                           config["particle_latents"], config["seed"])


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


# -----------------------------------------------------------------------------
# reward runs: accuracy against context size, and against questions asked


def evaluate_rewards(paths, config, device):
    """Rows for eval.json and the function that draws the plots into a folder."""
    models, data, configs = load_models(paths, device)
    sizes = sorted(config["num_context"])
    sampler = EpisodeSampler(data, config["split"], config["num_targets"], max(sizes), seed=config["seed"])
    predict = predictors(models, config)
    if config["particles"]:
        import particles as particle_lib

        for name in [n for n, m in models.items() if not hasattr(m, "encoder")]:
            print(f"note: {name} reads no context: no particles row")
        for name in [n for n, m in models.items() if hasattr(m, "encoder")]:
            particles = training_particles(models[name], data, configs[name], config["particles"], config)
            predict[f"{name} (particles)"] = particle_lib.particle_predictor(models[name], data, config["split"],
                                                                             particles)
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


def evaluate_queries(paths, strategies, config, device):
    """--queries: accuracy against questions for each NP model and strategy, with Bayes-random and
    Bayes-active beside them where the generator is known. Rows for queries.json and the plot."""
    import queries

    models, data, configs = load_models(paths, device)
    for name in [n for n, m in models.items() if not hasattr(m, "encoder")]:
        print(f"note: {name} reads no context: no question changes its predictions; left out")
        del models[name]
    check(len(models) > 0, "run", "--queries compares question strategies for NP-BTL runs: give at least one")
    known = true_rewards(data.meta, data.pairs[:1]) is not None or data.meta.get("generator") == "linear_population"
    bayes = (lambda batch: bayes_reference(data.meta, batch, config)[0]) if known else None
    particles = None
    if config["query"]["belief"] != "lookahead":  # the training users' latents, read as each run was trained
        num = config["query"]["particles"] if config["query"]["belief"] == "particles" else config["particle_latents"]
        particles = {name: training_particles(m, data, configs[name], num, config) for name, m in models.items()}
    curves = queries.evaluate(models, data, config["split"], strategies, config, device, bayes, particles)
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


def check_arguments(config, paths):
    check(len(paths) > 0, "run", "give at least one run dir or checkpoint")
    check(config["split"] in ("train", "val", "test"), "split", "must be train, val or test")
    check(len(config["num_context"]) > 0 and all(isinstance(n, int) and n >= 0 for n in config["num_context"]),
          "num_context", "must be a non-empty list of non-negative integers")
    check(config["max_sem"] > 0, "max_sem", "must be positive")
    check(config["chunk"] > 0, "chunk", "must be positive")
    check(config["episodes"] >= 2, "episodes", "must be at least 2 (a standard error needs two)")
    check(config["predict_samples"] >= 0, "predict_samples", "must be non-negative (0 = mean z only)")
    check(config["particles"] >= 0, "particles", "must be non-negative (0 = off)")
    check(config["particle_latents"] > 0, "particle_latents", "must be positive")
    check(config["bayes_samples"] >= 4, "bayes_samples", "must be at least 4 (four Monte Carlo groups)")
    check(config["query"]["questions"] <= config["query"]["pool"], "query.questions",
          f"must be at most query.pool = {config['query']['pool']}: a question is asked once")
    check_positive(config, "num_targets", "rerank_samples",
                   *(f"policy_eval.{k}" for k in config["policy_eval"] if k != "reference_temperature"),
                   *(f"query.{k}" for k in config["query"]
                     if k not in ("selector", "lookahead", "screen", "belief", "world_pool")))
    check(config["policy_eval"]["reference_temperature"] >= 0, "policy_eval.reference_temperature",
          "must be positive, or 0 for the sampling temperature")
    check(config["query"]["belief"] in ("lookahead", "particles", "adaptive"), "query.belief",
          "must be lookahead, particles or adaptive")
    check(config["query"]["screen"] >= 0, "query.screen", "must be non-negative (0 = every candidate over draws)")
    pool = config["query"]["world_pool"]
    check(pool == 0 or pool >= max(config["num_context"]), "query.world_pool",
          f"must be 0 (the user's own pairs) or at least the largest num_context, {max(config['num_context'])}")


def main(argv):
    """Everything a user can get wrong is refused before any work, and nothing is written
    until the numbers exist; eval.json goes first, so a failing plot loses no numbers."""
    for arg in argv:  # a run's training config is not an evaluation config
        if arg.endswith((".yaml", ".yml")) and os.path.isfile(arg) and "stage" in read_yaml(arg):
            folders = [os.path.dirname(arg) or ".", str(read_yaml(arg).get("out_dir") or "")]
            trained = [f for f in folders if f and os.path.isfile(os.path.join(f, "ckpt_best.pt"))]
            where = f"give the run's folder ({trained[0]})" if trained else "train it first, then give its out_dir"
            raise ConfigError(f"{arg} is a training config, not a run: {where} to evaluate it")
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
    name = "queries.json" if strategies else "eval.json"
    check(not (config["out"] and os.path.exists(os.path.join(out, name)) and not config["overwrite"]), "out",
          f"{os.path.join(out, name)} holds another evaluation's results: choose another --out, or add --overwrite")
    policy_runs = kinds.pop()
    check(not (config["particles"] and policy_runs), "particles", "is for reward runs (an NP-BTL's predictions)")
    check(not (config["world_data"] and not policy_runs), "world_data", "is for policy runs of the steering world "
          "(reward runs are scored on the data file they name)")
    check(not (config["query"]["world_pool"] and not (strategies and policy_runs)), "query.world_pool",
          "is for --queries on steering-world policies (reward runs: query.pool)")
    check(not (config["rerank"] and not policy_runs), "rerank", "is for steering-world policy runs (NP-DPO's)")
    check(not (config["rerank"] and strategies), "rerank", "scores the context-size table, not --queries")
    check(not (config["rerank_latent"] != "encoder" and not config["rerank"]), "rerank_latent",
          "chooses the --rerank NP-BTL's latent; give --rerank=RUN")
    check_rerank_options(config)
    check(not (config["particles"] and strategies), "particles",
          "scores the context-size table; questions are chosen under particles with --query.belief=particles")
    if strategies:
        rows, draw = (evaluate_policy_queries if policy_runs else evaluate_queries)(paths, strategies, config, device)
    else:
        rows, draw = (evaluate_policies if policy_runs else evaluate_rewards)(paths, config, device)
    write_json(os.path.join(out, name), rows)
    print(f"\nwrote {out}/{name}")
    if config["plot"] and draw is not None:
        print(f"wrote {', '.join(draw(out))} to {out}")
    return rows


if __name__ == "__main__":
    run_script(main)
