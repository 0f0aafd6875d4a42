"""The sampler chain against a plain numpy reference of llama.cpp's samplers, with fixed seeds.

Tolerances: the sampler and the reference compute the same float64 quantities from the same float32
logits in different orders, so they differ by float64 rounding only: at most about n 2^-53
relative for a softmax or sum over n terms (n <= 6000 here: under 1e-12), a few 2^-53 for a
penalty (one or two operations per logit).  rtol 1e-9 (probabilities, log-probabilities) and 1e-12
(penalties) sit above that and far below what a wrong candidate set or penalty changes (a dropped
candidate moves the others by its own probability, >= 1e-4 here).  The draw counts are checked
with a chi-square bound from the distribution's tail (CHI2_BOUND), not from one run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgellama.sampling import (GREEDY_TEMPERATURE, MAX_PENALTY, MAX_PENALTY_LAST_N, SAMPLING_OPTIONS, Sampled,
                                Sampler, SamplingError, _shortest_prefix, make_sampler, token_logprobs)

# ----- the reference: each llama.cpp sampler written out with full sorts ---------------------------


def ref_softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def ref_top_k(ids, v, k):
    if k <= 0 or k >= len(ids):
        return ids, v
    order = np.argsort(-v, kind="stable")[:k]
    return ids[order], v[order]


def ref_typical(ids, v, p):
    if p >= 1.0 or len(ids) <= 1:
        return ids, v
    probs = ref_softmax(v)
    entropy = -np.sum(probs * np.log(probs))
    order = np.argsort(np.abs(-np.log(probs) - entropy), kind="stable")
    cum = np.cumsum(probs[order])
    last = len(order)
    for i, c in enumerate(cum):
        if c > p:
            last = i + 1
            break
    return ids[order[:last]], v[order[:last]]


def ref_top_p(ids, v, p):
    if p >= 1.0 or len(ids) <= 1:
        return ids, v
    order = np.argsort(-v, kind="stable")
    cum = np.cumsum(ref_softmax(v)[order])
    last = len(order)
    for i, c in enumerate(cum):
        if c >= p:
            last = i + 1
            break
    return ids[order[:last]], v[order[:last]]


def ref_min_p(ids, v, p):
    if p <= 0.0:
        return ids, v
    keep = ref_softmax(v) >= p * ref_softmax(v).max()
    return ids[keep], v[keep]


def ref_penalized(logits, history, last_n, repeat=1.0, presence=0.0, frequency=0.0):
    x = np.array(logits, dtype=np.float64)
    window = history[-last_n:] if last_n else []
    for t in set(window):
        c = window.count(t)
        x[t] = x[t] * repeat if x[t] <= 0 else x[t] / repeat
        x[t] -= c * frequency + presence
    return x


def ref_distribution(logits, temperature=1.0, top_k=0, typical_p=1.0, top_p=1.0, min_p=0.0):
    x = np.asarray(logits, dtype=np.float64)
    ids, v = np.arange(x.size), x
    ids, v = ref_top_k(ids, v, top_k)
    ids, v = ref_typical(ids, v, typical_p)
    ids, v = ref_top_p(ids, v, top_p)
    ids, v = ref_min_p(ids, v, min_p)
    out = np.zeros(x.size)
    out[ids] = ref_softmax(v / temperature)
    return out


def candidate_set(sampler, logits):
    ids, _ = sampler.candidates(sampler.adjusted_logits(np.asarray(logits)))
    return sorted(int(i) for i in ids)


# hand-made: probabilities 0.40 0.25 0.15 0.10 0.05 0.03 0.02 scattered over 10 ids (3 ids ~0)
PROBS = {7: 0.40, 2: 0.25, 9: 0.15, 0: 0.10, 4: 0.05, 5: 0.03, 1: 0.02}
LOGITS = np.full(10, -30.0, dtype=np.float32)
for _id, _p in PROBS.items():
    LOGITS[_id] = math.log(_p)


@pytest.mark.parametrize("kwargs, want", [
    (dict(top_k=1), [7]),
    (dict(top_k=3), [2, 7, 9]),
    (dict(top_k=0), list(range(10))),
    (dict(top_k=50), list(range(10))),
    (dict(top_p=0.5), [2, 7]),            # 0.40 < 0.5 <= 0.65
    (dict(top_p=0.75), [2, 7, 9]),        # 0.65 < 0.75 <= 0.80
    (dict(top_p=0.0), [7]),               # the most likely token always stays
    (dict(top_p=0.97), [0, 2, 4, 5, 7, 9]),
    (dict(min_p=0.3), [2, 7, 9]),         # p >= 0.12
    (dict(min_p=0.5), [2, 7]),            # p >= 0.20
    (dict(min_p=1.0), [7]),
    (dict(top_k=4, top_p=0.5), [2, 7]),
    (dict(top_k=2, min_p=0.9), [7]),
    (dict(top_p=0.9, min_p=0.2), [0, 2, 7, 9]),
    (dict(top_k=5, top_p=0.75, min_p=0.5), [2, 7]),
])
def test_filters_keep_exactly_the_right_candidates(kwargs, want):
    assert candidate_set(Sampler(temperature=1.0, **kwargs), LOGITS) == want


def test_typical_keeps_the_locally_typical_set():
    # entropy of PROBS ~ 1.561 nats; |-log p - H|: 0.25 -> 0.17, 0.15 -> 0.34, 0.40 -> 0.64, 0.10 -> 0.74 ...
    probs = ref_softmax(LOGITS.astype(np.float64))
    entropy = -np.sum(probs * np.log(probs))
    assert abs(entropy - 1.561) < 0.0005  # the figure above, to its 3 decimals
    # most typical first: 0.25 (id 2), 0.15 (id 9), 0.40 (id 7), 0.10 (id 0); kept until the sum exceeds p
    assert candidate_set(Sampler(temperature=1.0, typical_p=0.2), LOGITS) == [2]           # 0.25 > 0.2
    assert candidate_set(Sampler(temperature=1.0, typical_p=0.3), LOGITS) == [2, 9]        # 0.40 > 0.3
    assert candidate_set(Sampler(temperature=1.0, typical_p=0.45), LOGITS) == [2, 7, 9]    # 0.80 > 0.45
    assert candidate_set(Sampler(temperature=1.0, typical_p=0.85), LOGITS) == [0, 2, 7, 9]  # 0.90 > 0.85
    assert candidate_set(Sampler(temperature=1.0, typical_p=1.0), LOGITS) == list(range(10))
    for p in (0.2, 0.3, 0.45, 0.85, 0.95):
        want, _ = ref_typical(np.arange(10), LOGITS.astype(np.float64), p)
        assert candidate_set(Sampler(temperature=1.0, typical_p=p), LOGITS) == sorted(want.tolist())


def test_typical_can_drop_the_most_likely_token_even_at_temperature_zero():
    """As in llama.cpp, temperature 0 takes the best remaining candidate after the filters."""
    assert Sampler(temperature=0.0, typical_p=0.2)(LOGITS) == 2
    assert Sampler(temperature=0.0)(LOGITS) == 7


@pytest.mark.parametrize("n", [50, 700, 6000])
@pytest.mark.parametrize("settings", [
    dict(top_p=0.9), dict(top_p=0.3), dict(typical_p=0.5), dict(typical_p=0.95),
    dict(top_k=40, top_p=0.8, min_p=0.05), dict(top_k=600, typical_p=0.7, top_p=0.9, min_p=0.01),
    dict(min_p=0.2), dict(top_k=17),
])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_candidates_match_the_reference_on_random_logits(n, settings, scale):
    """Flat (scale 0.5) and peaked (3.0) random logits over vocabularies that exercise the partial
    sort's growth steps (64, 512, 4096 candidates, then all)."""
    logits = (np.random.default_rng(n).standard_normal(n) * scale).astype(np.float32)
    got = Sampler(temperature=0.8, **settings).probabilities(logits)
    want = ref_distribution(logits, temperature=0.8, **settings)
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)


