"""Verification: does a worker serve the model it claims? (pure where possible)

The committee's validators send challenges that look like user traffic, score each answer
against the registered (reference) model, and fold the scores into a reputation that routing
and payment read. ``docs/verification.md`` states the rules and their calibration. Modules:

- :mod:`~permamesh.verify.textgen`: English-like user text: topics, lead-ins, raw templates
  and the composers that write a message of a given length (pure).
- :mod:`~permamesh.verify.traffic`: a seeded model of user traffic, ``user_requests``:
  conversations, parameters, arrivals (pure).
- :mod:`~permamesh.verify.profile`: :class:`~permamesh.verify.profile.TrafficProfile`, what a
  worker can observe of traffic, learned from requests and sampled for challenges (pure).
- :mod:`~permamesh.verify.challenges`: :class:`~permamesh.verify.challenges.ChallengePool`
  (consented prompts, perturbed, plus fresh ones, with traffic's parameters) (pure).
- :mod:`~permamesh.verify.consented`: consented samples: the client's
  ``sample_for_verification`` and how the pool keeps and rewords what it forwards (pure).
- :mod:`~permamesh.verify.schedule`: :class:`~permamesh.verify.schedule.ChallengeSchedule`
  (send times spread like arrivals) (pure).
- :mod:`~permamesh.verify.scoring`: the teacher-forced pass of the reference model over prompt +
  answer (the only module that imports torch, lazily).
- :mod:`~permamesh.verify.credit`: per-answer credit C in [0, 1] from that evidence: structure,
  log-prob agreement, greedy match or two-sided typicality, with a config per serving engine;
  PlanetServe's 1/PPL for comparison (pure).
- :mod:`~permamesh.verify.verifier`: :class:`~permamesh.verify.verifier.Verifier`, a request
  and its answer in, a credit out; ``epoch_credit`` (the minimum of an epoch's challenges).
- :mod:`~permamesh.verify.contract`: the sampling contract over many answers (argmax excess,
  two-sided typicality, seeded replay), per node across epochs (pure).
- :mod:`~permamesh.verify.observe`: :class:`~permamesh.verify.observe.WorkerView`, what a
  worker can observe of its requests as features (the indistinguishability test's, and the
  adaptive dodger's) (pure).
- :mod:`~permamesh.verify.reputation`: the fixed-point reputation rule (PlanetServe's, window
  counted correctly), trust floor with hysteresis, challenges per epoch rising for low
  reputation (pure, integer ppm: what the committee stores).
- :mod:`~permamesh.verify.zoo`: cheaters for tests and the benchmark;
  :mod:`~permamesh.verify.dodger`: the adaptive dodger (learns to spot challenges; scikit-learn).
- :mod:`~permamesh.verify.errors`: :class:`~permamesh.verify.errors.VerifyError`.

Who calls it: validators (the committee; ``committee/duties.py`` plans what they send),
``permamesh bench verify``, tests. Nothing here
opens a socket.
"""
