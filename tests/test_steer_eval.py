"""The steering world's policy metrics (steer_eval.py), on fixtures with
hand-computed answers. Each broken evaluation named in the docstrings makes a test fail."""

import math

import numpy as np
import pytest
import torch

import report
import steer_eval
import world
from common import ConfigError
from data import PreferenceData

# -----------------------------------------------------------------------------
# metrics by hand


def test_spearman_by_hand():
    assert steer_eval.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert steer_eval.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert steer_eval.spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(math.sqrt(3) / 2)  # ties: average ranks
    assert math.isnan(steer_eval.spearman([1, 2, 3], [5, 5, 5]))


def test_normalised_reward_by_hand():
    out = steer_eval.normalised(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0]))
    assert out.tolist() == [0.5, 1.0]


# -----------------------------------------------------------------------------
# a fixture world: 3 test users whose true preferences are known, one feature per row
# that names the row, and a stub policy whose latent and generations are known

PROMPTS = ["Describe owls.", "Describe kites.", "What about owls?"]


@pytest.fixture
def users():
    rows, choices, prefs = [], [], {"t0": [1.0, -1.0], "t1": [3.5, 0.0], "t2": [6.0, 1.0], "x": [2.0, 0.0]}
    short, long = "owls exist .", "owls exist . owls exist . owls exist ."
    for u, label in enumerate(["t0", "t1", "t2"]):
        for i in range(6):
            rows.append({"prompt": PROMPTS[i % 3], "response_a": short, "response_b": long, "split": "test"})
            choices.append([-1] * 3 + [-1])
            choices[-1][u] = int(label != "t0")  # t0 likes short, the others long
    rows.append({"prompt": PROMPTS[0], "response_a": short, "response_b": long, "split": "train"})  # a train user
    choices.append([-1, -1, -1, 0])
    features = torch.arange(len(rows), dtype=torch.float32)[:, None, None].expand(-1, 2, 1).clone()  # row id
    features[:, 1] += 0.5
    data = PreferenceData(features, torch.tensor(choices, dtype=torch.int8), ["t0", "t1", "t2", "x"],
                          np.array([r["split"] for r in rows]), {"preferences": prefs}, "<fixture>")
    return steer_eval.TestUsers(data, rows, "test")


def test_test_users_are_the_splits_users_only(users):
    assert users.labels == ["t0", "t1", "t2"]  # the train user 'x' is not scored
    assert all(users.data.split[r] == "test" for rows in users.rows for r in rows.tolist())


def test_context_never_holds_the_evaluated_prompt_or_a_scored_pair(users):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        context, picked = users.context(1, 4, gen, exclude_prompt=PROMPTS[0])
        assert all(users.prompt_of[r] != PROMPTS[0] for r in picked.tolist())
        assert context[:, 0, 0].tolist() == [float(r) + 0.5 for r in picked.tolist()]  # chosen (long, b) first
        _, picked = users.context(0, 3, gen, exclude_rows=torch.tensor([0, 1, 2]))
        assert not set(picked.tolist()) & {0, 1, 2}
    with pytest.raises(ValueError, match="pairs to draw"):
        users.context(0, 5, gen, exclude_prompt=PROMPTS[0])


class StubPolicy:
    """Infers a latent = the user's preferred length read off the context's rows (the
    fixture's users own rows 0-5, 6-11, 12-17), and generates that many on-topic sentences."""

    def __init__(self):
        self.contexts = []

    def infer_latent(self, context):
        self.contexts.append(context)
        rows = context[:, :, 0, 0].floor().long()  # (U, n) row ids (chosen may be a or b)
        owner = rows[:, 0] // 6 if rows.shape[1] else torch.ones(len(rows), dtype=torch.long)
        return torch.tensor([[1.0], [3.5], [6.0]])[owner]


def stub_texts(policy, tokenizer, prompt, latent, count, samples, config, device, reference=False):
    topic = world.prompt_topic(prompt)
    if reference:
        return [f"{topic} exist . drums exist ."] * (count * samples)  # relevance 0.5, length 2
    lengths = latent[:, 0].round().long().repeat_interleave(samples).tolist()
    return [" ".join([f"{topic} exist ."] * k) for k in lengths]


