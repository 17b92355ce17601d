"""
The steering world: train_policy.py's default task, a CPU-sized text world where
users form a continuum and every response has a gold reward computed from its text.

    python world.py                       # a few users, their optimum, a scored response

A prompt asks about a topic ("Tell me about bees."). A response is 1-6 sentences
"<subject> <predicate> ."; the subject is the prompt's topic (on topic) or another one,
and each predicate has a tone: warm (+1), plain (0) or harsh (-1).

A user is a point u = (length, tone) drawn from the population: a preferred number of
sentences, uniform in [1, 6], and a preferred mean tone, uniform in [-1, 1], drawn
independently. Every user shares one quality attribute, relevance: the share of
sentences that are well formed and on the prompt's topic. A user's gold reward is

    R(y; u) = 4 * relevance - 0.3 * (sentences - length)^2 - 2 * (mean tone - tone)^2

and their choice between two responses is Bradley-Terry on it (temperature 1), so no
single pair reveals them. The best response a user can get under this generator
(relevance 1, any length in 1..6, any mix of tones) is found by exhaustive search:
`best_reward(u)` is exact.

Topics are split: preference pairs of train, val and test users are about disjoint
topics, so test prompts are on topics never seen in preference training. The base
model (the reference policy) is fine-tuned on responses to prompts on every topic, as
a pretrained model knows every topic before preference training.
"""

import itertools
import math
import re

import numpy as np
import torch

TOPICS = {
    "train": "cats dogs rain music bread stars trees boats tea snow bees maps".split(),
    "val": "lamps clocks hills rivers".split(),
    "test": "owls kites shells drums".split(),
}
ALL_TOPICS = [t for split in ("train", "val", "test") for t in TOPICS[split]]
TEMPLATES = ["Tell me about {}.", "What about {}?", "Describe {}.", "Say something on {}.",
             "I want to hear about {}!", "{}, please."]
PREDICATES = {  # tone -> predicates
    1: ["are lovely", "bring joy", "feel warm", "make people smile"],
    0: ["exist", "can be found", "have names", "are common"],
    -1: ["are dull", "cause trouble", "feel cold", "seem awful"],
}
TONE_OF = {p: tone for tone, ps in PREDICATES.items() for p in ps}
MAX_SENTENCES = 6
LENGTH_RANGE, TONE_RANGE = (1.0, 6.0), (-1.0, 1.0)  # the population: uniform on each, independent
RELEVANCE_WEIGHT, LENGTH_WEIGHT, TONE_WEIGHT = 4.0, 0.3, 2.0
ATTRIBUTES = ("length", "tone")  # the preference dimensions, in the order of a user's vector


def vocabulary():
    words = set(ALL_TOPICS) | {w for p in TONE_OF for w in p.split()} | {".", "?", "!", ","}
    words |= {w.lower() for t in TEMPLATES for w in re.findall(r"[A-Za-z]+", t)}
    return ["<pad>", "<unk>", "<bos>", "<eos>"] + sorted(words)


def tokenizer():
    """The world's word-level tokenizer (lower-cases and splits off punctuation, as people type)."""
    return word_tokenizer(vocabulary())


def word_tokenizer(words):
    """A word-level Hugging Face tokenizer over a word list, built in code: it lower-cases
    and splits off punctuation, as people type."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # people type "Tell me about bees." for "tell me about bees ."; the toy texts tokenize as before
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def prompts(split):
    return [t.format(topic) for topic in TOPICS[split] for t in TEMPLATES]


def words_of(text):
    """Lower-case words and sentence marks, as the world's tokenizer reads them."""
    return re.findall(r"[a-z]+|[.!?,]", text.lower())


def prompt_topic(prompt):
    return next((w for w in words_of(prompt) if w in ALL_TOPICS), None)


# -----------------------------------------------------------------------------
# attributes and the gold reward: text in, numbers out


def sentences_of(text):
    """Word lists of the response's sentences (split at . ! ?), empty ones dropped."""
    sentences, current = [], []
    for w in words_of(text):
        if w in ".!?":
            sentences.append(current)
            current = []
        else:
            current.append(w)
    return [s for s in sentences + [current] if s]