def test_shortest_prefix_equals_a_full_sort():
    rng = np.random.default_rng(3)
    for n in (1, 2, 63, 64, 65, 600, 5000):
        keys = rng.standard_normal(n)
        probs = rng.random(n)
        probs /= probs.sum()
        order = np.argsort(keys, kind="stable")
        cum = np.cumsum(probs[order])
        for mass in (0.0, 0.1, 0.5, 0.99, 1.0):
            for strict in (False, True):
                hit = np.flatnonzero(cum > mass if strict else cum >= mass)
                want = order[:hit[0] + 1] if hit.size else order
                np.testing.assert_array_equal(_shortest_prefix(keys, probs, mass, strict), want)


# ----- penalties and logit bias ----------------------------------------------------------------------

PEN_LOGITS = np.array([2.0, -1.0, 0.0, 3.0, -2.5, 1.5, 0.5, 4.0], dtype=np.float32)


def _with_history(sampler, history):
    sampler.reset(history)
    return sampler


@pytest.mark.parametrize("kwargs", [
    dict(repeat_penalty=1.3), dict(presence_penalty=0.7), dict(frequency_penalty=0.4),
    dict(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
])
@pytest.mark.parametrize("last_n", [1, 3, 5, 64])
def test_penalties_change_exactly_the_window_tokens(kwargs, last_n):
    history = [3, 0, 0, 1, 4, 4, 4, 2, 0, 6]
    s = _with_history(Sampler(penalty_last_n=last_n, **kwargs), history)
    got = s.adjusted_logits(PEN_LOGITS)
    want = ref_penalized(PEN_LOGITS, history, last_n, kwargs.get("repeat_penalty", 1.0),
                         kwargs.get("presence_penalty", 0.0), kwargs.get("frequency_penalty", 0.0))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    window = set(history[-last_n:])
    untouched = [i for i in range(len(PEN_LOGITS)) if i not in window]
    np.testing.assert_array_equal(got[untouched], PEN_LOGITS[untouched])
    assert all(got[i] < PEN_LOGITS[i] or PEN_LOGITS[i] == 0.0 for i in window)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    s = _with_history(Sampler(repeat_penalty=2.0), [0, 1, 2, 2, 2])
    got = s.adjusted_logits(PEN_LOGITS)
    assert got[0] == 1.0 and got[1] == -2.0 and got[2] == 0.0  # counts do not matter for it
    assert got[3] == 3.0


def test_frequency_counts_and_presence_is_once():
    s = _with_history(Sampler(frequency_penalty=0.5, presence_penalty=0.25), [3, 3, 3, 5])
    got = s.adjusted_logits(PEN_LOGITS)
    assert got[3] == 3.0 - 3 * 0.5 - 0.25 and got[5] == 1.5 - 0.5 - 0.25


def test_accept_slides_the_window():
    s = Sampler(repeat_penalty=1.5, presence_penalty=0.1, penalty_last_n=3)
    stream = [0, 3, 3, 5, 7, 0, 3, 6, 6, 6, 1]
    s.reset()
    for i, token in enumerate(stream):
        s.accept(token)
        want = ref_penalized(PEN_LOGITS, stream[:i + 1], 3, 1.5, 0.1)
        np.testing.assert_allclose(s.adjusted_logits(PEN_LOGITS), want, rtol=1e-12)
    # reset starts over from the given tokens
    s.reset([7])
    np.testing.assert_allclose(s.adjusted_logits(PEN_LOGITS), ref_penalized(PEN_LOGITS, [7], 3, 1.5, 0.1))


def test_no_penalty_settings_leave_logits_alone():
    for s in (Sampler(), Sampler(repeat_penalty=1.7, penalty_last_n=0)):
        s.reset([0, 1, 2, 3, 3])
        np.testing.assert_array_equal(s.adjusted_logits(PEN_LOGITS), PEN_LOGITS)


def test_penalty_changes_the_greedy_choice():
    s = _with_history(Sampler(temperature=0.0, repeat_penalty=2.0), [7])
    assert s(PEN_LOGITS) == 3          # 4.0 / 2 = 2.0 < 3.0
    assert Sampler(temperature=0.0)(PEN_LOGITS) == 7


def test_logit_bias_adds_and_bans():
    s = Sampler(temperature=0.0, logit_bias={7: -math.inf, 1: 2.5, 0: -0.5})
    got = s.adjusted_logits(PEN_LOGITS)
    np.testing.assert_array_equal(got[[1, 0]], [1.5, 1.5])
    assert got[7] == -math.inf and np.array_equal(np.delete(got, [0, 1, 7]), np.delete(PEN_LOGITS, [0, 1, 7]))
    assert s(PEN_LOGITS) == 3
    assert 7 not in candidate_set(Sampler(temperature=1.0, logit_bias={7: -math.inf}), PEN_LOGITS)
    # a banned token is never drawn, even the most likely one
    s = Sampler(temperature=5.0, seed=1, logit_bias={7: -math.inf, 3: -math.inf})
    assert not {3, 7} & {s(PEN_LOGITS) for _ in range(2000)}
    # a big positive bias forces a token
    assert Sampler(temperature=1.0, seed=0, logit_bias={4: 100.0})(PEN_LOGITS) == 4


def test_logit_bias_comes_before_the_penalties_as_in_llama_cpp():
    s = _with_history(Sampler(repeat_penalty=2.0, logit_bias={0: 2.0}), [0])
    assert s.adjusted_logits(PEN_LOGITS)[0] == (2.0 + 2.0) / 2.0


def test_every_token_banned_is_a_clear_error():
    s = Sampler(temperature=1.0, logit_bias={i: -math.inf for i in range(len(PEN_LOGITS))})
    with pytest.raises(SamplingError, match="banned"):
        s(PEN_LOGITS)


# ----- draws ----------------------------------------------------------------------------------------

CHI2_BOUND = 40.0  # df <= 5: the 1e-6 tail starts near 35.9; with fixed seeds this is deterministic anyway


def _chi_square(draws, probs):
    counts = np.bincount(draws, minlength=probs.size)
    assert counts[probs == 0].sum() == 0, "a token outside the candidates was drawn"
    keep = probs > 0
    expected = probs[keep] * len(draws)
    return float(((counts[keep] - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1.0), dict(temperature=0.6), dict(temperature=2.5),
    dict(temperature=1.0, top_k=4), dict(temperature=0.8, top_p=0.9), dict(temperature=1.3, min_p=0.1),
    dict(temperature=1.0, typical_p=0.6),
])
def test_draws_follow_the_distribution(kwargs):
    logits = np.log(np.array([0.05, 0.3, 0.1, 0.25, 0.2, 0.1], dtype=np.float64)).astype(np.float32)
    s = Sampler(seed=1234, **kwargs)
    probs = ref_distribution(logits, **kwargs)
    np.testing.assert_allclose(s.probabilities(logits), probs, rtol=1e-9)
    draws = np.array([s(logits) for _ in range(20000)])
    assert _chi_square(draws, probs) < CHI2_BOUND


def test_chi_square_check_rejects_a_wrong_distribution():
    """The check has teeth: temperature-1 draws do not pass as temperature-0.6 draws."""
    logits = np.log(np.array([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])).astype(np.float32)
    s = Sampler(temperature=1.0, seed=1234)
    draws = np.array([s(logits) for _ in range(20000)])
    assert _chi_square(draws, ref_distribution(logits, temperature=0.6)) > 10 * CHI2_BOUND


def test_same_seed_same_tokens():
    logits = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    kw = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, typical_p=0.98, repeat_penalty=1.1)

    def run(seed):
        s = Sampler(seed=seed, **kw)
        s.reset([1, 2, 3])
        out = []
        for _ in range(200):
            t = s(logits)
            s.accept(t)
            out.append(t)
        return out

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_temperature_zero_is_argmax_with_ties_to_the_lowest_id():
    logits = np.array([1.0, 3.0, 0.5, 3.0], dtype=np.float32)
    assert Sampler()(logits) == 1
    assert Sampler(top_k=2, top_p=0.5, min_p=0.5)(logits) in (1, 3)
    assert Sampler(temperature=0.0).probabilities(logits).tolist() == [0, 1, 0, 0]


