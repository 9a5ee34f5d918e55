"""The batched sampler: filters, reproducible seeds, logprobs, penalties and the host transfer."""

import pytest
import torch

from sliceserve.engine.requests import SamplingParams
from sliceserve.engine.sampler import (
    SamplingRows,
    adjust_logits,
    gumbel_noise,
    murmur3_32,
    sample,
    uniforms,
)

V = 8
LOGITS = torch.tensor([2.0, 1.5, 1.1, 0.4, 0.0, -0.6, -1.0, -2.0])  # no filter boundary sits near a cut


def rows_for(params, counters=None, seeds=None, **kw):
    counters = [0] * len(params) if counters is None else counters
    seeds = [p.seed or 0 for p in params] if seeds is None else seeds
    return SamplingRows.build(params, counters, seeds, "cpu", kw.pop("vocab_size", V), **kw)


def draws(params: SamplingParams, n: int, logits=LOGITS, seed: int = 0, **kw) -> torch.Tensor:
    """Tokens for counters 0..n-1 of one request: n rows of one batch (each depends on its counter only)."""
    rows = rows_for([params] * n, list(range(n)), [seed] * n, vocab_size=logits.numel(), **kw)
    return sample(logits.expand(n, -1), rows).tokens


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Per-row float64 reference: temperature, top-k, top-p (the old sampler's rules), min-p."""
    scores = logits.double() / p.temperature
    if 0 < p.top_k < scores.numel():
        scores = scores.masked_fill(scores < torch.topk(scores, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        ranked, order = torch.sort(scores, descending=True)
        probs = ranked.softmax(-1)
        scores = scores.scatter(0, order, ranked.masked_fill(probs.cumsum(-1) - probs >= p.top_p, float("-inf")))
    if p.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return scores.softmax(-1)


# ---- the hash --------------------------------------------------------------------------------


def test_murmur3_matches_published_vectors():
    word = lambda x: [torch.tensor(x)]
    assert int(murmur3_32(word(0))) == 0x2362F9DE
    assert int(murmur3_32(word(0x61616161), seed=0x9747B28C)) == 0x5A97808A  # "aaaa"
    assert int(murmur3_32(word(int.from_bytes(b"abcd", "little")), seed=0x9747B28C)) == 0xF0478627


def test_uniforms_are_in_the_open_interval_and_flat():
    u = uniforms(torch.tensor([0, -1, 2**62]), torch.arange(3), 4096)
    assert u.dtype == torch.float32 and u.shape == (3, 4096)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert torch.histc(u, bins=10, min=0, max=1).div(u.numel()).sub(0.1).abs().max() < 0.01


# ---- greedy and the filters ------------------------------------------------------------------


def test_greedy_is_argmax_and_only_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    rows = rows_for([SamplingParams(temperature=0.0)] * 6, vocab_size=50)
    assert rows.all_greedy and rows.temperatures is None and rows.seeds is None
    assert torch.equal(sample(logits, rows).tokens, logits.argmax(-1))


def test_greedy_rows_among_drawn_rows_take_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=t) for t in (0.0, 1.0, 1e-6, 2.0)]
    tokens = sample(logits, rows_for(params, vocab_size=50)).tokens
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.3),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.9, min_p=0.1),
    ],
    ids=["plain", "cold", "top_k", "top_p", "min_p", "all"],
)
def test_draws_follow_the_filtered_distribution(params):
    n = 20_000
    expected = filtered_probs(LOGITS, params)
    counts = torch.bincount(draws(params, n, seed=11), minlength=V).double()
    assert torch.all(counts[expected == 0] == 0), "a filtered token was drawn"
    kept = expected > 0
    chi2 = ((counts[kept] - n * expected[kept]) ** 2 / (n * expected[kept])).sum()
    assert chi2 < 30, f"chi-square {chi2:.1f} over {int(kept.sum()) - 1} degrees of freedom"


def test_top_p_keeps_the_top_token_even_at_zero():
    assert torch.all(draws(SamplingParams(top_p=0.0), 200) == 0)


# ---- seeds ---------------------------------------------------------------------------------------


