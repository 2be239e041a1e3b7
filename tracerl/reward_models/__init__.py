"""Learned rewards (DESIGN §19), each a reward function with TRL's contract:

- ``classifier``  SequenceClassifierReward: a sequence-classification reward model (its own tokenizer and chat
  template, batched by a token budget, eval mode, no gradients)
- ``judge``       JudgeReward: a generative judge behind an OpenAI-compatible chat endpoint (template, score
  parser, concurrency, timeouts, retries)
- ``train``       preference pairs sampled from a policy and labelled by a verifier, and a reward model trained on
  them with TRL's ``RewardTrainer`` (``tracerl train-reward-model``)

Nothing is imported here: the judge must stay importable without torch (reward workers that only run
functions never load it).
"""