def test_generation_metrics_by_hand(users, monkeypatch):
    monkeypatch.setattr(steer_eval, "sample_texts", stub_texts)
    config = {"samples": 2, "temperature": 1.0, "max_new_tokens": 8}
    policy = StubPolicy()
    gen = torch.Generator().manual_seed(0)
    attrs = steer_eval.generation_attributes(policy, "np_dpo", users, None, PROMPTS[:2], 3, config, gen, "cpu")
    assert attrs.shape == (3, 2, 2, 3)
    assert attrs[..., 0].mean((1, 2)).tolist() == [1.0, 4.0, 6.0]  # round(3.5) = 4
    for context, q in zip(policy.contexts, PROMPTS[:2]):  # the evaluated prompt is never in a context
        rows = context[:, :, 0, 0].floor().long().flatten().tolist()
        assert all(users.prompt_of[r] != q for r in rows)
    reference = steer_eval.reference_attributes(policy, None, PROMPTS[:2], dict(config, reference_samples=3), "cpu")
    ref_reward = steer_eval.rewards_from_attributes(reference[None], users.preferences[:, None, None]).mean((1, 2))
    best = torch.tensor([world.best_reward(u) for u in users.preferences.tolist()], dtype=torch.float64)
    scores = steer_eval.user_scores(attrs, users, ref_reward, best)
    # user t0 (length 1, tone -1): reference 4 * 0.5 - 0.3 * 1 - 2 * 1 = -0.3; generation 4 - 0 - 2 = 2; best 4
    assert ref_reward[0].item() == pytest.approx(-0.3)
    assert scores["normalised"][0].item() == pytest.approx((2 + 0.3) / (4 + 0.3))
    assert steer_eval.spearman(users.preferences[:, 0], scores["length"]) == pytest.approx(1.0)


def test_a_zeroed_latent_or_empty_generations_fail_the_metrics(users, monkeypatch):
    """The latent replaced by zeros, or every generation empty, loses the continuum."""
    monkeypatch.setattr(steer_eval, "sample_texts", lambda *a, **k: [""] * (a[4] * a[5]))
    config = {"samples": 2, "temperature": 1.0, "max_new_tokens": 8}
    gen = torch.Generator().manual_seed(0)
    attrs = steer_eval.generation_attributes(StubPolicy(), "np_dpo", users, None, PROMPTS[:1], 3, config, gen, "cpu")
    scores = steer_eval.user_scores(attrs, users, torch.zeros(3), torch.full((3,), 4.0))
    assert (scores["normalised"] < 0).all()  # an empty response is worse than the reference's
    assert math.isnan(steer_eval.spearman(users.preferences[:, 0], scores["length"]))


def test_best_of_picks_each_samples_highest_scored_draw_by_hand():
    """Two users, two samples of three draws each: the argmax within each sample's own draws.
    Picking the lowest score, or grouping the draws across samples, fails."""
    attrs = torch.arange(12, dtype=torch.float64).view(2, 6, 1).expand(-1, -1, 3)  # draw id in every column
    scores = torch.tensor([[0, 5, 1, 9, 2, 3], [7, 0, 0, 0, 0, 8]], dtype=torch.float64)
    picked = steer_eval.best_of(attrs, scores, 2)
    assert picked.shape == (2, 2, 3)
    assert picked[..., 0].tolist() == [[1, 3], [6, 11]]


def diverse_texts(policy, tokenizer, prompt, latent, count, samples, config, device, reference=False):
    """Draw s of each user has (s % 6) + 1 sentences: every group of six draws holds lengths 1 to 6."""
    topic = world.prompt_topic(prompt)
    return [" ".join([f"{topic} exist ."] * (s % 6 + 1)) for _ in range(count) for s in range(samples)]


class LengthReranker:
    """Scores a draw by how near its length is to the length StubPolicy reads off the user's context."""
    samples = 6

    def __init__(self):
        self.calls, self.contexts = [], []

    def scores(self, prompt, texts, contexts):
        self.calls.append((len(texts), len(contexts)))
        self.contexts.append(contexts)
        target = StubPolicy().infer_latent(contexts)  # (U, 1)
        lengths = torch.tensor([float(len(t.split(" . "))) for t in texts]).view(len(contexts), -1)
        return -(lengths - target) ** 2


def test_a_reranker_picks_each_users_draw_nearest_their_own_context(users, monkeypatch):
    """With a reranker each of the S responses is the best of reranker.samples draws for that user,
    judged from the user's own context: users t0, t1, t2 (lengths 1, 3.5, 6) get 1, 3 and 6 sentences.
    Scoring another user's context, or another draw of the same user's, or keeping a random draw, fails."""
    monkeypatch.setattr(steer_eval, "sample_texts", diverse_texts)
    config = {"samples": 2, "temperature": 1.0, "max_new_tokens": 8}
    reranker, policy = LengthReranker(), StubPolicy()
    attrs = steer_eval.generation_attributes(policy, "np_dpo", users, None, PROMPTS[:2], 3, config,
                                             torch.Generator().manual_seed(0), "cpu", reranker)
    assert all(torch.equal(a, b) for a, b in zip(reranker.contexts, policy.contexts))  # the pairs NP-DPO read
    assert attrs.shape == (3, 2, 2, 3)
    assert attrs[..., 0].tolist() == [[[1, 1]] * 2, [[3, 3]] * 2, [[6, 6]] * 2]
    assert reranker.calls == [(3 * 2 * 6, 3)] * 2  # every draw of every user, per prompt
    plain = steer_eval.generation_attributes(StubPolicy(), "np_dpo", users, None, PROMPTS[:2], 3, config,
                                             torch.Generator().manual_seed(0), "cpu")
    assert plain[..., 0].tolist() != attrs[..., 0].tolist()  # without it: the first draws, whatever they are