def test_a_nan_logit_is_a_clear_error():
    with pytest.raises(SamplingError, match="NaN"):
        Sampler()(np.array([0.0, np.nan, 1.0], dtype=np.float32))
    with pytest.raises(SamplingError, match="one non-empty row"):
        Sampler()(np.zeros((2, 3), dtype=np.float32))


# ----- log-probabilities ------------------------------------------------------------------------------

def test_logprobs_are_the_models_log_softmax():
    logits = np.random.default_rng(5).standard_normal(100).astype(np.float32) * 2
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    s = Sampler(temperature=0.7, top_k=10, repeat_penalty=1.5, logit_bias={3: 1.0}, seed=3, logprobs=5)
    s.reset([int(np.argmax(logits))])
    picked = s.sample(logits)
    assert isinstance(picked, Sampled)
    assert picked.logprob == pytest.approx(ref[picked.token], abs=1e-9)
    top = np.argsort(-ref, kind="stable")[:5]
    assert [t.token for t in picked.top_logprobs] == top.tolist()
    np.testing.assert_allclose([t.logprob for t in picked.top_logprobs], ref[top], atol=1e-9)

    only = Sampler(logprobs=0).sample(logits)
    assert only.top_logprobs == [] and only.logprob == pytest.approx(ref.max(), abs=1e-9)
    assert Sampler().sample(logits) == Sampled(int(np.argmax(logits)), None, None)
    logprob, alternatives = token_logprobs(logits[:3], 0, 20)
    assert len(alternatives) == 3


