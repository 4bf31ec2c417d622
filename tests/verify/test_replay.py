"""The committee's seeded replay and typicality race every answer position at once; the worker
samples one token at a time. Both must draw the same numbers and keep the same nucleus, bit for
bit, or an honest seeded answer would look like a seed-ignoring one. Checked on synthetic
logits (a 5,000-token vocabulary: fast, and flat enough that some nuclei outgrow the first
look of 64 tokens), against the worker's own ``sample_token``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from permamesh.verify.scoring import (
    NO_RACE, ROWS_AT_ONCE, _race_weights, _sampling_probs, seeded_race_gaps, seeded_replay,
)
from permamesh.workers.sampling import SamplingParams, generator, nucleus_rows, race_scores, sample_token

VOCAB = 5000


def _logits(rows: int, spread: float, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * spread


def _one_at_a_time(logits: torch.Tensor, temperature: float, top_p: float, seed: int) -> list[int]:
    params = SamplingParams(max_tokens=len(logits), temperature=temperature, top_p=top_p, seed=seed)
    gen = generator(seed)
    return [sample_token(row, params, gen)[0] for row in logits]


@pytest.mark.parametrize(("temperature", "top_p", "spread"), [
    (0.8, 0.9, 4.0), (1.0, 1.0, 4.0), (0.3, 0.5, 4.0), (1e-31, 1.0, 4.0), (2.0, 0.99, 0.5), (0.7, 0.95, 0.2),
])
def test_racing_every_position_at_once_replays_the_workers_draws(temperature, top_p, spread) -> None:
    rows = ROWS_AT_ONCE * 2 + 5  # several chunks, the last one short
    logits = _logits(rows, spread, seed=int(temperature * 100) + int(top_p * 10))
    worker = _one_at_a_time(logits, temperature, top_p, seed=7)
    weights = _race_weights(logits, temperature, top_p)
    assert weights is not None
    assert seeded_replay(logits, weights, worker, temperature, top_p, 7) == (True,) * rows
    if temperature > 0.1:  # (a vanishing temperature leaves the argmax: any seed replays it)
        assert sum(seeded_replay(logits, weights, worker, temperature, top_p, 8)) < rows  # another seed does not


def test_a_lost_race_is_measured_in_nats_behind_the_winner() -> None:
    """Another seed's draws lose the replay's races by log(winner's score / theirs): checked
    against the race scores themselves; tokens the nucleus leaves out lose by NO_RACE."""
    rows = 40
    logits = _logits(rows, 2.0, seed=21)
    weights = _race_weights(logits, 0.8, 0.9)
    drawn = _one_at_a_time(logits, 0.8, 0.9, seed=5)  # not the request's seed (6)
    gaps = seeded_race_gaps(logits, weights, drawn, 0.8, 0.9, 6)
    scores = race_scores(weights, generator(6)).astype(np.float64)
    assert 0 < sum(g > 0 for g in gaps) < rows
    for row, (token, gap) in enumerate(zip(drawn, gaps)):
        assert gap == pytest.approx(float(np.log(scores[row].max() / scores[row, token])), abs=1e-9)
    outside = [int(np.argmin(np.where(weights[row] > 0, np.inf, 0.0))) for row in range(rows)]  # weight 0
    assert all(g == NO_RACE for g in seeded_race_gaps(logits, weights, outside, 0.8, 0.9, 6))
    assert seeded_replay(logits, weights, drawn, 0.8, 0.9, 6) == tuple(g == 0 for g in gaps)


def test_the_batched_nucleus_is_the_workers_and_its_distribution_sums_to_one() -> None:
    logits = _logits(40, 0.3, seed=3)  # flat: nuclei of hundreds of tokens, past the first look
    weights = _race_weights(logits, 1.0, 0.9)
    kept = (weights > 0).sum(axis=1)
    assert kept.max() > 64
    for row in range(len(logits)):  # the one-row call the worker makes keeps the same tokens
        single = nucleus_rows(np.exp(logits[row:row + 1].numpy() - float(logits[row].max())), 0.9)
        assert np.array_equal(single[0], weights[row] > 0)
    probs = _sampling_probs(logits, weights)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(len(logits)), atol=1e-5)


def test_rows_without_a_finite_maximum_are_replayed_one_by_one_as_the_worker_picks() -> None:
    logits = _logits(6, 4.0, seed=5)
    logits[2, 17] = float("inf")  # the worker takes it without drawing
    logits[4] = float("nan")  # every entry impossible: the first maximum, no draw
    worker = _one_at_a_time(logits, 0.8, 0.9, seed=11)
    assert _race_weights(logits, 0.8, 0.9) is None
    assert seeded_replay(logits, None, worker, 0.8, 0.9, 11) == (True,) * 6
    greedy = _sampling_probs(logits, None)
    assert greedy[2, 17] == 1.0 and float(greedy.sum()) == 6.0