def test_reranker_scores_each_draw_under_its_own_users_latent(monkeypatch):
    """Reranker.scores: draw j of user u is scored by the NP-BTL's reward at the latent of u's context.
    A zeroed latent, or one user's latent for all, fails; so does the prior mean for the particles' posterior mean."""
    import particles
    import policy_eval
    import text
    from reward import MODEL_DEFAULTS, build_model

    torch.manual_seed(0)
    config = dict(MODEL_DEFAULTS, hidden=8, encoder=dict(MODEL_DEFAULTS["encoder"], hidden=8, latent_dim=2))
    model = build_model(config, 3).eval()
    for p in model.film.net[-1].parameters():  # FiLM starts at the identity: make the latent matter
        torch.nn.init.normal_(p)
    features = torch.randn(2 * 4, 3)
    monkeypatch.setattr(text, "embed_responses", lambda prompt, texts, *a: features[:len(texts)])
    reranker = policy_eval.Reranker.__new__(policy_eval.Reranker)
    reranker.model, reranker.tokenizer, reranker.embedder, reranker.pooling = model, None, None, "last"
    reranker.samples, reranker.device, reranker.latents = 4, "cpu", None
    contexts = torch.randn(2, 3, 2, 3)  # two users' contexts
    with torch.no_grad():
        scores = reranker.scores("Describe owls.", ["t"] * 8, contexts)
        expected = torch.cat([model.rewards(features.view(2, 4, 3)[u:u + 1], model.infer_latent(contexts[u:u + 1]))
                              for u in range(2)])
        zeroed = model.rewards(features.view(2, 4, 3), torch.zeros(2, 2))
    assert scores.shape == (2, 4)
    assert torch.allclose(scores, expected, atol=1e-6) and not torch.allclose(scores, zeroed, atol=1e-3)
    reranker.latents = torch.randn(50, 2)  # --rerank_latent=particles: the posterior mean of these, per user
    with torch.no_grad():
        scores = reranker.scores("Describe owls.", ["t"] * 8, contexts)
        posterior = torch.cat([particles.posterior_latent(model, contexts[u:u + 1], reranker.latents) for u in range(2)])
        prior = model.rewards(features.view(2, 4, 3), reranker.latents.mean(0).expand(2, 2))
        expected = model.rewards(features.view(2, 4, 3), posterior)
    assert torch.allclose(scores, expected, atol=1e-6) and not torch.allclose(scores, prior, atol=1e-3)


def test_the_reference_is_sampled_at_its_own_temperature_when_set(monkeypatch):
    """policy_eval.reference_temperature decodes the reference (a fixed 0 % for comparing decodings);
    unset, the sampling temperature does. Ignoring the key fails."""
    seen = []
    monkeypatch.setattr(steer_eval, "sample_texts", lambda *a, **k: seen.append(a[6]["temperature"]) or
                        ["owls exist ."] * (a[4] * a[5]))
    config = {"samples": 1, "temperature": 0.3, "reference_samples": 2, "max_new_tokens": 8}
    steer_eval.reference_attributes(None, None, PROMPTS[:1], dict(config, reference_temperature=0.1), "cpu")
    steer_eval.reference_attributes(None, None, PROMPTS[:1], dict(config, reference_temperature=0.0), "cpu")
    assert seen == [0.1, 0.3]


def test_implicit_accuracy_is_split_by_kind_and_not_inverted(users, monkeypatch):
    """A predictor right on every agreeing pair and wrong on every conflicting one scores
    100 % and 0 %: mixing the kinds, or inverting the accuracy, fails."""
    kinds = ["agree" if i % 2 else "conflict" for i in range(len(users.text_rows))]
    monkeypatch.setattr(world, "pair_kind", lambda q, a, b, it=iter(kinds * 100): next(it))

    def logprobs(policy, batch):  # chosen above rejected on agreeing pairs only
        agree = batch["agree"].double()
        return agree, 1 - agree, torch.zeros_like(agree), torch.zeros_like(agree)

    monkeypatch.setattr(steer_eval, "policy_and_reference_logprobs", logprobs)
    real_collate = steer_eval.collate_pairs

    def collate(token_pairs, rows, flipped, pad_id):
        batch = real_collate(token_pairs, rows, flipped, pad_id)
        return dict(batch, agree=torch.tensor([kinds[r] == "agree" for r in rows.tolist()]))

    monkeypatch.setattr(steer_eval, "collate_pairs", collate)
    token_pairs = [([2, 4], ([5, 3], [6, 3]))] * len(users.text_rows)
    out = steer_eval.implicit_accuracy({"stub": (None, "dpo")}, users, token_pairs, 0, [0, 2], 2, 0, "cpu")
    for n in (0, 2):
        assert out[("stub", n, "agree")].tolist() == [1.0, 1.0, 1.0]
        assert out[("stub", n, "conflict")].tolist() == [0.0, 0.0, 0.0]
        # the true reward: t0 prefers short and chose it; t1 (3.5) and t2 (6) prefer long and chose it
        assert out[("gold", n, "agree")].tolist() == [1.0, 1.0, 1.0]