def attributes(prompt, text):
    """{'length': sentences, 'tone': mean tone (0 if none), 'relevance': share of sentences
    that are well formed ('<topic> <predicate>') and about the prompt's topic}."""
    topic, sentences = prompt_topic(prompt), sentences_of(text)
    tones, relevant = [], 0
    for s in sentences:
        predicate = " ".join(s[1:])
        well_formed = s[0] in ALL_TOPICS and predicate in TONE_OF
        tones.append(TONE_OF[predicate] if well_formed else 0)
        relevant += well_formed and s[0] == topic
    k = len(sentences)
    return {"length": float(k), "tone": sum(tones) / k if k else 0.0, "relevance": relevant / k if k else 0.0}


def reward_of(attrs, preference):
    """The gold reward of a response with these attributes for a user (length, tone)."""
    length, tone = preference
    return (RELEVANCE_WEIGHT * attrs["relevance"] - LENGTH_WEIGHT * (attrs["length"] - length) ** 2
            - TONE_WEIGHT * (attrs["tone"] - tone) ** 2)


def gold_reward(prompt, text, preference):
    return reward_of(attributes(prompt, text), preference)


def candidate_responses():
    """The attributes of every response with relevance 1: each length and each count of warm and
    harsh sentences. Every user's best response is one of them."""
    return [{"length": k, "tone": (warm - harsh) / k, "relevance": 1.0} for k in range(1, MAX_SENTENCES + 1)
            for warm, harsh in itertools.product(range(k + 1), repeat=2) if warm + harsh <= k]


def best_reward(preference):
    """The largest gold reward any response of the world gets from this user (exact search)."""
    return max(reward_of(attrs, preference) for attrs in candidate_responses())


def preference_posterior(answers, points=41, temperature=1.0):
    """What a person's answers say about their preference, exactly: the posterior under the
    population prior (uniform on a points x points grid) and Bradley-Terry choices.
    answers: [(prompt, chosen text, rejected text)]. Returns {dimension: (mean, sd)}."""
    grid = torch.cartesian_prod(torch.linspace(*LENGTH_RANGE, points, dtype=torch.float64),
                                torch.linspace(*TONE_RANGE, points, dtype=torch.float64))  # (G, 2)
    log_w = torch.zeros(len(grid), dtype=torch.float64)
    for prompt, chosen, rejected in answers:
        margin = (reward_of(attributes(prompt, chosen), grid.T) - reward_of(attributes(prompt, rejected), grid.T))
        log_w += torch.nn.functional.logsigmoid(margin / temperature)
    w = torch.softmax(log_w, 0)
    mean = w @ grid
    sd = (w @ (grid - mean) ** 2).sqrt()
    return {name: (mean[d].item(), sd[d].item()) for d, name in enumerate(ATTRIBUTES)}


def preference_latent(preference):
    """A user's preference scaled to [-1, 1] per dimension: the known-preference policy's latent."""
    (lo_l, hi_l), (lo_t, hi_t) = LENGTH_RANGE, TONE_RANGE
    return [2 * (preference[0] - lo_l) / (hi_l - lo_l) - 1, 2 * (preference[1] - lo_t) / (hi_t - lo_t) - 1]


PREFERENCE_GRID = [(l, t) for l in np.linspace(*LENGTH_RANGE, 11) for t in np.linspace(*TONE_RANGE, 11)]


def pair_kind(prompt, text_a, text_b):
    """'agree' if every user of the population (an 11 x 11 grid over its support) prefers
    the same response strictly, else 'conflict'."""
    attrs = attributes(prompt, text_a), attributes(prompt, text_b)
    signs = {np.sign(reward_of(attrs[1], u) - reward_of(attrs[0], u)) for u in PREFERENCE_GRID}
    return "agree" if len(signs) == 1 and 0 not in signs else "conflict"


# -----------------------------------------------------------------------------
# the generator: responses, users and their choices