def test_a_row_draws_the_same_alone_or_anywhere_in_a_mixed_batch():
    gen = torch.Generator().manual_seed(2)
    vocab = 64
    mine, theirs = torch.randn(1, vocab, generator=gen), torch.randn(4, vocab, generator=gen)
    me = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=123)
    others = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=1.5, min_p=0.05, presence_penalty=1.0, logit_bias={3: 2.0}, seed=5),
        SamplingParams(temperature=1.0, allowed_token_ids=[1, 2, 3], repetition_penalty=1.2, seed=6),
        SamplingParams(temperature=0.5, frequency_penalty=0.5, bad_words_ids=[[7]], min_tokens=4, seed=7),
    ]
    history = [[1, 2, 3], [4, 4], [5], [6, 7, 8, 9]]
    for counter in range(40):

        def tokens(params, logits, outputs, counter=counter):
            rows = SamplingRows.build(
                params,
                [counter] * len(params),
                [p.seed or 0 for p in params],
                "cpu",
                vocab,
                output_ids=outputs,
                prompt_ids=[[10, 11]] * len(params),
                eos_ids={0},
            )
            return sample(logits, rows).tokens

        alone = tokens([me], mine, [[]])[0]
        first = tokens([me, *others], torch.cat([mine, theirs]), [[], *history])[0]
        last = tokens([*others, me], torch.cat([theirs, mine]), [*history, []])[-1]
        assert alone == first == last, counter


def test_different_seeds_draw_differently_and_a_seed_repeats():
    flat = torch.zeros(V)
    a, b = draws(SamplingParams(), 400, flat, seed=1), draws(SamplingParams(), 400, flat, seed=2)
    assert torch.equal(a, draws(SamplingParams(), 400, flat, seed=1))
    assert (a == b).double().mean() < 0.25  # 1/8 by chance


def test_seeds_use_their_64_bits():
    params = SamplingParams()
    flat = torch.zeros(64)
    assert torch.equal(draws(params, 50, flat, seed=-5), draws(params, 50, flat, seed=2**64 - 5))
    assert not torch.equal(draws(params, 50, flat, seed=2**63 - 1), draws(params, 50, flat, seed=2**32 - 1))


# ---- logprobs ------------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_logits_for_the_rows_that_ask():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.5, logprobs=3, logit_bias={5: 50.0}),
        SamplingParams(temperature=2.0, top_k=4, logprobs=5, presence_penalty=2.0),
    ]
    tokens, logprobs = sample(logits, rows_for(params, output_ids=[[]] * 4, vocab_size=30)).to_host()
    reference = torch.log_softmax(logits, dim=-1)
    assert logprobs[0] is None
    for row, n in ((1, 0), (2, 3), (3, 5)):
        chosen, top = logprobs[row]
        assert chosen == pytest.approx(reference[row, tokens[row]].item(), abs=1e-6)
        values, ids = reference[row].topk(n)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-6)
    assert tokens[2] == 5  # the bias moved the draw, not the reported logprobs
    assert logprobs[2][0] == pytest.approx(reference[2, 5].item(), abs=1e-6)


def test_host_transfer_gives_python_values():
    rows = rows_for([SamplingParams(logprobs=2), SamplingParams()])
    tokens, logprobs = sample(LOGITS.expand(2, -1), rows).to_host()
    assert all(type(t) is int for t in tokens) and logprobs[1] is None
    chosen, top = logprobs[0]
    assert type(chosen) is float and len(top) == 2
    assert all(type(i) is int and type(v) is float for i, v in top)
    assert sample(LOGITS[None], rows_for([SamplingParams(temperature=0.0)])).to_host() == ([0], [None])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4)).to(dtype)
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(top_p=0.9, min_p=0.05, logprobs=1),
        SamplingParams(top_k=7, presence_penalty=0.5),
    ]
    build = lambda: rows_for(params, [3, 4, 5], [1, 2, 3], vocab_size=40, output_ids=[[1], [2], [3]])
    half, full = sample(logits, build()), sample(logits.float(), build())
    assert torch.equal(half.tokens, full.tokens)
    assert half.to_host() == full.to_host()


# ---- penalties and biases ---------------------------------------------------------------------------


def test_the_logits_are_not_modified():
    logits = LOGITS.clone()[None]
    adjust_logits(
        logits,
        rows_for(
            [
                SamplingParams(
                    logit_bias={1: 5.0}, presence_penalty=1.0, repetition_penalty=2.0, allowed_token_ids=[1, 2]
                )
            ],
            output_ids=[[0]],
            prompt_ids=[[1]],
        ),
    )
    assert torch.equal(logits[0], LOGITS)