def test_seed_groups_pool_runs_that_differ_only_in_seed():
    base = {"stage": "policy", "train": {"nll_weight": 1.0}, "seed": 0, "out_dir": "a"}
    configs = {"np_s0": base, "np_s1": dict(base, seed=1, out_dir="b"), "pure": dict(base, train={"nll_weight": 0.0})}
    assert report.seed_groups(configs) == {"np": ["np_s0", "np_s1"], "pure": ["pure"]}


def tiny_world_policy():
    """A random 1-layer policy on the world's vocabulary, with a 2-d latent."""
    from transformers import LlamaConfig

    import policy as policy_lib
    tokenizer = world.tokenizer()
    torch.manual_seed(0)
    base = policy_lib.build_base_model(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, num_key_value_heads=2,
                                                   intermediate_size=32, max_position_embeddings=64))
    config = dict(policy_lib.DEFAULTS, base="tiny", encoder=dict(policy_lib.DEFAULTS["encoder"], latent_dim=2))
    return policy_lib.SteerablePolicy(base, config).eval(), tokenizer


def test_sampled_texts_are_the_generated_responses_not_the_prompt():
    """Decoding the wrong slice (the prompt, or nothing: every generation empty) fails."""
    policy, tokenizer = tiny_world_policy()
    texts = steer_eval.sample_texts(policy, tokenizer, "Describe owls.", torch.zeros(3, 2), 3, 2,
                                    {"temperature": 1.0, "max_new_tokens": 6}, "cpu")
    assert len(texts) == 6
    assert sum(len(t.split()) for t in texts) > 12  # a random model rarely stops at once
    assert not any(t.startswith("describe owls") for t in texts)


def test_the_reference_and_the_policy_decode_at_the_configs_temperature():
    """policy_eval.temperature decodes the reference (the normalised reward's 0 %) and the policy
    alike: near 0, a prompt's samples are one response; at 1, a random model's differ. A
    reference left at temperature 1 (or a policy), or the key ignored, fails."""
    policy, tokenizer = tiny_world_policy()

    def distinct(temperature, reference):
        texts = steer_eval.sample_texts(policy, tokenizer, "Describe owls.", torch.zeros(1, 2), 1, 8,
                                        {"temperature": temperature, "max_new_tokens": 6}, "cpu", reference=reference)
        return len(set(texts))
    for reference in (False, True):
        assert distinct(1e-4, reference) == 1
        assert distinct(1.0, reference) > 1


def test_bayes_reference_moves_from_the_majority_to_the_user(users):
    """Short (1 sentence) against long (3): users with a preferred length above 2, 80 % of
    the prior, prefer long. With no context Bayes predicts long and is wrong for t0, who
    chose short; after t0's five other answers (all short) it is right."""
    target, others = users.rows[0][:1], users.rows[0][1:]
    assert steer_eval.bayes_correct(users, others[:0], target, 0).tolist() == [0.0]
    assert steer_eval.bayes_correct(users, others, target, 0).tolist() == [1.0]
    assert steer_eval.bayes_correct(users, users.rows[2][1:], users.rows[2][:1], 2).tolist() == [1.0]