# ----- validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=-0.01), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(typical_p=1.2), "typical_p"),
    (dict(repeat_penalty=-1.0), "repeat_penalty"),
    (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(presence_penalty=-0.5), "presence_penalty"),
    (dict(frequency_penalty=-0.5), "frequency_penalty"),
    (dict(penalty_last_n=-1), "penalty_last_n"),
    (dict(penalty_last_n=1.0), "penalty_last_n"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(seed=-3), "seed"),
    (dict(seed="7"), "seed"),
    (dict(logit_bias=[(1, 2.0)]), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(logit_bias={5: float("inf")}), r"logit_bias\[5\]"),
    (dict(logit_bias={5: float("nan")}), r"logit_bias\[5\]"),
    (dict(logit_bias={8: 1.0}, n_vocab=8), "outside the vocabulary"),
    (dict(n_vocab=0), "n_vocab"),
])
def test_invalid_parameters_raise_sampling_error(kwargs, match):
    with pytest.raises(SamplingError, match=match):
        Sampler(**kwargs)


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-0.1), "temperature"), (dict(top_k=2.5), "top_k"), (dict(top_p=1.01), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(typical_p=0.0), "typical_p"), (dict(seed="7"), "seed"),
    (dict(repeat_penalty=1e308), "repeat_penalty"), (dict(repeat_penalty=5e-324), "repeat_penalty"),
    (dict(presence_penalty=MAX_PENALTY * 2), "presence_penalty"), (dict(frequency_penalty=1e308), "frequency_penalty"),
    (dict(penalty_last_n=MAX_PENALTY_LAST_N + 1), "penalty_last_n"), (dict(logprobs=21), "logprobs"),
    (dict(logit_bias={5: float("nan")}), "logit_bias"), (dict(logit_bias=[1]), "logit_bias"),
    (dict(n_vocab=0), "n_vocab"),
])
def test_errors_carry_the_parameter(kwargs, param):
    """Issue 13 item 4: the CLI and the server name the setting from ``param``, never from the text."""
    with pytest.raises(SamplingError) as e:
        Sampler(**kwargs)
    assert e.value.param == param
    if param in SAMPLING_OPTIONS:  # what is accepted, for "must be {expected}" in the caller's terms
        assert e.value.expected == SAMPLING_OPTIONS[param].expected and e.value.value == kwargs[param]
    with pytest.raises(SamplingError) as e:
        Sampler(logit_bias={8: 1.0})(PEN_LOGITS)
    assert e.value.param == "logit_bias"
    with pytest.raises(SamplingError) as e:
        Sampler()(np.array([0.0, np.nan]))
    assert e.value.param is None  # the logits, not a setting