def test_presence_penalty():
    params = SamplingParams(temperature=0.0, presence_penalty=2.0)
    rows = rows_for([params], output_ids=[[0, 0, 2]])
    expected = LOGITS - 2.0 * torch.tensor([1.0, 0, 1, 0, 0, 0, 0, 0])
    assert torch.equal(adjust_logits(LOGITS[None], rows)[0], expected)
    assert sample(LOGITS[None], rows).tokens.item() == 1  # the generated 0 is not chosen again


def test_frequency_penalty_counts_occurrences():
    rows = rows_for([SamplingParams(frequency_penalty=0.75)], output_ids=[[0, 0, 1]])
    expected = LOGITS - 0.75 * torch.tensor([2.0, 1, 0, 0, 0, 0, 0, 0])
    assert torch.equal(adjust_logits(LOGITS[None], rows)[0], expected)


def test_repetition_penalty_over_prompt_and_output():
    rows = rows_for([SamplingParams(repetition_penalty=2.0)], output_ids=[[0]], prompt_ids=[[6, 0]])
    expected = LOGITS.clone()
    expected[0], expected[6] = LOGITS[0] / 2, LOGITS[6] * 2  # positive divided, negative multiplied
    assert torch.equal(adjust_logits(LOGITS[None], rows)[0], expected)


def test_penalties_without_history_are_refused():
    with pytest.raises(ValueError):
        rows_for([SamplingParams(presence_penalty=1.0)])
    with pytest.raises(ValueError):
        rows_for([SamplingParams(repetition_penalty=1.1)], output_ids=[[]])


def test_logit_bias_forces_and_forbids():
    assert torch.all(draws(SamplingParams(logit_bias={6: 100.0}), 200) == 6)
    greedy = SamplingParams(temperature=0.0, logit_bias={0: -100.0})
    assert sample(LOGITS[None], rows_for([greedy])).tokens.item() == 1


def test_min_tokens_holds_back_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 3.0, 5.0, 1.0]])  # eos (2), then a stop token (1), are the most likely
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[1])
    picks = [sample(logits, rows_for([params], [c], vocab_size=4, eos_ids={2})).tokens.item() for c in range(5)]
    assert picks == [3, 3, 3, 2, 2]
    ignoring = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[1], ignore_eos=True)
    assert sample(logits, rows_for([ignoring], [0], vocab_size=4, eos_ids={2})).tokens.item() == 2


def test_allowed_token_ids_restrict_only_their_row():
    flat = torch.zeros(V)
    assert set(draws(SamplingParams(allowed_token_ids=[1, 4]), 200, flat).tolist()) == {1, 4}
    params = [SamplingParams(allowed_token_ids=[1, 4]), SamplingParams()] * 100
    tokens = sample(flat.expand(200, -1), rows_for(params, list(range(200)))).tokens
    assert set(tokens[0::2].tolist()) == {1, 4} and len(set(tokens[1::2].tolist())) == V


def test_bad_words():
    params = SamplingParams(temperature=0.0, bad_words_ids=[[0], [3, 1]])
    picks = lambda output: sample(LOGITS[None], rows_for([params], output_ids=[output])).tokens.item()
    assert picks([]) == 1  # [0] is banned outright
    assert picks([2, 3]) == 2  # 1 would complete [3, 1]
    assert picks([3, 2]) == 1
    assert set(draws(SamplingParams(bad_words_ids=[[0], [1]]), 300, output_ids=[[]] * 300).tolist()).isdisjoint({0, 1})


# ---- devices --------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_what_the_cpu_draws():
    seeds, counters = torch.tensor([0, -1, 2**40 + 3, 9]), torch.tensor([0, 1, 2**33, 7])
    assert torch.equal(uniforms(seeds, counters, 1000), uniforms(seeds.cuda(), counters.cuda(), 1000).cpu())
    fused = gumbel_noise(seeds.cuda(), counters.cuda(), 1000).cpu()  # torch.compile'd on CUDA
    torch.testing.assert_close(fused, gumbel_noise(seeds, counters, 1000), rtol=1e-6, atol=1e-6)
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, logprobs=3)] * 64
    build = lambda device: SamplingRows.build(params, list(range(64)), list(range(64)), device, 1000)
    cpu, cuda = sample(logits, build("cpu")), sample(logits.cuda(), build("cuda"))
    assert (cpu.tokens == cuda.tokens.cpu()).double().mean() > 0.95  # log/softmax may round apart at near-ties