def test_posterior_latents_follow_the_answers_and_draw_npdpos_contexts(users, monkeypatch):
    """The few-shot ceiling's z: the prior mean (0, 0) with no answers; after t0's short
    answers, below the middle in length (latent < 0), after t2's long ones above it; the
    tone latent stays 0 (short and long have the same tone). Drawn from the same generator
    state, its contexts are NP-DPO's."""
    none = users.posterior_latents([users.rows[u][:0] for u in range(3)])
    assert none.abs().max().item() < 1e-6
    after = users.posterior_latents([users.rows[u][1:] for u in range(3)])
    assert after[0, 0] < -0.3 and after[2, 0] > 0.3 and after[1, 0] > 0.3  # t1 (3.5) chose long, as t2
    assert after[:, 1].abs().max().item() < 1e-6
    monkeypatch.setattr(steer_eval, "sample_texts", stub_texts)
    seen = []
    monkeypatch.setattr(steer_eval.TestUsers, "posterior_latents", lambda self, picked, answers=None: seen.append(picked) or
                        torch.tensor([[1.0], [3.5], [6.0]]))
    config = {"samples": 1, "temperature": 1.0, "max_new_tokens": 8}
    policy = StubPolicy()
    for role, who in (("np_dpo", policy.contexts), ("posterior", seen)):
        steer_eval.generation_attributes(policy, role, users, None, PROMPTS[:1], 3, config,
                                         torch.Generator().manual_seed(5), "cpu")
    np_rows = policy.contexts[0][:, :, 0, 0].floor().long()
    assert [r.tolist() for r in seen[0]] == np_rows.tolist()


REF_ATTRS = torch.tensor([[[2.0, 0.0, 0.5]]])  # the reference writes "owls exist . drums exist ." (Q = S = 1)


def test_decision_scores_and_the_bayes_decision_by_hand():
    """Each candidate's normalised score: 1 for the user's best response, 0 for one as good as the
    reference; t0 (1, -1) against the reference (reward 2 - 0.3 - 2 = -0.3). The Bayes decision
    takes the candidate best on average under the weights, and scores it by the user's own row."""
    scores = steer_eval.decision_scores(torch.tensor([[1.0, -1.0]], dtype=torch.float64), REF_ATTRS)[0]
    candidates = world.candidate_responses()
    assert scores[candidates.index({"length": 1, "tone": -1.0, "relevance": 1.0})].item() == pytest.approx(1.0)
    plain6 = candidates.index({"length": 6, "tone": 0.0, "relevance": 1.0})  # 4 - 0.3 * 25 - 2 = -5.5
    assert scores[plain6].item() == pytest.approx((-5.5 + 0.3) / (4 + 0.3))
    grid = torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.6]], dtype=torch.float64)  # (G = 2, C = 3)
    truth = torch.tensor([[0.5, 0.1, 0.9], [0.3, 0.7, 0.2]], dtype=torch.float64)  # (U = 2, C = 3)
    weights = torch.tensor([[1.0, 0.0], [0.3, 0.7]], dtype=torch.float64)  # expected: [1, 0, .2] and [.3, .7, .48]
    assert steer_eval.bayes_decision(weights, grid, truth).tolist() == [0.5, 0.7]


def grid_index(preference):
    here = torch.isclose(steer_eval.BAYES_GRID.double(), torch.tensor(preference, dtype=torch.float64), atol=1e-6)
    return int(here.all(1).nonzero())


def test_bayes_limit_is_the_bayes_decision_scored_by_the_true_preference(users, monkeypatch):
    """The Bayes limit of n pairs: a posterior sure of the truth gives every user their optimum (1);
    one sure that t0 (1, -1) is t2 (6, 1) gives t0 t2's best response (6 warm sentences) scored
    by t0: (4 - 0.3 * 25 - 2 * 4 + 0.3) / (4 + 0.3). The answers move t0 (short) and t2 (long)
    up from n = 0. Its contexts are NP-DPO's draws, never on the evaluated prompt."""
    none = steer_eval.bayes_limit(users, PROMPTS[:1], 0, torch.Generator().manual_seed(0), REF_ATTRS)
    after = steer_eval.bayes_limit(users, PROMPTS[:1], 4, torch.Generator().manual_seed(0), REF_ATTRS)
    assert after[0] > none[0] + 0.1 and after[2] > none[2] + 0.1
    seen, sure = [], torch.zeros(3, len(steer_eval.BAYES_GRID), dtype=torch.float64)
    for u, where in enumerate(users.preferences.tolist()):
        sure[u, grid_index(where)] = 1.0
    monkeypatch.setattr(steer_eval.TestUsers, "posterior_weights", lambda self, picked, answers=None:
                        seen.append(picked) or sure)
    assert steer_eval.bayes_limit(users, PROMPTS[:1], 3, torch.Generator().manual_seed(5), REF_ATTRS).tolist() == \
        pytest.approx([1.0, 1.0, 1.0])
    sure[0] = sure[2]
    wrong = steer_eval.bayes_limit(users, PROMPTS[:1], 3, torch.Generator().manual_seed(5), REF_ATTRS)
    assert wrong[0].item() == pytest.approx((4 - 0.3 * 25 - 2 * 4 + 0.3) / (4 + 0.3))
    monkeypatch.setattr(steer_eval, "sample_texts", stub_texts)
    policy = StubPolicy()
    steer_eval.generation_attributes(policy, "np_dpo", users, None, PROMPTS[:1], 3,
                                     {"samples": 1, "temperature": 1.0, "max_new_tokens": 8},
                                     torch.Generator().manual_seed(5), "cpu")
    assert [r.tolist() for r in seen[0]] == policy.contexts[0][:, :, 0, 0].floor().long().tolist()
    assert all(users.prompt_of[r] != PROMPTS[0] for rows in seen[0] for r in rows.tolist())