def test_boundaries_of_the_documented_ranges_are_accepted():
    s = Sampler(repeat_penalty=1 / MAX_PENALTY, presence_penalty=MAX_PENALTY, frequency_penalty=MAX_PENALTY,
                penalty_last_n=MAX_PENALTY_LAST_N, temperature=5e-324)
    assert s.repeat_penalty == 0.001 and s.penalty_last_n == 2 ** 30 and s.greedy
    assert Sampler(repeat_penalty=MAX_PENALTY).repeat_penalty == 1000.0


@pytest.mark.parametrize("t", [5e-324, 1e-300, 1e-9, GREEDY_TEMPERATURE * 0.999])
def test_temperatures_below_the_epsilon_are_greedy(t):
    """5e-324 made logits / T infinite, every weight NaN, and the draw the last candidate."""
    logits = np.array([0.5, 3.0, 2.9, 1.0], dtype=np.float32)  # the best is not the last
    s = Sampler(temperature=t, seed=0)
    assert [s(logits) for _ in range(10)] == [1] * 10
    np.testing.assert_array_equal(s.probabilities(logits), [0.0, 1.0, 0.0, 0.0])
    state = s.rng.bit_generator.state
    s(logits)
    assert s.rng.bit_generator.state == state  # greedy: no draw


def test_extreme_values_in_range_never_make_nan():
    """At and above the epsilon, with the largest penalties and biases in range and float32's
    extreme logits, the distribution is finite, sums to 1 and the draw is a candidate."""
    f32 = float(np.finfo(np.float32).max)
    logits = np.array([f32, -f32, 0.0, 1.0, -1.0, f32 * 0.5], dtype=np.float32)
    for kwargs in (dict(temperature=GREEDY_TEMPERATURE), dict(temperature=1e300),
                   dict(temperature=1.0, repeat_penalty=MAX_PENALTY, presence_penalty=MAX_PENALTY,
                        frequency_penalty=MAX_PENALTY),
                   dict(temperature=1.0, repeat_penalty=1 / MAX_PENALTY),
                   dict(temperature=0.5, logit_bias={1: 1e308, 2: -1e308})):
        s = _with_history(Sampler(seed=0, **kwargs), [0, 1, 1, 5])
        p = s.probabilities(logits)
        assert np.isfinite(p).all() and p.sum() == pytest.approx(1.0, abs=1e-12), kwargs
        assert all(p[s(logits)] > 0 for _ in range(5)), kwargs
    # the bias of 1e308 makes token 1 certain; a huge temperature spreads the mass evenly
    assert Sampler(temperature=0.5, logit_bias={1: 1e308}).probabilities(logits)[1] == 1.0
    np.testing.assert_allclose(Sampler(temperature=1e300).probabilities(logits), np.full(6, 1 / 6), rtol=1e-12)


