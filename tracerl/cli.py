"""The ``tracerl`` command.

    tracerl generate [CONFIG.yaml] [key=value ...] --prompt TEXT   watch one prompt denoise in the terminal
    tracerl validate [CONFIG.yaml] [key=value ...]                 check config, model, data and rewards
    tracerl sft [CONFIG.yaml] [key=value ...]                      masked-diffusion SFT
    tracerl export CHECKPOINT OUT_DIR                              write a Hugging Face model directory
    tracerl serve-reward --reward SPEC [--host --port]             serve a reward function over HTTP

Errors are one clear paragraph and a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

from tracerl.config import Config, ConfigError


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """The optional YAML path (first argument, if it is not key=value) and the overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _config(ns: argparse.Namespace) -> Config:
    from tracerl.checks import load_config

    path, overrides = _split_config(ns.config)
    return load_config(path, overrides)


def cmd_generate(ns: argparse.Namespace) -> int:
    """Sample one response and replay its trace frame by frame: masks turn into tokens in commit order."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from tracerl.data import encode_prompt
    from tracerl.models import load_policy
    from tracerl.sampling import generate

    cfg = _config(ns)
    policy = load_policy(cfg.model)
    prompt_ids = encode_prompt(policy.tokenizer, ns.prompt, cfg.data)
    rollout = generate(policy, [prompt_ids], cfg.sampling, seed=cfg.seed)
    ids, steps = rollout.response_ids[0].tolist(), rollout.step_map[0].tolist()
    last = max(steps) if max(steps) >= 0 else 0
    tok = policy.tokenizer
    console = Console()

    def frame(step: int) -> Text:
        text = Text(ns.prompt, style="bold")
        for token, at in zip(ids, steps, strict=True):
            if at < 0:
                break
            if at <= step:
                piece = tok.decode([token], skip_special_tokens=True) if token != policy.eos_id else "⏎"
                text.append(piece, style="green" if at == step else "dim" if token == policy.eos_id else "")
            else:
                text.append("░", style="dim")
        return text

    if ns.no_animate:
        console.print(frame(last))
    else:
        with Live(frame(-1), console=console, refresh_per_second=30) as live:
            for step in range(last + 1):
                time.sleep(ns.delay)
                live.update(frame(step))
        console.print()
    nfe = last + 1
    console.print(
        f"[dim]{sum(s >= 0 for s in steps)} tokens in {nfe} denoising steps · "
        f"mean log-prob {float(rollout.rollout_logp[0][rollout.response_mask[0]].mean()):.3f}[/dim]"
    )
    return 0


def cmd_validate(ns: argparse.Namespace) -> int:
    """Resolve and check everything a run needs, without training."""
    from rich.console import Console

    from tracerl.data import PromptStream, load_examples
    from tracerl.models import load_policy
    from tracerl.sampling import check_compatible, check_positions, resolve_cache

    console = Console()
    cfg = _config(ns)
    console.print(f"config: ok (seed {cfg.seed}, run_dir {cfg.run_dir})")
    policy = load_policy(cfg.model)
    check_compatible(policy, cfg.sampling)
    params = sum(p.numel() for p in policy.model.parameters())
    layout = "block" if policy.block_size else "full"
    console.print(
        f"model: ok ({cfg.model.family}, {params / 1e6:.2f}M parameters, {layout} attention, mask id "
        f"{policy.mask_id}, cache {resolve_cache(policy, cfg.sampling)})"
    )
    ds = load_examples(cfg.data, cfg.seed, require=("prompt",))
    stream = PromptStream(ds, policy.tokenizer, cfg.data, cfg.seed)
    if stream.ids:
        check_positions(policy, max(len(ids) for ids in stream.ids), cfg.sampling)
    console.print(f"data: ok ({len(stream.ids)} prompts, {stream.dropped} dropped as longer than the limit)")
    try:
        from tracerl.reward_service import RewardService
    except ImportError:  # the reward service is optional for SFT-only setups
        return 0
    r = cfg.reward
    sandbox = dataclasses.asdict(r.sandbox)
    RewardService(reward_specs(cfg), on_error=r.on_error, timeout_s=r.timeout_s, imports=r.imports, sandbox=sandbox)
    console.print(f"rewards: ok ({', '.join(f.fn for f in r.functions)}; sandbox minimum {r.sandbox.min_isolation})")
    return 0


def reward_specs(cfg: Config) -> list:
    """The ``RewardSpec`` of every ``reward.functions`` entry."""
    from tracerl.reward_service import RewardSpec

    return [
        RewardSpec(f.fn, f.weight, f.name, dict(f.kwargs), f.completion_format, f.factory_kwargs)
        for f in cfg.reward.functions
    ]


def cmd_sft(ns: argparse.Namespace) -> int:
    from tracerl.sft import run_sft

    run_sft(_config(ns))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from tracerl.checkpoint import export_hf

    out = export_hf(ns.checkpoint, ns.out)
    print(f"exported to {out}")
    return 0


def cmd_serve_reward(ns: argparse.Namespace, rest: list[str]) -> int:
    from tracerl.reward_server import main as serve

    return serve(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracerl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "optional YAML file, then key=value overrides (e.g. sampling.temperature=0.7)"

    g = sub.add_parser("generate", help="watch one prompt denoise in the terminal")
    g.add_argument("config", nargs="*", help=config_help)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--delay", type=float, default=0.05, help="seconds per denoising step in the animation")
    g.add_argument("--no-animate", action="store_true", help="print only the final text")
    g.set_defaults(fn=cmd_generate)

    v = sub.add_parser("validate", help="check config, model, data and rewards without training")
    v.add_argument("config", nargs="*", help=config_help)
    v.set_defaults(fn=cmd_validate)

    s = sub.add_parser("sft", help="masked-diffusion supervised fine-tuning")
    s.add_argument("config", nargs="*", help=config_help)
    s.set_defaults(fn=cmd_sft)

    e = sub.add_parser("export", help="write a Hugging Face directory from a checkpoint")
    e.add_argument("checkpoint", help="a checkpoint directory (run_dir/checkpoints/step-N)")
    e.add_argument("out", help="output directory")
    e.set_defaults(fn=cmd_export)

    r = sub.add_parser("serve-reward", help="serve a reward function over HTTP (loopback by default)", add_help=False)
    r.set_defaults(fn=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if "serve-reward" in argv:  # its own argument parser
        at = argv.index("serve-reward")
        return cmd_serve_reward(argparse.Namespace(), argv[at + 1 :])
    ns = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = ns.fn
    try:
        return fn(ns)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one paragraph unless --debug
        if debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        expected = isinstance(err, ConfigError | ValueError | FileNotFoundError | KeyError | RuntimeError)
        kind = "" if expected else f"{type(err).__name__}: "
        hint = "" if expected else " (run with --debug for the traceback)"
        print(f"tracerl {ns.command}: error: {kind}{message}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