def test_bayes_limit_decides_for_the_normalised_score_over_the_raw_reward(users, monkeypatch):
    """A posterior split evenly between (1, -0.5) and (6, 1): the raw reward's Bayes decision is the
    posterior mean's (3.5, 0.25) best response, 4 sentences of tone 0.25; the normalised score's
    weights each side by 1 / (optimum - reference) (3.5 - 1.2 against 4 + 4.8 here) and picks 2
    plain sentences (with a reference of reward 0 it would pick 3 of tone 1/3). Scored by t1
    (3.5, 0): (3.325 - 1.325) / (3.925 - 1.325), and by t0 (1, -1): (1.7 + 0.3) / (4 + 0.3)."""
    assert len(world.candidate_responses()) == sum((k + 1) * (k + 2) // 2 for k in range(1, 7))  # 83
    split = torch.zeros(3, len(steer_eval.BAYES_GRID), dtype=torch.float64)
    split[:, grid_index([1.0, -0.5])] = split[:, grid_index([6.0, 1.0])] = 0.5
    monkeypatch.setattr(steer_eval.TestUsers, "posterior_weights", lambda self, picked, answers=None: split)
    limit = steer_eval.bayes_limit(users, PROMPTS[:1], 2, torch.Generator().manual_seed(0), REF_ATTRS)
    assert limit[1].item() == pytest.approx(2.0 / 2.6) and limit[0].item() == pytest.approx(2.0 / 4.3)


def test_question_curves_by_hand(users, monkeypatch):
    """Steering against questions asked: the stub policy reads each user's length off their answers,
    so from one answer on every user gets their own length; with none, everyone gets 3.5 -> 4. The
    evaluated prompt's pairs are never asked (a zeroed latent or a leaked prompt fails here)."""
    monkeypatch.setattr(steer_eval, "sample_texts", stub_texts)
    monkeypatch.setattr(steer_eval, "eval_prompts", lambda split, count: PROMPTS[:count])
    policy = StubPolicy()
    config = {"num_context": [0, 1, 3], "seed": 0, "policy_eval": {
        "prompts": 2, "samples": 2, "reference_samples": 3, "temperature": 1.0, "max_new_tokens": 8}}
    out = steer_eval.question_curves({"np": (policy, "np_dpo")}, None, users, None, ["random"], config, "cpu")
    assert set(out) == {(m, "random", n) for m in ("np", "Bayes limit") for n in (0, 1, 3)}
    reference = [world.gold_reward(PROMPTS[0], "owls exist . drums exist .", p) for p in users.preferences.tolist()]
    best = [world.best_reward(p) for p in users.preferences.tolist()]

    def expected(lengths):
        scores = []
        for q in PROMPTS[:2]:
            topic = world.prompt_topic(q)
            for u, p in enumerate(users.preferences.tolist()):
                reward = world.gold_reward(q, " ".join([f"{topic} exist ."] * lengths[u]), p)
                scores.append((reward - reference[u]) / (best[u] - reference[u]))
        return sum(scores) / len(scores)

    assert out[("np", "random", 0)]["normalised"][0] == pytest.approx(expected([4, 4, 4]))
    for n in (1, 3):
        assert out[("np", "random", n)]["normalised"][0] == pytest.approx(expected([1, 4, 6]))
    # the stub reference writes "owls exist . drums exist ." (length 2, tone 0, relevance 0.5); with no
    # answers everyone gets the same response, and answers move the limit up
    truth = steer_eval.decision_scores(users.preferences, REF_ATTRS)  # (U, C)
    limit = out[("Bayes limit", "random", 0)]["users"]
    assert any(torch.allclose(limit, truth[:, c]) for c in range(truth.shape[1]))
    assert out[("Bayes limit", "random", 3)]["normalised"][0] > out[("Bayes limit", "random", 0)]["normalised"][0] + 0.1
    assert len(policy.contexts) == 3 * 2  # one latent per n and prompt, in that order
    for i, context in enumerate(policy.contexts):
        rows = context[:, :, 0, 0].floor().long().flatten().tolist()
        assert all(users.prompt_of[r] != PROMPTS[i % 2] for r in rows)  # never a pair on the evaluated prompt


def test_question_curves_ceiling_reads_the_same_asked_rows(users, monkeypatch):
    """The known-preference policy against questions is the few-shot ceiling: conditioned on the
    Bayes posterior mean of the very rows NP-DPO was asked (model 'NAME@posterior'), n of them."""
    monkeypatch.setattr(steer_eval, "sample_texts", stub_texts)
    monkeypatch.setattr(steer_eval, "eval_prompts", lambda split, count: PROMPTS[:count])
    seen = []
    monkeypatch.setattr(steer_eval.TestUsers, "posterior_latents", lambda self, picked, answers=None: seen.append(picked) or
                        torch.tensor([[1.0], [3.5], [6.0]]))
    np_policy, known = StubPolicy(), StubPolicy()
    config = {"num_context": [0, 2], "seed": 0, "policy_eval": {
        "prompts": 1, "samples": 1, "reference_samples": 1, "temperature": 1.0, "max_new_tokens": 8}}
    out = steer_eval.question_curves({"np": (np_policy, "np_dpo"), "k": (known, "known")}, None, users, None,
                                     ["random"], config, "cpu")
    assert set(out) == {(m, "random", n) for m in ("np", "k@posterior", "Bayes limit") for n in (0, 2)}
    assert known.contexts == []  # the known policy never reads a context with an encoder
    assert [len(rows) for rows in seen[0]] == [0, 0, 0] and [len(rows) for rows in seen[1]] == [2, 2, 2]
    np_rows = np_policy.contexts[1][:, :, 0, 0].floor().long()  # NP-DPO's n = 2 context: the same rows
    assert torch.as_tensor(seen[1]).tolist() == np_rows.tolist()
    assert out[("k@posterior", "random", 2)]["normalised"][0] == pytest.approx(out[("np", "random", 2)]["normalised"][0])


def test_simulated_answers_are_bradley_terry_on_the_users_gold_reward(users):
    """Short (1 sentence) against long (3), the same tone: P(long) = sigmoid(gold margin), 0.23 for
    t0 (length 1), 0.86 for t1 (3.5), 0.99 for t2 (6). An inverted margin, or the recorded choices
    (t0: never long), fails."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.zeros(4000, dtype=torch.long)  # row 0, asked again and again
    for u, margin in enumerate([-1.2, 1.8, 4.8]):
        share = users.simulated_answers(rows, u, gen).double().mean().item()
        assert share == pytest.approx(1 / (1 + math.exp(-margin)), abs=0.025)


def test_question_contexts_from_a_pool_of_the_splits_pairs(users):
    """world_pool: candidates are the split's pairs off the evaluated prompt, other users' included;
    the contexts are oriented by the returned (simulated) answers; the same for every strategy."""
    out = steer_eval.question_contexts(users, None, "random", PROMPTS[0], 5, seed=3, pool=12)
    contexts, asked, answers = out
    assert contexts.shape == (3, 5, 2, 1) and asked.shape == answers.shape == (3, 5)
    assert all(users.prompt_of[r] != PROMPTS[0] for r in asked.flatten().tolist())
    owners = {r: u for u in range(3) for r in users.rows[u].tolist()}
    assert any(owners[r] != u for u in range(3) for r in asked[u].tolist())  # not only the user's own pairs
    chosen_b = contexts[:, :, 0, 0] - asked.double() == 0.5  # feature = row (+ 0.5 for response b)
    assert torch.equal(chosen_b, answers)
    again = steer_eval.question_contexts(users, None, "random", PROMPTS[0], 5, seed=3, pool=12)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    with pytest.raises(ConfigError, match="world_pool = 13"):
        steer_eval.question_contexts(users, None, "random", PROMPTS[0], 5, seed=3, pool=13)


def test_question_curves_ceiling_reads_the_simulated_answers(users, monkeypatch):
    """With query.world_pool the few-shot ceiling's posterior is given the answers NP-DPO's context
    holds (not the recorded choices, which pairs of other users do not have)."""
    monkeypatch.setattr(steer_eval, "sample_texts", stub_texts)
    monkeypatch.setattr(steer_eval, "eval_prompts", lambda split, count: PROMPTS[:count])
    seen = []
    monkeypatch.setattr(steer_eval.TestUsers, "posterior_latents", lambda self, picked, answers=None:
                        seen.append((picked, answers)) or torch.tensor([[1.0], [3.5], [6.0]]))
    np_policy, known = StubPolicy(), StubPolicy()
    config = {"num_context": [0, 4], "seed": 0, "query": {"world_pool": 12}, "policy_eval": {
        "prompts": 1, "samples": 1, "reference_samples": 1, "temperature": 1.0, "max_new_tokens": 8}}
    steer_eval.question_curves({"np": (np_policy, "np_dpo"), "k": (known, "known")}, None, users, None,
                               ["random"], config, "cpu")
    picked, answers = seen[1]
    context = np_policy.contexts[1][:, :, 0, 0]
    assert torch.equal(picked, context.floor().long())
    assert torch.equal(answers, context - context.floor() == 0.5)
    read = []  # the Bayes limit reads the same simulated answers (the recorded ones do not exist for these pairs)
    monkeypatch.setattr(steer_eval.TestUsers, "posterior_weights", lambda self, picked, answers=None:
                        read.append(answers) or torch.ones(len(picked), len(steer_eval.BAYES_GRID), dtype=torch.float64))
    steer_eval.question_curves({"np": (StubPolicy(), "np_dpo")}, None, users, None, ["random"], config, "cpu")
    assert torch.equal(read[1], answers)


def test_bayes_active_questions_are_the_users_answers_off_the_prompt(users):
    """The limit's questions: rows off the evaluated prompt, oriented by the user's answers."""
    contexts, asked, answers = steer_eval.question_contexts(users, None, "bayes-active", PROMPTS[0], 3, seed=1)
    assert all(users.prompt_of[r] != PROMPTS[0] for r in asked.flatten().tolist())
    assert all(set(asked[u].tolist()) <= set(users.rows[u].tolist()) and len(set(asked[u].tolist())) == 3
               for u in range(3))
    assert answers.tolist() == [[False] * 3, [True] * 3, [True] * 3]  # t0 chose short, the others long
    assert torch.equal(contexts[:, :, 0, 0] - asked.double() == 0.5, answers)


def test_question_curves_add_the_bayes_active_limit_to_infogain(users, monkeypatch):
    monkeypatch.setattr(steer_eval, "sample_texts", stub_texts)
    monkeypatch.setattr(steer_eval, "eval_prompts", lambda split, count: PROMPTS[:count])

    class AnyBelief:  # a selector that likes every question alike
        def infogain(self, context, mask, cand, targets):
            return torch.zeros(cand.shape[:2])

    config = {"num_context": [0, 2], "seed": 0, "policy_eval": {
        "prompts": 1, "samples": 1, "reference_samples": 1, "temperature": 1.0, "max_new_tokens": 8}}
    out = steer_eval.question_curves({"np": (StubPolicy(), "np_dpo"), "k": (StubPolicy(), "known")}, AnyBelief(),
                                     users, None, ["random", "infogain"], config, "cpu")
    assert {s for _, s, _ in out} == {"random", "infogain", "bayes-active"}
    assert ("k@posterior", "bayes-active", 2) in out


def test_paired_gaps_by_hand(capsys):
    """The paired gap to random's largest n: each user averaged over a model's seeds, then mean ±
    SEM over users; in brackets the SEM over the seeds' means."""
    import policy_eval
    users = {("a_s0", "random", 3): [0.1, 0.2], ("a_s1", "random", 3): [0.3, 0.5],
             ("a_s0", "infogain", 3): [0.2, 0.2], ("a_s1", "infogain", 3): [0.3, 0.9],
             ("a_s0", "random", 1): [0.0, 0.0], ("a_s1", "random", 1): [0.0, 0.0],
             ("a_s0", "infogain", 1): [0.1, 0.2], ("a_s1", "infogain", 1): [0.3, 0.5],
             ("b", "random", 3): [0.4, 0.6], ("b", "infogain", 3): [0.5, 0.5],
             ("b", "random", 1): [0.0, 0.0], ("b", "infogain", 1): [0.0, 0.0]}
    curves = {k: {"users": torch.tensor(v)} for k, v in users.items()}
    policy_eval.paired_gaps(curves, {"a": ["a_s0", "a_s1"], "b": ["b"]}, [1, 3])
    out = capsys.readouterr().out
    levels, paired = out.split("Paired gap")
    # infogain@3 - random@3: seed 0 per user (0.1, 0.0), seed 1 (0.0, 0.4); per user over seeds
    # (0.05, 0.2): mean 12.5 points, SEM over users 7.5; seed means (0.05, 0.2): SEM 7.5 as well
    assert "| a | infogain | +0.0 ± 0.0 (± 0.0) | +12.5 ± 7.5 (± 7.5) |" in paired
    assert "| a | random |" not in paired
    # one seed, no bracket: (0 - 0.4, 0 - 0.6) and (0.5 - 0.4, 0.5 - 0.6)
    assert "| b | infogain | -50.0 ± 10.0 | +0.0 ± 10.0 |" in paired
    # infogain@3 per user over seeds (0.25, 0.55): mean 40.0, SEM over users 15.0; seed means
    # (0.2, 0.6): SEM 20.0. A pooled SEM over the 4 user-seeds would say 16.8: not what is printed
    assert "| a | infogain | 27.5 ± 7.5 (± 12.5) | 40.0 ± 15.0 (± 20.0) |" in levels
    assert "| a | random | 0.0 ± 0.0 (± 0.0) | 27.5 ± 7.5 (± 12.5) |" in levels