def test_make_sampler_takes_a_sampler_or_settings():
    given = Sampler(seed=1)
    assert make_sampler(given, {}, 10) is given
    made = make_sampler(None, {"temperature": 0.5, "top_k": 3}, 10)
    assert (made.temperature, made.top_k, made.n_vocab) == (0.5, 3, 10)
    with pytest.raises(SamplingError, match="not both") as e:
        make_sampler(given, {"top_k": 3})
    assert e.value.param == "top_k"
    with pytest.raises(TypeError):
        make_sampler(None, {"temprature": 0.5})


def test_vocabulary_checks_once_the_size_is_known():
    s = Sampler(logit_bias={8: 1.0})  # size unknown yet
    with pytest.raises(SamplingError, match="logit_bias token id 8 is outside the vocabulary"):
        s(PEN_LOGITS)
    s = Sampler(repeat_penalty=1.2)
    s.reset([2, 99])
    with pytest.raises(SamplingError, match="token id 99 in the penalty window"):
        s(PEN_LOGITS)
    s = Sampler(n_vocab=8, repeat_penalty=1.2)
    with pytest.raises(SamplingError, match="token id"):
        s.accept(8)
    with pytest.raises(SamplingError, match="made for a vocabulary of 8"):
        s(np.zeros(9, dtype=np.float32))


def test_sampling_error_is_a_value_error():
    assert issubclass(SamplingError, ValueError)
