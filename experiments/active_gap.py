"""
Why does NP-BTL's infogain fall behind Bayes-active on a continuous population?
Two causes are separable: the questions the model asks (selection), and what the model
predicts from the answers to those questions (inference).

    PYTHONPATH=. python experiments/active_gap.py runs/population_pool_np_btl 600

On the run's test split (pool 200, 50 held-out targets, 16 unlabelled target pairs, as
evaluate.py --queries), each of the two beliefs (the model's look-ahead and the exact
posterior) asks 10 infogain questions; each context prefix is then scored by both
predictors (the model and the Bayes-optimal prediction). Accuracy in points after k
questions; the diagonal cells are evaluate.py's infogain and Bayes-active rows.
"""

import sys

import torch

from bayes import bayes_log_prob_chosen
from data import choice_correct, load_pairs
from queries import BayesBelief, ModelBelief, ask, episode_chunks, predictor
from reward import load_reward_model, run_data_path


def main(run, episodes):
    torch.set_num_threads(2)
    data = load_pairs(run_data_path(run))
    model, _ = load_reward_model(run, data.dim, "cpu", data.path)
    model.eval()
    config = {"num_targets": 50, "chunk": 200, "query": {"pool": 200, "episodes": episodes, "target_inputs": 16}}
    predictors = {"model": predictor(model, 64),
                  "bayes": lambda batch: bayes_log_prob_chosen(data.meta, batch, 16000, seed=1234)}
    beliefs = {"model": ModelBelief(model), "bayes": BayesBelief(data.meta, 2000, 1234)}
    accs = {}
    with torch.no_grad():
        for chunk in episode_chunks(data, "test", config, 1234):
            for asker, belief in beliefs.items():
                gen = torch.Generator().manual_seed(chunk["seed"])
                context, _ = ask(belief, "infogain", chunk["cand"], chunk["answers"], 10, chunk["target_inputs"], gen)
                for scorer, predict in predictors.items():
                    for k in range(11):
                        batch = {"context": context[:, :k], "targets": chunk["targets"],
                                 "context_mask": torch.ones(len(context), k, dtype=torch.bool)}
                        torch.manual_seed(chunk["seed"] + k)
                        acc = choice_correct(predict(batch)).float().mean(1)
                        accs.setdefault((asker, scorer), [[] for _ in range(11)])[k].append(acc)
    cells = {key: [torch.cat(parts) for parts in ks] for key, parts_ in [(k, v) for k, v in accs.items()]
             for ks in [parts_]}
    print(f"{episodes} test episodes of {data.path}; accuracy in points ± SEM after k infogain questions")
    print("| questions asked by | scored by | " + " | ".join(f"k={k}" for k in range(11)) + " |")
    print("|---|---|" + "---|" * 11)
    for (asker, scorer), ks in cells.items():
        print(f"| {asker} | {scorer} | " + " | ".join(f"{100 * a.mean():.2f} ± {100 * a.std() / len(a) ** 0.5:.2f}"
                                                      for a in ks) + " |")
    for scorer in predictors:
        diff = [(cells[("model", scorer)][k] - cells[("bayes", scorer)][k]) for k in range(11)]
        print(f"selection cost, scored by {scorer}: " + " ".join(f"{100 * d.mean():+.2f}" for d in diff))
    for asker in beliefs:
        diff = [(cells[(asker, "model")][k] - cells[(asker, "bayes")][k]) for k in range(11)]
        print(f"inference cost on {asker}'s questions: " + " ".join(f"{100 * d.mean():+.2f}" for d in diff))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/population_pool_np_btl", int(sys.argv[2]) if len(sys.argv) > 2 else 600)
