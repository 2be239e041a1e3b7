"""K rollout actors, each a policy copy with the sampler (DESIGN §11).

dims: P prompts · G samples per prompt · K actors
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray

from tracerl.workers.common import split_even, where

# K rollout actors, each a policy copy in inference mode (dtype rollout.dtype) with the sampler (DESIGN §11). A
# batch of prompts is cut into sampler batches of whole groups (the same cut for any K), handed out to the actors;
# each batch comes back as a Rollout shard through the object store, stamped with the weights version it was
# sampled with.


@ray.remote
class RolloutWorker:
    """One policy copy and the sampler; weights arrive from the learner, versioned."""

    def __init__(self, cfg: Any, index: int) -> None:
        self.cfg, self.index = cfg, index
        self.policy: Any = None
        self.version = 0  # learner updates behind the weights this copy holds
        self.weight_group: Any = None
        self.device = "cpu"

    def setup(self, weights: tuple[int, list[Any], list[Any]] | None = None) -> dict[str, Any]:
        """Load the policy copy (then ``weights`` = (version, layout, packed buckets) from
        ``LearnerWorker.packed_weights``, if given); returns what the driver needs to know about the policy and
        where this actor runs."""
        import torch

        from tracerl.models import load_policy

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        policy = load_policy(replace(self.cfg.model, dtype=self.cfg.rollout.dtype))
        if self.cfg.learner.lora.enabled:  # the base once; weight syncs replace the adapters (applied unmerged)
            from tracerl.models.lora import apply_lora

            apply_lora(policy, self.cfg.learner.lora, self.cfg.seed)
        policy.model.to(self.device).eval().requires_grad_(False)
        self.policy = policy
        if weights is not None:
            self.load_weights(weights)
        return {
            "mask_id": policy.mask_id,
            "shift": policy.shift,
            "block_size": policy.block_size,
            "family": policy.family,
            "eos_id": policy.eos_id,
            **where(),
            "parameters": sum(p.numel() for p in policy.model.parameters()),
        }

    def where(self) -> dict[str, Any]:
        return where()

    def generate(
        self,
        prompt_ids: list[list[int]],
        group: Any,
        seeds: list[int],
        sampling: Any = None,
        logp_temperature: float = 1.0,
    ) -> Any:
        """Sample one response per prompt (repeated for groups), sequence i with ``seeds[i]``, recording the
        log-probs at ``logp_temperature``; the Rollout carries this copy's version."""
        import torch

        from tracerl.sampling import generate

        with torch.inference_mode():
            s = sampling or self.cfg.sampling
            rollout = generate(self.policy, prompt_ids, s, group=group, seeds=seeds, logp_temperature=logp_temperature)
        rollout.weights_version = self.version
        return rollout

    def load_weights(self, published: tuple[int, list[Any], list[Any]]) -> int:
        """Object-store path: (version, layout, packed buckets) from ``LearnerWorker.packed_weights``; the
        weights are copied (and cast) in. Returns the bytes received."""
        from tracerl.models.lora import load_trained
        from tracerl.weight_sync import layout_bytes, unpack

        version, layout, flats = published
        load_trained(self.policy.model, unpack(layout, flats))
        self.version = int(version)
        return layout_bytes(layout)

    def load_weights_from(self, directory: str, version: int) -> int:
        """Reload the weights from a Hugging Face directory (the anchors' per-step path; benchmarks compare)."""
        from safetensors.torch import load_file

        files = sorted(Path(directory).glob("*.safetensors"))
        weights = {k: v for f in files for k, v in load_file(f).items()}
        self.policy.model.load_state_dict(weights)
        self.version = version
        return sum(t.numel() * t.element_size() for t in weights.values())

    def join_weight_group(self, addr: str, port: int, rank: int, size: int, backend: str) -> None:
        from tracerl.weight_sync import new_group

        self.weight_group = new_group(backend, addr, port, rank, size)

    def receive_weights(self, version: int, layout: list[Any]) -> int:
        """Collective path: receive the broadcast buckets and copy (cast) them in; returns the bytes received."""
        from tracerl.models.lora import load_trained
        from tracerl.weight_sync import layout_bytes, receive_state

        state = receive_state(self.weight_group, layout, self.device)
        load_trained(self.policy.model, state)
        self.version = int(version)
        return layout_bytes(layout)

    def state_dict(self) -> dict:
        """The copy's weights on CPU (tests compare sync paths with it)."""
        return {k: v.detach().cpu().clone() for k, v in self.policy.model.state_dict().items()}

    def merged_state_dict(self) -> dict:
        """The copy's weights with its adapters merged in (``learner.lora``), under the native model's names."""
        from tracerl.models.lora import merged_state_dict

        return merged_state_dict(self.policy.model)

    def offload(self) -> None:
        """Colocated on GPU: free the device for the learner while it trains."""
        if self.device == "cuda":
            import torch

            self.policy.model.to("cpu")
            torch.cuda.empty_cache()

    def onload(self) -> None:
        if self.device == "cuda":
            self.policy.model.to(self.device)