def sample_response(topic, other_topics, rng):
    """A response from the world's mixed distribution (what the base model learns): a
    uniform number of sentences, and per response a share of on-topic sentences and a
    mix of tones, so responses differ in every attribute."""
    on_topic = rng.uniform(0.3, 1.0)
    tone_mix = rng.dirichlet([1.0, 1.0, 1.0])  # P(warm), P(plain), P(harsh)
    sentences = []
    for _ in range(int(rng.integers(1, MAX_SENTENCES + 1))):
        subject = topic if rng.random() < on_topic else other_topics[rng.integers(len(other_topics))]
        tone = (1, 0, -1)[rng.choice(3, p=tone_mix)]
        predicates = PREDICATES[tone]
        sentences.append(f"{subject} {predicates[rng.integers(len(predicates))]} .")
    return " ".join(sentences)


def sample_preferences(num, rng):
    return np.stack([rng.uniform(*LENGTH_RANGE, num), rng.uniform(*TONE_RANGE, num)], 1)  # (num, 2)


def corpus(num, seed=0):
    """(prompt, response) pairs on every topic: what the base model is fine-tuned on."""
    rng = np.random.default_rng(seed)
    everything = [q for split in TOPICS for q in prompts(split)]
    out = []
    for _ in range(num):
        prompt = everything[rng.integers(len(everything))]
        out.append((prompt, sample_response(prompt_topic(prompt), [t for t in ALL_TOPICS if t != prompt_topic(prompt)],
                                            rng)))
    return out


def make_pairs(users=(1000, 40, 100), pairs_per_user=24, answers_per_pair=4, temperature=1.0, seed=0):
    """Text pairs in text.py's JSONL schema and {user: [length, tone]}.

    users: how many train, val and test users. Every user answers exactly pairs_per_user
    pairs, on prompts of their split's topics, Bradley-Terry on their gold reward. A pair
    is shown to answers_per_pair users of its split (fewer for the last few), as data
    sets give one pair to several annotators: the same pair then carries conflicting
    choices, which only a policy that reads the user can fit."""
    rng = np.random.default_rng(seed)
    rows, preferences = [], {}
    for split, count in zip(("train", "val", "test"), users):
        names = [f"{split}{i:04d}" for i in range(count)]
        for name, preference in zip(names, sample_preferences(count, rng)):
            preferences[name] = [round(float(v), 4) for v in preference]
        capacity = np.full(count, pairs_per_user)
        while capacity.sum() > 0:
            k = min(answers_per_pair, int((capacity > 0).sum()))
            answering = rng.choice(count, k, replace=False, p=capacity / capacity.sum())
            capacity[answering] -= 1
            rows.append(annotated_pair(split, [names[u] for u in sorted(answering)], preferences, temperature, rng))
            rows[-1]["id"] = len(rows) - 1
    return rows, preferences


def annotated_pair(split, names, preferences, temperature, rng):
    prompt = prompts(split)[rng.integers(len(prompts(split)))]
    topic = prompt_topic(prompt)
    others = [t for t in TOPICS[split] if t != topic]
    a, b = (sample_response(topic, others, rng) for _ in range(2))
    choices = {}
    for name in names:
        margin = gold_reward(prompt, b, preferences[name]) - gold_reward(prompt, a, preferences[name])
        choices[name] = int(rng.random() < 1 / (1 + math.exp(-margin / temperature)))
    return {"prompt": prompt, "response_a": a, "response_b": b, "choices": choices, "split": split}


def user_latents(labels, preferences):
    """(L, 2) known-preference latents of `labels` (users) from {user: [length, tone]}."""
    return torch.tensor([preference_latent(preferences[label]) for label in labels], dtype=torch.float32)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    for preference in sample_preferences(3, rng):
        text = sample_response("bees", TOPICS["train"], rng)
        print(f"user (length {preference[0]:.2f}, tone {preference[1]:+.2f}): best reward "
              f"{best_reward(preference):.3f}; {text!r} scores {gold_reward('Tell me about bees.', text, preference):.3f}")