def sampler_batches(prompts: int, samples: int, batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) prompt ranges of the sampler batches of an RL step: whole groups, ``batch_size // samples`` prompts
    each (at least one), in order. The cut depends on the batch alone, never on the number of actors.

    Example:
        >>> sampler_batches(5, 4, 8)
        [(0, 2), (2, 4), (4, 5)]
    """
    per = max(1, batch_size // samples)
    return [(lo, min(lo + per, prompts)) for lo in range(0, prompts, per)]


@dataclass
class RolloutShard:
    """A pending shard: the future of its Rollout and which prompts of the batch it covers."""

    ref: ray.ObjectRef
    lo: int  # first prompt of the batch in this shard (one sampler batch of whole groups)
    hi: int  # one past its last prompt
    worker: int = 0  # index of the actor it was sent to
    args: tuple = ()  # the generate() arguments, to redo the shard on a replacement actor
    incarnation: int = 0  # which actor held slot ``worker`` when it was sent (a slot's actor is replaced on death)


class RolloutGroup:
    """K rollout actors behind one handle.

    Args:
        cfg: the run config (``model``, ``sampling``, ``rollout``).
        options: Ray options of each actor (``place(cfg, gpus).rollout``).
        weights: (version, layout, packed buckets) to start from, as ``LearnerWorker.packed_weights`` returns them
            (default: what ``cfg.model`` loads, version 0).

    Example:
        >>> group = RolloutGroup(cfg, [{"num_cpus": 1}] * 2)                     # doctest: +SKIP
        >>> seeds = seeding.batch_seeds(cfg.seed, step, len(prompt_ids), 4)     # doctest: +SKIP
        >>> shards = group.generate_async(prompt_ids, samples=4, seeds=seeds)   # doctest: +SKIP
        >>> rollout = Rollout.concat([ray.get(s.ref) for s in shards])          # doctest: +SKIP
    """

    def __init__(self, cfg: Any, options: Sequence[dict[str, Any]], weights: Any = None) -> None:
        self.cfg, self.options = cfg, list(options)
        self.workers = [RolloutWorker.options(**o).remote(cfg, k) for k, o in enumerate(options)]
        self.info = ray.get([w.setup.remote(weights) for w in self.workers])
        self.version = int(weights[0]) if isinstance(weights, tuple) else 0
        self.restarts = 0  # actors replaced after they died
        self.restart_s = 0.0  # seconds spent starting and loading the replacements
        self.incarnation = [0] * len(self.workers)  # replacements of each slot's actor
        self._layout: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.workers)

    def generate_async(
        self,
        prompt_ids: list[list[int]],
        samples: int,
        seeds: Sequence[int],
        sampling: Any = None,
        logp_temperature: float = 1.0,
    ) -> list[RolloutShard]:
        """Sample ``samples`` responses for each of P prompts; one future per sampler batch. The rollouts' log-probs
        are at ``logp_temperature`` (``config.logp_temperature``: what the learner computes).

        The P prompts are cut into sampler batches of whole groups, ``sampler_batches(P, samples, batch_size)``,
        and the batches are handed out to the K actors in contiguous runs. Sample g of prompt p draws with
        ``seeds[p * samples + g]`` (``seeding.batch_seeds``), and a batch is decoded alone, so its tokens and
        log-probs are bitwise the same whichever actor decodes it and however many there are: a run's numbers do
        not depend on K.
        """
        import torch

        s = sampling or self.cfg.sampling
        if len(seeds) != len(prompt_ids) * samples:
            raise ValueError(f"generate_async got {len(seeds)} seeds for {len(prompt_ids)} × {samples} samples")
        batches = sampler_batches(len(prompt_ids), samples, s.batch_size)
        shards = []
        for k, (first, last) in enumerate(split_even(len(batches), len(self.workers))):
            for lo, hi in batches[first:last]:
                prompts = [p for p in prompt_ids[lo:hi] for _ in range(samples)]
                group = torch.arange(lo, hi).repeat_interleave(samples)
                args = (prompts, group, list(seeds[lo * samples : hi * samples]), sampling, logp_temperature)
                ref = self.workers[k].generate.remote(*args)
                shards.append(RolloutShard(ref, lo, hi, k, args, self.incarnation[k]))
        return shards

    def redo(self, shard: RolloutShard, weights: tuple[int, ray.ObjectRef] | None) -> RolloutShard:
        """Replace the (dead) actor of ``shard`` with a fresh one holding ``weights`` = (version, the stored
        (version, layout, packed buckets)) from ``LearnerGroup.publish_weights``, or ``cfg.model`` as on disk for
        None, and send it the same work: same prompts and seeds, same samples. The other shards that were queued on
        the dead actor fail too: they go to its replacement, which is started once."""
        k = shard.worker
        if shard.incarnation == self.incarnation[k]:  # the actor it was sent to is still in the slot: replace it
            self._replace(k, weights[1] if weights is not None else None)
        ref = self.workers[k].generate.remote(*shard.args)
        return replace(shard, ref=ref, incarnation=self.incarnation[k])

    def _replace(self, k: int, published: Any) -> None:
        """A fresh actor in slot ``k`` (the old one is dead), loaded with ``published`` weights (None: from disk)."""
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):
            ray.kill(self.workers[k])
        self.workers[k] = RolloutWorker.options(**self.options[k]).remote(self.cfg, k)
        self.info[k] = ray.get(self.workers[k].setup.remote(published))
        self._layout = None  # a collective sync re-forms its group with the new member
        self.incarnation[k] += 1
        self.restarts += 1
        self.restart_s += time.perf_counter() - t0

    def load_weights(self, version: int, published: ray.ObjectRef) -> int:
        """Object-store sync: every actor loads the one stored copy; returns the bytes each received. An actor that
        died since its last task (an idle one, say) is replaced by a fresh one that loads the same copy."""
        from ray.exceptions import RayActorError

        refs = [w.load_weights.remote(published) for w in self.workers]
        received = []
        for k, ref in enumerate(refs):
            try:
                received.append(ray.get(ref))
            except RayActorError as err:
                if err.actor_id != self.workers[k]._actor_id.hex():
                    raise  # not this actor's death (the learner rank that published the weights, say)
                self._replace(k, published)
                received.append(ray.get(self.workers[k].load_weights.remote(published)))
        self.version = version
        return int(received[0])

    def sync_collective(self, learner: Any, version: int) -> int:
        """Collective sync from learner rank 0 (the group is formed on first use); returns bytes per actor."""
        if self._layout is None:
            self._layout = learner.sync_layout(self.cfg.rollout.sync_bucket_mb)
            backend = "nccl" if any(i["gpu_ids"] for i in self.info) else "gloo"
            size = len(self.workers) + 1
            host, addr, port = learner.join_weight_group(size, backend)
            joins = [w.join_weight_group.remote(addr, port, k + 1, size, backend) for k, w in enumerate(self.workers)]
            ray.get(host + joins)
        sends = learner.broadcast_weights()
        received = ray.get([w.receive_weights.remote(version, self._layout) for w in self.workers] + sends)
        self.version = version
        return int(received[0])

    def forget_weight_group(self) -> None:
        """The learner group was rebuilt: the next collective sync forms a new weight-sync group with it."""
        self._layout = None

    def state_dicts(self) -> list[dict]:
        return ray.get([w.state_dict.remote() for w in self.workers])

    def merged_state_dicts(self) -> list[dict]:
        return ray.get([w.merged_state_dict.remote() for w in self.workers])

    def offload(self) -> None:
        ray.get([w.offload.remote() for w in self.workers])

    def onload(self) -> None:
        ray.get([w.onload.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w)
        self.workers = []
